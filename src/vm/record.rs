//! A VM's record as the store keeps it (table `vms`): its identity, its
//! lifecycle phase, its resource ledger and its VMM process. Fields added
//! later carry `#[serde(default)]` so older records still decode; anything
//! else is a schema change with a migration (`vms_v2_from_v1`).

use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::store::Record;
use crate::vm::ledger::Resource;
use crate::vm::phase::Phase;
use crate::vm::restart::{RestartHistory, RestartPolicy};
use crate::vm::state::LastExit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    Firecracker,
    Qemu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Short immutable id used in paths, sockets and interface names.
    pub id: String,
    pub name: String,
    /// Where the VM is in its lifecycle, with its deadline (`vm::machine`).
    pub phase: Phase,
    /// The host resources the VM owns, written before each is acquired
    /// and removed after it is released (`vm::ledger`).
    pub resources: Vec<Resource>,
    pub vmm: VmmKind,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: String,
    /// The VM's own root disk (a clone of what the user gave).
    pub rootfs: PathBuf,
    pub created_at: Timestamp,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub restart_count: u32,
    #[serde(default)]
    pub restart_history: RestartHistory,
    #[serde(default)]
    pub last_exit: Option<LastExit>,
    /// The running VMM, when there is one.
    #[serde(default)]
    pub process: Option<VmmProcess>,
    /// Why the VM's last launch failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Why a re-adopted VMM counts as degraded: alive, its control socket
    /// not answering. Cleared when it answers or exits.
    #[serde(default)]
    pub degraded: Option<String>,
    /// The network the VM joins, and its address there once leased.
    #[serde(default)]
    pub network: Option<VmNetwork>,
    /// The image its root disk was cloned from.
    #[serde(default)]
    pub image: Option<VmImage>,
    /// The size its root disk was grown to at create, when asked.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// The image's command, run as the VM's main process (`--run-image-cmd`):
    /// its exit is the VM's.
    #[serde(default)]
    pub main: Option<crate::image::RunConfig>,
}

/// The image a VM came from, as it was named when the VM was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmImage {
    pub name: String,
    pub digest: String,
}

/// A VM's place on its network. Its tap and MAC follow from its id
/// (`network::tap_name`, `network::mac_of`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNetwork {
    pub network: String,
    /// Leased when the VM is created; kept until it is removed.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
}

impl VmRecord {
    /// The guest its network lets out: tap, MAC and leased address.
    pub fn guest(&self) -> Option<(String, crate::network::Guest)> {
        let network = self.network.as_ref()?;
        Some((
            network.network.clone(),
            crate::network::Guest::of(&self.id, network.address?),
        ))
    }
}

/// A VMM process as recorded before the VM is reported running: enough to
/// find it again after a daemon restart and to tell it from a recycled pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmProcess {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_time: u64,
    /// The VMM's control socket: firecracker's API, or QEMU's QMP.
    pub api_socket: PathBuf,
    /// Where the host reaches the guest agent.
    #[serde(default)]
    pub agent: Option<AgentEndpoint>,
    /// How QEMU runs the guest (Firecracker always uses KVM).
    #[serde(default)]
    pub accel: Option<Accel>,
}

/// The host end of a VM's agent channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum AgentEndpoint {
    /// A QEMU virtio-serial port's chardev socket.
    Serial { socket: PathBuf },
    /// Firecracker's hybrid vsock: a Unix socket and a `CONNECT <port>` handshake.
    Vsock { socket: PathBuf, port: u32 },
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Record for VmRecord {
    const TABLE: &'static str = "vms";
    fn key(&self) -> String {
        self.id.clone()
    }
}

/// vms v1 -> v2: the persisted `state` (and `next_restart_at`) become the
/// lifecycle phase, and the VM's resource ledger is written. A v1 VM caught starting or stopping gets a deadline in
/// the past: recovery then launches it afresh, or finishes its stop.
pub fn vms_v2_from_v1(mut data: serde_json::Value) -> Result<serde_json::Value, String> {
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

/// A VM record for unit tests: created, firecracker, one directory.
#[cfg(test)]
pub(crate) fn sample() -> VmRecord {
    VmRecord {
        id: "abcdefghij".into(),
        name: "web".into(),
        phase: Phase::Created,
        vmm: VmmKind::Firecracker,
        vcpus: 1,
        memory_mib: 128,
        kernel: "k".into(),
        rootfs: PathBuf::from("/vms/abcdefghij/rootfs.ext4"),
        created_at: Timestamp::UNIX_EPOCH,
        started_at: None,
        restart_policy: Default::default(),
        restart_count: 0,
        restart_history: Default::default(),
        last_exit: None,
        process: None,
        error: None,
        degraded: None,
        network: None,
        image: None,
        disk_bytes: None,
        main: None,
        resources: vec![Resource::VmDirectory],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_vm_states_become_phases() {
        use crate::vm::phase::Phase;
        let v1 = |state: &str, next: serde_json::Value| {
            let mut record = serde_json::to_value(sample()).expect("json");
            let obj = record.as_object_mut().expect("object");
            obj.remove("phase");
            obj.insert("state".into(), state.into());
            obj.insert("next_restart_at".into(), next);
            let migrated = vms_v2_from_v1(record).expect("migrates");
            serde_json::from_value::<crate::vm::record::VmRecord>(migrated)
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
}
