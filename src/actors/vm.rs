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

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use jiff::Timestamp;
use rustix::process::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::actors::catalog::{
    CatalogActor, ImageError, KernelError, PrepareBoot, Reserve, Unreserve, VmReserveError,
};
use crate::actors::netns::{
    Attach, Detach, Lease, NetworkError, NetworkManager, ReconcileNetworks, Release,
};
use crate::actors::store::{Delete, Get, List, Put, Quarantined, StoreActor};
use crate::caller::{SizeCap, Stalled, Watch};
use crate::catalog::CatalogError;
use crate::catalog::KernelRecord;
use crate::disk::{self, DiskError, DiskSource};
use crate::error_chain;
use crate::fault;
use crate::guest::link::AgentLink;
use crate::network::GuestConfig;
use crate::reconcile;
use crate::store::{Listing, StoreError, StoreHealth, Undecodable, Unwritable};
use crate::vm::InvalidVm;
use crate::vm::ledger::Resource;
use crate::vm::machine::{self, Conflict, Effect, Event, Exit, HostView, Outcome, RequestId, Vm};
use crate::vm::phase::Phase;
use crate::vm::record::{VmImage, VmNetwork, VmRecord, VmmKind};
use crate::vm::restart::{self, RestartPolicy};
use crate::vm::state::{Announcement, ShutdownAction};
use crate::vmm::firecracker::Firecracker;
use crate::vmm::host::HostOps;
use crate::vmm::logs::{self, LogCap};
use crate::vmm::orphans::Layout;
use crate::vmm::process::{ProcessHandle, is_alive};
use crate::vmm::qemu::Qemu;
use crate::vmm::{self, BootFiles, LaunchSpec, Nic, VmPaths, Vmm, VmmError};

/// How long a graceful stop waits for the agent to take the request
/// before pressing Ctrl-Alt-Del instead.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a VMM starts (or is adopted) the agent is first sought.
const AGENT_FIRST_CONNECT: Duration = Duration::from_millis(100);
/// How often a VM's console log size is checked against its cap.
const CONSOLE_CHECK: Duration = Duration::from_secs(10);
/// A re-adopted VMM's API is probed this many times, with doubling waits
/// from 100 ms, before the VM is shown as degraded (it is never killed for
/// a slow answer).
const PROBE_ATTEMPTS: u32 = 3;
/// How often a degraded VM's VMM is probed again.
const PROBE_DEGRADED: Duration = Duration::from_secs(5);
/// How long start-up waits for an orphaned VMM to exit after SIGKILL.
const ORPHAN_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `vm ls` waits for one VM actor's memory while the store
/// cannot write.
const MEMORY_ANSWER: Duration = Duration::from_secs(1);
/// `vm stop` waits this long for the guest before SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where VMs live and what they run with.
pub struct VmSettings {
    pub firecracker: Firecracker,
    pub qemu: Qemu,
    /// The backend of a VM created without `--vmm`.
    pub default_vmm: VmmKind,
    /// The kernel of a VM created without `--kernel` (else the only one).
    pub default_kernel: Option<String>,
    pub vms_dir: PathBuf,
    /// Where jails live (also where orphaned jailed VMMs are recognised).
    pub jail_base: PathBuf,
    pub restart_defaults: RestartPolicy,
    pub host: Arc<dyn HostOps>,
    /// The most a root disk a request names may hold.
    pub max_rootfs: SizeCap,
    /// How long one read of a root disk's source may wait.
    pub io_stall: Duration,
    /// Caps the VMs' logs as they grow.
    pub log_cap: LogCap,
    /// The uid (and gid) the tools run as that check and grow a new root
    /// disk (`[host] tool_uid`).
    pub tool_uid: u32,
    /// Whether the store writes: commands are refused while it does not,
    /// and held work goes on when it does again.
    pub store_health: watch::Receiver<StoreHealth>,
}

impl VmSettings {
    pub fn paths(&self, id: &str) -> VmPaths {
        VmPaths {
            dir: self.vms_dir.join(id),
        }
    }

    pub fn backend(&self, kind: VmmKind) -> &dyn Vmm {
        match kind {
            VmmKind::Firecracker => &self.firecracker,
            VmmKind::Qemu => &self.qemu,
        }
    }

    /// The jailer's directory for a VM: `<jail base>/firecracker/<id>`.
    pub fn jail_dir(&self, id: &str) -> PathBuf {
        crate::vmm::firecracker::jail_dir(&self.jail_base, id)
    }

    /// Where one resource of a VM's ledger lives (none: the backend has no
    /// such thing, e.g. a jail for QEMU).
    pub fn path_of(&self, record: &VmRecord, resource: Resource) -> Option<PathBuf> {
        match resource {
            Resource::VmDirectory => Some(self.paths(&record.id).dir),
            // Wherever the jailer would put it, configured now or not: a
            // jail made under another configuration is still this VM's.
            Resource::Jail => {
                (record.vmm == VmmKind::Firecracker).then(|| self.jail_dir(&record.id))
            }
            // Not files: the network actors release them.
            Resource::Lease | Resource::Tap | Resource::Image => None,
        }
    }

