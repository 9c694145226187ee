//! The operations registry and one `Operation` actor per state-changing
//! request.
//!
//! Ownership: an `Operation` owns its record while it runs: it writes the
//! intent record first thing (before it handles anything else, so its end
//! record always follows), publishes every change on a `watch` channel
//! (watchers and the request's own progress notifications read it) and
//! persists the record when it ends. Work that leaves files behind starts
//! only once the intent is durable; other work starts alongside the write,
//! and every answer waits for it. The registry owns the table of running
//! operations, answers list/get/cancel, and tells shutdown when nothing is
//! left in flight. Finished operations live only in the store.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use jiff::Timestamp;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::actors::records::StoreFailure;
use crate::actors::store::{Delete, Get, List, Put, StoreActor};
use crate::operations::{self, Retention};
use crate::operations::{OperationOutcome, OperationRecord};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error("no operation {0}; `banger ops ls --all` lists them")]
    NotFound(String),
    #[error("operation {op_id} already ended ({outcome:?})")]
    Finished {
        op_id: String,
        outcome: OperationOutcome,
    },
    #[error("operation {op_id} ({method}) cannot be cancelled")]
    NotCancellable { op_id: String, method: String },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
    #[error(transparent)]
    Store(StoreFailure),
}

impl From<StoreError> for OperationError {
    fn from(e: StoreError) -> OperationError {
        OperationError::Store(e.into())
    }
}

fn store_gone(_: MailboxError) -> OperationError {
    OperationError::Unavailable("store")
}

struct Running {
    status: watch::Receiver<OperationRecord>,
    cancel: CancellationToken,
}

pub struct OperationRegistry {
    store: Addr<StoreActor>,
    retention: Retention,
    running: HashMap<String, Running>,
    drain_waiters: Vec<oneshot::Sender<()>>,
    shutting_down: bool,
}

impl OperationRegistry {
    pub fn new(store: Addr<StoreActor>, retention: Retention) -> Self {
        OperationRegistry {
            store,
            retention,
            running: HashMap::new(),
            drain_waiters: Vec::new(),
            shutting_down: false,
        }
    }

    fn notify_if_drained(&mut self) {
        if self.running.is_empty() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

/// How often finished operations past the retention rule are deleted (also
/// once at start-up); pruning after every operation would cost each one a
/// scan of the whole table.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Actor for OperationRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(PRUNE_EVERY, |registry, ctx| {
            let (store, retention) = (registry.store.clone(), registry.retention);
            ctx.spawn(
                async move {
                    if let Err(e) = prune(&store, retention).await {
                        warn!(error = %e, "cannot prune finished operations");
                    }
                }
                .into_actor(registry),
            );
        });
    }
}

impl Supervised for OperationRegistry {
    /// Running operations persist their own end, so forgetting them here
    /// loses no record; they are listed from the store again once finished.
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!(
            running = self.running.len(),
            "operation registry restarting"
        );
        self.running.clear();
        self.notify_if_drained();
    }
}

/// Handed to the code doing an operation's work.
pub struct OperationHandle {
    pub op_id: String,
    pub cancel: CancellationToken,
    addr: Addr<Operation>,
    status: watch::Receiver<OperationRecord>,
}

impl OperationHandle {
    /// A cheap, cloneable progress reporter, usable from blocking threads.
    /// Counts are best-effort (a full mailbox drops one, the next wins);
    /// a change of phase is always delivered, and phases are few.
    pub fn reporter(&self) -> impl Fn(&str, Option<u64>, Option<u64>) + Send + Clone + 'static {
        let addr = self.addr.clone();
        let last_phase = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        move |phase, current, total| {
            let report = Report {
                phase: phase.to_string(),
                current,
                total,
            };
            let changed = match last_phase.lock() {
                Ok(mut last) if *last != phase => {
                    *last = phase.to_string();
                    true
                }
                Ok(_) => false,
                Err(_) => true,
            };
            if changed {
                addr.do_send(report);
            } else {
                let _ = addr.try_send(report);
            }
        }
    }

    pub fn status(&self) -> watch::Receiver<OperationRecord> {
        self.status.clone()
    }

    /// Records the outcome durably and ends the operation.
    pub async fn finish(
        self,
        outcome: OperationOutcome,
        error: Option<String>,
    ) -> Result<OperationRecord, OperationError> {
        self.addr
            .send(Finish { outcome, error })
            .await
            .map_err(|_| OperationError::Unavailable("operation"))?
    }
}

