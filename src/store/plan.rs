//! Start-up planning: from what a store file holds (its observed table
//! versions and applied migration ids) to the steps that bring it to the
//! schema this binary knows, or the reason this binary must not touch it.
//! One pure function serves the daemon, the offline probe and the online
//! probe.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::schema::{Migration, Schema};

/// What a store file holds, read from its meta tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Table name to stored schema version, as the meta table records them.
    pub tables: BTreeMap<String, u32>,
    /// Ids of every migration applied to the file.
    pub applied: BTreeSet<String>,
    /// Tables present in the file that the meta table does not record: the
    /// file was not written by banger, or by a banger that lost track.
    pub unrecorded: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy)]
pub enum Step<'s> {
    /// The table does not exist yet: create it empty at its current version.
    Create {
        table: &'static str,
        version: u32,
    },
    Migrate(&'s Migration),
}

impl fmt::Display for Step<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Create { table, version } => write!(f, "create-{table}-v{version}"),
            Step::Migrate(m) => f.write_str(m.id),
        }
    }
}

/// The steps, in order, that bring a file to the binary's schema. Empty means
/// the file is compatible as it is.
#[derive(Debug, Clone, Default)]
pub struct Plan<'s> {
    pub steps: Vec<Step<'s>>,
}

impl Plan<'_> {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn step_ids(&self) -> Vec<String> {
        self.steps.iter().map(Step::to_string).collect()
    }
}

/// Why this binary must not open a store file. Each message names the table
/// and both versions, so the operator knows which binary the file needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    #[error("{table} stored v{stored}, this binary knows v{known}")]
    NewerTable {
        table: String,
        stored: u32,
        known: u32,
    },
    #[error("{table} stored v{stored}, this binary does not know that table")]
    UnknownTable { table: String, stored: u32 },
    #[error("applied migrations unknown to this binary: [{}]", .0.join(", "))]
    UnknownMigrations(Vec<String>),
    #[error(
        "{table} stored v{stored}, this binary knows v{known} but has no migration from v{stored}"
    )]
    NoMigrationPath {
        table: String,
        stored: u32,
        known: u32,
    },
    #[error("tables [{}] are not recorded in the meta table: not a banger store", .0.join(", "))]
    UnrecordedTables(Vec<String>),
}

pub fn plan<'s>(schema: &'s Schema, observed: &Observed) -> Result<Plan<'s>, Incompatible> {
    if !observed.unrecorded.is_empty() {
        return Err(Incompatible::UnrecordedTables(
            observed.unrecorded.iter().cloned().collect(),
        ));
    }
    let unknown: Vec<String> = observed
        .applied
        .iter()
        .filter(|id| schema.migration(id).is_none())
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(Incompatible::UnknownMigrations(unknown));
    }

    let mut steps = Vec::new();
    let mut accounted: BTreeSet<&str> = BTreeSet::new();
    for spec in &schema.tables {
        let Some((source, stored)) = stored_location(schema, observed, spec.name) else {
            steps.push(Step::Create {
                table: spec.name,
                version: spec.version,
            });
            continue;
        };
        accounted.insert(source);
        if stored > spec.version {
            return Err(Incompatible::NewerTable {
                table: source.to_string(),
                stored,
                known: spec.version,
            });
        }
        let (mut at, mut under) = (stored, source);
        while at < spec.version || under != spec.name {
            let next = schema.migrations.iter().find(|m| {
                m.table == spec.name
                    && m.from == at
                    && m.to > at
                    && m.renamed_from.unwrap_or(m.table) == under
            });
            let Some(next) = next else {
                return Err(Incompatible::NoMigrationPath {
                    table: source.to_string(),
                    stored,
                    known: spec.version,
                });
            };
            steps.push(Step::Migrate(next));
            (at, under) = (next.to, spec.name);
        }
    }
    if let Some((table, stored)) = observed
        .tables
        .iter()
        .find(|(name, _)| !accounted.contains(name.as_str()))
    {
        return Err(Incompatible::UnknownTable {
            table: table.clone(),
            stored: *stored,
        });
    }
    Ok(Plan { steps })
}

