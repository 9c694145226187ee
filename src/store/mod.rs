//! The store: one redb file, `<state-dir>/banger.redb`, holding every
//! record banger keeps. In the daemon only `StoreActor` calls into this
//! module; the migration probe reads files through [`lifecycle`] without
//! ever writing them.
//!
//! Layout: one table per record type (`&str` key, envelope bytes, see
//! [`codec`]), plus two meta tables: `meta_tables` (table name -> schema
//! version) and `meta_migrations` (migration id -> unix time applied).
//! Every write is its own durable commit.

pub mod backup;
mod codec;
pub mod health;
pub mod lifecycle;
pub mod lock;
pub mod plan;
pub mod records;
pub mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use crossbeam_channel::{Receiver, Sender};

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
    WriteTransaction,
};

pub use health::{StoreHealth, Unwritable};
pub use lifecycle::{Opened, ProbeOutcome, open, probe};
pub use plan::{Incompatible, Observed};
pub use records::Record;
pub use schema::Schema;

use plan::Step;

const META_TABLES: TableDefinition<&str, u32> = TableDefinition::new("meta_tables");
const META_MIGRATIONS: TableDefinition<&str, u64> = TableDefinition::new("meta_migrations");

fn data_table(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cannot read the schema versions of the store {path}")]
    Observe {
        path: PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the store {path} was written by a newer banger ({reason}); run a bangerd that knows this schema"
    )]
    Incompatible { path: PathBuf, reason: Incompatible },
    #[error("migration {id} failed on record {key:?}: {reason}; the store was left as it was")]
    MigrationFailed {
        id: String,
        key: String,
        reason: String,
    },
    #[error("store access to table {table} failed")]
    Db {
        table: String,
        #[source]
        source: redb::Error,
    },
    #[error("record {key:?} in table {table} cannot be decoded")]
    Decode {
        table: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("record {key:?} in table {table} is at v{found}, this binary reads v{expected}")]
    RecordVersion {
        table: String,
        key: String,
        found: u32,
        expected: u32,
    },
    #[error("record {key:?} in table {table} changed since it was read")]
    Conflict { table: String, key: String },
    #[error("table {0} is not part of this store's schema")]
    UnknownTable(String),
    #[error("another bangerd ({holder}) holds the lock {path}; stop it first")]
    Locked {
        path: PathBuf,
        holder: String,
        /// The holder's pid as its lock file says.
        pid: Option<i32>,
    },
    /// A write failed on I/O (a full disk): the store refuses writes at
    /// once until its recovery commits one again.
    #[error("{0}")]
    Unwritable(Unwritable),
}

impl StoreError {
    /// The I/O error underneath (its errno kept), when redb hit one;
    /// `Some(None)`: redb refuses because an earlier write failed.
    fn io(&self) -> Option<Option<io::Error>> {
        match self {
            StoreError::Db {
                source: redb::Error::Io(e),
                ..
            } => Some(Some(
                e.raw_os_error()
                    .map(io::Error::from_raw_os_error)
                    .unwrap_or_else(|| io::Error::new(e.kind(), e.to_string())),
            )),
            StoreError::Db {
                source: redb::Error::PreviousIo,
                ..
            } => Some(None),
            _ => None,
        }
    }
}

/// A table's records: those that decode, and those that do not.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing<R> {
    pub records: Vec<R>,
    pub undecodable: Vec<Undecodable>,
}

/// A record that does not decode: quarantined, never a reason to stop.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Undecodable {
    pub table: String,
    pub key: String,
    pub reason: String,
}

fn db_err<E: Into<redb::Error>>(table: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |source| StoreError::Db {
        table: table.to_string(),
        source: source.into(),
    }
}

/// An open store. Cheap reads run concurrently; writes serialise inside redb.
/// The database sits behind a lock so that recovery can re-open it after
/// an I/O error (see [`health`]); it is `None` only while that re-open runs
/// or fails.
pub struct Store {
    db: RwLock<Option<Database>>,
    schema: Schema,
    path: PathBuf,
    health: health::Health,
    /// Wakes the recovery thread; dropped with the store, which ends it.
    recover: Sender<()>,
    recoveries: Mutex<Option<Receiver<()>>>,
    /// Bumped by each re-open: a reader re-opens only the database it saw fail.
    generation: AtomicU64,
    /// Held by every live snapshot (a backup): no re-open under one.
    snapshots: Arc<()>,
}