    fn launch_spec(
        &self,
        record: &VmRecord,
        kernel: &KernelRecord,
        network: Option<GuestConfig>,
    ) -> LaunchSpec {
        let mut args = kernel
            .cmdline
            .clone()
            .unwrap_or_else(|| self.backend(record.vmm).default_boot_args().to_string());
        if let Some(config) = &network {
            args = format!("{args} {}", config.boot_args());
        }
        LaunchSpec {
            nic: network.map(|_| Nic {
                tap: crate::network::tap_name(&record.id),
                mac: crate::network::mac_of(&record.id),
            }),
            id: record.id.clone(),
            boot: BootFiles {
                vmlinux: kernel.vmlinux.clone(),
                bzimage: kernel.bzimage.clone(),
                initrd: kernel.boot_image.as_ref().map(|image| image.path.clone()),
                args: format!("{args} banger.hostname={}", record.name),
            },
            rootfs: record.rootfs.clone(),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            paths: self.paths(&record.id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Invalid(#[from] InvalidVm),
    #[error("no VM named {0}; `banger vm ls` lists them")]
    NotFound(String),
    #[error("a VM named {0} already exists")]
    Exists(String),
    #[error(
        "no kernel named {0}; `banger kernel ls` lists them and `banger kernel import` adds one"
    )]
    NoKernel(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("no quarantined VM record has the id {0}; `banger daemon status` lists them")]
    NotQuarantined(String),
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("VM {name}: {reason}")]
    Failed { name: String, reason: String },
    #[error("VM {name} failed to start")]
    Launch {
        name: String,
        #[source]
        source: VmmError,
    },
    #[error("VM {name}'s agent is not answering: {reason}")]
    Agent { name: String, reason: String },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
    #[error("VM {name}: {what}: {down}")]
    NotRecorded {
        name: String,
        what: String,
        down: Box<Unwritable>,
    },
    #[error("VM {0} is being read again from the store; try again in a moment")]
    Reloading(String),
    #[error(transparent)]
    Stalled(#[from] Stalled),
}

impl From<VmReserveError> for VmError {
    fn from(e: VmReserveError) -> VmError {
        match e {
            VmReserveError::Kernel(e) => e.into(),
            VmReserveError::Image(e) => e.into(),
        }
    }
}

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

/// Sends a spawn's answer when dropped, so that one always arrives.
struct SpawnAnswer {
    actor: Addr<VmActor>,
    incarnation: u64,
    result: Option<SpawnResult>,
}

type SpawnResult = Result<(LaunchSpec, ProcessHandle, crate::vm::record::VmmProcess), VmError>;

impl Drop for SpawnAnswer {
    fn drop(&mut self) {
        if let Some(result) = self.result.take() {
            // Internal and small: it must arrive even when the mailbox is full.
            self.actor.do_send(SpawnAnswered {
                incarnation: self.incarnation,
                result,
            });
        }
    }
}

/// A spawn's answer, for the incarnation that asked.
struct SpawnAnswered {
    incarnation: u64,
    result: SpawnResult,
}

impl Message for SpawnAnswered {
    type Result = ();
}

impl Handler<SpawnAnswered> for VmActor {
    type Result = ();

    fn handle(&mut self, msg: SpawnAnswered, ctx: &mut Context<Self>) {
        self.spawns_in_flight = self.spawns_in_flight.saturating_sub(1);
        if msg.incarnation == self.incarnation {
            match msg.result {
                Ok((spec, process, recorded)) => {
                    self.launch = Some(spec);
                    self.unrecorded = Some(process);
                    self.watch_logs();
                    let _ = self.apply(Event::Spawned(recorded), ctx);
                }
                Err(e) => {
                    warn!(vm = %self.name(), error = %error_chain(&e), "VM failed to start");
                    let _ = self.apply(Event::LaunchFailed(error_chain(&e)), ctx);
                }
            }
            return;
        }
        // Asked for by an incarnation before a restart: no record names its
        // VMM, which goes before this one reads the store and launches.
        let exited = match msg.result {
            Ok((_, process, _)) => {
                warn!(vm = %self.name(), pid = process.pid(), "killing a VMM spawned before the actor restarted");
                let _ = process.signal(Signal::KILL);
                Some(process)
            }
            Err(_) => None,
        };
        ctx.wait(
            async move {
                if let Some(process) = exited {
                    let _ = tokio::time::timeout(ORPHAN_EXIT_TIMEOUT, process.exited()).await;
                }
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                if act.spawns_in_flight == 0 && act.reload_waits {
                    act.reload_waits = false;
                    act.reload(ctx);
                }
            }),
        );
    }
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

/// A change to a VM's record.
#[derive(Clone)]
enum Write {
    Put(VmRecord),
    Delete(VmRecord),
}

/// A write the store refused, held with what waits behind it.
struct Held {
    write: Write,
    effects: VecDeque<Effect>,
    down: Unwritable,
    since: std::time::Instant,
    /// The timer that was armed when the hold began.
    timer_at: Option<Timestamp>,
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Written {
    Durable,
    /// The store refuses writes for now (see `store::health`).
    Refused(Unwritable),
    /// Anything else: the store is gone, or the record did not encode.
    Lost,
}

/// Applies one VM's writes in the order they were queued, answering each
/// with how it ended.
async fn write_in_order(
    store: Addr<StoreActor>,
    mut writes: mpsc::UnboundedReceiver<(Write, oneshot::Sender<Written>)>,
) {
    while let Some((write, durable)) = writes.recv().await {
        let (record, result) = match write {
            Write::Put(record) => {
                let result = store.send(Put(record.clone())).await.map(|r| r.map(drop));
                (record, result)
            }
            Write::Delete(record) => {
                let result = store
                    .send(Delete::<VmRecord>::new(record.id.clone()))
                    .await
                    .map(|r| r.map(drop));
                (record, result)
            }
        };
        let written = match result {
            Ok(Ok(())) => Written::Durable,
            Ok(Err(StoreError::Unwritable(down))) => {
                warn!(vm = %record.name, error = %down, "cannot record the VM's state");
                Written::Refused(down)
            }
            Ok(Err(e)) => {
                error!(vm = %record.name, error = %error_chain(&e), "cannot record the VM's state");
                Written::Lost
            }
            Err(_) => {
                error!(vm = %record.name, "the store is not answering; the VM's state is not recorded");
                Written::Lost
            }
        };
        let _ = durable.send(written);
    }
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

    /// Feeds one event through the machine and carries out its effects. A
    /// fact that comes while a write is held waits behind it.
    fn apply(&mut self, event: Event, ctx: &mut Context<Self>) -> Result<(), Conflict> {
        if self.held.is_some() {
            match event {
                // Re-armed when the hold ends, later by the hold's length.
                Event::Timer => {}
                Event::Probed(_) | Event::Announced(_) => {
                    let same = std::mem::discriminant(&event);
                    self.deferred.retain(|e| std::mem::discriminant(e) != same);
                    self.deferred.push_back(event);
                }
                event => self.deferred.push_back(event),
            }
            return Ok(());
        }
        let spawned = match &event {
            Event::Spawned(process) => Some(process.pid),
            _ => None,
        };
        let (vm, effects) = machine::step(&self.vm, event, Timestamp::now())?;
        let before = self.vm.record.phase;
        let command = self.command.take();
        self.command = command.filter(|_| machine::undoable(&effects));
        self.vm = vm;
        if self.vm.record.phase != before {
            info!(vm = %self.vm.record.name, id = %self.vm.record.id, phase = ?self.vm.record.phase, "VM phase");
        }
        self.run(effects.into(), ctx);
        self.command = None;
        // A spawned VMM the machine recorded is watched from now on.
        if let Some(pid) = spawned
            && record_pid(&self.vm.record) == Some(pid)
            && let Some(process) = self.unrecorded.take_if(|p| p.pid() == pid)
        {
            self.watch(Rc::new(process), ctx);
        }
        Ok(())
    }

    /// Writes the record, then carries out the effects behind the write.
    fn persist(&mut self, write: Write, effects: VecDeque<Effect>, ctx: &mut Context<Self>) {
        let undo = self.command.take();
        self.writing = true;
        let durable = self.write(write.clone());
        ctx.wait(durable.into_actor(self).map(move |written, act, ctx| {
            act.writing = false;
            match written.unwrap_or(Written::Lost) {
                Written::Durable => {
                    act.in_store = true;
                    act.durable = match write {
                        Write::Put(record) => Some(record),
                        Write::Delete(_) => None,
                    };
                    act.restarts = 0;
                    act.run(effects, ctx);
                    act.replay_deferred(ctx);
                }
                Written::Refused(down) => match undo {
                    Some((before, request)) => act.undo_command(before, request, down, ctx),
                    None => act.hold(write, effects, down, ctx),
                },
                Written::Lost => {
                    error!(vm = %act.name(), "a write failed; rebuilding the VM from the store");
                    ctx.stop();
                }
            }
        }));
    }

    /// The store refused a command's write: the VM is as it was, and the
    /// client hears that nothing changed. A VM whose create was refused
    /// never existed: its name is free again.
    fn undo_command(
        &mut self,
        before: Vm,
        request: RequestId,
        down: Unwritable,
        ctx: &mut Context<Self>,
    ) {
        self.vm = before;
        let refused = self.not_recorded("nothing was changed".into(), down);
        if let Some(reply) = self.replies.remove(&request) {
            let _ = reply.send(Err(refused));
        }
        if !self.in_store {
            self.source = None;
            self.vm.removed = true;
            self.become_tombstone(ctx);
        }
    }

    /// The store refused the write of a fact: it and the effects behind it
    /// wait until the store writes again; clients waiting on the VM are
    /// told now instead of hanging. The timer stops meanwhile: a launch or
    /// stop deadline is not spent waiting for the store.
    fn hold(
        &mut self,
        write: Write,
        effects: VecDeque<Effect>,
        down: Unwritable,
        ctx: &mut Context<Self>,
    ) {
        warn!(vm = %self.name(), phase = ?self.vm.record.phase, "holding the VM's next steps until the store writes again");
        let what = match &self.vm.create_failure {
            Some(failure) => format!(
                "its create failed ({failure}); the undo is recorded once the store writes again"
            ),
            None => {
                "its state cannot be recorded yet; banger carries on once the store writes again"
                    .to_string()
            }
        };
        for (_, reply) in self.replies.drain() {
            let _ = reply.send(Err(VmError::NotRecorded {
                name: self.vm.record.name.clone(),
                what: what.clone(),
                down: Box::new(down.clone()),
            }));
        }
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        self.held = Some(Held {
            write,
            effects,
            down,
            since: std::time::Instant::now(),
            timer_at: self.timer_at.take(),
        });
        let mut health = self.settings.store_health.clone();
        ctx.spawn(
            async move {
                let _ = health.wait_for(|h| *h == StoreHealth::Writable).await;
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                let Some(held) = act.held.take() else {
                    return;
                };
                info!(vm = %act.name(), "the store writes again; carrying on");
                if let Some(at) = held.timer_at {
                    let held_for = jiff::SignedDuration::try_from(held.since.elapsed())
                        .unwrap_or(jiff::SignedDuration::ZERO);
                    act.arm_timer(at.checked_add(held_for).unwrap_or(at), ctx);
                }
                act.persist(held.write, held.effects, ctx);
            }),
        );
    }

    /// Facts deferred behind a held write, one at a time: each may write.
    fn replay_deferred(&mut self, ctx: &mut Context<Self>) {
        while self.held.is_none() && !self.writing {
            let Some(event) = self.deferred.pop_front() else {
                return;
            };
            let _ = self.apply(event, ctx);
        }
    }

    /// Why the store cannot write now: as it says, or as the held write heard.
    fn store_down(&self) -> Option<Unwritable> {
        let health = self.settings.store_health.borrow();
        health
            .unwritable()
            .cloned()
            .or_else(|| self.held.as_ref().map(|held| held.down.clone()))
    }

    fn not_recorded(&self, what: String, down: Unwritable) -> VmError {
        VmError::NotRecorded {
            name: self.vm.record.name.clone(),
            what,
            down: Box::new(down),
        }
    }

    /// (Re)arms the VM's one timer; [`Event::Timer`] fires at `at`.
    fn arm_timer(&mut self, at: Timestamp, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        let wait = at.as_millisecond() - Timestamp::now().as_millisecond();
        let wait = Duration::from_millis(wait.max(0) as u64);
        self.timer_at = Some(at);
        self.timer = Some(ctx.run_later(wait, |act, ctx| {
            act.timer = None;
            act.timer_at = None;
            if let Phase::BackingOff { .. } = act.vm.record.phase {
                info!(vm = %act.name(), "restarting after backoff");
            }
            let _ = act.apply(Event::Timer, ctx);
        }));
    }

    /// Carries out effects in order; whatever follows a write waits until
    /// the write is durable (see [`VmActor::persist`]).
    fn run(&mut self, mut effects: VecDeque<Effect>, ctx: &mut Context<Self>) {
        while let Some(effect) = effects.pop_front() {
            fault::boundary(effect_name(&effect));
            match effect {
                Effect::Persist | Effect::Delete => {
                    let record = self.vm.record.clone();
                    let write = match effect {
                        Effect::Delete => Write::Delete(record),
                        _ => Write::Put(record),
                    };
                    self.persist(write, effects, ctx);
                    return;
                }
                Effect::Spawn => self.spawn_vmm(ctx),
                Effect::Configure => self.configure(ctx),
                Effect::Kill => {
                    if let Some(process) = &self.process
                        && let Err(e) = process.signal(Signal::KILL)
                    {
                        warn!(vm = %self.name(), error = %e, "cannot signal the VMM");
                    }
                }
                Effect::KillUnrecorded => {
                    if let Some(process) = self.unrecorded.take() {
                        warn!(vm = %self.name(), pid = process.pid(), "killing a VMM no launch expects");
                        let _ = process.signal(Signal::KILL);
                        actix::spawn(async move {
                            process.exited().await;
                        });
                    }
                }
                Effect::AskPoweroff => self.ask_poweroff(ctx),
                Effect::ArmTimer(at) => self.arm_timer(at, ctx),
                Effect::ConnectAgent => self.connect_agent(ctx),
                Effect::DropAgent => self.drop_agent(ctx),
                Effect::Provision(_) => {
                    let (source, size, target) = (
                        self.source.take(),
                        self.vm.record.disk_bytes,
                        self.vm.record.rootfs.clone(),
                    );
                    let lease = self.vm.record.network.as_ref().map(|n| Lease {
                        network: n.network.clone(),
                        vm: self.vm.record.id.clone(),
                        vm_name: self.vm.record.name.clone(),
                    });
                    let networks = self.networks.clone();
                    let (io_stall, tool_uid) = (self.settings.io_stall, self.settings.tool_uid);
                    let provisioned = async move {
                        let address = match lease {
                            Some(lease) => Some(
                                networks
                                    .send(lease)
                                    .await
                                    .map_err(|_| VmError::Unavailable("network manager"))??,
                            ),
                            None => None,
                        };
                        clone_rootfs(source, size, target, io_stall, tool_uid).await?;
                        Ok::<_, VmError>(address)
                    };
                    ctx.spawn(provisioned.into_actor(self).map(|provisioned, act, ctx| {
                        if provisioned.is_ok() {
                            act.watch_console(ctx);
                        }
                        let provisioned = provisioned.map_err(|e| error_chain(&e));
                        let _ = act.apply(Event::Provisioned(provisioned), ctx);
                    }));
                }
                Effect::Detach => {
                    let detach = self
                        .vm
                        .record
                        .guest()
                        .map(|(network, guest)| Detach { network, guest });
                    let networks = self.networks.clone();
                    let detached = async move {
                        if let Some(detach) = detach {
                            networks
                                .send(detach)
                                .await
                                .map_err(|_| VmError::Unavailable("network manager"))??;
                        }
                        Ok::<_, VmError>(())
                    };
                    ctx.spawn(detached.into_actor(self).map(|detached, act, ctx| {
                        let detached = detached.map_err(|e| {
                            warn!(vm = %act.name(), error = %error_chain(&e), "cannot remove the VM's tap");
                            error_chain(&e)
                        });
                        let _ = act.apply(Event::Detached(detached), ctx);
                    }));
                }
                Effect::RemoveFiles => {
                    let released = release_resources(
                        self.settings.clone(),
                        self.networks.clone(),
                        self.vm.record.clone(),
                    );
                    ctx.spawn(released.into_actor(self).map(|removed, act, ctx| {
                        let removed = removed.map_err(|e| error_chain(&e));
                        let _ = act.apply(Event::FilesRemoved(removed), ctx);
                    }));
                }
                Effect::Reply { request, outcome } => {
                    if let Some(reply) = self.replies.remove(&request) {
                        let _ = reply.send(match outcome {
                            Outcome::Done => Ok(self.vm.record.clone()),
                            Outcome::Failed(reason) => Err(VmError::Failed {
                                name: self.name().to_string(),
                                reason,
                            }),
                        });
                    }
                }
            }
        }
        if self.vm.removed {
            self.become_tombstone(ctx);
        }
    }

    fn write(&mut self, write: Write) -> oneshot::Receiver<Written> {
        let (durable, done) = oneshot::channel();
        if self.writes.send((write, durable)).is_err() {
            error!(vm = %self.name(), "the VM's writer is gone; its state is not recorded");
        }
        done
    }

    /// Removed: nothing left to do or to watch.
    fn become_tombstone(&mut self, ctx: &mut Context<Self>) {
        info!(vm = %self.name(), id = %self.vm.record.id, "VM removed");
        self.settings.log_cap.unwatch(&self.log_dirs());
        for handle in [self.timer.take(), self.console_check.take()]
            .into_iter()
            .flatten()
        {
            ctx.cancel_future(handle);
        }
        self.drop_agent(ctx);
        let removed = VmRemoved {
            name: self.name().to_string(),
            actor: ctx.address(),
        };
        // Internal and small: the manager must hear it even when busy.
        self.manager.do_send(removed);
    }

    /// `Effect::Spawn`: the kernel, the directory's lock, the agent on the
    /// disk, the backend's files, the process; answers `Spawned` (the
    /// process is recorded before anything configures it) or `LaunchFailed`.
    fn spawn_vmm(&mut self, ctx: &mut Context<Self>) {
        let record = self.vm.record.clone();
        let (catalog, settings) = (self.catalog.clone(), self.settings.clone());
        let networks = self.networks.clone();
        let spawned = async move {
            let kernel = match catalog
                .send(PrepareBoot {
                    kernel: record.kernel.clone(),
                })
                .await
            {
                Ok(Ok(kernel)) => kernel,
                Ok(Err(KernelError::NotFound(_))) => {
                    return Err(VmError::NoKernel(record.kernel));
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(VmError::Unavailable("catalog")),
            };
            // The tap (named by the ledger, durable) before the VMM opens it.
            let network = match record.guest() {
                Some((network, guest)) if record.resources.contains(&Resource::Tap) => Some(
                    networks
                        .send(Attach {
                            network,
                            vm: record.id.clone(),
                            guest,
                            owner: settings.backend(record.vmm).tap_owner(),
                        })
                        .await
                        .map_err(|_| VmError::Unavailable("network manager"))??,
                ),
                _ => None,
            };
            fault::boundary("attached");
            let spec = settings.launch_spec(&record, &kernel, network);
            let launch = |source| VmError::Launch {
                name: record.name.clone(),
                source,
            };
            // The lock first: the disk and sockets are touched only when no
            // VMM of this VM lives.
            let console_log = spec.paths.console_log();
            let console = tokio::task::spawn_blocking(move || vmm::lock_console(&console_log))
                .await
                .map_err(|_| VmError::Unavailable("blocking thread pool"))?
                .map_err(launch)?;
            let (process, recorded) =
                vmm::spawn(&settings.host, settings.backend(record.vmm), &spec, console)
                    .await
                    .map_err(launch)?;
            fault::boundary("spawned");
            Ok((spec, process, recorded))
        };
        // Not the context's: a restart drops the context's futures, and a
        // spawn must reach this actor (whichever incarnation) in any case,
        // or its VMM would run unrecorded and unwatched.
        let (actor, incarnation) = (ctx.address(), self.incarnation);
        self.spawns_in_flight += 1;
        actix::spawn(async move {
            // Answers even if this task is dropped before the spawn ends.
            let mut answer = SpawnAnswer {
                actor,
                incarnation,
                result: Some(Err(VmError::Unavailable("VMM spawn"))),
            };
            answer.result = Some(spawned.await);
        });
    }

    /// `Effect::Configure`: answers `Ready` or `LaunchFailed`.
    fn configure(&mut self, ctx: &mut Context<Self>) {
        let (Some(spec), Some(process)) = (self.launch.clone(), self.process.clone()) else {
            let _ = self.apply(
                Event::LaunchFailed("nothing to configure: the launch was lost".into()),
                ctx,
            );
            return;
        };
        let (settings, vmm, name) = (
            self.settings.clone(),
            self.vm.record.vmm,
            self.vm.record.name.clone(),
        );
        let configured_process = Rc::clone(&process);
        ctx.spawn(
            async move {
                settings
                    .backend(vmm)
                    .configure(&spec, &process)
                    .await
                    .map_err(|source| VmError::Launch { name, source })
            }
            .into_actor(self)
            .map(move |configured, act, ctx| {
                // A late answer about a VMM that is no longer this VM's.
                if !act
                    .process
                    .as_ref()
                    .is_some_and(|p| Rc::ptr_eq(p, &configured_process))
                {
                    return;
                }
                let event = match configured {
                    Ok(()) => {
                        let pid = act.process.as_ref().map(|p| p.pid());
                        info!(vm = %act.name(), id = %act.vm.record.id, pid, "VM running");
                        Event::Ready
                    }
                    Err(e) => {
                        warn!(vm = %act.name(), error = %error_chain(&e), "VM failed to start");
                        Event::LaunchFailed(error_chain(&e))
                    }
                };
                let _ = act.apply(event, ctx);
            }),
        );
    }

    /// Watches the recorded VMM; its exit is an event.
    fn watch(&mut self, process: Rc<ProcessHandle>, ctx: &mut Context<Self>) {
        self.process = Some(process.clone());
        ctx.spawn(
            async move { (process.exited().await, process) }
                .into_actor(self)
                .map(|(status, process), act, ctx| {
                    if !act
                        .process
                        .as_ref()
                        .is_some_and(|p| Rc::ptr_eq(p, &process))
                    {
                        return;
                    }
                    act.process = None;
                    act.launch = None;
                    let exit = Exit {
                        code: status.code,
                        signal: status.signal,
                    };
                    let _ = act.apply(Event::Exited(exit), ctx);
                    let next_restart_at = match act.vm.record.phase {
                        Phase::BackingOff { until, .. } => until.to_string(),
                        _ => String::new(),
                    };
                    warn!(
                        vm = %act.name(),
                        code = ?status.code,
                        signal = ?status.signal,
                        kind = ?act.vm.record.last_exit.map(|e| e.kind),
                        state = ?act.vm.record.phase.state(),
                        next_restart_at = %next_restart_at,
                        "VMM exited"
                    );
                }),
        );
    }

    /// `Effect::AskPoweroff`: the agent powers the guest off cleanly;
    /// without it, Ctrl-Alt-Del through the VMM.
    fn ask_poweroff(&mut self, ctx: &mut Context<Self>) {
        let Some(recorded) = self.vm.record.process.clone() else {
            return;
        };
        let (agent, settings, vmm) = (
            self.agent.clone(),
            self.settings.clone(),
            self.vm.record.vmm,
        );
        let name = self.vm.record.name.clone();
        ctx.spawn(fut::wrap_future(async move {
            let asked = match agent {
                Some(agent) => tokio::time::timeout(
                    AGENT_STOP_TIMEOUT,
                    agent.shutdown(ShutdownAction::Poweroff),
                )
                .await
                .is_ok_and(|r| r.is_ok()),
                None => false,
            };
            if !asked {
                info!(vm = %name, "agent not answering; sending Ctrl-Alt-Del");
                if let Err(e) = settings.backend(vmm).ctrl_alt_del(&recorded).await {
                    warn!(vm = %name, error = %error_chain(&e), "cannot send Ctrl-Alt-Del");
                }
            }
        }));
    }

    /// Start-up (and actor restart): holds the recorded VMM against the
    /// host. The pidfd is opened before `/proc` is checked, so the process
    /// checked is the one watched (no pid-reuse window).
    fn recover(&mut self, ctx: &mut Context<Self>) {
        let adopted = self.vm.record.process.clone().and_then(|recorded| {
            let handle = ProcessHandle::open(recorded.pid).ok()?;
            is_alive(recorded.pid, recorded.start_time).then_some((handle, recorded))
        });
        let Some((handle, recorded)) = adopted else {
            let _ = self.apply(Event::Recovered(HostView::Gone), ctx);
            return;
        };
        if self.vm.record.phase == Phase::Running {
            info!(vm = %self.name(), pid = recorded.pid, "re-adopted running VM");
        } else {
            info!(vm = %self.name(), pid = recorded.pid, phase = ?self.vm.record.phase, "re-adopted the VMM");
        }
        let handle = Rc::new(handle);
        self.watch(Rc::clone(&handle), ctx);
        if !matches!(self.vm.record.phase, Phase::Launching { retry: false, .. }) {
            let _ = self.apply(Event::Recovered(HostView::Alive), ctx);
            self.probe(handle, 1, ctx);
            return;
        }
        // A launch the daemon did not see end: adopted if the VMM says its
        // guest runs (asked once, bounded by the API's timeout), else
        // killed and launched again.
        let (settings, vmm) = (self.settings.clone(), self.vm.record.vmm);
        ctx.wait(
            async move { settings.backend(vmm).probe(&recorded).await }
                .into_actor(self)
                .map(move |answer, act, ctx| {
                    let view = match answer {
                        Ok(true) => HostView::Running,
                        _ => HostView::Alive,
                    };
                    let _ = act.apply(Event::Recovered(view), ctx);
                    if act.vm.record.phase == Phase::Running {
                        act.probe(handle, 1, ctx);
                    }
                }),
        );
    }

    /// Probes a re-adopted VMM's control socket, with doubling waits. It is
    /// never killed for a slow answer: after [`PROBE_ATTEMPTS`] failures
    /// it shows as degraded, and is probed every [`PROBE_DEGRADED`] until
    /// it answers or exits.
    fn probe(&mut self, process: Rc<ProcessHandle>, attempt: u32, ctx: &mut Context<Self>) {
        let Some(recorded) = self.vm.record.process.clone() else {
            return;
        };
        let (settings, vmm) = (self.settings.clone(), self.vm.record.vmm);
        ctx.spawn(
            async move { settings.backend(vmm).probe(&recorded).await }
                .into_actor(self)
                .map(move |answer, act, ctx| {
                    if !act.process.as_ref().is_some_and(|p| Rc::ptr_eq(p, &process)) {
                        return;
                    }
                    let failure = match answer {
                        Ok(_) => {
                            let _ = act.apply(Event::Probed(Ok(())), ctx);
                            return;
                        }
                        Err(e) => error_chain(&e),
                    };
                    let wait = if attempt >= PROBE_ATTEMPTS {
                        if act.vm.record.degraded.is_none() {
                            warn!(vm = %act.name(), error = %failure, "re-adopted VMM does not answer; the VM is degraded");
                        }
                        let _ = act.apply(Event::Probed(Err(failure)), ctx);
                        PROBE_DEGRADED
                    } else {
                        Duration::from_millis(100 << attempt)
                    };
                    ctx.run_later(wait, move |act, ctx| act.probe(process, attempt + 1, ctx));
                }),
        );
    }

    /// Connects to the guest agent in the background (the guest may still
    /// be booting); on success the link is kept and waiters get it, and a
    /// link that ends while the VMM runs is connected again.
    fn connect_agent(&mut self, ctx: &mut Context<Self>) {
        let Some(endpoint) = self
            .vm
            .record
            .process
            .as_ref()
            .and_then(|p| p.agent.clone())
        else {
            return;
        };
        if let Some(previous) = self.agent_connect.take() {
            ctx.cancel_future(previous);
        }
        let (events, heard) = watch::channel(None);
        let connecting = async move {
            // No guest answers within its first moments; waiting keeps the
            // agent traffic off the start's critical path.
            tokio::time::sleep(AGENT_FIRST_CONNECT).await;
            (AgentLink::connect(&endpoint, events).await, heard)
        };
        let handle = ctx.spawn(connecting.into_actor(self).map(|(link, heard), act, ctx| {
            act.agent_connect = None;
            match link {
                Ok(link) => {
                    act.listen(heard, ctx);
                    act.agent_ready(link, ctx)
                }
                Err(e) => {
                    warn!(vm = %act.name(), error = %error_chain(&e), "cannot connect to the agent")
                }
            }
        }));
        self.agent_connect = Some(handle);
    }

    /// Takes the agent's latest announcement each time it changes, for as
    /// long as its connection lasts; a flood is coalesced in the channel
    /// and logged once per change of action.
    fn listen(
        &mut self,
        mut heard: watch::Receiver<Option<Announcement>>,
        ctx: &mut Context<Self>,
    ) {
        ctx.spawn(
            async move {
                let open = heard.changed().await.is_ok();
                let latest = *heard.borrow_and_update();
                (open.then_some(latest).flatten(), heard)
            }
            .into_actor(self)
            .map(|(event, heard), act, ctx| {
                let Some(announced) = event else {
                    return;
                };
                if act.vm.announced != Some(announced) {
                    info!(vm = %act.name(), announced = ?announced, "guest is shutting down");
                }
                let _ = act.apply(Event::Announced(announced), ctx);
                if let Some(agent) = &act.agent {
                    agent.ack_shutdown();
                }
                act.listen(heard, ctx);
            }),
        );
    }

    fn agent_ready(&mut self, link: AgentLink, ctx: &mut Context<Self>) {
        let hello = link.hello();
        info!(
            vm = %self.name(),
            kernel = %hello.kernel,
            agent = %hello.agent_version,
            boot_ms = hello.boot.ready_ms,
            "agent ready"
        );
        for waiter in self.agent_waiters.drain(..) {
            let _ = waiter.send(link.clone());
        }
        self.agent = Some(link.clone());
        if let Some(main) = &self.vm.record.main {
            // Idempotent in the guest: a reconnect hears the same pid.
            let (request, name, agent) =
                (main.main_request(), self.name().to_string(), link.clone());
            actix::spawn(async move {
                match agent.run_main(request).await {
                    Ok(pid) => info!(vm = %name, pid, "main process running"),
                    Err(e) => warn!(vm = %name, error = %e, "cannot start the main process"),
                }
            });
        }
        // When the connection ends while the VMM runs, connect again.
        ctx.spawn(
            async move { link.closed().await }
                .into_actor(self)
                .map(|(), act, ctx| {
                    if act.agent.as_ref().is_some_and(AgentLink::is_closed) {
                        act.agent = None;
                        if act.process.is_some() {
                            act.connect_agent(ctx);
                        }
                    }
                }),
        );
    }

    fn drop_agent(&mut self, ctx: &mut Context<Self>) {
        if let Some(connecting) = self.agent_connect.take() {
            ctx.cancel_future(connecting);
        }
        if let Some(link) = self.agent.take() {
            link.close();
        }
        // Waiters hear that the VM stopped when their sender drops.
        self.agent_waiters.clear();
    }
}

fn record_pid(record: &VmRecord) -> Option<i32> {
    record.process.as_ref().map(|p| p.pid)
}

fn effect_name(effect: &Effect) -> &'static str {
    match effect {
        Effect::Persist => "persist",
        Effect::Delete => "delete",
        Effect::Provision(_) => "provision",
        Effect::Detach => "detach",
        Effect::Spawn => "spawn",
        Effect::Configure => "configure",
        Effect::Kill => "kill",
        Effect::KillUnrecorded => "kill-unrecorded",
        Effect::AskPoweroff => "ask-poweroff",
        Effect::ArmTimer(_) => "arm-timer",
        Effect::ConnectAgent => "connect-agent",
        Effect::DropAgent => "drop-agent",
        Effect::RemoveFiles => "remove-files",
        Effect::Reply { .. } => "reply",
    }
}

impl Actor for VmActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A restarted tombstone reads the store too: its delete may have
        // been the write that failed.
        if self.vm.removed && self.on_start != OnStart::Reload {
            return;
        }
        match self.on_start {
            OnStart::Recover => {
                self.watch_console(ctx);
                self.recover(ctx);
            }
            OnStart::Reload => {
                self.watch_console(ctx);
                // Backs off when the store keeps failing.
                let wait = Duration::from_millis(100u64 << self.restarts.min(6));
                self.restarts = self.restarts.saturating_add(1);
                ctx.run_later(wait, |act, ctx| act.reload(ctx));
            }
            // The first write and the interval come with the create.
            OnStart::Nothing => {}
        }
    }
}

