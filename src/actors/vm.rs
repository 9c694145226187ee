//! `VmActor`, one per VM, and `VmManager`, which creates them and finds
//! them by name.
//!
//! Ownership: a VmActor owns its VM's record and its VMM process (a pidfd;
//! the process lives in its own session and outlives the daemon). It is the
//! only writer of its record, and it persists through `ctx.wait`, so its
//! writes reach the store in order. A VM crash is not an actor crash: the
//! actor sees the VMM exit, records it and applies the restart policy. On
//! daemon start each VmActor re-adopts a live VMM (same pid, same start
//! time, API answering) or records the crash it finds.
//!
//! VmActors are not supervised: a VmActor stops only when its VM is
//! removed, and a supervisor would bring a removed VM back.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use jiff::Timestamp;
use rustix::process::Signal;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::actors::store::{Delete, Get, List, Put, StoreActor};
use crate::catalog::CatalogError;
use crate::error_chain;
use crate::guest::disk::{self, InjectError};
use crate::guest::link::AgentLink;
use crate::host::HostOps;
use crate::store::StoreError;
use crate::store::records::{KernelRecord, VmRecord, VmState, VmmKind};
use crate::vm::InvalidVm;
use crate::vm::restart::{self, Decision, RestartPolicy};
use crate::vm::state::{self, Announcement, LastExit, StopIntent};
use crate::vmm::console;
use crate::vmm::firecracker::Firecracker;
use crate::vmm::orphans::Layout;
use crate::vmm::process::{ExitStatus, ProcessHandle, is_alive};
use crate::vmm::qemu::Qemu;
use crate::vmm::{BootFiles, LaunchSpec, VmPaths, Vmm, VmmError};

/// How long a graceful stop waits for the agent to take the request
/// before pressing Ctrl-Alt-Del instead.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a VMM starts (or is adopted) the agent is first sought.
const AGENT_FIRST_CONNECT: Duration = Duration::from_millis(100);
/// How often a VM's console log size is checked against its cap.
const CONSOLE_CHECK: Duration = Duration::from_secs(10);
/// `vm stop` waits this long for the guest before SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where VMs live and what they run with.
pub struct VmSettings {
    pub firecracker: Firecracker,
    pub qemu: Qemu,
    /// The backend of a VM created without `--vmm`.
    pub default_vmm: VmmKind,
    /// The banger-agent binary injected into every VM's root disk.
    pub agent: PathBuf,
    pub vms_dir: PathBuf,
    /// Where jails live (also where orphaned jailed VMMs are recognised).
    pub jail_base: PathBuf,
    pub restart_defaults: RestartPolicy,
    pub host: Arc<dyn HostOps>,
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
    #[error("no kernel named {0}")]
    KernelNotFound(String),
    #[error("kernel {kernel} is used by VM {vm}; remove the VM first")]
    KernelInUse { kernel: String, vm: String },
    #[error("VM {name} is {state}; {hint}")]
    Conflict {
        name: String,
        state: String,
        hint: &'static str,
    },
    #[error("VM {name} failed to start")]
    Launch {
        name: String,
        #[source]
        source: VmmError,
    },
    #[error("VM {name} failed to start")]
    Inject {
        name: String,
        #[source]
        source: InjectError,
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
    Store(#[from] StoreError),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
}

fn conflict(record: &VmRecord, hint: &'static str) -> VmError {
    VmError::Conflict {
        name: record.name.clone(),
        state: crate::wire_name(&record.state),
        hint,
    }
}

pub struct VmActor {
    record: VmRecord,
    settings: Arc<VmSettings>,
    store: Addr<StoreActor>,
    process: Option<Rc<ProcessHandle>>,
    intent: StopIntent,
    restart_timer: Option<SpawnHandle>,
    stop_timer: Option<SpawnHandle>,
    exit_waiters: Vec<oneshot::Sender<()>>,
    writes: mpsc::UnboundedSender<(Write, oneshot::Sender<bool>)>,
    /// The guest agent, once it has answered; dropped when its connection
    /// ends or the VMM exits.
    agent: Option<AgentLink>,
    /// Connecting to the agent, while the VMM runs and no link is up.
    agent_connect: Option<SpawnHandle>,
    agent_waiters: Vec<oneshot::Sender<AgentLink>>,
    /// What the agent announced before the VMM exits.
    announced: Option<Announcement>,
}

/// A change to a VM's record.
enum Write {
    Put(VmRecord),
    Delete(VmRecord),
}

/// Applies one VM's writes in the order they were queued, answering each
/// with whether it is durable.
async fn write_in_order(
    store: Addr<StoreActor>,
    mut writes: mpsc::UnboundedReceiver<(Write, oneshot::Sender<bool>)>,
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
        let ok = match result {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                error!(vm = %record.name, error = %error_chain(&e), "cannot record the VM's state");
                false
            }
            Err(_) => {
                error!(vm = %record.name, "the store is not answering; the VM's state is not recorded");
                false
            }
        };
        let _ = durable.send(ok);
    }
}

