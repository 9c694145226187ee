//! The tables this binary ships, at the versions it writes, and the
//! migrations that bring older ones up to date. Each domain owns its
//! record type and its migrations; the store only persists them.

use crate::catalog::KernelRecord;
use crate::image::{ImageRecord, images_v2_from_v1};
use crate::operations::OperationRecord;
use crate::store::Record;
use crate::store::schema::{Migration, Schema, TableSpec};
use crate::vm::record::{VmRecord, vms_v2_from_v1};

impl Schema {
    /// The daemon's tables. `leases` and `host_keys` are created now
    /// (empty, v1) for the domains that will fill them.
    pub fn production() -> Schema {
        let v1 = |name| TableSpec { name, version: 1 };
        Schema {
            tables: vec![
                TableSpec {
                    name: VmRecord::TABLE,
                    version: 2,
                },
                TableSpec {
                    name: ImageRecord::TABLE,
                    version: 2,
                },
                v1(KernelRecord::TABLE),
                v1("networks"),
                v1("leases"),
                v1(OperationRecord::TABLE),
                v1("host_keys"),
            ],
            migrations: vec![
                Migration {
                    id: "vms-2-phase",
                    table: VmRecord::TABLE,
                    renamed_from: None,
                    from: 1,
                    to: 2,
                    transform: vms_v2_from_v1,
                },
                Migration {
                    id: "images-2-import",
                    table: ImageRecord::TABLE,
                    renamed_from: None,
                    from: 1,
                    to: 2,
                    transform: images_v2_from_v1,
                },
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

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