impl VmActor {
    /// Caps the VM's logs (`vmm::logs`): checked as they grow, and
    /// every [`CONSOLE_CHECK`] (a jail's own log, a directory the watcher
    /// could not watch).
    fn watch_console(&mut self, ctx: &mut Context<Self>) {
        if self.console_check.is_some() {
            return;
        }
        self.watch_logs();
        self.console_check = Some(ctx.run_interval(CONSOLE_CHECK, |act, _| {
            let dirs = act.log_dirs();
            let vm = act.vm.record.name.clone();
            actix::spawn(async move {
                let _ = tokio::task::spawn_blocking(move || {
                    for name in logs::CAPPED {
                        for dir in &dirs {
                            let path = dir.join(name);
                            if let Err(e) = logs::rotate_if_larger(&path, logs::MAX_LOG_BYTES) {
                                warn!(vm = %vm, log = %path.display(), error = %e, "cannot rotate the log");
                            }
                        }
                    }
                })
                .await;
            });
        }));
    }

    /// The directories that hold the VM's logs: its own, its jail's root.
    fn log_dirs(&self) -> [PathBuf; 2] {
        let id = &self.vm.record.id;
        [
            self.settings.paths(id).dir,
            self.settings.jail_dir(id).join("root"),
        ]
    }

    /// Has the logs that exist now watched as they grow (again after each
    /// launch, which makes them).
    fn watch_logs(&self) {
        self.settings.log_cap.watch(&self.log_dirs());
    }