impl VmActor {
    pub fn new(record: VmRecord, settings: Arc<VmSettings>, store: Addr<StoreActor>) -> VmActor {
        let (writes, queue) = mpsc::unbounded_channel();
        actix::spawn(write_in_order(store.clone(), queue));
        VmActor {
            writes,
            record,
            settings,
            store,
            process: None,
            intent: StopIntent::None,
            restart_timer: None,
            stop_timer: None,
            exit_waiters: Vec::new(),
            agent: None,
            agent_connect: None,
            agent_waiters: Vec::new(),
            announced: None,
        }
    }

    /// Queues the record for the store. Writes reach the store in order
    /// (one writer task per VM) without pausing the actor; the answer fires
    /// when this write is durable (or has failed, and been logged), for
    /// what must be in the store before a client hears of it.
    fn persist(&mut self) -> oneshot::Receiver<bool> {
        self.write(Write::Put(self.record.clone()))
    }

    fn write(&mut self, write: Write) -> oneshot::Receiver<bool> {
        let (durable, done) = oneshot::channel();
        if self.writes.send((write, durable)).is_err() {
            error!(vm = %self.record.name, "the VM's writer is gone; its state is not recorded");
        }
        done
    }

    fn launch_spec(&self, kernel: &KernelRecord) -> LaunchSpec {
        let paths = self.settings.paths(&self.record.id);
        let args = kernel.cmdline.clone().unwrap_or_else(|| {
            self.settings
                .backend(self.record.vmm)
                .default_boot_args()
                .to_string()
        });
        LaunchSpec {
            id: self.record.id.clone(),
            boot: BootFiles {
                vmlinux: kernel.vmlinux.clone(),
                bzimage: kernel.bzimage.clone(),
                initrd: kernel.initrd.clone(),
                args: format!("{args} banger.hostname={}", self.record.name),
            },
            rootfs: self.record.rootfs.clone(),
            vcpus: self.record.vcpus,
            memory_mib: self.record.memory_mib,
            paths,
        }
    }

