//! `VmActor`, one per VM, and `VmManager`, which creates them and finds
//! them by name.
//!
//! Ownership: a VmActor owns its VM's record and its VMM process (a pidfd;
//! the process lives in its own session and outlives the daemon). It holds
//! no lifecycle logic: every event (a user command, a process fact, a
//! timer, what recovery saw) goes through `vm::machine::step`, and the
//! actor carries out the effects in order. A `Persist` is awaited with
//! `ctx.wait` before the effects after it, so nothing is acquired and no
//! client is answered ahead of the store; writes reach the store in order
//! through one writer task per VM.
//!
//! A write the store refuses (a full disk: see `store::health`) is not a
//! restart. When it carried out a user command, the VM goes back to its
//! durable record and the client hears that nothing changed; otherwise (a
//! process fact, a timer: something that happened) the actor holds the
//! write and the effects behind it, defers later facts, refuses commands,
//! and carries on once the store says it writes again. Clients waiting on
//! the VM are answered at once either way.
//!
//! VmActors run under an actix `Supervisor`. Any other failed write (the
//! store gone) stops the actor; `restarting()` discards what it held in
//! memory and the next `started()` reads the record again and re-derives
//! the VM through `Event::Recovered`, as at daemon start; meanwhile
//! commands are refused and reads see the last durable record. A removed
//! VM is a tombstone: it does nothing, answers nothing but conflicts, and
//! ends when the manager drops its address.
//!
//! Its parts, one concern each: `interpreter` (events through the machine,
//! effects carried out, writes held or undone), `process` (the VMM's spawn,
//! configuration, exit and poweroff), `recovery` (start, restart, adoption,
//! probes, reload), `agent` (the guest agent link's life), `files` (root
//! disk, released resources, capped logs), `commands` (what a client asks)
//! and `manager` (`VmManager`). `settings` holds what they run with and
//! the errors they answer.

mod agent;
mod commands;
mod files;
mod interpreter;
mod manager;
mod process;
mod recovery;
mod settings;

pub use agent::GetAgent;
pub use commands::VmCommand;
pub use manager::{AgentOf, CreateVm, ForVm, ForgetVm, ListVms, LoadVms, VmManager};
pub use settings::{VmError, VmSettings};

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use jiff::Timestamp;
use tokio::sync::{mpsc, oneshot};

use crate::actors::catalog::CatalogActor;
use crate::actors::netns::NetworkManager;
use crate::actors::store::StoreActor;
use crate::disk::DiskSource;
use crate::guest::link::AgentLink;
use crate::vm::machine::{Event, RequestId, Vm};
use crate::vm::record::VmRecord;
use crate::vmm::LaunchSpec;
use crate::vmm::process::ProcessHandle;

use interpreter::{Held, Write, Written, write_in_order};

/// How long start-up waits for an orphaned VMM to exit after SIGKILL.
const ORPHAN_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// `vm stop` waits this long for the guest before SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = oneshot::Sender<Result<VmRecord, VmError>>;

pub struct VmActor {
    vm: Vm,
    settings: Arc<VmSettings>,
    store: Addr<StoreActor>,
    catalog: Addr<CatalogActor>,
    networks: Addr<NetworkManager>,
    writes: mpsc::UnboundedSender<(Write, oneshot::Sender<Written>)>,
    /// The recorded VMM's pidfd, while it lives.
    process: Option<Rc<ProcessHandle>>,
    /// A spawned VMM the machine did not record (`Effect::KillUnrecorded`).
    unrecorded: Option<ProcessHandle>,
    /// The launch under way: what `Effect::Configure` configures.
    launch: Option<LaunchSpec>,
    timer: Option<SpawnHandle>,
    console_check: Option<SpawnHandle>,
    replies: HashMap<RequestId, Reply>,
    next_request: RequestId,
    /// What the next `started()` does first.
    on_start: OnStart,
    /// The record as of the last durable write (for a VM being created,
    /// the record it is created with): what reads see while the actor
    /// reloads; a process the actor holds beyond its pid is killed if the
    /// actor restarts.
    durable: Option<VmRecord>,
    /// The user command being applied, with the VM as it was: its first
    /// write, if refused, puts that VM back and answers the command.
    command: Option<(Vm, RequestId)>,
    /// A write the store refused while carrying out a fact, and the effects
    /// behind it, until the store writes again.
    held: Option<Held>,
    /// Facts that came while a write was held, applied in order after it.
    /// Bounded: each is the answer of one piece of work started before the
    /// hold, and the repeating ones (probes, announcements) keep only their
    /// latest; the timer is re-armed instead (see [`VmActor::hold`]).
    deferred: VecDeque<Event>,
    /// When the armed timer fires.
    timer_at: Option<Timestamp>,
    /// A write is on its way to the store.
    writing: bool,
    /// Restarts since the last durable write, for the reload's backoff.
    restarts: u32,
    /// Bumped by each restart: a spawn's answer finds who asked for it.
    incarnation: u64,
    /// Spawns whose answers have not arrived; they outlive restarts.
    spawns_in_flight: u32,
    /// A reload waits until they have arrived (and their VMMs are gone).
    reload_waits: bool,
    /// The store holds the record: false for a VM being created until its
    /// first write is durable, so nobody is shown a VM the store lacks.
    in_store: bool,
    /// The guest agent, once it has answered; dropped when its connection
    /// ends or the VMM exits.
    agent: Option<AgentLink>,
    /// Connecting to the agent, while the VMM runs and no link is up.
    agent_connect: Option<SpawnHandle>,
    agent_waiters: Vec<oneshot::Sender<AgentLink>>,
    /// A new VM's root disk as the caller opened it, until it is cloned.
    source: Option<DiskSource>,
    /// Told when the VM is gone, however its removal ended.
    manager: Recipient<VmRemoved>,
}

/// A VM's record is deleted: the manager forgets its name (if it still
/// names this actor).
pub struct VmRemoved {
    pub name: String,
    pub actor: Addr<VmActor>,
}

impl Message for VmRemoved {
    type Result = ();
}

/// What a VmActor does when it (re)starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnStart {
    /// Hold the record it was given against the host (daemon start).
    Recover,
    /// Read the record again from the store, then recover (a restart).
    Reload,
    /// Nothing: a VM being created, whose record is not written yet.
    Nothing,
}

impl VmActor {
    pub fn new(
        record: VmRecord,
        settings: Arc<VmSettings>,
        store: Addr<StoreActor>,
        catalog: Addr<CatalogActor>,
        networks: Addr<NetworkManager>,
        manager: Recipient<VmRemoved>,
    ) -> VmActor {
        // Unbounded, yet never more than one write deep: the actor waits
        // for each write to be durable (ctx.wait) before it goes on.
        let (writes, queue) = mpsc::unbounded_channel();
        actix::spawn(write_in_order(store.clone(), queue));
        let durable = Some(record.clone());
        VmActor {
            vm: Vm::new(record),
            settings,
            store,
            catalog,
            networks,
            writes,
            process: None,
            unrecorded: None,
            launch: None,
            timer: None,
            console_check: None,
            replies: HashMap::new(),
            next_request: 0,
            durable,
            command: None,
            held: None,
            timer_at: None,
            deferred: VecDeque::new(),
            writing: false,
            restarts: 0,
            incarnation: 0,
            spawns_in_flight: 0,
            reload_waits: false,
            in_store: true,
            on_start: OnStart::Recover,
            agent: None,
            agent_connect: None,
            agent_waiters: Vec::new(),
            source: None,
            manager,
        }
    }

    fn name(&self) -> &str {
        &self.vm.record.name
    }
}
