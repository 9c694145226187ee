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
    /// The tables this binary ships. Every table starts at v1; the first real
    /// migration ships with the first real schema change.
    pub fn production() -> Schema {
        let v1 = |name| TableSpec { name, version: 1 };
        Schema {
            tables: vec![
                v1(VmRecord::TABLE),
                v1(ImageRecord::TABLE),
                v1(KernelRecord::TABLE),
                v1(NetworkRecord::TABLE),
                v1(LeaseRecord::TABLE),
                v1(OperationRecord::TABLE),
                v1(HostKeyRecord::TABLE),
            ],
            migrations: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

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