    /// Launches the VMM; the record says `starting` (durably) before and
    /// `running` with the pid (durably) before this reports success.
    fn begin_start(
        &mut self,
        ctx: &mut Context<Self>,
        restart: bool,
    ) -> ResponseActFuture<Self, Result<VmRecord, VmError>> {
        if let Some(timer) = self.restart_timer.take() {
            ctx.cancel_future(timer);
        }
        self.record.state = VmState::Starting;
        self.record.error = None;
        self.record.next_restart_at = None;
        if restart {
            self.record.restart_count += 1;
        }
        self.persist();
        let store = self.store.clone();
        let kernel_name = self.record.kernel.clone();
        let name = self.record.name.clone();
        let host = self.settings.host.clone();
        let settings = self.settings.clone();
        let vmm = self.record.vmm;
        let get = store.send(Get::<KernelRecord>::new(kernel_name.clone()));
        Box::pin(
            get
                .into_actor(self)
                .then(move |kernel, act, _| {
                    let spec = match kernel {
                        Ok(Ok(Some(kernel))) => Ok(act.launch_spec(&kernel)),
                        Ok(Ok(None)) => Err(VmError::NoKernel(kernel_name)),
                        Ok(Err(e)) => Err(VmError::Store(e)),
                        Err(_) => Err(VmError::Unavailable("store")),
                    };
                    async move {
                        let spec = spec?;
                        inject_agent(&spec.rootfs, &settings.agent, &name).await?;
                        settings
                            .backend(vmm)
                            .launch(&host, &spec)
                            .await
                            .map_err(|source| VmError::Launch { name, source })
                    }
                    .into_actor(act)
                })
                .then(|launched, act, ctx| {
                    let result = match launched {
                        Ok(launched) => {
                            act.record.process = Some(launched.recorded);
                            act.record.state = VmState::Running;
                            act.record.started_at = Some(Timestamp::now());
                            act.announced = None;
                            act.watch(Rc::new(launched.process), ctx);
                            Ok(act.record.clone())
                        }
                        Err(error) => {
                            // Whoever waits for this VM's agent hears it will not come.
                            act.agent_waiters.clear();
                            act.record.state = VmState::Failed;
                            act.record.error = Some(error_chain(&error));
                            act.record.process = None;
                            warn!(vm = %act.record.name, error = %error_chain(&error), "VM failed to start");
                            Err(error)
                        }
                    };
                    let durable = act.persist();
                    async move {
                        let _ = durable.await;
                        if let Ok(vm) = &result {
                            let pid = vm.process.as_ref().map(|p| p.pid);
                            info!(vm = %vm.name, id = %vm.id, pid, "VM running");
                        }
                        result
                    }
                    .into_actor(act)
                }),
        )
    }

    fn watch(&mut self, process: Rc<ProcessHandle>, ctx: &mut Context<Self>) {
        self.process = Some(process.clone());
        self.connect_agent(ctx);
        ctx.spawn(
            async move { process.exited().await }
                .into_actor(self)
                .map(|status, act, ctx| act.on_exit(status, ctx)),
        );
    }

    fn on_exit(&mut self, status: ExitStatus, ctx: &mut Context<Self>) {
        let now = Timestamp::now();
        self.process = None;
        if let Some(timer) = self.stop_timer.take() {
            ctx.cancel_future(timer);
        }
        self.drop_agent(ctx);
        let requested = self.intent != StopIntent::None;
        let kind = state::classify(self.intent, self.announced.take());
        self.intent = StopIntent::None;
        let ran_for = self
            .record
            .started_at
            .map(|started| {
                Duration::from_millis(
                    now.as_millisecond()
                        .saturating_sub(started.as_millisecond())
                        .max(0) as u64,
                )
            })
            .unwrap_or_default();
        self.record.process = None;
        self.record.last_exit = Some(LastExit {
            kind,
            code: status.code,
            signal: status.signal,
            at: now,
        });
        let decision = if requested {
            Decision::Stay
        } else {
            restart::after_exit(
                &self.record.restart_policy,
                &mut self.record.restart_history,
                kind,
                ran_for,
                now,
            )
        };
        match decision {
            Decision::Stay => {
                self.record.state = match kind {
                    state::ExitKind::Crash => VmState::Crashed,
                    _ => VmState::Stopped,
                };
            }
            Decision::RestartAfter { delay, crash_loop } => {
                self.record.state = match (kind, crash_loop) {
                    // A reboot the guest asked for is not a crash.
                    (state::ExitKind::Reboot, _) => VmState::Stopped,
                    (_, true) => VmState::CrashLoop,
                    (_, false) => VmState::Crashed,
                };
                self.schedule_restart(delay, now, ctx);
            }
        }
        let next_restart_at = self
            .record
            .next_restart_at
            .map(|t| t.to_string())
            .unwrap_or_default();
        warn!(
            vm = %self.record.name,
            kind = ?kind,
            code = ?status.code,
            signal = ?status.signal,
            state = ?self.record.state,
            next_restart_at = %next_restart_at,
            "VMM exited"
        );
        // Whoever waits for the exit hears of it once it is recorded.
        let durable = self.persist();
        let waiters = std::mem::take(&mut self.exit_waiters);
        actix::spawn(async move {
            let _ = durable.await;
            for waiter in waiters {
                let _ = waiter.send(());
            }
        });
    }

