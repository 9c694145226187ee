//! Opening a store file at daemon start-up, and the dry-run probe.
//!
//! Nothing here writes to a store file before the plan says the binary may:
//! planning reads through a read-only open (in redb's `SingleWriter` mode, so
//! it works beside a running daemon), and a file a killed writer left
//! needing repair is planned from a repaired temporary copy. Creation and
//! migration each build a new file beside the store and rename it into
//! place, so a refusal or a failed migration leaves the original byte for
//! byte as it was, and a migrated store keeps its old inode as the backup.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use redb::{ConcurrencyMode, Database, DatabaseError, ReadableDatabase};

use super::plan::{Incompatible, Observed, Plan, plan};
use super::{Schema, Store, StoreError, apply_step, db_err, observe_read, observe_write};
use crate::error_chain;

pub const DATABASE_FILE: &str = "banger.redb";

/// redb's cache grows on demand up to this; the store is small.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

pub fn database_path(state_dir: &Path) -> PathBuf {
    state_dir.join(DATABASE_FILE)
}

/// Every open of the live store uses one concurrency mode, so read-only
/// probes share the file with the daemon.
pub(super) fn builder() -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder
        .set_concurrency_mode(ConcurrencyMode::SingleWriter)
        .set_cache_size(CACHE_BYTES);
    builder
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> StoreError + 'p {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn open_err(path: &Path) -> impl FnOnce(DatabaseError) -> StoreError + '_ {
    move |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads what a store file holds without writing to it.
pub fn observe_file(path: &Path) -> Result<Observed, StoreError> {
    let observed = match builder().open_read_only(path) {
        Ok(db) => db
            .begin_read()
            .map_err(db_err("meta_tables"))
            .and_then(|txn| observe_read(&txn)),
        // A writer was killed mid-transaction and no live writer owns the
        // file: plan from a repaired copy, never the original.
        Err(DatabaseError::RepairAborted) => observe_repaired_copy(path),
        Err(source) => return Err(open_err(path)(source)),
    };
    observed.map_err(|e| match e {
        e @ (StoreError::Open { .. } | StoreError::Io { .. }) => e,
        e => StoreError::Observe {
            path: path.to_path_buf(),
            source: Box::new(e),
        },
    })
}

fn observe_repaired_copy(path: &Path) -> Result<Observed, StoreError> {
    let dir = tempfile::Builder::new()
        .prefix("banger-probe-")
        .tempdir()
        .map_err(io_err("create a temporary directory for", path))?;
    let copy = dir.path().join(DATABASE_FILE);
    fs::copy(path, &copy).map_err(io_err("copy", path))?;
    let db = Database::builder().open(&copy).map_err(open_err(path))?;
    let txn = db.begin_read().map_err(db_err("meta_tables"))?;
    observe_read(&txn)
}

/// What the daemon did to the store file while opening it.
pub struct Opened {
    pub store: Store,
    pub created: bool,
    /// Steps applied, in order (migration ids and table creations).
    pub applied: Vec<String>,
    pub backup: Option<PathBuf>,
}

/// Opens the store under `state_dir` for the daemon: creates it when
/// missing, migrates it (after a backup) when older, refuses it when newer.
/// The caller holds the state directory's lock.
pub fn open(state_dir: &Path, schema: Schema) -> Result<Opened, StoreError> {
    let path = database_path(state_dir);
    let exists = path
        .try_exists()
        .map_err(io_err("check for the store", &path))?;
    let (applied, backup) = if exists {
        let observed = observe_file(&path)?;
        let plan = plan(&schema, &observed).map_err(|reason| StoreError::Incompatible {
            path: path.clone(),
            reason,
        })?;
        if plan.is_empty() {
            (Vec::new(), None)
        } else {
            let (applied, backup) = migrate(&path, &schema)?;
            (applied, Some(backup))
        }
    } else {
        let staging = staging_path(&path, "creating");
        let applied = build_staged(&path, &staging, &schema, false)?;
        fs::rename(&staging, &path).map_err(io_err("move into place", &staging))?;
        sync_parent(&path)?;
        (applied, None)
    };
    let db = builder().open(&path).map_err(open_err(&path))?;
    Ok(Opened {
        store: Store::new(db, schema, path),
        created: !exists,
        applied,
        backup,
    })
}

fn staging_path(path: &Path, what: &str) -> PathBuf {
    path.with_extension(format!("redb.{what}"))
}

/// Migrates a copy of the store, then swaps it in; the old file stays
/// behind, unchanged, as `banger.redb.bak-<unix-time>`.
fn migrate(path: &Path, schema: &Schema) -> Result<(Vec<String>, PathBuf), StoreError> {
    let staging = staging_path(path, "migrating");
    let applied = build_staged(path, &staging, schema, true)?;
    let backup = backup_path(path);
    if let Err(e) = fs::hard_link(path, &backup) {
        let _ = fs::remove_file(&staging);
        return Err(io_err("back up", path)(e));
    }
    fs::rename(&staging, path).map_err(io_err("move into place", &staging))?;
    sync_parent(path)?;
    Ok((applied, backup))
}

fn backup_path(path: &Path) -> PathBuf {
    let now = jiff::Timestamp::now().as_second();
    let mut candidate = path.with_extension(format!("redb.bak-{now}"));
    let mut n = 1;
    while candidate.exists() {
        candidate = path.with_extension(format!("redb.bak-{now}-{n}"));
        n += 1;
    }
    candidate
}

/// Builds the planned store at `staging` (from a copy of `path` when
/// `from_existing`), applying every step in one write transaction. On any
/// error the staging file is removed and `path` was never written.
fn build_staged(
    path: &Path,
    staging: &Path,
    schema: &Schema,
    from_existing: bool,
) -> Result<Vec<String>, StoreError> {
    let result = (|| {
        // A staging file left by a daemon that died mid-build is garbage.
        match fs::remove_file(staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove the stale", staging)(e));
            }
            _ => {}
        }
        if from_existing {
            fs::copy(path, staging).map_err(io_err("copy", path))?;
        } else {
            // redb initialises an empty file; creating it first sets the mode.
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(staging)
                .map_err(io_err("create", staging))?;
        }
        let db = Database::builder()
            .create(staging)
            .map_err(open_err(staging))?;
        let txn = db.begin_write().map_err(db_err("meta_tables"))?;
        let observed = observe_write(&txn)?;
        let plan: Plan<'_> =
            plan(schema, &observed).map_err(|reason| StoreError::Incompatible {
                path: path.to_path_buf(),
                reason,
            })?;
        let applied_at = u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0);
        for step in &plan.steps {
            apply_step(&txn, step, applied_at)?;
        }
        txn.commit().map_err(db_err("meta_tables"))?;
        drop(db);
        File::open(staging)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", staging))?;
        Ok(plan.step_ids())
    })();
    if result.is_err() {
        let _ = fs::remove_file(staging);
    }
    result
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