/// Starts an operation: its intent record is durable before this answers.
pub struct Begin {
    pub method: &'static str,
    pub target: Option<String>,
    pub op_id: String,
    pub cancellable: bool,
    /// Answer only once the intent record is durable: for work that leaves
    /// files behind which only the record lets a later start clean up. Other
    /// operations write it alongside their work; their end record, and so
    /// their answer, still waits for it.
    pub intent_first: bool,
}

impl Message for Begin {
    type Result = Result<OperationHandle, OperationError>;
}

impl Handler<Begin> for OperationRegistry {
    type Result = ResponseActFuture<Self, Result<OperationHandle, OperationError>>;

    fn handle(&mut self, msg: Begin, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Box::pin(fut::ready(Err(OperationError::ShuttingDown)));
        }
        let record = OperationRecord {
            op_id: msg.op_id,
            method: msg.method.to_string(),
            target: msg.target,
            outcome: OperationOutcome::Running,
            phase: Some("starting".into()),
            phases: vec!["starting".into()],
            current: None,
            total: None,
            cancellable: msg.cancellable,
            started_at: Timestamp::now(),
            finished_at: None,
            error: None,
        };
        let (written, intent) = oneshot::channel();
        let (status_tx, status) = watch::channel(record.clone());
        let cancel = CancellationToken::new();
        let op_id = record.op_id.clone();
        info!(op_id = %op_id, method = %record.method, target = ?record.target, "operation started");
        let addr = Operation {
            record,
            store: self.store.clone(),
            registry: ctx.address(),
            status: status_tx,
            intent_written: Some(written),
        }
        .start();
        self.running.insert(
            op_id.clone(),
            Running {
                status: status.clone(),
                cancel: cancel.clone(),
            },
        );
        let handle = OperationHandle {
            op_id,
            cancel,
            addr,
            status,
        };
        if !msg.intent_first {
            return Box::pin(fut::ready(Ok(handle)));
        }
        let op_id = handle.op_id.clone();
        Box::pin(
            async move {
                match intent.await {
                    Ok(Ok(())) => Ok(handle),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(OperationError::Unavailable("operation")),
                }
            }
            .into_actor(self)
            .map(move |result, registry, _| {
                if result.is_err() {
                    // The work never starts; dropping the handle stops the
                    // operation's actor.
                    registry.running.remove(&op_id);
                    registry.notify_if_drained();
                }
                result
            }),
        )
    }
}

/// One operation by id: from memory while it runs, else from the store.
pub struct GetOperation(pub String);

impl Message for GetOperation {
    type Result = Result<OperationRecord, OperationError>;
}

impl Handler<GetOperation> for OperationRegistry {
    type Result = ResponseFuture<Result<OperationRecord, OperationError>>;

    fn handle(&mut self, msg: GetOperation, _: &mut Context<Self>) -> Self::Result {
        if let Some(running) = self.running.get(&msg.0) {
            let record = running.status.borrow().clone();
            return Box::pin(async move { Ok(record) });
        }
        let store = self.store.clone();
        Box::pin(async move {
            store
                .send(Get::<OperationRecord>::new(msg.0.clone()))
                .await
                .map_err(store_gone)??
                .ok_or(OperationError::NotFound(msg.0))
        })
    }
}

/// Operations in flight, or all recorded ones, oldest first.
pub struct ListOperations {
    pub all: bool,
}

impl Message for ListOperations {
    type Result = Result<Vec<OperationRecord>, OperationError>;
}

impl Handler<ListOperations> for OperationRegistry {
    type Result = ResponseFuture<Result<Vec<OperationRecord>, OperationError>>;

