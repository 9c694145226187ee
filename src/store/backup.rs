//! `daemon.backup`: a consistent copy of the whole store, taken from one
//! read snapshot while the daemon keeps writing. Blocking work: the caller
//! runs it on a blocking thread. The copy is built as `<target>.partial`
//! and appears under its name only when complete, so a crash or a cancel
//! never leaves a half-made backup that looks whole.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use tokio_util::sync::CancellationToken;

use super::{META_MIGRATIONS, META_TABLES, StoreError, data_table, db_err};

/// Records between two progress reports and cancellation checks.
const REPORT_EVERY: u64 = 64;

/// A consistent read view of the whole store, usable from any thread.
pub struct Snapshot {
    pub(super) txn: redb::ReadTransaction,
    /// Keeps the store from re-opening its file under this snapshot.
    pub(super) _open: std::sync::Arc<()>,
}

impl Snapshot {
    /// Copies every table of the snapshot into a new store file at `target`.
    /// `progress(copied, total)` is called as records are copied;
    /// `rate_limit` caps the bytes copied per second.
    pub fn write(
        self,
        target: &Path,
        rate_limit: Option<u64>,
        cancel: &CancellationToken,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Copied, BackupError> {
        if target.exists() {
            return Err(BackupError::Exists(target.to_path_buf()));
        }
        let partial = partial_path(target);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => BackupError::InProgress(partial.clone()),
                _ => BackupError::Io {
                    action: "create",
                    path: partial.clone(),
                    source,
                },
            })?;
        let result = copy_into(&self, &partial, rate_limit, cancel, &mut progress)
            .and_then(|copied| publish(&partial, target).map(|()| copied));
        if result.is_err() {
            let _ = fs::remove_file(&partial);
        }
        result
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the backup was cancelled")]
    Cancelled,
    #[error("{0} already exists; choose another path")]
    Exists(PathBuf),
    #[error(
        "{0} exists: another backup to this path is in flight, or a crashed one left it (remove it)"
    )]
    InProgress(PathBuf),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `<target>.partial`: where a backup is built before it is complete.
pub fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    target.with_file_name(name)
}

fn copy_into(
    snapshot: &Snapshot,
    partial: &Path,
    rate_limit: Option<u64>,
    cancel: &CancellationToken,
    progress: &mut impl FnMut(u64, u64),
) -> Result<Copied, BackupError> {
    let tables: Vec<String> = snapshot
        .txn
        .list_tables()
        .map_err(db_err("meta_tables"))?
        .map(|h| h.name().to_string())
        .collect();
    let mut total = 0;
    for name in &tables {
        total += match name.as_str() {
            n if n == META_TABLES.name() => table_len(snapshot, META_TABLES)?,
            n if n == META_MIGRATIONS.name() => table_len(snapshot, META_MIGRATIONS)?,
            n => table_len(snapshot, data_table(n))?,
        };
    }
    let dest = Database::builder()
        .create(partial)
        .map_err(|source| StoreError::Open {
            path: partial.to_path_buf(),
            source,
        })?;
    let txn = dest.begin_write().map_err(db_err("meta_tables"))?;
    let mut pacer = Pacer::new(rate_limit, total, cancel);
    for name in &tables {
        match name.as_str() {
            n if n == META_TABLES.name() => {
                copy_table(snapshot, &txn, META_TABLES, &mut pacer, progress)?
            }
            n if n == META_MIGRATIONS.name() => {
                copy_table(snapshot, &txn, META_MIGRATIONS, &mut pacer, progress)?
            }
            n => copy_table(snapshot, &txn, data_table(n), &mut pacer, progress)?,
        }
    }
    txn.commit().map_err(db_err("meta_tables"))?;
    drop(dest);
    File::open(partial)
        .and_then(|f| f.sync_all())
        .map_err(|source| BackupError::Io {
            action: "sync",
            path: partial.to_path_buf(),
            source,
        })?;
    progress(pacer.copied.records, total);
    Ok(pacer.copied)
}

fn table_len<K: redb::Key + 'static, V: redb::Value + 'static>(
    snapshot: &Snapshot,
    def: TableDefinition<K, V>,
) -> Result<u64, StoreError> {
    let table = snapshot.txn.open_table(def).map_err(db_err(def.name()))?;
    table.len().map_err(db_err(def.name()))
}

fn copy_table<K, V>(
    snapshot: &Snapshot,
    txn: &redb::WriteTransaction,
    def: TableDefinition<K, V>,
    pacer: &mut Pacer<'_>,
    progress: &mut impl FnMut(u64, u64),
) -> Result<(), BackupError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
    for<'a> K::SelfType<'a>: std::borrow::Borrow<K::SelfType<'a>>,
    for<'a> V::SelfType<'a>: std::borrow::Borrow<V::SelfType<'a>>,
{
    let source = snapshot.txn.open_table(def).map_err(db_err(def.name()))?;
    let mut dest = txn.open_table(def).map_err(db_err(def.name()))?;
    for entry in source.iter().map_err(db_err(def.name()))? {
        let (key, value) = entry.map_err(db_err(def.name()))?;
        let bytes = (K::as_bytes(&key.value()).as_ref().len()
            + V::as_bytes(&value.value()).as_ref().len()) as u64;
        dest.insert(key.value(), value.value())
            .map_err(db_err(def.name()))?;
        pacer.record(bytes, progress)?;
    }
    Ok(())
}

/// Counts what was copied, reports progress, honours cancellation and the
/// rate limit.
struct Pacer<'c> {
    copied: Copied,
    total: u64,
    rate_limit: Option<u64>,
    started: Instant,
    cancel: &'c CancellationToken,
}

impl<'c> Pacer<'c> {
    fn new(rate_limit: Option<u64>, total: u64, cancel: &'c CancellationToken) -> Self {
        Pacer {
            copied: Copied {
                records: 0,
                bytes: 0,
            },
            total,
            rate_limit,
            started: Instant::now(),
            cancel,
        }
    }

    fn record(
        &mut self,
        bytes: u64,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), BackupError> {
        self.copied.records += 1;
        self.copied.bytes += bytes;
        if self.copied.records.is_multiple_of(REPORT_EVERY) {
            progress(self.copied.records, self.total);
        }
        if let Some(rate) = self.rate_limit {
            // Wait until the bytes copied so far fit the rate, in slices
            // short enough that a cancel is seen promptly.
            let due = Duration::from_secs_f64(self.copied.bytes as f64 / rate as f64);
            loop {
                let ahead = due.saturating_sub(self.started.elapsed());
                if ahead.is_zero() {
                    break;
                }
                if self.cancel.is_cancelled() {
                    return Err(BackupError::Cancelled);
                }
                std::thread::sleep(ahead.min(Duration::from_millis(50)));
            }
        }
        if self.cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        Ok(())
    }
}

/// Gives the finished copy its name without replacing anything there.
fn publish(partial: &Path, target: &Path) -> Result<(), BackupError> {
    fs::hard_link(partial, target).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => BackupError::Exists(target.to_path_buf()),
        _ => BackupError::Io {
            action: "create",
            path: target.to_path_buf(),
            source,
        },
    })?;
    let _ = fs::remove_file(partial);
    let dir = target.parent().unwrap_or(Path::new("/"));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| BackupError::Io {
            action: "sync",
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partial_file_sits_beside_the_target() {
        assert_eq!(
            partial_path(Path::new("/b/store.redb")),
            PathBuf::from("/b/store.redb.partial")
        );
    }
}