    fn schedule_restart(&mut self, delay: Duration, now: Timestamp, ctx: &mut Context<Self>) {
        let at = now
            .checked_add(
                jiff::SignedDuration::try_from(delay).unwrap_or(jiff::SignedDuration::ZERO),
            )
            .unwrap_or(now);
        self.record.next_restart_at = Some(at);
        self.restart_timer = Some(ctx.run_later(delay, |act, ctx| {
            act.restart_timer = None;
            info!(vm = %act.record.name, "restarting after backoff");
            let start = act.begin_start(ctx, true);
            ctx.spawn(start.map(|_, _, _| ()));
        }));
    }

    /// Start-up: re-adopt a live VMM, or record the crash the daemon's
    /// absence hid, or re-arm a pending restart.
    fn recover(&mut self, ctx: &mut Context<Self>) {
        let live = match (&self.record.process, state::has_process(self.record.state)) {
            (Some(p), true) if is_alive(p.pid, p.start_time) => Some(p.clone()),
            _ => None,
        };
        if let Some(recorded) = live {
            let handle = match ProcessHandle::open(recorded.pid) {
                Ok(handle) => Rc::new(handle),
                Err(e) => {
                    warn!(vm = %self.record.name, error = %e, "cannot watch the VMM; treating it as crashed");
                    self.on_exit(ExitStatus::default(), ctx);
                    return;
                }
            };
            let settings = self.settings.clone();
            let vmm = self.record.vmm;
            ctx.wait(
                async move { settings.backend(vmm).probe(&recorded).await }
                    .into_actor(self)
                    .map(move |info, act, ctx| match info {
                        Ok(()) => {
                            act.record.state = VmState::Running;
                            act.persist();
                            info!(vm = %act.record.name, pid = handle.pid(), "re-adopted running VM");
                            act.watch(handle, ctx);
                        }
                        Err(e) => {
                            // Alive but not answering: it cannot be managed,
                            // so it goes, and the policy decides what follows.
                            warn!(vm = %act.record.name, error = %error_chain(&e), "VMM does not answer; killing it");
                            let _ = handle.signal(Signal::KILL);
                            act.watch(handle, ctx);
                        }
                    }),
            );
        } else if state::has_process(self.record.state) {
            warn!(vm = %self.record.name, "VMM exited while the daemon was down");
            self.on_exit(ExitStatus::default(), ctx);
        } else if let Some(at) = self.record.next_restart_at {
            let now = Timestamp::now();
            let wait = at
                .as_millisecond()
                .saturating_sub(now.as_millisecond())
                .max(0) as u64;
            self.record.next_restart_at = None;
            self.schedule_restart(Duration::from_millis(wait), now, ctx);
        }
    }

