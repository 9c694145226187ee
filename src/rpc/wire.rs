//! The transport as a request handler sees it: where its answer goes, its
//! op_id, its operation record and its progress notifications. Knows no
//! domain.

use std::future::Future;

use actix::Addr;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::protocol::{ErrorCode, Notification, Progress, RpcError, WithOpId};
use crate::actors::operation::{Begin, OperationHandle, OperationRegistry};
use crate::caller::{Caller, CallerFile, CallerFileError, CallerPath, SizeCap};
use crate::operations::{OperationOutcome, OperationRecord};

/// One request's view of its connection: who sent it, where its lines
/// go, and whether the client has gone.
pub struct Reply<'a> {
    pub caller: Caller,
    pub id: &'a Value,
    pub op_id: &'a str,
    pub out: &'a mpsc::Sender<Vec<u8>>,
    pub closed: &'a CancellationToken,
}

/// A line ready to write: the JSON and its newline.
pub fn line(message: &impl Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(message).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// A progress reporter for blocking work: phase, current, total.
pub type Reporter = Box<dyn Fn(&str, Option<u64>, Option<u64>) + Send>;

/// The transport as a handler sees it: its answer, its operation record,
/// its progress notifications.
pub struct Wire<'a> {
    pub reply: &'a Reply<'a>,
    pub operations: &'a Addr<OperationRegistry>,
}

impl Wire<'_> {
    /// The file a request's `field` names, opened with the caller's
    /// authority (`crate::caller`); refusals name the field and the path.
    pub async fn open_named(
        &self,
        field: &'static str,
        path: &std::path::Path,
        cap: SizeCap,
    ) -> Result<CallerFile, RpcError> {
        self.reply
            .caller
            .open_file(path, cap)
            .await
            .map_err(|e| open_error(field, e))
    }

    /// Opens `path` as the caller: a regular file of at most `cap` bytes,
    /// or a directory whose files are opened beneath it.
    pub async fn open_file_or_dir(
        &self,
        field: &'static str,
        path: &std::path::Path,
        cap: SizeCap,
    ) -> Result<CallerPath, RpcError> {
        self.reply
            .caller
            .open_file_or_dir(path, cap)
            .await
            .map_err(|e| open_error(field, e))
    }

    /// The result, with the request's `op_id` beside its fields.
    pub fn answer<T: Serialize>(&self, result: T) -> Result<Box<RawValue>, RpcError> {
        serde_json::value::to_raw_value(&WithOpId {
            op_id: self.reply.op_id.to_string(),
            result,
        })
        .map_err(|e| {
            RpcError::new(
                ErrorCode::Internal,
                format!("cannot encode the result: {e}"),
            )
        })
    }

    /// Runs `work` as a recorded operation on `target`.
    pub async fn operation<T>(
        &self,
        method: &'static str,
        target: &str,
        work: impl Future<Output = Result<T, RpcError>>,
    ) -> Result<T, RpcError> {
        let op = self
            .operations
            .send(Begin {
                method,
                target: Some(target.to_string()),
                op_id: self.reply.op_id.to_string(),
                cancellable: false,
                intent_first: false,
            })
            .await??;
        let result = work.await;
        finish(op, result).await
    }

    /// Runs `work` as a recorded operation whose progress reaches the
    /// client as notifications; the last one precedes the answer.
    /// `intent_first`: the record is durable before the work begins (it
    /// names files a killed daemon's successor must find).
    pub async fn with_progress<T, F>(
        &self,
        method: &'static str,
        target: &str,
        cancellable: bool,
        intent_first: bool,
        work: impl FnOnce(Reporter, CancellationToken) -> F,
    ) -> Result<T, RpcError>
    where
        F: Future<Output = Result<T, RpcError>>,
    {
        let begin = Begin {
            method,
            target: Some(target.to_string()),
            op_id: self.reply.op_id.to_string(),
            cancellable,
            intent_first,
        };
        let operation = self.operations.send(begin).await??;
        let progress = self.forward_progress(operation.status());
        let work = work(Box::new(operation.reporter()), operation.cancel.clone());
        let (result, ()) = tokio::join!(async { finish(operation, work.await).await }, progress);
        result
    }

    /// Sends the operation's status as `progress` notifications, now and at
    /// every change, until it ends or the client goes away.
    /// From the current phase on, a phase that began and ended between two
    /// reads is sent too (a late watcher does not hear the earlier ones).
    pub async fn forward_progress(&self, mut status: watch::Receiver<OperationRecord>) {
        let mut seen = status.borrow().phases.len();
        loop {
            let record = status.borrow_and_update().clone();
            if record.outcome == OperationOutcome::Running {
                let missed = record
                    .phases_between(seen)
                    .iter()
                    .map(|phase| (phase, None, None));
                let none = String::new();
                let current = (
                    record.phase.as_ref().unwrap_or(&none),
                    record.current,
                    record.total,
                );
                for (phase, current, total) in missed.chain(std::iter::once(current)) {
                    let progress = Progress {
                        id: self.reply.id.clone(),
                        op_id: record.op_id.clone(),
                        phase: phase.clone(),
                        current,
                        total,
                    };
                    if self
                        .reply
                        .out
                        .send(line(&Notification::progress(&progress)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                seen = record.phases.len();
            }
            tokio::select! {
                changed = status.changed() => if changed.is_err() { return },
                _ = self.reply.closed.cancelled() => return,
            }
        }
    }
}

/// Records how an operation ended; its result stays the request's answer.
async fn finish<T>(op: OperationHandle, result: Result<T, RpcError>) -> Result<T, RpcError> {
    let (outcome, error) = match &result {
        Ok(_) => (OperationOutcome::Succeeded, None),
        Err(e) if e.code == ErrorCode::Cancelled => {
            (OperationOutcome::Cancelled, Some(e.message.clone()))
        }
        Err(e) => (OperationOutcome::Failed, Some(e.message.clone())),
    };
    let finished = op.finish(outcome, error).await;
    result.and_then(|value| finished.map(|_| value).map_err(RpcError::from))
}

/// How a refused open reads on the wire.
fn open_error(field: &'static str, e: CallerFileError) -> RpcError {
    match e {
        CallerFileError::TimedOut { .. } | CallerFileError::Busy { .. } => {
            RpcError::new(ErrorCode::Unavailable, crate::error_chain(&e))
        }
        CallerFileError::Credentials { .. } => {
            RpcError::new(ErrorCode::Internal, crate::error_chain(&e))
        }
        e => RpcError::invalid_params(field, crate::error_chain(&e)),
    }
}