    fn handle(&mut self, msg: ListOperations, _: &mut Context<Self>) -> Self::Result {
        let mut running: HashMap<String, OperationRecord> = self
            .running
            .iter()
            .map(|(id, r)| (id.clone(), r.status.borrow().clone()))
            .collect();
        let store = self.store.clone();
        Box::pin(async move {
            let mut records = if msg.all {
                let stored = store
                    .send(List::<OperationRecord>::new())
                    .await
                    .map_err(store_gone)??
                    .records;
                // A running operation's live record replaces its intent record.
                let mut merged: Vec<OperationRecord> = stored
                    .into_iter()
                    .map(|r| running.remove(&r.op_id).unwrap_or(r))
                    .collect();
                merged.extend(running.into_values());
                merged
            } else {
                running.into_values().collect::<Vec<_>>()
            };
            records.sort_by(|a, b| a.op_id.cmp(&b.op_id));
            Ok(records)
        })
    }
}

/// The live status of a running operation, or None once it has ended.
pub struct WatchOperation(pub String);

impl Message for WatchOperation {
    type Result = Option<watch::Receiver<OperationRecord>>;
}

impl Handler<WatchOperation> for OperationRegistry {
    type Result = Option<watch::Receiver<OperationRecord>>;

    fn handle(&mut self, msg: WatchOperation, _: &mut Context<Self>) -> Self::Result {
        self.running.get(&msg.0).map(|r| r.status.clone())
    }
}

/// Asks a running, cancellable operation to stop; answers its record.
pub struct CancelOperation(pub String);

impl Message for CancelOperation {
    type Result = Result<OperationRecord, OperationError>;
}

impl Handler<CancelOperation> for OperationRegistry {
    type Result = ResponseFuture<Result<OperationRecord, OperationError>>;

    fn handle(&mut self, msg: CancelOperation, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(running) = self.running.get(&msg.0) {
            let record = running.status.borrow().clone();
            let result = if record.cancellable {
                info!(op_id = %msg.0, "operation cancel requested");
                running.cancel.cancel();
                Ok(record)
            } else {
                Err(OperationError::NotCancellable {
                    op_id: record.op_id,
                    method: record.method,
                })
            };
            return Box::pin(async move { result });
        }
        let get = ctx.address().send(GetOperation(msg.0));
        Box::pin(async move {
            let record = get
                .await
                .map_err(|_| OperationError::Unavailable("operation registry"))??;
            Err(OperationError::Finished {
                op_id: record.op_id,
                outcome: record.outcome,
            })
        })
    }
}

/// Shutdown: refuse new operations, cancel the cancellable ones, and
/// answer once none is left in flight.
pub struct Drain;

impl Message for Drain {
    type Result = Result<(), oneshot::error::RecvError>;
}

impl Handler<Drain> for OperationRegistry {
    type Result = ResponseFuture<Result<(), oneshot::error::RecvError>>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        for running in self.running.values() {
            running.cancel.cancel();
        }
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        self.notify_if_drained();
        Box::pin(rx)
    }
}

/// Start-up: operations the store shows in flight were interrupted by the
/// previous daemon's death. Marks them, removes what they left half-made,
/// and applies the retention rule. Answers the interrupted ones.
pub struct Reconcile;

impl Message for Reconcile {
    type Result = Result<Vec<OperationRecord>, OperationError>;
}

impl Handler<Reconcile> for OperationRegistry {
    type Result = ResponseFuture<Result<Vec<OperationRecord>, OperationError>>;

    fn handle(&mut self, _: Reconcile, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let retention = self.retention;
        Box::pin(async move {
            let listing = store
                .send(List::<OperationRecord>::new())
                .await
                .map_err(store_gone)??;
            for bad in &listing.undecodable {
                warn!(table = %bad.table, key = %bad.key, reason = %bad.reason, "an operation record does not decode; it is left as it is");
            }
            let records = listing.records;
            let now = Timestamp::now();
            let mut interrupted = Vec::new();
            for record in records
                .iter()
                .filter(|r| r.outcome == OperationOutcome::Running)
            {
                let record = operations::interrupted(record.clone(), now);
                for leftover in operations::leftovers(&record) {
                    match std::fs::remove_file(&leftover) {
                        Ok(()) => {
                            info!(op_id = %record.op_id, path = %leftover.display(), "removed what an interrupted operation left")
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            warn!(op_id = %record.op_id, path = %leftover.display(), error = %e, "cannot remove what an interrupted operation left")
                        }
                    }
                }
                store
                    .send(Put(record.clone()))
                    .await
                    .map_err(store_gone)??;
                warn!(op_id = %record.op_id, method = %record.method, "operation was interrupted by a daemon stop");
                interrupted.push(record);
            }
            prune(&store, retention).await?;
            Ok(interrupted)
        })
    }
}

