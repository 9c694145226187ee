//! The store's schema as data: which tables exist, at which version, and the
//! migrations that bring an older table up to date. The daemon's tables
//! are `Schema::production` (`crate::tables`); tests build their own
//! schemas to exercise every path of the migration machinery.

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