impl Store {
    fn new(db: Database, schema: Schema, path: PathBuf) -> Store {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let (recover, recoveries) = crossbeam_channel::bounded(1);
        Store {
            db: RwLock::new(Some(db)),
            schema,
            path,
            health: health::Health::new(dir),
            recover,
            recoveries: Mutex::new(Some(recoveries)),
            generation: AtomicU64::new(0),
            snapshots: Arc::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells the subscriber each change of [`StoreHealth`].
    pub fn health(&self) -> tokio::sync::watch::Receiver<StoreHealth> {
        self.health.subscribe()
    }

    /// Starts the recovery thread (once; later calls do nothing). It holds
    /// the store only while an attempt runs, and ends with the store.
    pub fn spawn_recovery(store: &Arc<Store>) -> io::Result<()> {
        let wakeups = store
            .recoveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(wakeups) = wakeups else {
            return Ok(());
        };
        let store = Arc::downgrade(store);
        std::thread::Builder::new()
            .name("store-recovery".into())
            .spawn(move || Store::run_recovery(store, wakeups))
            .map(drop)
    }

    fn unwritable(&self) -> Option<StoreError> {
        self.health
            .current()
            .unwritable()
            .map(|down| StoreError::Unwritable(down.clone()))
    }

    /// The refusal to answer: the health's, else (a window where it was
    /// not yet marked) one made now from `cause`.
    fn refusal(&self, cause: Option<&io::Error>) -> StoreError {
        self.unwritable()
            .unwrap_or_else(|| StoreError::Unwritable(self.health.unwritable_now(cause)))
    }

    /// The open database, or why there is none (a re-open that failed).
    fn database(&self) -> Result<DbGuard<'_>, StoreError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return Err(self.refusal(None));
        }
        Ok(DbGuard(guard))
    }

    /// Runs a read. redb latches an I/O error for reads too: a read that
    /// meets one re-opens the file (reads need no space), unless someone
    /// re-opened it meanwhile, and runs again.
    fn reading<T>(
        &self,
        read: impl Fn(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let seen = {
            let db = self.database()?;
            let generation = self.generation.load(Ordering::Acquire);
            match read(db.get()) {
                Err(e) if e.io().is_some() => {
                    let _ = self.noticed(Err::<T, _>(e));
                    generation
                }
                result => return result,
            }
        };
        if let Err(e) = self.reopen(Some(seen)) {
            tracing::warn!(error = %e, "cannot re-open the store for reading");
        }
        let db = self.database()?;
        let again = read(db.get());
        self.noticed(again)
    }

    /// Runs a write, refused at once while the store is unwritable.
    fn writing<T>(
        &self,
        write: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Some(refused) = self.unwritable() {
            return Err(refused);
        }
        if let Some(e) = crate::fault::store_write() {
            return self.noticed(Err(StoreError::Db {
                table: "fault".into(),
                source: redb::Error::Io(e),
            }));
        }
        let db = self.database()?;
        let result = write(db.get());
        self.noticed(result)
    }

    /// Marks the store unwritable after an I/O error. Called with the
    /// database's read lock held, so no recovery (which takes the write
    /// lock) slips in between the failure and this.
    fn noticed<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        let Err(e) = &result else {
            return result;
        };
        let Some(io) = e.io() else {
            return result;
        };
        tracing::error!(error = %crate::error_chain(e), "a store access failed; the store refuses writes until one commits again");
        if self.health.failed(io.as_ref()) {
            let _ = self.recover.try_send(());
        }
        Err(self.refusal(io.as_ref()))
    }

    /// The recovery thread's body: each wake-up (an access that failed on
    /// I/O) re-opens the file until a write commits, then tells every
    /// subscriber. Ends when the store is dropped.
    fn run_recovery(store: std::sync::Weak<Store>, wakeups: Receiver<()>) {
        while wakeups.recv().is_ok() {
            let Some(dir) = store.upgrade().map(|s| s.health.dir().to_path_buf()) else {
                return;
            };
            let recovered = health::recover(&dir, &wakeups, || match store.upgrade() {
                Some(store) => store.recover_once(),
                None => Err(io::Error::other("the store is gone")),
            });
            if !recovered {
                return;
            }
        }
    }

    /// Re-opens the database (repairing it if redb asks) and commits one
    /// real write, which a re-open alone does not prove possible; on
    /// success the store is writable again, said before any access can
    /// see the new database.
    fn recover_once(&self) -> Result<(), io::Error> {
        let db = self.reopen_locked(None)?;
        let probed = crate::fault::store_write()
            .map_or_else(|| db.as_ref().map_or(Ok(()), probe_write), Err);
        if probed.is_ok() {
            tracing::info!(path = %self.path.display(), "the store writes again");
            self.health.recovered();
        }
        // A failed probe latched the new database: the next read re-opens.
        probed
    }