    fn reload(&mut self, ctx: &mut Context<Self>) {
        if self.spawns_in_flight > 0 && !self.reload_waits {
            // A spawn of the last incarnation is still out: its VMM would
            // hold the console lock (and run unrecorded) if the launch
            // were resumed first. Bounded: a spawn stuck in fork/exec
            // answers late, and its VMM is killed then.
            self.reload_waits = true;
            ctx.run_later(machine::LAUNCH_TIMEOUT, |act, ctx| {
                if act.reload_waits {
                    warn!(vm = %act.name(), "a spawn of the previous actor has not answered; reloading anyway");
                    act.reload(ctx);
                }
            });
            return;
        }
        self.reload_waits = false;
        self.on_start = OnStart::Recover;
        let get = self
            .store
            .send(Get::<VmRecord>::new(self.vm.record.id.clone()));
        ctx.wait(get.into_actor(self).map(|stored, act, ctx| match stored {
            Ok(Ok(Some(record))) => {
                act.vm = Vm::new(record);
                act.recover(ctx);
            }
            Ok(Ok(None)) => {
                act.vm.removed = true;
                act.become_tombstone(ctx);
            }
            // The store cannot answer: try again through another restart.
            _ => {
                act.on_start = OnStart::Reload;
                ctx.stop();
            }
        }));
    }
}

