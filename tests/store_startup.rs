//! The store's start-up contract, exercised through the real `bangerd`
//! binary: creation, migration with backup, refusal of newer stores, repair
//! after a killed writer, the dry-run probe, and the state-dir lock.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use banger::store::Record;
use banger::store::lifecycle::observe_file;
use banger::store::schema::{Migration, TableSpec, unchanged};
use banger::store::{self, Schema};
use banger::vm::record::VmRecord;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn production_versions() -> Vec<(String, u32)> {
    Schema::production()
        .tables
        .iter()
        .map(|t| (t.name.to_string(), t.version))
        .collect()
}

#[test]
fn a_fresh_start_creates_every_table_and_the_probe_agrees() {
    let tmp = state_dir();
    let dir = tmp.path().join("state");

    let (code, line) = probe(&dir);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with("migrations needed: pending [create-vms-v2,"),
        "{line}"
    );
    assert!(!dir.exists(), "the probe created {}", dir.display());

    let daemon = Daemon::start(&dir);
    let observed = observe_file(&db_path(&dir)).expect("observe while running");
    let versions: Vec<(String, u32)> = observed.tables.into_iter().collect();
    let mut expected = production_versions();
    expected.sort();
    assert_eq!(versions, expected);
    assert_eq!(
        probe(&dir),
        (0, "compatible".to_string()),
        "probe beside a running daemon"
    );
    assert!(daemon.stop().success());
    assert_eq!(probe(&dir), (0, "compatible".to_string()));
}

#[test]
fn an_older_store_is_backed_up_migrated_and_keeps_its_data() {
    let tmp = state_dir();
    let dir = tmp.path();
    // A store from a release that did not have the host_keys table yet.
    let mut past = Schema::production();
    past.tables.retain(|t| t.name != "host_keys");
    {
        let opened = store::open(dir, past).expect("create the old store");
        for i in 0..5 {
            opened.store.put(&vm_record(i)).expect("put");
        }
    }
    let before = fingerprint(&db_path(dir));
    assert_eq!(
        probe(dir),
        (
            1,
            "migrations needed: pending [create-host_keys-v1]".to_string()
        )
    );

    let daemon = Daemon::start(dir);
    assert!(daemon.stop().success());

    let backups: Vec<_> = std::fs::read_dir(dir)
        .expect("list state dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("banger.redb.bak-")
        })
        .collect();
    assert_eq!(backups.len(), 1, "one backup beside the store");
    assert_eq!(
        fingerprint(&backups[0].path()),
        before,
        "the backup is the old file, unchanged"
    );
    assert_eq!(probe(dir), (0, "compatible".to_string()));

    let opened = store::open(dir, Schema::production()).expect("reopen");
    assert!(opened.applied.is_empty());
    let vms: Vec<VmRecord> = opened.store.list().expect("list").records;
    assert_eq!(vms.len(), 5, "data survive the migration");
    assert!(
        opened
            .store
            .list::<HostKey>()
            .expect("new table")
            .records
            .is_empty()
    );
}

#[test]
fn a_store_of_the_landed_format_migrates_its_images_table_to_v2() {
    let tmp = state_dir();
    let dir = tmp.path();
    // The landed release: images v1 (empty), and no images migration.
    let mut landed = Schema::production();
    for table in &mut landed.tables {
        if table.name == "images" {
            table.version = 1;
        }
    }
    landed.migrations.retain(|m| m.table != "images");
    {
        let opened = store::open(dir, landed).expect("create the landed store");
        for i in 0..3 {
            opened.store.put(&vm_record(i)).expect("put");
        }
    }
    assert_eq!(
        probe(dir),
        (
            1,
            "migrations needed: pending [images-2-import]".to_string()
        )
    );
    let daemon = Daemon::start(dir);
    assert!(daemon.stop().success());
    assert_eq!(probe(dir), (0, "compatible".to_string()));
    let observed = observe_file(&db_path(dir)).expect("observe");
    assert_eq!(observed.tables.get("images"), Some(&2));
    let opened = store::open(dir, Schema::production()).expect("reopen");
    assert!(opened.applied.is_empty());
    assert_eq!(
        opened.store.list::<VmRecord>().expect("vms").records.len(),
        3
    );
    assert!(
        opened
            .store
            .list::<banger::image::ImageRecord>()
            .expect("images")
            .records
            .is_empty()
    );
}

/// Writes a store as a newer banger would, then checks that neither the
/// daemon nor the probe touches it and both exit 2 with `expect` in their words.
fn assert_refused(future: Schema, expect: &str) {
    let tmp = state_dir();
    let dir = tmp.path();
    store::open(dir, Schema::production()).expect("create");
    store::open(dir, future).expect("write as the future binary");
    let before = fingerprint(&db_path(dir));

    let (code, stderr) = refused(dir);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(expect), "{stderr}");
    assert!(
        stderr.contains("newer"),
        "the refusal says what to do: {stderr}"
    );

    let (code, line) = probe(dir);
    assert_eq!(code, 2, "{line}");
    assert_eq!(line, format!("incompatible: {expect}"));
    assert_eq!(
        fingerprint(&db_path(dir)),
        before,
        "file bytes and mtime unchanged"
    );
}

#[test]
fn a_newer_table_version_is_refused_untouched() {
    let mut future = Schema::production();
    future.tables[0] = TableSpec {
        name: VmRecord::TABLE,
        version: 3,
    };
    future.migrations.push(Migration {
        id: "vms-v3",
        table: VmRecord::TABLE,
        renamed_from: None,
        from: 2,
        to: 3,
        transform: unchanged,
    });
    // Both the version and the id are unknown here; the id is named first.
    assert_refused(
        future,
        "applied migrations unknown to this binary: [vms-v3]",
    );
}

