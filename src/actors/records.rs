//! What the wire may know of the store, and no more: its failures as the
//! domains report them (`StoreFailure`), the records it keeps in
//! quarantine because they do not decode (`QuarantinedRecord`), and
//! `Records`, the service the `daemon.*` methods ask for counts,
//! quarantine and backups. The store's own types stay behind the actors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::actors::store::{CountRecords, Quarantined, StoreActor, TakeSnapshot};
use crate::error_chain;
use crate::store::backup::BackupError;
use crate::store::{StoreError, StoreHealth, Undecodable};

/// What a store failure means to the client that hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A write lost a race with another (try again).
    Conflict,
    /// The store cannot write, or does not answer, for now.
    Unavailable,
    /// A backup the client cancelled.
    Cancelled,
    /// A backup's target exists already.
    Exists,
    /// Anything else: the store or its file is broken.
    Internal,
}

/// A store failure, its whole chain of causes written out.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl From<MailboxError> for StoreFailure {
    /// The store's actor did not take the message (as the wire says of
    /// any actor that does not).
    fn from(_: MailboxError) -> StoreFailure {
        StoreFailure {
            kind: FailureKind::Unavailable,
            message: "the daemon is shutting down or overloaded; retry".into(),
        }
    }
}

impl From<StoreError> for StoreFailure {
    fn from(e: StoreError) -> StoreFailure {
        let kind = match e {
            StoreError::Conflict { .. } => FailureKind::Conflict,
            StoreError::Unwritable(_) => FailureKind::Unavailable,
            _ => FailureKind::Internal,
        };
        StoreFailure {
            kind,
            message: error_chain(&e),
        }
    }
}

impl From<BackupError> for StoreFailure {
    fn from(e: BackupError) -> StoreFailure {
        let kind = match e {
            BackupError::Store(e) => return e.into(),
            BackupError::Io { .. } => FailureKind::Internal,
            BackupError::Cancelled => FailureKind::Cancelled,
            BackupError::Exists(_) => FailureKind::Exists,
            BackupError::InProgress(_) => FailureKind::Conflict,
        };
        StoreFailure {
            kind,
            message: error_chain(&e),
        }
    }
}

/// A record that does not decode, left alone (with what it owns) until it
/// is forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedRecord {
    pub table: String,
    pub key: String,
    pub reason: String,
}

impl From<Undecodable> for QuarantinedRecord {
    fn from(bad: Undecodable) -> QuarantinedRecord {
        QuarantinedRecord {
            table: bad.table,
            key: bad.key,
            reason: bad.reason,
        }
    }
}

/// A finished backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupWritten {
    pub records: u64,
    pub bytes: u64,
}

/// The daemon's records as `daemon.*` asks about them.
pub struct Records {
    store: Addr<StoreActor>,
    health: watch::Receiver<StoreHealth>,
    /// The owners of quarantined records (VMs, kernels), asked in order.
    quarantines: Vec<Recipient<Quarantined>>,
}

impl Records {
    pub fn new(
        store: Addr<StoreActor>,
        health: watch::Receiver<StoreHealth>,
        quarantines: Vec<Recipient<Quarantined>>,
    ) -> Records {
        Records {
            store,
            health,
            quarantines,
        }
    }

    /// How many records each table holds; the outer error: the store's
    /// actor did not answer (a store that cannot be read answers the inner).
    pub async fn counts(
        &self,
    ) -> Result<Result<BTreeMap<String, u64>, StoreFailure>, MailboxError> {
        Ok(self
            .store
            .send(CountRecords)
            .await?
            .map_err(StoreFailure::from))
    }

    /// Why the store cannot write now, if it cannot.
    pub fn unwritable(&self) -> Option<String> {
        self.health.borrow().unwritable().map(ToString::to_string)
    }

    /// Every record in quarantine, of every owner.
    pub async fn quarantined(&self) -> Result<Vec<QuarantinedRecord>, MailboxError> {
        let answers =
            futures_util::future::join_all(self.quarantines.iter().map(|o| o.send(Quarantined)))
                .await;
        let mut all = Vec::new();
        for answer in answers {
            let records = answer?;
            all.extend(records.into_iter().map(QuarantinedRecord::from));
        }
        Ok(all)
    }

    /// A consistent copy of the store at `target` (which must not exist),
    /// copied on a blocking thread; `progress(copied, total)` hears it go.
    pub async fn backup(
        &self,
        target: PathBuf,
        rate_limit: Option<u64>,
        cancel: CancellationToken,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<BackupWritten, StoreFailure> {
        let snapshot = self.store.send(TakeSnapshot).await??;
        let copied = tokio::task::spawn_blocking(move || {
            snapshot.write(&target, rate_limit, &cancel, progress)
        })
        .await
        .map_err(|e| StoreFailure {
            kind: FailureKind::Internal,
            message: format!("the backup thread failed: {e}"),
        })??;
        Ok(BackupWritten {
            records: copied.records,
            bytes: copied.bytes,
        })
    }
}
