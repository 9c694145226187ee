//! From a typed request to its answer: each method's handler asks the
//! actors and does no I/O of its own beyond sending progress lines.

use std::path::PathBuf;
use std::time::Instant;

use actix::Addr;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::protocol::{
    BackupParams, BackupResult, ErrorCode, HelloParams, HelloResult, METHODS, MethodDescription,
    MethodsResult, Notification, OperationRef, OperationResult, OperationsResult, PROTOCOL_VERSION,
    Progress, Request, RpcError, StatusResult, StoreSchemaResult, StoreStatus, WithOpId,
};
use crate::actors::operation::{
    Begin, CancelOperation, GetOperation, ListOperations, OperationRegistry, WatchOperation,
};
use crate::actors::store::{CountRecords, StoreActor, TakeSnapshot};
use crate::config::Mode;
use crate::store::records::{OperationOutcome, OperationRecord};
use crate::store::{Observed, backup};

/// Facts about the running daemon, fixed at start-up.
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    pub mode: Mode,
    pub started_at: Timestamp,
    pub started: Instant,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub store_path: PathBuf,
    /// The store's schema: fixed while the daemon runs, since migrations
    /// happen only at start-up under the state directory's lock.
    pub schema: Observed,
}

/// What request handlers reach.
pub struct Services {
    pub store: Addr<StoreActor>,
    pub operations: Addr<OperationRegistry>,
    pub info: DaemonInfo,
}

/// One request's view of its connection: where its lines go, and whether
/// the client has gone.
pub struct Reply<'a> {
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

pub async fn handle(
    services: &Services,
    request: Request,
    reply: &Reply<'_>,
) -> Result<Value, RpcError> {
    match request {
        Request::Hello(params) => with_op_id(reply, hello(services, params)?),
        Request::Status => with_op_id(reply, status(services).await?),
        Request::Methods => with_op_id(reply, methods()),
        Request::StoreSchema => with_op_id(reply, store_schema(services)),
        Request::OperationsList(params) => {
            let operations = services
                .operations
                .send(ListOperations { all: params.all })
                .await??;
            with_op_id(reply, OperationsResult { operations })
        }
        Request::OperationsGet(OperationRef { op_id }) => {
            let operation = services.operations.send(GetOperation(op_id)).await??;
            with_op_id(reply, OperationResult { operation })
        }
        Request::OperationsCancel(OperationRef { op_id }) => {
            let operation = services.operations.send(CancelOperation(op_id)).await??;
            with_op_id(reply, OperationResult { operation })
        }
        Request::OperationsWatch(OperationRef { op_id }) => {
            if let Some(status) = services
                .operations
                .send(WatchOperation(op_id.clone()))
                .await?
            {
                forward_progress(status, reply).await;
            }
            let operation = services.operations.send(GetOperation(op_id)).await??;
            with_op_id(reply, OperationResult { operation })
        }
        Request::Backup(params) => with_op_id(reply, backup(services, params, reply).await?),
    }
}

fn with_op_id<T: Serialize>(reply: &Reply<'_>, result: T) -> Result<Value, RpcError> {
    serde_json::to_value(WithOpId {
        op_id: reply.op_id.to_string(),
        result,
    })
    .map_err(|e| {
        RpcError::new(
            ErrorCode::Internal,
            format!("cannot encode the result: {e}"),
        )
    })
}

fn hello(services: &Services, params: HelloParams) -> Result<HelloResult, RpcError> {
    if params.protocol_version != PROTOCOL_VERSION {
        return Err(RpcError::new(
            ErrorCode::ProtocolMismatch,
            format!(
                "the client speaks protocol v{}, this daemon (banger {}) speaks v{PROTOCOL_VERSION}; use the banger CLI of the daemon's release",
                params.protocol_version, services.info.version
            ),
        ));
    }
    Ok(HelloResult {
        protocol_version: PROTOCOL_VERSION,
        daemon_version: services.info.version.clone(),
    })
}