async fn prune(store: &Addr<StoreActor>, retention: Retention) -> Result<(), OperationError> {
    let records = store
        .send(List::<OperationRecord>::new())
        .await
        .map_err(store_gone)??
        .records;
    for op_id in retention.expired(&records, Timestamp::now()) {
        store
            .send(Delete::<OperationRecord>::new(op_id))
            .await
            .map_err(store_gone)??;
    }
    Ok(())
}

/// Sent by an `Operation` once its end is recorded.
struct Ended(String);

impl Message for Ended {
    type Result = ();
}

impl Handler<Ended> for OperationRegistry {
    type Result = ();

    fn handle(&mut self, msg: Ended, _: &mut Context<Self>) {
        self.running.remove(&msg.0);
        self.notify_if_drained();
    }
}

/// One state-changing request in flight.
pub struct Operation {
    record: OperationRecord,
    store: Addr<StoreActor>,
    registry: Addr<OperationRegistry>,
    status: watch::Sender<OperationRecord>,
    /// Told once the intent record is durable.
    intent_written: Option<oneshot::Sender<Result<(), OperationError>>>,
}

impl Actor for Operation {
    type Context = Context<Self>;

    /// Writes the intent record; the actor handles nothing (its end
    /// included) until it is durable, so the end record always follows it.
    fn started(&mut self, ctx: &mut Context<Self>) {
        let put = self.store.send(Put(self.record.clone()));
        ctx.wait(put.into_actor(self).map(|written, op, _| {
            let written = written
                .map_err(store_gone)
                .and_then(|r| r.map_err(OperationError::from));
            if let Err(e) = &written {
                warn!(op_id = %op.record.op_id, error = %e, "cannot record the operation's intent");
            }
            if let Some(tell) = op.intent_written.take() {
                let _ = tell.send(written);
            }
        }));
    }
}

struct Report {
    phase: String,
    current: Option<u64>,
    total: Option<u64>,
}

impl Message for Report {
    type Result = ();
}

impl Handler<Report> for Operation {
    type Result = ();

    fn handle(&mut self, msg: Report, _: &mut Context<Self>) {
        self.record.report(msg.phase, msg.current, msg.total);
        self.status.send_replace(self.record.clone());
    }
}

struct Finish {
    outcome: OperationOutcome,
    error: Option<String>,
}

impl Message for Finish {
    type Result = Result<OperationRecord, OperationError>;
}

impl Handler<Finish> for Operation {
    type Result = Result<OperationRecord, OperationError>;

    /// Answers at once with the final record (watchers and `get` see it from
    /// memory); the end record is written before the operation leaves the
    /// registry, so a shutdown drain still waits for it to be durable.
    fn handle(&mut self, msg: Finish, ctx: &mut Context<Self>) -> Self::Result {
        self.record.outcome = msg.outcome;
        self.record.error = msg.error;
        self.record.finished_at = Some(Timestamp::now());
        info!(op_id = %self.record.op_id, outcome = ?self.record.outcome, error = ?self.record.error, "operation ended");
        let put = self.store.send(Put(self.record.clone()));
        ctx.wait(put.into_actor(self).map(|persisted, op, ctx| {
            match persisted {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(op_id = %op.record.op_id, error = %e, "cannot record the operation's end"),
                Err(_) => warn!(op_id = %op.record.op_id, "the store is not answering; the operation's end is not recorded"),
            }
            op.registry.do_send(Ended(op.record.op_id.clone()));
            ctx.stop();
        }));
        // Watchers see the end now; the sender drops when the actor stops.
        self.status.send_replace(self.record.clone());
        Ok(self.record.clone())
    }
}