impl Supervised for VmActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!(vm = %self.name(), "VM actor restarting; the VM is read again from the store");
        // Memory goes; the record and the host say what is true. Clients
        // waiting on this VM hear that it is unavailable. A VMM the store
        // may not name goes too, or nothing would ever watch it.
        for process in [
            self.process.take().and_then(|p| Rc::try_unwrap(p).ok()),
            self.unrecorded.take(),
        ]
        .into_iter()
        .flatten()
        {
            if Some(process.pid()) != self.durable.as_ref().and_then(record_pid) {
                warn!(vm = %self.name(), pid = process.pid(), "killing a VMM the store may not name");
                let _ = process.signal(Signal::KILL);
                actix::spawn(async move {
                    process.exited().await;
                });
            }
        }
        self.launch = None;
        self.incarnation += 1;
        self.timer = None;
        self.timer_at = None;
        self.console_check = None;
        self.replies.clear();
        self.command = None;
        self.held = None;
        self.deferred.clear();
        self.writing = false;
        self.agent = None;
        self.agent_connect = None;
        self.agent_waiters.clear();
        self.on_start = OnStart::Reload;
    }
}

/// The VM's agent, waiting up to `timeout` for it to come up (a VM that is
/// booting); a VM that is not running answers a conflict at once.
pub struct GetAgent {
    pub timeout: Duration,
}