async fn status(services: &Services) -> Result<StatusResult, RpcError> {
    let (records, running) = tokio::join!(
        services.store.send(CountRecords),
        services.operations.send(ListOperations { all: false })
    );
    let (records, running) = (records??, running??);
    let info = &services.info;
    Ok(StatusResult {
        version: info.version.clone(),
        protocol_version: PROTOCOL_VERSION,
        pid: info.pid,
        mode: match info.mode {
            Mode::System => "system".into(),
            Mode::User => "user".into(),
        },
        started_at: info.started_at,
        uptime_seconds: info.started.elapsed().as_secs(),
        state_dir: info.state_dir.clone(),
        socket: info.socket.clone(),
        store: StoreStatus {
            path: info.store_path.clone(),
            tables: info.schema.tables.clone(),
            applied_migrations: info.schema.applied.iter().cloned().collect(),
            records,
        },
        operations_running: running.len() as u64,
    })
}

fn methods() -> MethodsResult {
    MethodsResult {
        methods: METHODS
            .iter()
            .map(|m| MethodDescription {
                name: m.name.into(),
                summary: m.summary.into(),
            })
            .collect(),
    }
}

fn store_schema(services: &Services) -> StoreSchemaResult {
    StoreSchemaResult {
        tables: services.info.schema.tables.clone(),
        applied_migrations: services.info.schema.applied.iter().cloned().collect(),
    }
}

/// Sends the operation's status as `progress` notifications, now and at
/// every change, until it ends or the client goes away.
async fn forward_progress(mut status: watch::Receiver<OperationRecord>, reply: &Reply<'_>) {
    loop {
        let record = status.borrow_and_update().clone();
        if record.outcome == OperationOutcome::Running {
            let progress = Progress {
                id: reply.id.clone(),
                op_id: record.op_id,
                phase: record.phase.unwrap_or_default(),
                current: record.current,
                total: record.total,
            };
            if reply
                .out
                .send(line(&Notification::progress(&progress)))
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            _ = reply.closed.cancelled() => return,
        }
    }
}

async fn backup(
    services: &Services,
    params: BackupParams,
    reply: &Reply<'_>,
) -> Result<BackupResult, RpcError> {
    let operation = services
        .operations
        .send(Begin {
            method: "daemon.backup",
            target: Some(params.path.display().to_string()),
            op_id: reply.op_id.to_string(),
            cancellable: true,
        })
        .await??;
    let progress = forward_progress(operation.status(), reply);
    let report = operation.reporter();
    let cancel = operation.cancel.clone();
    let path = params.path.clone();
    let work = async move {
        let snapshot = services.store.send(TakeSnapshot).await??;
        tokio::task::spawn_blocking(move || {
            backup::write(
                snapshot,
                &path,
                params.rate_limit,
                &cancel,
                |current, total| report("copying", Some(current), Some(total)),
            )
        })
        .await
        .map_err(|e| {
            RpcError::new(
                ErrorCode::Internal,
                format!("the backup thread failed: {e}"),
            )
        })?
        .map_err(RpcError::from)
    };
    // Progress runs until the operation ends, so its last line precedes the answer.
    let (result, ()) = tokio::join!(
        async {
            let result = work.await;
            let (outcome, error) = match &result {
                Ok(_) => (OperationOutcome::Succeeded, None),
                Err(e) if e.code == ErrorCode::Cancelled => {
                    (OperationOutcome::Cancelled, Some(e.message.clone()))
                }
                Err(e) => (OperationOutcome::Failed, Some(e.message.clone())),
            };
            let finished = operation.finish(outcome, error).await;
            result.and_then(|copied| finished.map(|_| copied).map_err(RpcError::from))
        },
        progress
    );
    let copied = result?;
    Ok(BackupResult {
        path: params.path,
        records: copied.records,
        bytes: copied.bytes,
    })
}
