//! `StoreActor`: the only code in the daemon that touches redb. It runs on
//! a `SyncArbiter` so a blocking commit never stalls an actor on the async
//! arbiters; several threads share one [`Store`], reads run in parallel
//! and redb serialises the writes. The arbiter's queue is unbounded because
//! its callers are bounded: requests by `rpc.max_in_flight`, each VM actor
//! to one write at a time, the catalog and operations to what those
//! requests started.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use crate::store::backup::Snapshot;
use crate::store::{Listing, Record, Store, StoreError};

pub struct StoreActor {
    store: Arc<Store>,
    // Dropped after `store` (fields drop in order): see `StoreClosed`.
    _alive: Sender<()>,
}

impl Actor for StoreActor {
    type Context = SyncContext<Self>;
}

/// Tells when the last `StoreActor` thread has dropped its handle on the
/// store, so the daemon exits only after redb has closed the file cleanly.
pub struct StoreClosed(Receiver<()>);

impl StoreClosed {
    /// Waits for the store to close; false if it did not within `timeout`.
    pub fn wait(self, timeout: Duration) -> bool {
        matches!(
            self.0.recv_timeout(timeout),
            Err(RecvTimeoutError::Disconnected)
        )
    }
}

impl StoreActor {
    /// Starts `threads` store workers; must run inside an actix `System`.
    pub fn start(store: Store, threads: usize) -> (Addr<StoreActor>, StoreClosed) {
        let store = Arc::new(store);
        if let Err(e) = Store::spawn_recovery(&store) {
            tracing::error!(error = %e, "cannot start the store's recovery thread");
        }
        let (alive, closed) = bounded(0);
        let addr = SyncArbiter::start(threads, move || StoreActor {
            store: Arc::clone(&store),
            _alive: alive.clone(),
        });
        (addr, StoreClosed(closed))
    }
}

/// Reads one record by key.
pub struct Get<R> {
    pub key: String,
    record: PhantomData<R>,
}

impl<R> Get<R> {
    pub fn new(key: impl Into<String>) -> Self {
        Get {
            key: key.into(),
            record: PhantomData,
        }
    }
}

/// Reads every record of a table.
pub struct List<R>(PhantomData<R>);

impl<R> List<R> {
    pub fn new() -> Self {
        List(PhantomData)
    }
}

impl<R> Default for List<R> {
    fn default() -> Self {
        Self::new()
    }
}

/// The records an owner holds in quarantine (they do not decode), for
/// `daemon status`; answered by each owner of a table.
pub struct Quarantined;

impl Message for Quarantined {
    type Result = Vec<crate::store::Undecodable>;
}

/// Inserts or replaces a record; answered after a durable commit.
pub struct Put<R>(pub R);

/// Removes a record; answers whether it existed.
pub struct Delete<R> {
    pub key: String,
    record: PhantomData<R>,
}

impl<R> Delete<R> {
    pub fn new(key: impl Into<String>) -> Self {
        Delete {
            key: key.into(),
            record: PhantomData,
        }
    }
}

/// Replaces `key`'s record with `new` (or removes it) only if it still
/// equals `expected`; otherwise [`StoreError::Conflict`].
pub struct CompareAndSwap<R> {
    pub key: String,
    pub expected: Option<R>,
    pub new: Option<R>,
}

impl<R: Record> Message for Get<R> {
    type Result = Result<Option<R>, StoreError>;
}

impl<R: Record> Message for List<R> {
    type Result = Result<Listing<R>, StoreError>;
}

impl<R: Record> Message for Put<R> {
    type Result = Result<(), StoreError>;
}

impl<R: Record> Message for Delete<R> {
    type Result = Result<bool, StoreError>;
}

impl<R: Record + PartialEq> Message for CompareAndSwap<R> {
    type Result = Result<(), StoreError>;
}

impl<R: Record> Handler<Get<R>> for StoreActor {
    type Result = Result<Option<R>, StoreError>;
    fn handle(&mut self, msg: Get<R>, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.get(&msg.key)
    }
}

impl<R: Record> Handler<List<R>> for StoreActor {
    type Result = Result<Listing<R>, StoreError>;
    fn handle(&mut self, _: List<R>, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.list()
    }
}

impl<R: Record> Handler<Put<R>> for StoreActor {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, msg: Put<R>, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.put(&msg.0)
    }
}

impl<R: Record> Handler<Delete<R>> for StoreActor {
    type Result = Result<bool, StoreError>;
    fn handle(&mut self, msg: Delete<R>, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.delete::<R>(&msg.key)
    }
}

impl<R: Record + PartialEq> Handler<CompareAndSwap<R>> for StoreActor {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, msg: CompareAndSwap<R>, _: &mut SyncContext<Self>) -> Self::Result {
        self.store
            .compare_and_swap(&msg.key, msg.expected.as_ref(), msg.new.as_ref())
    }
}

/// A consistent read view of the whole store (for a backup).
pub struct TakeSnapshot;

impl Message for TakeSnapshot {
    type Result = Result<Snapshot, StoreError>;
}

impl Handler<TakeSnapshot> for StoreActor {
    type Result = Result<Snapshot, StoreError>;
    fn handle(&mut self, _: TakeSnapshot, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.snapshot()
    }
}

/// How many records each table holds.
pub struct CountRecords;

impl Message for CountRecords {
    type Result = Result<BTreeMap<String, u64>, StoreError>;
}

impl Handler<CountRecords> for StoreActor {
    type Result = Result<BTreeMap<String, u64>, StoreError>;
    fn handle(&mut self, _: CountRecords, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.record_counts()
    }
}