impl Message for GetAgent {
    type Result = Result<AgentLink, VmError>;
}

impl Handler<GetAgent> for VmActor {
    type Result = ResponseActFuture<Self, Result<AgentLink, VmError>>;

    fn handle(&mut self, msg: GetAgent, _: &mut Context<Self>) -> Self::Result {
        if let Some(link) = self.agent.clone().filter(|l| !l.is_closed()) {
            return Box::pin(fut::ready(Ok(link)));
        }
        let booting = !self.vm.removed
            && matches!(
                self.vm.record.phase,
                Phase::Launching { .. } | Phase::Running
            );
        if !booting {
            let state = self.vm.record.phase.state();
            return Box::pin(fut::ready(Err(VmError::Conflict(Conflict {
                name: self.name().to_string(),
                state: crate::vm::phase::state_name(state),
                hint: "start it first: the agent runs inside the VM",
            }))));
        }
        let name = self.name().to_string();
        if msg.timeout.is_zero() {
            return Box::pin(fut::ready(Err(VmError::Agent {
                name,
                reason: "the agent is not connected".into(),
            })));
        }
        // Waiters that gave up leave, so a VM whose agent never answers
        // does not collect them.
        self.agent_waiters.retain(|waiter| !waiter.is_closed());
        let (tx, rx) = oneshot::channel();
        self.agent_waiters.push(tx);
        Box::pin(fut::wrap_future(async move {
            match tokio::time::timeout(msg.timeout, rx).await {
                Ok(Ok(link)) => Ok(link),
                Ok(Err(_)) => Err(VmError::Agent {
                    name,
                    reason: "the VM stopped".into(),
                }),
                Err(_) => Err(VmError::Agent {
                    name,
                    reason: format!(
                        "no answer within {:?}; `banger vm logs` shows the console",
                        msg.timeout
                    ),
                }),
            }
        }))
    }
}

/// What can be asked of a VM.
pub enum VmCommand {
    Get,
    /// The first command of a new VM: its disk cloned from `source`.
    Create {
        source: DiskSource,
    },
    Start,
    Stop {
        timeout: Duration,
    },
    Kill,
    Restart {
        timeout: Duration,
    },
    Remove {
        force: bool,
    },
}

impl Message for VmCommand {
    type Result = Result<VmRecord, VmError>;
}

impl Handler<VmCommand> for VmActor {
    type Result = ResponseFuture<Result<VmRecord, VmError>>;

    fn handle(&mut self, command: VmCommand, ctx: &mut Context<Self>) -> Self::Result {
        let request = self.next_request;
        self.next_request += 1;
        let reloading = self.on_start == OnStart::Reload;
        let event = match command {
            VmCommand::Get => {
                // Reloading, memory is not to be trusted: the last durable
                // record is. A held write's record is the host's truth.
                let record = match (&self.durable, reloading) {
                    (Some(durable), true) => durable.clone(),
                    _ => self.vm.record.clone(),
                };
                let found = if self.vm.removed || !self.in_store {
                    Err(VmError::NotFound(record.name))
                } else {
                    Ok(record)
                };
                return Box::pin(async move { found });
            }
            _ if reloading => {
                let refused = VmError::Reloading(self.name().to_string());
                return Box::pin(async move { Err(refused) });
            }
            // Nothing is started that could not be recorded (a removed VM
            // answers its conflict below).
            _ if !self.vm.removed
                && let Some(down) = self.store_down() =>
            {
                let refused = self.not_recorded("nothing was changed".into(), down);
                // A create refused before its first write: the VM never was.
                if !self.in_store {
                    self.vm.removed = true;
                    self.become_tombstone(ctx);
                }
                return Box::pin(async move { Err(refused) });
            }
            VmCommand::Create { source } => {
                let path = source.named.clone();
                self.source = Some(source);
                Event::Create {
                    request,
                    source: path,
                }
            }
            VmCommand::Start => Event::Start { request },
            VmCommand::Stop { timeout } => Event::Stop { request, timeout },
            VmCommand::Kill => Event::Kill { request },
            VmCommand::Restart { timeout } => Event::Restart { request, timeout },
            VmCommand::Remove { force } => Event::Remove { request, force },
        };
        let (reply, answer) = oneshot::channel();
        self.replies.insert(request, reply);
        self.command = Some((self.vm.clone(), request));
        if let Err(conflict) = self.apply(event, ctx) {
            self.command = None;
            self.replies.remove(&request);
            return Box::pin(async move { Err(conflict.into()) });
        }
        Box::pin(async move {
            answer
                .await
                .unwrap_or(Err(VmError::Unavailable("VM actor")))
        })
    }
}

/// Releases a VM's ledger: its tap (through its network), its jail
/// (through the host) and its directory, then its lease, last, so that its
/// address is free only once nothing of the VM is left. A network that is
/// gone, or networking turned off, holds nothing of the VM any more.
async fn release_resources(
    settings: Arc<VmSettings>,
    networks: Addr<NetworkManager>,
    record: VmRecord,
) -> Result<(), VmError> {
    let released = |result: Result<Result<(), NetworkError>, MailboxError>| match result {
        Err(_) => Err(VmError::Unavailable("network manager")),
        Ok(Err(NetworkError::NotFound(_) | NetworkError::Off(_))) | Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(VmError::Network(e)),
    };
    if let Some((network, guest)) = record.guest()
        && record.resources.contains(&Resource::Tap)
    {
        released(networks.send(Detach { network, guest }).await)?;
    }
    let lease = record
        .network
        .as_ref()
        .filter(|_| record.resources.contains(&Resource::Lease))
        .map(|network| Release {
            network: network.network.clone(),
            vm: record.id.clone(),
        });
    tokio::task::spawn_blocking(move || {
        for resource in record.resources.iter().rev() {
            let Some(path) = settings.path_of(&record, *resource) else {
                continue;
            };
            let released = match resource {
                Resource::Jail => settings.host.remove_jail(&path),
                Resource::VmDirectory => reconcile::remove_any(&path),
                Resource::Lease | Resource::Tap | Resource::Image => continue,
            };
            released.map_err(|source| VmError::Io {
                action: "remove",
                path,
                source,
            })?;
        }
        Ok::<_, VmError>(())
    })
    .await
    .map_err(|_| VmError::Unavailable("blocking thread pool"))??;
    if let Some(lease) = lease {
        released(networks.send(lease).await)?;
    }
    Ok(())
}

/// The VM's own copy of the root disk (`crate::disk`), read through the
/// descriptor opened with the caller's authority (or the daemon's, for an
/// image's disk) and grown to `size`. The source is never written; a read
/// of it that stalls for `io_stall` fails the copy.
async fn clone_rootfs(
    source: Option<DiskSource>,
    size: Option<u64>,
    target: PathBuf,
    io_stall: Duration,
    tool_uid: u32,
) -> Result<(), VmError> {
    let from_caller = source.as_ref().is_some_and(|s| s.from_caller);
    let watch = Watch::new(io_stall);
    let watched = from_caller.then(|| watch.clone());
    let copy = tokio::task::spawn_blocking(move || {
        let Some(source) = source else {
            return Err(VmError::Io {
                action: "copy the root filesystem",
                path: target,
                source: std::io::Error::other("the opened file was lost"),
            });
        };
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(|e| VmError::Io {
                action: "create",
                path: dir.to_path_buf(),
                source: e,
            })?;
        }
        let cloned = disk::clone_disk(&source, &target, size, tool_uid, watched.as_ref(), || {
            fault::boundary("disk-cloning")
        })?;
        info!(disk = %target.display(), from = %source.named.display(), ?cloned, "root disk cloned");
        fault::boundary("disk-cloned");
        Ok(())
    });
    watch
        .bound(copy)
        .await?
        .map_err(|_| VmError::Unavailable("blocking thread pool"))?
}

/// A validated `vm create`, its root disk open with the caller's authority.
pub struct CreateVm {
    pub name: String,
    pub kernel: String,
    /// The root disk's source: a user's file, or an image's disk.
    pub rootfs: DiskSource,
    /// The image it comes from, which the VM then holds.
    pub image: Option<VmImage>,
    /// The size the root disk is grown to, when larger than its source.
    pub disk_bytes: Option<u64>,
    /// The image's command as the VM's main process.
    pub main: Option<crate::image::RunConfig>,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The daemon's default backend when not given.
    pub vmm: Option<VmmKind>,
    pub restart: Option<restart::RestartMode>,
    pub restart_delay_ms: Option<u64>,
    pub restart_max_delay_ms: Option<u64>,
    /// The network it joins (resolved: `--network`, or `default` when
    /// networking is on), or none.
    pub network: Option<String>,
    pub start: bool,
}