/// Where a table's records live in the file and at which version: under its
/// own name, or under an old name that one of its migrations renames from.
fn stored_location<'s>(
    schema: &'s Schema,
    observed: &Observed,
    table: &'s str,
) -> Option<(&'s str, u32)> {
    if let Some(version) = observed.tables.get(table) {
        return Some((table, *version));
    }
    schema
        .migrations
        .iter()
        .filter(|m| m.table == table)
        .find_map(|m| {
            let old = m.renamed_from?;
            observed.tables.get(old).map(|version| (old, *version))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::{TableSpec, unchanged};

    fn schema(tables: &[(&'static str, u32)], migrations: Vec<Migration>) -> Schema {
        Schema {
            tables: tables
                .iter()
                .map(|&(name, version)| TableSpec { name, version })
                .collect(),
            migrations,
        }
    }

    fn migration(id: &'static str, table: &'static str, from: u32, to: u32) -> Migration {
        Migration {
            id,
            table,
            renamed_from: None,
            from,
            to,
            transform: unchanged,
        }
    }

    fn observed(tables: &[(&str, u32)], applied: &[&str]) -> Observed {
        Observed {
            tables: tables.iter().map(|&(n, v)| (n.to_string(), v)).collect(),
            applied: applied.iter().map(|s| s.to_string()).collect(),
            unrecorded: BTreeSet::new(),
        }
    }

    #[test]
    fn an_empty_file_creates_every_table() {
        let s = schema(&[("vms", 2), ("images", 1)], vec![]);
        let plan = plan(&s, &Observed::default()).expect("plan");
        assert_eq!(plan.step_ids(), ["create-vms-v2", "create-images-v1"]);
    }

    #[test]
    fn equal_versions_need_nothing() {
        let s = schema(&[("vms", 2)], vec![migration("vms-2", "vms", 1, 2)]);
        let plan = plan(&s, &observed(&[("vms", 2)], &["vms-2"])).expect("plan");
        assert!(plan.is_empty());
    }

    #[test]
    fn older_versions_chain_migrations_in_order() {
        let s = schema(
            &[("vms", 3)],
            vec![
                migration("vms-3", "vms", 2, 3),
                migration("vms-2", "vms", 1, 2),
            ],
        );
        let plan = plan(&s, &observed(&[("vms", 1)], &[])).expect("plan");
        assert_eq!(plan.step_ids(), ["vms-2", "vms-3"]);
    }

    #[test]
    fn a_newer_table_is_incompatible() {
        let s = schema(&[("vms", 1)], vec![]);
        let err = plan(&s, &observed(&[("vms", 4)], &[])).expect_err("newer");
        assert_eq!(err.to_string(), "vms stored v4, this binary knows v1");
    }

    #[test]
    fn an_unknown_migration_id_is_incompatible() {
        let s = schema(&[("vms", 1)], vec![]);
        let err = plan(&s, &observed(&[("vms", 1)], &["from-the-future"])).expect_err("unknown");
        assert_eq!(
            err,
            Incompatible::UnknownMigrations(vec!["from-the-future".into()])
        );
    }

    #[test]
    fn a_rename_reads_the_old_table() {
        let rename = Migration {
            renamed_from: Some("kernels"),
            ..migration("rename-kernels", "kernel_catalog", 1, 2)
        };
        let s = schema(&[("kernel_catalog", 2)], vec![rename]);
        let plan = plan(&s, &observed(&[("kernels", 1)], &[])).expect("plan");
        assert_eq!(plan.step_ids(), ["rename-kernels"]);
    }

    #[test]
    fn a_table_the_binary_does_not_know_is_incompatible() {
        let s = schema(&[("vms", 1)], vec![]);
        let err = plan(&s, &observed(&[("vms", 1), ("widgets", 3)], &[])).expect_err("unknown");
        assert_eq!(
            err,
            Incompatible::UnknownTable {
                table: "widgets".into(),
                stored: 3
            }
        );
    }

    #[test]
    fn a_gap_in_the_migration_chain_is_incompatible() {
        let s = schema(&[("vms", 3)], vec![migration("vms-3", "vms", 2, 3)]);
        let err = plan(&s, &observed(&[("vms", 1)], &[])).expect_err("gap");
        assert!(matches!(
            err,
            Incompatible::NoMigrationPath {
                stored: 1,
                known: 3,
                ..
            }
        ));
    }

    #[test]
    fn unrecorded_tables_mean_a_foreign_file() {
        let s = schema(&[("vms", 1)], vec![]);
        let mut obs = Observed::default();
        obs.unrecorded.insert("stuff".into());
        assert!(matches!(
            plan(&s, &obs),
            Err(Incompatible::UnrecordedTables(_))
        ));
    }

    #[test]
    fn a_missing_table_is_created_beside_migrations() {
        let s = schema(
            &[("vms", 2), ("leases", 1)],
            vec![migration("vms-2", "vms", 1, 2)],
        );
        let plan = plan(&s, &observed(&[("vms", 1)], &[])).expect("plan");
        assert_eq!(plan.step_ids(), ["vms-2", "create-leases-v1"]);
    }
}