#[test]
fn a_newer_table_without_migrations_is_refused_untouched() {
    let mut future = Schema::production();
    future.tables.push(TableSpec {
        name: "widgets",
        version: 3,
    });
    assert_refused(
        future,
        "widgets stored v3, this binary does not know that table",
    );
}

#[test]
fn a_table_written_at_a_newer_version_is_refused_untouched() {
    let tmp = state_dir();
    let dir = tmp.path();
    let mut future = Schema::production();
    future.tables[0].version = 4;
    // Fresh: the future binary creates vms directly at v4, no migration id.
    store::open(dir, future).expect("create as the future binary");
    let before = fingerprint(&db_path(dir));
    let (code, stderr) = refused(dir);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("vms stored v4, this binary knows v2"),
        "{stderr}"
    );
    assert_eq!(
        probe(dir),
        (
            2,
            "incompatible: vms stored v4, this binary knows v2".to_string()
        )
    );
    assert_eq!(fingerprint(&db_path(dir)), before);
}

#[test]
fn a_missing_store_probes_as_pending_and_creates_nothing() {
    let tmp = state_dir();
    let (code, line) = probe(tmp.path());
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("create-host_keys-v1"), "{line}");
    assert_eq!(std::fs::read_dir(tmp.path()).expect("list").count(), 0);
}

#[test]
fn a_corrupt_store_is_reported_and_left_alone() {
    let tmp = state_dir();
    let dir = tmp.path();
    let path = db_path(dir);
    let garbage: Vec<u8> = (0..16384u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).expect("write garbage");
    let before = fingerprint(&path);

    let (code, line) = probe(dir);
    assert_eq!(code, 3, "{line}");
    assert!(line.starts_with("cannot tell: "), "{line}");
    assert!(
        line.contains(&path.display().to_string()),
        "names the file: {line}"
    );

    let (code, stderr) = refused(dir);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert_eq!(fingerprint(&path), before);
}

#[test]
fn a_truncated_store_is_reported_and_left_alone() {
    let tmp = state_dir();
    let dir = tmp.path();
    let path = db_path(dir);
    {
        let opened = store::open(dir, Schema::production()).expect("create");
        for i in 0..50 {
            opened.store.put(&vm_record(i)).expect("put");
        }
    }
    let len = std::fs::metadata(&path).expect("stat").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(len / 3).expect("truncate");
    drop(file);
    let before = fingerprint(&path);

    let (code, line) = probe(dir);
    assert_eq!(code, 3, "{line}");
    let (code, stderr) = refused(dir);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert_eq!(fingerprint(&path), before);
}

/// Child process: writes records through a plain store until killed.
#[test]
#[ignore = "child process of a_store_left_by_a_killed_writer_is_planned_on_a_copy_and_repaired"]
fn killed_writer_child() {
    let Some(dir) = child_dir() else { return };
    let opened = store::open(&dir, Schema::production()).expect("open in child");
    for i in 0..1_000_000 {
        opened.store.put(&vm_record(i)).expect("put in child");
        println!("ack {i}");
    }
}

#[test]
fn a_store_left_by_a_killed_writer_is_planned_on_a_copy_and_repaired() {
    let tmp = state_dir();
    let dir = tmp.path();
    let mut child = spawn_child("killed_writer_child", dir);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut acked = 0;
    while acked < 50 {
        let line = lines.next().expect("child output").expect("read line");
        if line.starts_with("ack ") {
            acked += 1;
        }
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("SIGKILL the writer");
    child.wait().expect("reap the writer");
    let path = db_path(dir);

    // The file really needs repair: a read-only open refuses it.
    let refused = redb::Builder::new()
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
        .open_read_only(&path)
        .err();
    assert!(
        matches!(refused, Some(redb::DatabaseError::RepairAborted)),
        "{refused:?}"
    );

    let before = fingerprint(&path);
    let (code, line) = probe(dir);
    assert!(
        code == 0 || code == 1,
        "the probe answers, not errs: {code} {line}"
    );
    assert_eq!(
        fingerprint(&path),
        before,
        "the probe repaired a copy, not the file"
    );

    let daemon = Daemon::start(dir);
    assert!(daemon.stop().success());
    assert_eq!(probe(dir), (0, "compatible".to_string()));
    let opened = store::open(dir, Schema::production()).expect("reopen");
    assert!(opened.store.list::<VmRecord>().expect("list").records.len() >= 50);
}

#[test]
fn the_probe_and_daemon_restarts_never_trip_each_other() {
    let tmp = state_dir();
    let dir = tmp.path().to_path_buf();
    assert!(Daemon::start(&dir).stop().success());

    let done = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (done, probes, dir) = (done.clone(), probes.clone(), dir.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                assert_eq!(probe(&dir), (0, "compatible".to_string()));
                probes.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    for cycle in 0..10 {
        let daemon = Daemon::start(&dir);
        let status = daemon.stop();
        assert!(status.success(), "cycle {cycle}: {status}");
    }
    done.store(true, Ordering::SeqCst);
    prober.join().expect("the prober never failed");
    assert!(probes.load(Ordering::SeqCst) > 0);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let tmp = state_dir();
    let first = Daemon::start(tmp.path());
    let (code, stderr) = refused(tmp.path());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another bangerd (pid {}) holds the lock",
            first.pid()
        )),
        "{stderr}"
    );
    assert!(first.stop().success());
}

/// A record of the (still empty) `host_keys` table.
#[derive(serde::Serialize, serde::Deserialize)]
struct HostKey {
    vm: String,
}

impl banger::store::Record for HostKey {
    const TABLE: &'static str = "host_keys";
    fn key(&self) -> String {
        self.vm.clone()
    }
}