impl Message for CreateVm {
    type Result = Result<VmRecord, VmError>;
}

/// Creates VMs, holds their actors by name, lists them, and keeps the VM
/// records that do not decode in quarantine (their files and processes
/// are left alone until `vm forget`).
pub struct VmManager {
    store: Addr<StoreActor>,
    catalog: Addr<CatalogActor>,
    networks: Addr<NetworkManager>,
    settings: Arc<VmSettings>,
    vms: HashMap<String, Addr<VmActor>>,
    quarantined: Vec<Undecodable>,
}

impl VmManager {
    pub fn new(
        store: Addr<StoreActor>,
        catalog: Addr<CatalogActor>,
        networks: Addr<NetworkManager>,
        settings: Arc<VmSettings>,
    ) -> VmManager {
        VmManager {
            store,
            catalog,
            networks,
            settings,
            vms: HashMap::new(),
            quarantined: Vec::new(),
        }
    }

    fn start_actor(&self, record: VmRecord, fresh: bool, ctx: &mut Context<Self>) -> Addr<VmActor> {
        let (settings, store, catalog, networks) = (
            self.settings.clone(),
            self.store.clone(),
            self.catalog.clone(),
            self.networks.clone(),
        );
        let manager = ctx.address().recipient();
        Supervisor::start(move |_| {
            let mut actor = VmActor::new(record, settings, store, catalog, networks, manager);
            if fresh {
                actor.on_start = OnStart::Nothing;
                actor.in_store = false;
            }
            actor
        })
    }
}

impl Handler<VmRemoved> for VmManager {
    type Result = ();

    fn handle(&mut self, msg: VmRemoved, _: &mut Context<Self>) {
        if self.vms.get(&msg.name) == Some(&msg.actor) {
            self.vms.remove(&msg.name);
        }
    }
}

/// Kills a VMM that no record claims (left by a daemon killed between the
/// spawn and its record, or by a restored store) and waits for it to exit,
/// so the VM directory's lock is free before the VMs start. The pidfd is
/// opened first and the identity checked after, so a recycled pid is never
/// signalled.
async fn terminate_orphan(found: crate::vmm::orphans::FoundVmm) {
    let Ok(process) = ProcessHandle::open(found.pid) else {
        return;
    };
    if !is_alive(found.pid, found.start_time) {
        return;
    }
    warn!(pid = found.pid, id = %found.id, "terminating a VMM that no VM record claims");
    if process.signal(Signal::KILL).is_ok()
        && tokio::time::timeout(ORPHAN_EXIT_TIMEOUT, process.exited())
            .await
            .is_err()
    {
        warn!(pid = found.pid, id = %found.id, "the orphaned VMM did not exit after SIGKILL");
    }
}

impl Actor for VmManager {
    type Context = Context<Self>;
}

impl Supervised for VmManager {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("VM manager restarting; VMs are looked up again");
    }
}

/// Start-up, in order: every VM's ledger from the store, the VMMs no
/// record claims terminated, `vms/` and the jail base swept of what no
/// ledger claims, then one VmActor per VM. Answers how many VMs there are.
pub struct LoadVms;

impl Message for LoadVms {
    type Result = Result<usize, VmError>;
}

impl Handler<LoadVms> for VmManager {
    type Result = ResponseActFuture<Self, Result<usize, VmError>>;

    fn handle(&mut self, _: LoadVms, _: &mut Context<Self>) -> Self::Result {
        let (store, settings) = (self.store.clone(), self.settings.clone());
        let networks = self.networks.clone();
        let layout = Layout {
            vms_dir: settings.vms_dir.clone(),
            jail_base: settings.jail_base.clone(),
        };
        Box::pin(
            async move {
                let started = std::time::Instant::now();
                let listing = store
                    .send(List::<VmRecord>::new())
                    .await
                    .map_err(|_| VmError::Unavailable("store"))??;
                let quarantined: HashSet<&str> =
                    listing.undecodable.iter().map(|bad| bad.key.as_str()).collect();
                // A VMM is its VM's only if it is the very process (pid and
                // start time) the record holds; a quarantined VM's are left.
                let claimed: HashSet<(String, i32, u64)> = listing
                    .records
                    .iter()
                    .filter_map(|r| {
                        let p = r.process.as_ref()?;
                        Some((r.id.clone(), p.pid, p.start_time))
                    })
                    .collect();
                let vmms = tokio::task::spawn_blocking(move || layout.scan())
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?;
                for found in vmms {
                    let key = (found.id.clone(), found.pid, found.start_time);
                    if claimed.contains(&key) || quarantined.contains(found.id.as_str()) {
                        continue;
                    }
                    terminate_orphan(found).await;
                }
                let (vms, jails) = ledger_claims(&settings, &listing);
                let swept = {
                    let settings = settings.clone();
                    tokio::task::spawn_blocking(move || {
                        reconcile::sweep(&settings.vms_dir, &vms, reconcile::remove_any)
                            + reconcile::sweep(&settings.jail_base.join("firecracker"), &jails, |p| {
                                settings.host.remove_jail(p)
                            })
                    })
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?
                };
                info!(
                    vms = listing.records.len(),
                    removed = swept,
                    ms = started.elapsed().as_secs_f64() * 1000.0,
                    "VM ledgers reconciled"
                );
                // Before any VM actor starts: nothing attaches meanwhile. A
                // host that cannot be reconciled is reported, and the VMs
                // still start (a VM whose tap cannot be made fails its own
                // launch, saying why).
                match networks.send(ReconcileNetworks).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        error!(error = %error_chain(&e), "the networks could not be reconciled")
                    }
                    Err(_) => return Err(VmError::Unavailable("network manager")),
                }
                Ok::<_, VmError>(listing)
            }
            .into_actor(self)
            .map(|listing, manager, ctx| {
                let listing = listing?;
                for bad in &listing.undecodable {
                    warn!(table = %bad.table, key = %bad.key, reason = %bad.reason, "quarantined a VM record that does not decode; `banger vm forget` removes it");
                }
                manager.quarantined = listing.undecodable;
                for record in listing.records {
                    let name = record.name.clone();
                    let actor = manager.start_actor(record, false, ctx);
                    manager.vms.insert(name, actor);
                }
                Ok(manager.vms.len())
            }),
        )
    }
}

/// What the VM ledgers claim under `vms/` and under the jail base: every
/// resource of every record, and everything a quarantined key could own.
fn ledger_claims(
    settings: &VmSettings,
    listing: &Listing<VmRecord>,
) -> (HashSet<PathBuf>, HashSet<PathBuf>) {
    let (mut vms, mut jails) = (HashSet::new(), HashSet::new());
    for record in &listing.records {
        for resource in &record.resources {
            if let Some(path) = settings.path_of(record, *resource) {
                match resource {
                    Resource::VmDirectory => vms.insert(path),
                    Resource::Jail => jails.insert(path),
                    Resource::Lease | Resource::Tap | Resource::Image => false,
                };
            }
        }
    }
    for bad in &listing.undecodable {
        vms.insert(settings.paths(&bad.key).dir);
        jails.insert(settings.jail_dir(&bad.key));
    }
    (vms, jails)
}

/// A command for the VM named `name`.
pub struct ForVm {
    pub name: String,
    pub command: VmCommand,
}

impl Message for ForVm {
    type Result = Result<VmRecord, VmError>;
}

impl Handler<ForVm> for VmManager {
    type Result = ResponseActFuture<Self, Result<VmRecord, VmError>>;

    fn handle(&mut self, msg: ForVm, _: &mut Context<Self>) -> Self::Result {
        let Some(vm) = self.vms.get(&msg.name).cloned() else {
            return Box::pin(fut::ready(Err(VmError::NotFound(msg.name))));
        };
        let removing = matches!(msg.command, VmCommand::Remove { .. });
        let name = msg.name;
        let actor = vm.clone();
        Box::pin(
            async move {
                vm.send(msg.command)
                    .await
                    .map_err(|_| VmError::Unavailable("VM actor"))?
            }
            .into_actor(self)
            .map(move |result, manager, _| {
                // Only this VM's entry: the name may already be a new VM's.
                if removing && result.is_ok() && manager.vms.get(&name) == Some(&actor) {
                    manager.vms.remove(&name);
                }
                result
            }),
        )
    }
}