    /// Re-opens the file unless it was re-opened since `seen` (a generation).
    fn reopen(&self, seen: Option<u64>) -> Result<(), io::Error> {
        self.reopen_locked(seen).map(drop)
    }

    /// The database opened afresh (its latched error gone), still locked.
    /// Refused while a backup reads a snapshot: closing the database under
    /// it would fail the backup.
    fn reopen_locked(
        &self,
        seen: Option<u64>,
    ) -> Result<std::sync::RwLockWriteGuard<'_, Option<Database>>, io::Error> {
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        if seen.is_some_and(|seen| seen != self.generation.load(Ordering::Acquire)) {
            return Ok(db);
        }
        if Arc::strong_count(&self.snapshots) > 1 {
            return Err(io::Error::other(
                "a backup is reading the store; re-opening it after",
            ));
        }
        // The latched database first: its file lock goes with it.
        *db = None;
        self.generation.fetch_add(1, Ordering::AcqRel);
        let opened = lifecycle::builder()
            .open(&self.path)
            .map_err(|e| io::Error::other(format!("cannot re-open the store: {e}")))?;
        *db = Some(opened);
        Ok(db)
    }

    fn version_of<R: Record>(&self) -> Result<u32, StoreError> {
        self.schema
            .version_of(R::TABLE)
            .ok_or_else(|| StoreError::UnknownTable(R::TABLE.to_string()))
    }

    fn decode<R: Record>(&self, key: &str, bytes: &[u8]) -> Result<R, StoreError> {
        let expected = self.version_of::<R>()?;
        let (found, record) = codec::decode::<R>(bytes).map_err(|source| StoreError::Decode {
            table: R::TABLE.to_string(),
            key: key.to_string(),
            source,
        })?;
        if found != expected {
            return Err(StoreError::RecordVersion {
                table: R::TABLE.to_string(),
                key: key.to_string(),
                found,
                expected,
            });
        }
        Ok(record)
    }

    fn encode<R: Record>(&self, record: &R) -> Result<Vec<u8>, StoreError> {
        let version = self.version_of::<R>()?;
        codec::encode(version, record).map_err(|source| StoreError::Decode {
            table: R::TABLE.to_string(),
            key: record.key(),
            source,
        })
    }

    pub fn get<R: Record>(&self, key: &str) -> Result<Option<R>, StoreError> {
        self.reading(|db| {
            let txn = db.begin_read().map_err(db_err(R::TABLE))?;
            let table = txn
                .open_table(data_table(R::TABLE))
                .map_err(db_err(R::TABLE))?;
            let value = table.get(key).map_err(db_err(R::TABLE))?;
            value.map(|v| self.decode(key, v.value())).transpose()
        })
    }

    /// Every record of the table that decodes, and the keys of those that
    /// do not: one bad record never hides the others.
    pub fn list<R: Record>(&self) -> Result<Listing<R>, StoreError> {
        self.reading(|db| self.list_in(db))
    }

    fn list_in<R: Record>(&self, db: &Database) -> Result<Listing<R>, StoreError> {
        let txn = db.begin_read().map_err(db_err(R::TABLE))?;
        let table = txn
            .open_table(data_table(R::TABLE))
            .map_err(db_err(R::TABLE))?;
        let mut listing = Listing {
            records: Vec::new(),
            undecodable: Vec::new(),
        };
        for entry in table.iter().map_err(db_err(R::TABLE))? {
            let (key, value) = entry.map_err(db_err(R::TABLE))?;
            match self.decode(key.value(), value.value()) {
                Ok(record) => listing.records.push(record),
                Err(e) => listing.undecodable.push(Undecodable {
                    table: R::TABLE.to_string(),
                    key: key.value().to_string(),
                    reason: crate::error_chain(&e),
                }),
            }
        }
        Ok(listing)
    }

    /// Inserts or replaces the record; durable when this returns.
    pub fn put<R: Record>(&self, record: &R) -> Result<(), StoreError> {
        let bytes = self.encode(record)?;
        self.write::<R, _>(|table| {
            table
                .insert(record.key().as_str(), bytes.as_slice())
                .map(drop)
        })
    }

    /// Removes the record; returns whether it existed.
    pub fn delete<R: Record>(&self, key: &str) -> Result<bool, StoreError> {
        let mut existed = false;
        self.write::<R, _>(|table| {
            existed = table.remove(key)?.is_some();
            Ok(())
        })?;
        Ok(existed)
    }

    /// Replaces the record stored under `key` with `new` (or removes it when
    /// `new` is `None`) only if it still equals `expected` (`None`: absent).
    /// Two writers racing on one record: one wins, the other gets
    /// [`StoreError::Conflict`] and re-reads.
    pub fn compare_and_swap<R: Record + PartialEq>(
        &self,
        key: &str,
        expected: Option<&R>,
        new: Option<&R>,
    ) -> Result<(), StoreError> {
        let new_bytes = new.map(|r| self.encode(r)).transpose()?;
        self.writing(|db| self.swap_in(db, key, expected, new_bytes.as_deref()))
    }

    fn swap_in<R: Record + PartialEq>(
        &self,
        db: &Database,
        key: &str,
        expected: Option<&R>,
        new_bytes: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(db_err(R::TABLE))?;
        {
            let mut table = txn
                .open_table(data_table(R::TABLE))
                .map_err(db_err(R::TABLE))?;
            let current = table
                .get(key)
                .map_err(db_err(R::TABLE))?
                .map(|v| self.decode::<R>(key, v.value()))
                .transpose()?;
            if current.as_ref() != expected {
                return Err(StoreError::Conflict {
                    table: R::TABLE.to_string(),
                    key: key.to_string(),
                });
            }
            match new_bytes {
                Some(bytes) => table.insert(key, bytes).map(drop),
                None => table.remove(key).map(drop),
            }
            .map_err(db_err(R::TABLE))?;
        }
        txn.commit().map_err(db_err(R::TABLE))
    }

    fn write<R: Record, F>(&self, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&mut redb::Table<&'static str, &'static [u8]>) -> Result<(), redb::StorageError>,
    {
        self.writing(|db| {
            let txn = db.begin_write().map_err(db_err(R::TABLE))?;
            {
                let mut table = txn
                    .open_table(data_table(R::TABLE))
                    .map_err(db_err(R::TABLE))?;
                f(&mut table).map_err(db_err(R::TABLE))?;
            }
            txn.commit().map_err(db_err(R::TABLE))
        })
    }

    /// A consistent view of every table, for a backup.
    pub fn snapshot(&self) -> Result<backup::Snapshot, StoreError> {
        self.reading(|db| {
            let txn = db.begin_read().map_err(db_err("meta_tables"))?;
            Ok(backup::Snapshot {
                txn,
                _open: Arc::clone(&self.snapshots),
            })
        })
    }

    /// How many records each table of the schema holds.
    pub fn record_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.reading(|db| {
            let txn = db.begin_read().map_err(db_err("meta_tables"))?;
            let mut counts = BTreeMap::new();
            for spec in &self.schema.tables {
                let table = txn
                    .open_table(data_table(spec.name))
                    .map_err(db_err(spec.name))?;
                counts.insert(
                    spec.name.to_string(),
                    table.len().map_err(db_err(spec.name))?,
                );
            }
            Ok(counts)
        })
    }

    /// The table versions and applied migrations this store holds.
    pub fn observe(&self) -> Result<Observed, StoreError> {
        self.reading(|db| {
            let txn = db.begin_read().map_err(db_err("meta_tables"))?;
            observe_read(&txn)
        })
    }
}

