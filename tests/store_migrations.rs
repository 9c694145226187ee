//! The migration machinery, driven through the same `store::open` and
//! `store::probe` the daemon uses, with schemas and migrations the tests
//! supply: a field added, a table renamed, a migration that fails halfway.

mod common;

use banger::store::Record;
use banger::store::schema::{Migration, TableSpec, unchanged};
use banger::store::{self, ProbeOutcome, Schema, StoreError};
use common::{db_path, fingerprint, state_dir};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NoteV1 {
    id: String,
    text: String,
}

impl Record for NoteV1 {
    const TABLE: &'static str = "notes";
    fn key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoteV2 {
    id: String,
    text: String,
    pinned: bool,
}

impl Record for NoteV2 {
    const TABLE: &'static str = "notes";
    fn key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Kernel {
    name: String,
}

impl Record for Kernel {
    const TABLE: &'static str = "kernels";
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CatalogKernel {
    name: String,
}

impl Record for CatalogKernel {
    const TABLE: &'static str = "kernel_catalog";
    fn key(&self) -> String {
        self.name.clone()
    }
}

fn add_pinned(mut data: serde_json::Value) -> Result<serde_json::Value, String> {
    let obj = data.as_object_mut().ok_or("record is not an object")?;
    obj.insert("pinned".into(), false.into());
    Ok(data)
}

fn poisoned(data: serde_json::Value) -> Result<serde_json::Value, String> {
    if data["text"] == "poison" {
        return Err("text is poison".into());
    }
    add_pinned(data)
}

fn v1() -> Schema {
    Schema {
        tables: vec![
            TableSpec {
                name: "notes",
                version: 1,
            },
            TableSpec {
                name: "kernels",
                version: 1,
            },
        ],
        migrations: vec![],
    }
}

fn v2(notes_transform: fn(serde_json::Value) -> Result<serde_json::Value, String>) -> Schema {
    Schema {
        tables: vec![
            TableSpec {
                name: "notes",
                version: 2,
            },
            TableSpec {
                name: "kernel_catalog",
                version: 2,
            },
        ],
        migrations: vec![
            Migration {
                id: "notes-v2-pinned",
                table: "notes",
                renamed_from: None,
                from: 1,
                to: 2,
                transform: notes_transform,
            },
            Migration {
                id: "kernels-v2-rename",
                table: "kernel_catalog",
                renamed_from: Some("kernels"),
                from: 1,
                to: 2,
                transform: unchanged,
            },
        ],
    }
}

fn seed_v1(dir: &std::path::Path, texts: &[&str]) {
    let opened = store::open(dir, v1()).expect("create v1 store");
    for (i, text) in texts.iter().enumerate() {
        opened
            .store
            .put(&NoteV1 {
                id: format!("n{i}"),
                text: text.to_string(),
            })
            .expect("put note");
    }
    opened
        .store
        .put(&Kernel {
            name: "debian-6.1".into(),
        })
        .expect("put kernel");
}

#[test]
fn an_added_field_and_a_renamed_table_migrate_in_one_go() {
    let tmp = state_dir();
    let dir = tmp.path();
    seed_v1(dir, &["a", "b", "c"]);
    let before = fingerprint(&db_path(dir));
    assert_eq!(
        store::probe(&db_path(dir), &v2(add_pinned)),
        ProbeOutcome::MigrationsNeeded(vec!["notes-v2-pinned".into(), "kernels-v2-rename".into()])
    );
    assert_eq!(
        fingerprint(&db_path(dir)),
        before,
        "the probe wrote nothing"
    );

    let opened = store::open(dir, v2(add_pinned)).expect("migrate");
    assert_eq!(opened.applied, ["notes-v2-pinned", "kernels-v2-rename"]);
    let backup = opened.backup.clone().expect("a backup");
    assert_eq!(backup.parent(), Some(dir));
    assert_eq!(fingerprint(&backup), before, "the backup is the old store");

    let mut notes: Vec<NoteV2> = opened.store.list().expect("list v2 notes").records;
    notes.sort_by(|a, b| a.id.cmp(&b.id));
    let texts: Vec<_> = notes.iter().map(|n| (n.text.as_str(), n.pinned)).collect();
    assert_eq!(texts, [("a", false), ("b", false), ("c", false)]);
    assert_eq!(
        opened
            .store
            .list::<CatalogKernel>()
            .expect("renamed table")
            .records,
        [CatalogKernel {
            name: "debian-6.1".into()
        }]
    );
    let observed = opened.store.observe().expect("observe");
    assert!(
        !observed.tables.contains_key("kernels"),
        "the old table is gone"
    );
    assert_eq!(observed.applied.len(), 2);
    drop(opened);

    assert_eq!(
        store::probe(&db_path(dir), &v2(add_pinned)),
        ProbeOutcome::Compatible
    );
    // The v1 binary now meets a newer store.
    assert!(matches!(
        store::probe(&db_path(dir), &v1()),
        ProbeOutcome::Incompatible(_)
    ));
}

#[test]
fn a_migration_failing_halfway_leaves_the_store_as_it_was() {
    let tmp = state_dir();
    let dir = tmp.path();
    seed_v1(dir, &["fine", "poison", "also fine"]);
    let before = fingerprint(&db_path(dir));

    let err = store::open(dir, v2(poisoned))
        .err()
        .expect("the migration fails");
    match &err {
        StoreError::MigrationFailed { id, key, reason } => {
            assert_eq!((id.as_str(), key.as_str()), ("notes-v2-pinned", "n1"));
            assert_eq!(reason, "text is poison");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert_eq!(
        fingerprint(&db_path(dir)),
        before,
        "the store is byte for byte unchanged"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "banger.redb")
        .collect();
    assert!(
        leftovers.is_empty(),
        "no staging or backup left: {leftovers:?}"
    );

    // Still readable by the old schema, still pending for the new one.
    let opened = store::open(dir, v1()).expect("v1 still opens");
    assert_eq!(
        opened.store.list::<NoteV1>().expect("notes").records.len(),
        3
    );
    drop(opened);
    assert!(matches!(
        store::probe(&db_path(dir), &v2(poisoned)),
        ProbeOutcome::MigrationsNeeded(_)
    ));
}

#[test]
fn an_undecodable_record_is_an_error_naming_table_and_key() {
    let tmp = state_dir();
    let dir = tmp.path();
    seed_v1(dir, &["a"]);
    let opened = store::open(dir, v1()).expect("open");
    // NoteV2 requires `pinned`, which a v1 record lacks.
    let err = opened
        .store
        .get::<NoteV2>("n0")
        .expect_err("a v1 record read as the v2 shape");
    assert!(matches!(err, StoreError::Decode { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "record \"n0\" in table notes cannot be decoded"
    );
}
