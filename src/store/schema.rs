//! The store's schema as data: which tables exist, at which version, and the
//! migrations that bring an older table up to date. The daemon uses
//! [`Schema::production`]; tests build their own schemas to exercise every
//! path of the migration machinery.

use super::records::{
    HostKeyRecord, ImageRecord, KernelRecord, LeaseRecord, NetworkRecord, OperationRecord, Record,
    VmRecord,
};

/// One table and the version of its records that this binary writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSpec {
    pub name: &'static str,
    pub version: u32,
}

/// Rewrites one record's data (the inside of its envelope) from the
/// migration's `from` version to its `to` version.
pub type Transform = fn(serde_json::Value) -> Result<serde_json::Value, String>;

/// One step in a table's history. A migration applies when the table's stored
/// version equals `from`; it rewrites every record with `transform` and
/// leaves the table at `to`. With `renamed_from`, the records are read from
/// the old table, which is then dropped.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub id: &'static str,
    pub table: &'static str,
    pub renamed_from: Option<&'static str>,
    pub from: u32,
    pub to: u32,
    pub transform: Transform,
}

/// A transform that keeps every record as it is (renames, version bumps).
pub fn unchanged(data: serde_json::Value) -> Result<serde_json::Value, String> {
    Ok(data)
}

#[derive(Debug, Clone)]
pub struct Schema {
    pub tables: Vec<TableSpec>,
    pub migrations: Vec<Migration>,
}

impl Schema {
    /// The tables this binary ships, and how older ones are brought up.
    pub fn production() -> Schema {
        let v1 = |name| TableSpec { name, version: 1 };
        Schema {
            tables: vec![
                TableSpec {
                    name: VmRecord::TABLE,
                    version: 2,
                },
                v1(ImageRecord::TABLE),
                v1(KernelRecord::TABLE),
                v1(NetworkRecord::TABLE),
                v1(LeaseRecord::TABLE),
                v1(OperationRecord::TABLE),
                v1(HostKeyRecord::TABLE),
            ],
            migrations: vec![Migration {
                id: "vms-2-phase",
                table: VmRecord::TABLE,
                renamed_from: None,
                from: 1,
                to: 2,
                transform: vm_phase_from_state,
            }],
        }
    }

    pub fn version_of(&self, table: &str) -> Option<u32> {
        self.tables
            .iter()
            .find(|t| t.name == table)
            .map(|t| t.version)
    }

    pub fn migration(&self, id: &str) -> Option<&Migration> {
        self.migrations.iter().find(|m| m.id == id)
    }
}

/// vms v1 -> v2: the persisted `state` (and `next_restart_at`) become the
/// lifecycle phase, and the VM's resource ledger is written. A v1 VM caught starting or stopping gets a deadline in
/// the past: recovery then launches it afresh, or finishes its stop.
fn vm_phase_from_state(mut data: serde_json::Value) -> Result<serde_json::Value, String> {
    use serde_json::json;
    let record = data.as_object_mut().ok_or("record is not an object")?;
    let state = record
        .remove("state")
        .and_then(|s| s.as_str().map(str::to_string))
        .ok_or("record has no state")?;
    let next_restart = record.remove("next_restart_at").filter(|v| !v.is_null());
    let past = json!("1970-01-01T00:00:00Z");
    let phase = match (state.as_str(), next_restart) {
        ("created", _) => json!({"phase": "created"}),
        ("starting", _) => {
            json!({"phase": "launching", "restart": false, "retry": false, "deadline": past})
        }
        ("running", _) => json!({"phase": "running"}),
        ("stopping", _) => {
            json!({"phase": "stopping", "intent": "stop", "killed": false, "deadline": past})
        }
        ("stopped", _) => json!({"phase": "stopped"}),
        ("crashed" | "crash-loop", Some(until)) => json!({
            "phase": "backing-off",
            "until": until,
            "crash_loop": state == "crash-loop",
        }),
        ("crashed" | "crash-loop", None) => json!({"phase": "crashed"}),
        ("failed", _) => json!({"phase": "failed"}),
        (other, _) => return Err(format!("unknown state {other:?}")),
    };
    record.insert("phase".into(), phase);
    // The ledger: the VM's directory, and its jail should it have one.
    record.insert("resources".into(), json!(["vm-directory", "jail"]));
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn v1_vm_states_become_phases() {
        use crate::vm::machine::Phase;
        let v1 = |state: &str, next: serde_json::Value| {
            let mut record = serde_json::to_value(crate::store::records::VmRecord {
                id: "abcdefghij".into(),
                name: "web".into(),
                phase: Phase::Created,
                vmm: crate::store::records::VmmKind::Qemu,
                vcpus: 1,
                memory_mib: 64,
                kernel: "k".into(),
                rootfs: "/r".into(),
                created_at: jiff::Timestamp::UNIX_EPOCH,
                started_at: None,
                restart_policy: Default::default(),
                restart_count: 0,
                restart_history: Default::default(),
                last_exit: None,
                process: None,
                error: None,
                degraded: None,
                resources: Vec::new(),
            })
            .expect("json");
            let obj = record.as_object_mut().expect("object");
            obj.remove("phase");
            obj.insert("state".into(), state.into());
            obj.insert("next_restart_at".into(), next);
            let migrated = vm_phase_from_state(record).expect("migrates");
            serde_json::from_value::<crate::store::records::VmRecord>(migrated)
                .expect("decodes as v2")
                .phase
        };
        assert_eq!(v1("running", serde_json::Value::Null), Phase::Running);
        assert_eq!(v1("crashed", serde_json::Value::Null), Phase::Crashed);
        assert!(matches!(
            v1("crash-loop", "2026-01-01T00:00:00Z".into()),
            Phase::BackingOff {
                crash_loop: true,
                ..
            }
        ));
        assert!(matches!(
            v1("starting", serde_json::Value::Null),
            Phase::Launching {
                restart: false,
                retry: false,
                ..
            }
        ));
        assert!(matches!(
            v1("stopping", serde_json::Value::Null),
            Phase::Stopping { killed: false, .. }
        ));
    }

    #[test]
    fn production_tables_and_migration_ids_are_unique() {
        let schema = Schema::production();
        let names: BTreeSet<_> = schema.tables.iter().map(|t| t.name).collect();
        assert_eq!(names.len(), schema.tables.len());
        let ids: BTreeSet<_> = schema.migrations.iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), schema.migrations.len());
        assert!(schema.migrations.iter().all(|m| m.to > m.from));
    }
}