/// The database under a read lock (never `None`: checked on taking it).
struct DbGuard<'a>(RwLockReadGuard<'a, Option<Database>>);

impl DbGuard<'_> {
    fn get(&self) -> &Database {
        self.0.as_ref().expect("checked when the guard was taken")
    }
}

/// One real commit (a meta entry written again as it is), which needs the
/// space any write needs.
fn probe_write(db: &Database) -> Result<(), io::Error> {
    let failed = |e: redb::Error| match e {
        redb::Error::Io(e) => e,
        e => io::Error::other(e.to_string()),
    };
    let txn = db.begin_write().map_err(|e| failed(e.into()))?;
    {
        let mut versions = txn.open_table(META_TABLES).map_err(|e| failed(e.into()))?;
        let first = versions
            .first()
            .map_err(|e| failed(e.into()))?
            .map(|(name, version)| (name.value().to_string(), version.value()));
        if let Some((name, version)) = first {
            versions
                .insert(name.as_str(), version)
                .map_err(|e| failed(e.into()))?;
        }
    }
    txn.commit().map_err(|e| failed(e.into()))
}

fn observe_read(txn: &redb::ReadTransaction) -> Result<Observed, StoreError> {
    let names = table_names(txn.list_tables().map_err(db_err("meta_tables"))?);
    let versions = names
        .contains(META_TABLES.name())
        .then(|| txn.open_table(META_TABLES))
        .transpose()
        .map_err(db_err(META_TABLES.name()))?;
    let applied = names
        .contains(META_MIGRATIONS.name())
        .then(|| txn.open_table(META_MIGRATIONS))
        .transpose()
        .map_err(db_err(META_MIGRATIONS.name()))?;
    collect_observed(names, versions.as_ref(), applied.as_ref())
}