    /// Connects to the guest agent in the background (the guest may still
    /// be booting); on success the link is kept and waiters get it, and a
    /// link that ends while the VMM runs is connected again.
    fn connect_agent(&mut self, ctx: &mut Context<Self>) {
        let Some(endpoint) = self.record.process.as_ref().and_then(|p| p.agent.clone()) else {
            return;
        };
        if let Some(previous) = self.agent_connect.take() {
            ctx.cancel_future(previous);
        }
        let (events, heard) = mpsc::unbounded_channel();
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
                    warn!(vm = %act.record.name, error = %error_chain(&e), "cannot connect to the agent")
                }
            }
        }));
        self.agent_connect = Some(handle);
    }

    /// Takes the agent's announcements one at a time, for as long as its
    /// connection lasts.
    fn listen(
        &mut self,
        mut heard: mpsc::UnboundedReceiver<Announcement>,
        ctx: &mut Context<Self>,
    ) {
        ctx.spawn(
            async move { (heard.recv().await, heard) }
                .into_actor(self)
                .map(|(event, heard), act, ctx| {
                    let Some(announced) = event else {
                        return;
                    };
                    act.announced = Some(announced);
                    info!(vm = %act.record.name, announced = ?act.announced, "guest is shutting down");
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
            vm = %self.record.name,
            kernel = %hello.kernel,
            agent = %hello.agent_version,
            boot_ms = hello.boot.ready_ms,
            "agent ready"
        );
        for waiter in self.agent_waiters.drain(..) {
            let _ = waiter.send(link.clone());
        }
        self.agent = Some(link.clone());
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

    fn wait_for_exit(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.exit_waiters.push(tx);
        rx
    }

    /// Answers with the record once the VMM has exited.
    fn after_exit(&mut self) -> ResponseActFuture<Self, Result<VmRecord, VmError>> {
        let exited = self.wait_for_exit();
        Box::pin(
            exited
                .into_actor(self)
                .map(|_, act, _| Ok(act.record.clone())),
        )
    }
}

impl Actor for VmActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.recover(ctx);
        ctx.run_interval(CONSOLE_CHECK, |act, _| {
            let path = act.settings.paths(&act.record.id).console_log();
            let vm = act.record.name.clone();
            actix::spawn(async move {
                let rotated = tokio::task::spawn_blocking(move || {
                    console::rotate_if_larger(&path, console::MAX_CONSOLE_BYTES)
                })
                .await;
                if let Ok(Err(e)) = rotated {
                    warn!(vm = %vm, error = %e, "cannot rotate the console log");
                }
            });
        });
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
        let booting = self.process.is_some() || self.record.state == VmState::Starting;
        if !booting || self.intent != StopIntent::None {
            return Box::pin(fut::ready(Err(conflict(
                &self.record,
                "start it first: the agent runs inside the VM",
            ))));
        }
        let (tx, rx) = oneshot::channel();
        self.agent_waiters.push(tx);
        let name = self.record.name.clone();
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
    Start,
    Stop { timeout: Duration },
    Kill,
    Restart { timeout: Duration },
    Remove { force: bool },
}

impl Message for VmCommand {
    type Result = Result<VmRecord, VmError>;
}

impl Handler<VmCommand> for VmActor {
    type Result = ResponseActFuture<Self, Result<VmRecord, VmError>>;

    fn handle(&mut self, command: VmCommand, ctx: &mut Context<Self>) -> Self::Result {
        let ready = |result| -> Self::Result { Box::pin(fut::ready(result)) };
        match command {
            VmCommand::Get => ready(Ok(self.record.clone())),
            VmCommand::Start => {
                // A stopping VM is on its way down: starting it is a conflict,
                // not a no-op that the stop would then undo.
                let stopping = self.intent != StopIntent::None;
                if !stopping && (self.process.is_some() || self.record.state == VmState::Starting) {
                    return ready(Ok(self.record.clone()));
                }
                if !state::can_start(self.record.state) {
                    return ready(Err(conflict(
                        &self.record,
                        "wait for it to stop, then start it",
                    )));
                }
                self.begin_start(ctx, false)
            }
            VmCommand::Stop { timeout } => self.stop(timeout, ctx),
            VmCommand::Kill => {
                let Some(process) = &self.process else {
                    return self.stop(Duration::ZERO, ctx);
                };
                self.intent = StopIntent::Kill;
                if let Err(e) = process.signal(Signal::KILL) {
                    warn!(vm = %self.record.name, error = %e, "cannot signal the VMM");
                }
                self.after_exit()
            }
            VmCommand::Restart { timeout } => {
                let stop = self.stop(timeout, ctx);
                Box::pin(stop.then(|stopped, act, ctx| -> Self::Result {
                    match stopped {
                        Ok(_) => act.begin_start(ctx, false),
                        Err(e) => Box::pin(fut::ready(Err(e))),
                    }
                }))
            }
            VmCommand::Remove { force } => {
                if self.process.is_none() && self.record.state == VmState::Starting {
                    // No process to kill yet: the launch must finish first.
                    return ready(Err(conflict(
                        &self.record,
                        "wait for it to finish starting",
                    )));
                }
                let running = self.process.is_some();
                if running && !force {
                    return ready(Err(conflict(&self.record, "stop it first, or use --force")));
                }
                let killed = match &self.process {
                    Some(process) => {
                        self.intent = StopIntent::Kill;
                        let _ = process.signal(Signal::KILL);
                        Some(self.wait_for_exit())
                    }
                    None => None,
                };
                if let Some(timer) = self.restart_timer.take() {
                    ctx.cancel_future(timer);
                }
                // The record goes after the exit is recorded: the writes are
                // ordered, and nothing may be written after the delete.
                let exited = async move {
                    if let Some(killed) = killed {
                        let _ = killed.await;
                    }
                };
                Box::pin(exited.into_actor(self).then(|(), act, _| {
                    let record = act.record.clone();
                    let deleted = act.write(Write::Delete(record.clone()));
                    let dir = act.settings.paths(&record.id).dir;
                    let jail = act.settings.backend(record.vmm).jail_dir(&record.id);
                    let host = act.settings.host.clone();
                    async move {
                        if !deleted.await.unwrap_or(false) {
                            return Err(VmError::Unavailable("store"));
                        }
                        remove_vm_files(host, jail, dir).await?;
                        info!(vm = %record.name, id = %record.id, "VM removed");
                        Ok(record)
                    }
                    .into_actor(act)
                    .map(|removed, _, ctx| {
                        if removed.is_ok() {
                            ctx.stop();
                        }
                        removed
                    })
                }))
            }
        }
    }
}

impl VmActor {
    fn stop(
        &mut self,
        timeout: Duration,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<VmRecord, VmError>> {
        if let Some(timer) = self.restart_timer.take() {
            // A stop wins over a pending restart.
            ctx.cancel_future(timer);
            self.record.next_restart_at = None;
            self.record.state = VmState::Stopped;
            self.persist();
        }
        let Some(process) = self.process.clone() else {
            if self.record.state == VmState::Starting {
                return Box::pin(fut::ready(Err(conflict(
                    &self.record,
                    "wait for it to finish starting",
                ))));
            }
            if matches!(self.record.state, VmState::Crashed | VmState::CrashLoop) {
                self.record.state = VmState::Stopped;
                self.persist();
            }
            return Box::pin(fut::ready(Ok(self.record.clone())));
        };
        if self.intent == StopIntent::None {
            self.intent = StopIntent::Stop;
            self.record.state = VmState::Stopping;
            self.persist();
            if let Some(recorded) = self.record.process.clone() {
                // The agent powers the guest off cleanly; without it,
                // Ctrl-Alt-Del through the VMM.
                let (agent, settings, vmm) =
                    (self.agent.clone(), self.settings.clone(), self.record.vmm);
                let name = self.record.name.clone();
                ctx.spawn(fut::wrap_future(async move {
                    let asked = match agent {
                        Some(agent) => tokio::time::timeout(
                            AGENT_STOP_TIMEOUT,
                            agent.shutdown(Announcement::Poweroff),
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
            self.stop_timer = Some(ctx.run_later(timeout, move |act, _| {
                act.stop_timer = None;
                if act.intent == StopIntent::Stop {
                    warn!(vm = %act.record.name, timeout = ?timeout, "guest did not stop in time; killing the VMM");
                    act.intent = StopIntent::StopEscalated;
                    let _ = process.signal(Signal::KILL);
                }
            }));
        }
        self.after_exit()
    }
}

/// Puts the current agent into the VM's root disk before each boot (an
/// upgraded banger brings its agent along). A disk that is not ext4 boots
/// as it is, with no agent.
async fn inject_agent(rootfs: &Path, agent: &Path, name: &str) -> Result<(), VmError> {
    let (rootfs, agent, vm) = (rootfs.to_path_buf(), agent.to_path_buf(), name.to_string());
    tokio::task::spawn_blocking(move || {
        if !disk::is_ext4(&rootfs)? {
            warn!(vm = %vm, disk = %rootfs.display(), "root disk is not ext4; booting it without banger-agent");
            return Ok(());
        }
        disk::inject_agent(&rootfs, &agent)
    })
    .await
    .map_err(|_| VmError::Unavailable("blocking thread pool"))?
    .map_err(|source| VmError::Inject {
        name: name.to_string(),
        source,
    })
}

/// Removes a VM's jail (through the host) and its directory.
async fn remove_vm_files(
    host: Arc<dyn HostOps>,
    jail: Option<PathBuf>,
    dir: PathBuf,
) -> Result<(), VmError> {
    tokio::task::spawn_blocking(move || {
        if let Some(jail) = jail {
            host.remove_jail(&jail).map_err(|source| VmError::Io {
                action: "remove the jail",
                path: jail.clone(),
                source,
            })?;
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(VmError::Io {
                action: "remove",
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        }
    })
    .await
    .map_err(|_| VmError::Unavailable("blocking thread pool"))?
}

/// A validated `vm create`.
pub struct CreateVm {
    pub name: String,
    pub kernel: String,
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The daemon's default backend when not given.
    pub vmm: Option<VmmKind>,
    pub restart: Option<restart::RestartMode>,
    pub restart_delay_ms: Option<u64>,
    pub restart_max_delay_ms: Option<u64>,
    pub start: bool,
}

impl Message for CreateVm {
    type Result = Result<VmRecord, VmError>;
}

/// Creates VMs, holds their actors by name, lists them.
pub struct VmManager {
    store: Addr<StoreActor>,
    settings: Arc<VmSettings>,
    vms: HashMap<String, Addr<VmActor>>,
    /// Names being created, so two creates cannot take one name.
    reserved: HashSet<String>,
}

impl VmManager {
    pub fn new(store: Addr<StoreActor>, settings: Arc<VmSettings>) -> VmManager {
        VmManager {
            store,
            settings,
            vms: HashMap::new(),
            reserved: HashSet::new(),
        }
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

/// Start-up: one VmActor per stored VM. Answers how many VMs there are.
pub struct LoadVms;

impl Message for LoadVms {
    type Result = Result<usize, VmError>;
}

impl Handler<LoadVms> for VmManager {
    type Result = ResponseActFuture<Self, Result<usize, VmError>>;

    fn handle(&mut self, _: LoadVms, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let layout = Layout {
            vms_dir: self.settings.vms_dir.clone(),
            jail_base: self.settings.jail_base.clone(),
        };
        Box::pin(
            async move {
                let records = store
                    .send(List::<VmRecord>::new())
                    .await
                    .map_err(|_| VmError::Unavailable("store"))??;
                let known: HashSet<String> = records.iter().map(|r| r.id.clone()).collect();
                let vmms = tokio::task::spawn_blocking(move || layout.scan())
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?;
                for (pid, id) in vmms.into_iter().filter(|(_, id)| !known.contains(id)) {
                    warn!(pid, id = %id, "terminating a VMM that no VM record claims");
                    if let Ok(process) = ProcessHandle::open(pid) {
                        let _ = process.signal(Signal::KILL);
                    }
                }
                Ok::<_, VmError>(records)
            }
            .into_actor(self)
            .map(|records, manager, _| {
                let records = records?;
                for record in records {
                    let name = record.name.clone();
                    let actor =
                        VmActor::new(record, manager.settings.clone(), manager.store.clone())
                            .start();
                    manager.vms.insert(name, actor);
                }
                Ok(manager.vms.len())
            }),
        )
    }
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
        Box::pin(
            async move {
                vm.send(msg.command)
                    .await
                    .map_err(|_| VmError::Unavailable("VM actor"))?
            }
            .into_actor(self)
            .map(move |result, manager, _| {
                if removing && result.is_ok() {
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

    fn handle(&mut self, _: ListVms, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move {
            let mut vms = store
                .send(List::<VmRecord>::new())
                .await
                .map_err(|_| VmError::Unavailable("store"))??;
            vms.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(vms)
        })
    }
}

impl Handler<CreateVm> for VmManager {
    type Result = ResponseActFuture<Self, Result<VmRecord, VmError>>;

    fn handle(&mut self, msg: CreateVm, _: &mut Context<Self>) -> Self::Result {
        if self.vms.contains_key(&msg.name) || !self.reserved.insert(msg.name.clone()) {
            return Box::pin(fut::ready(Err(VmError::Exists(msg.name))));
        }
        let defaults = self.settings.restart_defaults;
        let policy = RestartPolicy {
            mode: msg.restart.unwrap_or(defaults.mode),
            delay_ms: msg.restart_delay_ms.unwrap_or(defaults.delay_ms),
            max_delay_ms: msg.restart_max_delay_ms.unwrap_or(defaults.max_delay_ms),
        };
        let id = crate::vm::new_vm_id();
        let dir = self.settings.paths(&id).dir;
        let record = VmRecord {
            id,
            name: msg.name.clone(),
            state: VmState::Created,
            vmm: msg.vmm.unwrap_or(self.settings.default_vmm),
            vcpus: msg.vcpus,
            memory_mib: msg.memory_mib,
            kernel: msg.kernel.clone(),
            rootfs: dir.join("rootfs.ext4"),
            created_at: Timestamp::now(),
            started_at: None,
            restart_policy: policy,
            restart_count: 0,
            restart_history: Default::default(),
            next_restart_at: None,
            last_exit: None,
            process: None,
            error: None,
        };
        let store = self.store.clone();
        let name = msg.name.clone();
        let source = msg.rootfs;
        let start = msg.start;
        let host = self.settings.host.clone();
        let staged = record.clone();
        Box::pin(
            async move {
                match store
                    .send(Get::<KernelRecord>::new(msg.kernel.clone()))
                    .await
                {
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => return Err(VmError::NoKernel(msg.kernel)),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(VmError::Unavailable("store")),
                }
                clone_rootfs(source, dir.clone(), staged.rootfs.clone()).await?;
                if let Err(e) = store
                    .send(Put(staged))
                    .await
                    .map_err(|_| VmError::Unavailable("store"))
                    .and_then(|r| r.map_err(VmError::from))
                {
                    let _ = remove_vm_files(host, None, dir).await;
                    return Err(e);
                }
                Ok(())
            }
            .into_actor(self)
            .then(move |created, manager, _| {
                manager.reserved.remove(&name);
                let result: Result<Addr<VmActor>, VmError> = created.map(|()| {
                    info!(vm = %record.name, id = %record.id, "VM created");
                    let actor = VmActor::new(
                        record.clone(),
                        manager.settings.clone(),
                        manager.store.clone(),
                    )
                    .start();
                    manager.vms.insert(name.clone(), actor.clone());
                    actor
                });
                let record = record.clone();
                async move {
                    let actor = result?;
                    if start {
                        actor
                            .send(VmCommand::Start)
                            .await
                            .map_err(|_| VmError::Unavailable("VM actor"))?
                    } else {
                        Ok(record)
                    }
                }
                .into_actor(manager)
            }),
        )
    }
}

/// The VM's own copy of the root disk: a reflink where the filesystem
/// allows, a copy otherwise. The user's file is never written.
async fn clone_rootfs(source: PathBuf, dir: PathBuf, target: PathBuf) -> Result<(), VmError> {
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|e| VmError::Io {
            action: "create",
            path: dir.clone(),
            source: e,
        })?;
        reflink_copy::reflink_or_copy(&source, &target)
            .map(drop)
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                VmError::Io {
                    action: "copy the root filesystem",
                    path: source.clone(),
                    source: e,
                }
            })
    })
    .await
    .map_err(|_| VmError::Unavailable("blocking thread pool"))?
}

/// Whether a kernel is in use, for `kernel rm`.
pub fn vm_using_kernel<'a>(vms: &'a [VmRecord], kernel: &str) -> Option<&'a VmRecord> {
    vms.iter().find(|vm| vm.kernel == kernel)
}