/// The agent of the VM named `name` (see [`GetAgent`]).
pub struct AgentOf {
    pub name: String,
    pub timeout: Duration,
}

impl Message for AgentOf {
    type Result = Result<AgentLink, VmError>;
}

impl Handler<AgentOf> for VmManager {
    type Result = ResponseFuture<Result<AgentLink, VmError>>;

    fn handle(&mut self, msg: AgentOf, _: &mut Context<Self>) -> Self::Result {
        let vm = self.vms.get(&msg.name).cloned();
        Box::pin(async move {
            let vm = vm.ok_or(VmError::NotFound(msg.name))?;
            vm.send(GetAgent {
                timeout: msg.timeout,
            })
            .await
            .map_err(|_| VmError::Unavailable("VM actor"))?
        })
    }
}

/// Every VM's record, by name.
pub struct ListVms;

impl Message for ListVms {
    type Result = Result<Vec<VmRecord>, VmError>;
}

impl Handler<ListVms> for VmManager {
    type Result = ResponseFuture<Result<Vec<VmRecord>, VmError>>;

    /// From the store; while it cannot write, from each VM actor's memory
    /// (a held write's record is what the host shows, not yet stored).
    fn handle(&mut self, _: ListVms, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let from_memory = self.settings.store_health.borrow().unwritable().is_some();
        let actors: Vec<Addr<VmActor>> = self.vms.values().cloned().collect();
        Box::pin(async move {
            let mut vms = if from_memory {
                // Bounded per VM: one actor busy reloading is left out, not
                // waited for.
                let answers = futures_util::future::join_all(
                    actors
                        .iter()
                        .map(|vm| tokio::time::timeout(MEMORY_ANSWER, vm.send(VmCommand::Get))),
                )
                .await;
                answers
                    .into_iter()
                    .filter_map(|answer| answer.ok()?.ok()?.ok())
                    .collect()
            } else {
                store
                    .send(List::<VmRecord>::new())
                    .await
                    .map_err(|_| VmError::Unavailable("store"))??
                    .records
            };
            vms.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(vms)
        })
    }
}

impl Handler<Quarantined> for VmManager {
    type Result = MessageResult<Quarantined>;

    fn handle(&mut self, _: Quarantined, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.quarantined.clone())
    }
}

/// `vm forget ID`: a quarantined VM record goes, with everything it could
/// own (its directory, its jail). Only quarantined records: a VM that
/// decodes is removed with `vm rm`.
pub struct ForgetVm {
    pub id: String,
}

impl Message for ForgetVm {
    type Result = Result<Undecodable, VmError>;
}

impl Handler<ForgetVm> for VmManager {
    type Result = ResponseActFuture<Self, Result<Undecodable, VmError>>;

    fn handle(&mut self, msg: ForgetVm, _: &mut Context<Self>) -> Self::Result {
        let Some(bad) = self.quarantined.iter().find(|b| b.key == msg.id).cloned() else {
            return Box::pin(fut::ready(Err(VmError::NotQuarantined(msg.id))));
        };
        let (store, settings) = (self.store.clone(), self.settings.clone());
        let id = msg.id;
        let layout = Layout {
            vms_dir: settings.vms_dir.clone(),
            jail_base: settings.jail_base.clone(),
        };
        Box::pin(
            async move {
                // Its VMM first: nothing may run on files about to go.
                let scan = tokio::task::spawn_blocking(move || layout.scan())
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?;
                for found in scan.into_iter().filter(|found| found.id == id) {
                    terminate_orphan(found).await;
                }
                store
                    .send(Delete::<VmRecord>::new(id.clone()))
                    .await
                    .map_err(|_| VmError::Unavailable("store"))??;
                Ok::<_, VmError>(id)
            }
            .into_actor(self)
            .then(move |deleted, manager, _| {
                if let Ok(id) = &deleted {
                    // The record is gone from the store: so from quarantine.
                    manager.quarantined.retain(|b| &b.key != id);
                }
                async move {
                    let id = deleted?;
                    let dir = settings.paths(&id).dir;
                    let jail = settings.jail_dir(&id);
                    tokio::task::spawn_blocking(move || {
                        settings.host.remove_jail(&jail)?;
                        reconcile::remove_any(&dir)
                    })
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?
                    .map_err(|source| VmError::Io {
                        action: "remove the files of",
                        path: PathBuf::from(&id),
                        source,
                    })?;
                    info!(id = %id, "forgot a quarantined VM");
                    Ok(bad)
                }
                .into_actor(manager)
            }),
        )
    }
}

impl Handler<CreateVm> for VmManager {
    type Result = ResponseActFuture<Self, Result<VmRecord, VmError>>;

    fn handle(&mut self, msg: CreateVm, ctx: &mut Context<Self>) -> Self::Result {
        if self.vms.contains_key(&msg.name) {
            return Box::pin(fut::ready(Err(VmError::Exists(msg.name))));
        }
        let defaults = self.settings.restart_defaults;
        let policy = RestartPolicy {
            mode: msg.restart.unwrap_or(defaults.mode),
            delay_ms: msg.restart_delay_ms.unwrap_or(defaults.delay_ms),
            max_delay_ms: msg.restart_max_delay_ms.unwrap_or(defaults.max_delay_ms),
        };
        let id = crate::vm::new_vm_id();
        let vmm = msg.vmm.unwrap_or(self.settings.default_vmm);
        // The ledger names the directory (and the jail, if the backend
        // makes one) before anything is created.
        let mut resources = vec![Resource::VmDirectory];
        if vmm == VmmKind::Firecracker {
            resources.push(Resource::Jail);
        }
        if msg.network.is_some() {
            resources.push(Resource::Lease);
        }
        if msg.image.is_some() {
            resources.push(Resource::Image);
        }
        let record = VmRecord {
            rootfs: self.settings.paths(&id).dir.join("rootfs.ext4"),
            id,
            name: msg.name.clone(),
            phase: Phase::Creating,
            resources,
            vmm,
            vcpus: msg.vcpus,
            memory_mib: msg.memory_mib,
            kernel: msg.kernel.clone(),
            created_at: Timestamp::now(),
            started_at: None,
            restart_policy: policy,
            restart_count: 0,
            restart_history: Default::default(),
            last_exit: None,
            process: None,
            error: None,
            degraded: None,
            network: msg.network.clone().map(|network| VmNetwork {
                network,
                address: None,
            }),
            image: msg.image.clone(),
            disk_bytes: msg.disk_bytes,
            main: msg.main.clone(),
        };
        // The name is taken from here on; a failed create gives it back.
        let actor = self.start_actor(record.clone(), true, ctx);
        self.vms.insert(msg.name.clone(), actor.clone());
        let catalog = self.catalog.clone();
        let (kernel, name) = (msg.kernel.clone(), msg.name.clone());
        let reserved_image = msg.image.clone();
        let image = msg.image.as_ref().map(|i| i.digest.clone());
        let (source, start) = (msg.rootfs, msg.start);
        // Err(true, _): refused before the actor took the create, so the
        // name is free again; Err(false, _): the VM's own record decides.
        let created = async move {
            catalog
                .send(Reserve {
                    kernel: kernel.clone(),
                    image: reserved_image,
                    vm: name.clone(),
                })
                .await
                .map_err(|_| VmError::Unavailable("catalog"))
                .and_then(|reserved| reserved.map_err(VmError::from))
                .map_err(|e| (true, e))?;
            let created = actor
                .send(VmCommand::Create { source })
                .await
                .map_err(|_| VmError::Unavailable("VM actor"));
            // The record (if any) names the kernel and image now: it holds them.
            let _ = catalog
                .send(Unreserve {
                    kernel,
                    image,
                    vm: name.clone(),
                })
                .await;
            let created = created.and_then(|c| c).map_err(|e| (false, e))?;
            info!(vm = %created.name, id = %created.id, "VM created");
            if start {
                actor
                    .send(VmCommand::Start)
                    .await
                    .map_err(|_| VmError::Unavailable("VM actor"))
                    .and_then(|started| started)
                    .map_err(|e| (false, e))
            } else {
                Ok(created)
            }
        };
        let ours = self.vms.get(&msg.name).cloned();
        let name = msg.name;
        Box::pin(created.into_actor(self).map(move |created, manager, _| {
            // Refused before the record was written: nothing to undo, and
            // the actor ends with its address.
            created.map_err(|(free, e)| {
                if free && manager.vms.get(&name) == ours.as_ref() {
                    manager.vms.remove(&name);
                }
                e
            })
        }))
    }
}