fn observe_write(txn: &WriteTransaction) -> Result<Observed, StoreError> {
    let names = table_names(txn.list_tables().map_err(db_err("meta_tables"))?);
    // Opening a table in a write transaction creates it; the meta tables are
    // created whenever a plan runs anyway.
    let versions = txn
        .open_table(META_TABLES)
        .map_err(db_err(META_TABLES.name()))?;
    let applied = txn
        .open_table(META_MIGRATIONS)
        .map_err(db_err(META_MIGRATIONS.name()))?;
    collect_observed(names, Some(&versions), Some(&applied))
}

fn table_names(handles: impl Iterator<Item = redb::UntypedTableHandle>) -> BTreeSet<String> {
    handles.map(|h| h.name().to_string()).collect()
}

fn collect_observed(
    names: BTreeSet<String>,
    versions: Option<&impl ReadableTable<&'static str, u32>>,
    applied: Option<&impl ReadableTable<&'static str, u64>>,
) -> Result<Observed, StoreError> {
    let mut observed = Observed::default();
    if let Some(versions) = versions {
        for entry in versions.iter().map_err(db_err(META_TABLES.name()))? {
            let (name, version) = entry.map_err(db_err(META_TABLES.name()))?;
            observed
                .tables
                .insert(name.value().to_string(), version.value());
        }
    }
    if let Some(applied) = applied {
        for entry in applied.iter().map_err(db_err(META_MIGRATIONS.name()))? {
            let (id, _) = entry.map_err(db_err(META_MIGRATIONS.name()))?;
            observed.applied.insert(id.value().to_string());
        }
    }
    observed.unrecorded = names
        .into_iter()
        .filter(|n| {
            n != META_TABLES.name()
                && n != META_MIGRATIONS.name()
                && !observed.tables.contains_key(n)
        })
        .collect();
    Ok(observed)
}

/// Applies one planned step inside the caller's write transaction.
fn apply_step(txn: &WriteTransaction, step: &Step<'_>, applied_at: u64) -> Result<(), StoreError> {
    let mut versions = txn
        .open_table(META_TABLES)
        .map_err(db_err(META_TABLES.name()))?;
    match step {
        Step::Create { table, version } => {
            txn.open_table(data_table(table)).map_err(db_err(table))?;
            versions
                .insert(*table, *version)
                .map_err(db_err(META_TABLES.name()))?;
        }
        Step::Migrate(m) => {
            let source = m.renamed_from.unwrap_or(m.table);
            let rewritten = rewrite_records(txn, m, source)?;
            if source != m.table {
                txn.delete_table(data_table(source))
                    .map_err(db_err(source))?;
                versions
                    .remove(source)
                    .map_err(db_err(META_TABLES.name()))?;
            }
            let mut table = txn
                .open_table(data_table(m.table))
                .map_err(db_err(m.table))?;
            for (key, bytes) in &rewritten {
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(db_err(m.table))?;
            }
            versions
                .insert(m.table, m.to)
                .map_err(db_err(META_TABLES.name()))?;
            txn.open_table(META_MIGRATIONS)
                .and_then(|mut t| t.insert(m.id, applied_at).map(drop).map_err(Into::into))
                .map_err(db_err(META_MIGRATIONS.name()))?;
        }
    }
    Ok(())
}

/// Every record of `source`, rewritten by the migration's transform into an
/// envelope at the migration's target version.
fn rewrite_records(
    txn: &WriteTransaction,
    m: &schema::Migration,
    source: &str,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let failed = |key: &str, reason: String| StoreError::MigrationFailed {
        id: m.id.to_string(),
        key: key.to_string(),
        reason,
    };
    let table = txn.open_table(data_table(source)).map_err(db_err(source))?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(db_err(source))? {
        let (key, value) = entry.map_err(db_err(source))?;
        let key = key.value().to_string();
        let (version, data) = codec::decode::<serde_json::Value>(value.value())
            .map_err(|e| failed(&key, format!("undecodable record: {e}")))?;
        if version != m.from {
            return Err(failed(
                &key,
                format!("record is at v{version}, the migration reads v{}", m.from),
            ));
        }
        let data = (m.transform)(data).map_err(|reason| failed(&key, reason))?;
        let bytes = codec::encode(m.to, &data).map_err(|e| failed(&key, e.to_string()))?;
        out.push((key, bytes));
    }
    Ok(out)
}