/// The answer of `bangerd --check-migrations`; the exit code is the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Compatible,
    MigrationsNeeded(Vec<String>),
    Incompatible(Incompatible),
    CannotTell(String),
}

impl ProbeOutcome {
    pub fn from_plan(plan: Result<Plan<'_>, Incompatible>) -> ProbeOutcome {
        match plan {
            Ok(plan) if plan.is_empty() => ProbeOutcome::Compatible,
            Ok(plan) => ProbeOutcome::MigrationsNeeded(plan.step_ids()),
            Err(reason) => ProbeOutcome::Incompatible(reason),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            ProbeOutcome::Compatible => 0,
            ProbeOutcome::MigrationsNeeded(_) => 1,
            ProbeOutcome::Incompatible(_) => 2,
            ProbeOutcome::CannotTell(_) => 3,
        }
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Compatible => f.write_str("compatible"),
            ProbeOutcome::MigrationsNeeded(ids) => {
                write!(f, "migrations needed: pending [{}]", ids.join(", "))
            }
            ProbeOutcome::Incompatible(reason) => write!(f, "incompatible: {reason}"),
            ProbeOutcome::CannotTell(reason) => write!(f, "cannot tell: {reason}"),
        }
    }
}

/// The dry-run migration probe. Never writes to `path` or creates anything
/// beside it; safe while a daemon runs or starts.
pub fn probe(path: &Path, schema: &Schema) -> ProbeOutcome {
    let observed = match path.try_exists() {
        Ok(false) => Observed::default(),
        Ok(true) => match observe_file(path) {
            Ok(observed) => observed,
            Err(e) => return ProbeOutcome::CannotTell(error_chain(&e)),
        },
        Err(e) => {
            return ProbeOutcome::CannotTell(format!("cannot check {}: {e}", path.display()));
        }
    };
    ProbeOutcome::from_plan(plan(schema, &observed))
}
