//! Every (phase, event) pair against a table of outcomes, and properties
//! over random event sequences run against a model of the host.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;

use proptest::prelude::*;

use super::*;
use crate::vm::phase::VmState;

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + seconds).expect("timestamp")
}

fn process(pid: i32) -> VmmProcess {
    VmmProcess {
        pid,
        start_time: pid as u64,
        api_socket: PathBuf::from("/run/api.sock"),
        agent: None,
        accel: None,
    }
}

fn record() -> VmRecord {
    crate::vm::record::sample()
}

/// A VM in `phase`, with a process or a spawn under way as given.
fn vm(phase: Phase, pid: Option<i32>, spawning: bool) -> Vm {
    let mut vm = Vm::new(VmRecord {
        phase,
        process: pid.map(process),
        ..record()
    });
    vm.spawning = spawning;
    vm
}

/// One of every phase, with the process variants that matter.
fn phases() -> Vec<(&'static str, Vm)> {
    let later = at(100);
    let mut removed = vm(Phase::Stopped, None, false);
    removed.removed = true;
    vec![
        ("creating", vm(Phase::Creating, None, false)),
        ("created", vm(Phase::Created, None, false)),
        (
            "launching/spawning",
            vm(
                Phase::Launching {
                    restart: false,
                    retry: false,
                    deadline: later,
                },
                None,
                true,
            ),
        ),
        (
            "launching/pid",
            vm(
                Phase::Launching {
                    restart: false,
                    retry: false,
                    deadline: later,
                },
                Some(7),
                false,
            ),
        ),
        (
            "launching-restart/pid",
            vm(
                Phase::Launching {
                    restart: true,
                    retry: false,
                    deadline: later,
                },
                Some(7),
                false,
            ),
        ),
        (
            "launching-retry/pid",
            vm(
                Phase::Launching {
                    restart: false,
                    retry: true,
                    deadline: later,
                },
                Some(7),
                false,
            ),
        ),
        ("running/pid", vm(Phase::Running, Some(7), false)),
        (
            "stopping/pid",
            vm(
                Phase::Stopping {
                    intent: Intent::Stop,
                    killed: false,
                    deadline: later,
                },
                Some(7),
                false,
            ),
        ),
        (
            "stopping-killed/pid",
            vm(
                Phase::Stopping {
                    intent: Intent::Stop,
                    killed: true,
                    deadline: later,
                },
                Some(7),
                false,
            ),
        ),
        (
            "stopping-restart/pid",
            vm(
                Phase::Stopping {
                    intent: Intent::Restart,
                    killed: false,
                    deadline: later,
                },
                Some(7),
                false,
            ),
        ),
        (
            "stopping-kill/spawning",
            vm(
                Phase::Stopping {
                    intent: Intent::Kill,
                    killed: true,
                    deadline: later,
                },
                None,
                true,
            ),
        ),
        (
            "backing-off",
            vm(
                Phase::BackingOff {
                    until: later,
                    crash_loop: false,
                },
                None,
                false,
            ),
        ),
        ("stopped", vm(Phase::Stopped, None, false)),
        ("crashed", vm(Phase::Crashed, None, false)),
        ("failed", vm(Phase::Failed, None, false)),
        (
            "removing/pid",
            vm(Phase::Removing { deadline: later }, Some(7), false),
        ),
        (
            "removing/files",
            vm(Phase::Removing { deadline: later }, None, false),
        ),
        ("removed", removed),
        ("stopped/tap", networked(Phase::Stopped, true)),
        (
            "backing-off/tap",
            networked(
                Phase::BackingOff {
                    until: later,
                    crash_loop: false,
                },
                true,
            ),
        ),
        ("created/net", networked(Phase::Created, false)),
    ]
}

/// A VM with a network and a lease, its tap in the ledger or not.
fn networked(phase: Phase, tap: bool) -> Vm {
    let mut vm = vm(phase, None, false);
    vm.record.network = Some(crate::vm::record::VmNetwork {
        network: "default".into(),
        address: Some(std::net::Ipv4Addr::new(172, 30, 0, 2)),
    });
    if tap {
        vm.record.resources.push(Resource::Tap);
    }
    vm
}

/// One of every event; timers both before and at their deadline.
fn events() -> Vec<(&'static str, Event, Timestamp)> {
    let now = at(10);
    let due = at(200);
    let timeout = Duration::from_secs(5);
    vec![
        (
            "create",
            Event::Create {
                request: 1,
                source: PathBuf::from("/images/base.ext4"),
            },
            now,
        ),
        ("provisioned", Event::Provisioned(Ok(None)), now),
        (
            "provision-failed",
            Event::Provisioned(Err("no space".into())),
            now,
        ),
        ("start", Event::Start { request: 1 }, now),
        (
            "stop",
            Event::Stop {
                request: 1,
                timeout,
            },
            now,
        ),
        ("kill", Event::Kill { request: 1 }, now),
        (
            "restart",
            Event::Restart {
                request: 1,
                timeout,
            },
            now,
        ),
        (
            "remove",
            Event::Remove {
                request: 1,
                force: false,
            },
            now,
        ),
        (
            "remove-force",
            Event::Remove {
                request: 1,
                force: true,
            },
            now,
        ),
        ("spawned", Event::Spawned(process(8)), now),
        ("ready", Event::Ready, now),
        ("launch-failed", Event::LaunchFailed("boom".into()), now),
        ("exited", Event::Exited(Exit::default()), now),
        ("announced", Event::Announced(Announcement::poweroff()), now),
        ("timer-early", Event::Timer, now),
        ("timer-due", Event::Timer, due),
        (
            "recovered-running",
            Event::Recovered(HostView::Running),
            now,
        ),
        ("recovered-alive", Event::Recovered(HostView::Alive), now),
        ("recovered-gone", Event::Recovered(HostView::Gone), now),
        ("files-removed", Event::FilesRemoved(Ok(())), now),
        ("files-failed", Event::FilesRemoved(Err("busy".into())), now),
        ("detached", Event::Detached(Ok(())), now),
        ("detach-failed", Event::Detached(Err("busy".into())), now),
        ("probed", Event::Probed(Ok(())), now),
        ("probe-failing", Event::Probed(Err("no answer".into())), now),
    ]
}

fn phase_name(vm: &Vm) -> String {
    if vm.removed {
        return "removed".into();
    }
    let name = match vm.record.phase {
        Phase::Creating => "creating".to_string(),
        Phase::Created => "created".to_string(),
        Phase::Launching { restart, retry, .. } => format!(
            "launching{}{}",
            if restart { "-restart" } else { "" },
            if retry { "-retry" } else { "" }
        ),
        Phase::Running => "running".into(),
        Phase::Stopping { intent, killed, .. } => {
            format!("stopping-{intent:?}{}", if killed { "-killed" } else { "" }).to_lowercase()
        }
        Phase::BackingOff { .. } => "backing-off".into(),
        Phase::Stopped => "stopped".into(),
        Phase::Crashed => "crashed".into(),
        Phase::Failed => "failed".into(),
        Phase::Removing { .. } => "removing".into(),
    };
    let process = match &vm.record.process {
        Some(p) => format!("/pid{}", p.pid),
        None => String::new(),
    };
    let spawning = if vm.spawning { "/spawning" } else { "" };
    let tap = if vm.record.resources.contains(&Resource::Tap) {
        "/tap"
    } else {
        ""
    };
    let degraded = if vm.record.degraded.is_some() {
        "/degraded"
    } else {
        ""
    };
    format!("{name}{process}{spawning}{degraded}{tap}")
}

fn effect_name(effect: &Effect) -> String {
    match effect {
        Effect::Persist => "persist".into(),
        Effect::Delete => "delete".into(),
        Effect::Provision(_) => "provision".into(),
        Effect::Detach => "detach".into(),
        Effect::Spawn => "spawn".into(),
        Effect::Configure => "configure".into(),
        Effect::Kill => "kill".into(),
        Effect::KillUnrecorded => "kill-unrecorded".into(),
        Effect::AskPoweroff => "ask-poweroff".into(),
        Effect::ArmTimer(_) => "timer".into(),
        Effect::ConnectAgent => "connect-agent".into(),
        Effect::DropAgent => "drop-agent".into(),
        Effect::RemoveFiles => "remove-files".into(),
        Effect::Reply {
            outcome: Outcome::Done,
            ..
        } => "reply".into(),
        Effect::Reply {
            outcome: Outcome::Failed(_),
            ..
        } => "reply-failed".into(),
    }
}

fn outcome(vm: &Vm, event: Event, now: Timestamp) -> String {
    match step(vm, event, now) {
        Err(conflict) => format!("conflict: {conflict}"),
        Ok((next, effects)) => {
            let waiting = next
                .waiters
                .iter()
                .map(|w| format!(" wait-{:?}", w.until).to_lowercase())
                .collect::<String>();
            let effects: Vec<String> = effects.iter().map(effect_name).collect();
            format!("{}{waiting} [{}]", phase_name(&next), effects.join(" "))
        }
    }
}

/// The outcome of every (phase, event) pair. A change of behaviour shows
/// here as a changed line, to be read and agreed with.
const EXPECTED: &str = include_str!("transitions.txt");

#[test]
fn every_phase_and_event_pair_has_its_outcome() {
    let mut table = String::new();
    for (phase, vm) in phases() {
        for (event, e, now) in events() {
            let _ = writeln!(table, "{phase:24} {event:16} -> {}", outcome(&vm, e, now));
        }
    }
    // The lifecycle does no I/O, its tests neither: the new table is shown.
    assert!(
        table == EXPECTED,
        "the transition table changed; put this in src/vm/machine/transitions.txt once it reads right:\n{table}"
    );
}

#[test]
fn the_persisted_phase_shows_as_the_stable_state() {
    let cases = [
        (Phase::Created, VmState::Created),
        (
            Phase::BackingOff {
                until: at(0),
                crash_loop: true,
            },
            VmState::CrashLoop,
        ),
        (
            Phase::BackingOff {
                until: at(0),
                crash_loop: false,
            },
            VmState::Crashed,
        ),
        (Phase::Removing { deadline: at(0) }, VmState::Removing),
    ];
    for (phase, state) in cases {
        assert_eq!(phase.state(), state);
    }
    let json = serde_json::to_value(Phase::Stopping {
        intent: Intent::Restart,
        killed: false,
        deadline: at(0),
    })
    .expect("phase to json");
    assert_eq!(json["phase"], "stopping");
    assert_eq!(json["intent"], "restart");
}

/// What the host does with the effects, in the model.
#[derive(Debug, Clone)]
enum Pending {
    Provision,
    Detach,
    Spawn,
    Configure,
    RemoveFiles,
    /// A SIGKILLed VMM's exit, still to be seen.
    Exit(i32),
}

/// The daemon and the host, modelled: the machine, the store's copy of the
/// record, live VMM processes, work in flight, and the clock; and the
/// interpreter's rules for a store that refuses writes (`actors::vm`): a
/// command whose first write is refused is undone and answered, any other
/// refused write holds the effects behind it and defers later facts,
/// commands are refused while the store is down or a write is held, and
/// waiting clients are answered when a write is held.
struct World {
    vm: Vm,
    stored: Option<VmRecord>,
    live: Vec<i32>,
    pending: Vec<Pending>,
    next_pid: i32,
    now: Timestamp,
    /// A stop or kill was accepted and no start or restart since.
    stopped_by_user: bool,
    /// The store refuses every write.
    store_down: bool,
    /// A refused write and the effects behind it.
    held: Option<VecDeque<Effect>>,
    /// Facts that came while a write was held.
    deferred: VecDeque<Event>,
    next_request: RequestId,
    /// Requests accepted and not yet answered.
    open: BTreeSet<RequestId>,
    /// How many answers each request got.
    answered: BTreeMap<RequestId, u32>,
    /// A spawned VMM the machine has not recorded yet.
    unrecorded: Option<i32>,
}

#[derive(Debug, Clone)]
enum Action {
    Start,
    Stop,
    Kill,
    Restart,
    Remove(bool),
    /// Finish the `n`th piece of work in flight (success or failure).
    Finish(usize, bool),
    /// A live VMM dies on its own.
    Crash,
    Announce,
    /// Time passes by this many seconds, and the timer fires.
    Advance(u8),
    /// The daemon is SIGKILLed and starts again.
    DaemonRestart,
    /// The VM's actor stops on a fault other than a refused write and is
    /// restarted by its supervisor, reading the store again.
    ActorRestart,
    /// The store starts refusing writes (a full disk).
    StoreFails,
    /// The store writes again.
    StoreRecovers,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        Just(Action::Start),
        Just(Action::Stop),
        Just(Action::Kill),
        Just(Action::Restart),
        any::<bool>().prop_map(Action::Remove),
        (0usize..3, any::<bool>()).prop_map(|(n, ok)| Action::Finish(n, ok)),
        (0usize..3, any::<bool>()).prop_map(|(n, ok)| Action::Finish(n, ok)),
        Just(Action::Crash),
        Just(Action::Announce),
        (1u8..120).prop_map(Action::Advance),
        Just(Action::DaemonRestart),
        Just(Action::ActorRestart),
        Just(Action::StoreFails),
        Just(Action::StoreRecovers),
    ]
}

impl World {
    fn new() -> World {
        let creating = VmRecord {
            phase: Phase::Creating,
            network: Some(crate::vm::record::VmNetwork {
                network: "default".into(),
                address: None,
            }),
            ..record()
        };
        World {
            vm: Vm::new(creating),
            // Nothing is stored until the create's first write.
            stored: None,
            live: Vec::new(),
            pending: Vec::new(),
            next_pid: 100,
            now: at(0),
            stopped_by_user: false,
            store_down: false,
            held: None,
            deferred: VecDeque::new(),
            next_request: 1,
            open: BTreeSet::new(),
            answered: BTreeMap::new(),
            unrecorded: None,
        }
    }

    /// A request's answer; a second answer is an error.
    fn answer(&mut self, request: RequestId) -> Result<(), String> {
        self.open.remove(&request);
        let count = self.answered.entry(request).or_default();
        *count += 1;
        if *count > 1 {
            return Err(format!("request {request} answered {count} times"));
        }
        Ok(())
    }

    /// The store keeps the record the VM shows (none: deleted).
    fn agrees_with_store(&self, what: &str) -> Result<(), String> {
        match &self.stored {
            Some(stored) if stored != &self.vm.record => Err(format!(
                "{what}: the answer shows {:?}, the store holds {:?}",
                self.vm.record.phase, stored.phase
            )),
            _ => Ok(()),
        }
    }

    /// Feeds one event as the interpreter would; answers whether it was a
    /// user command that took effect.
    fn feed(&mut self, event: Event) -> Result<bool, String> {
        let request = request_of(&event);
        if self.held.is_some() || (request.is_some() && self.store_down) {
            match request {
                // Refused at once: nothing could be recorded.
                Some(request) => self.answer(request)?,
                None => self.deferred.push_back(event),
            }
            return Ok(false);
        }
        let (vm, effects) = match step(&self.vm, event.clone(), self.now) {
            Ok(answer) => answer,
            Err(_) => {
                if let Some(request) = request {
                    self.answer(request)?;
                }
                return Ok(false);
            }
        };
        if self.vm.removed && !effects.is_empty() {
            return Err(format!("a removed VM acted on {event:?}: {effects:?}"));
        }
        let undo = request
            .filter(|_| undoable(&effects))
            .map(|request| (self.vm.clone(), request));
        if let Some(request) = request {
            self.open.insert(request);
        }
        self.vm = vm;
        let undone = self.run(effects.into(), undo)?;
        Ok(request.is_some() && !undone)
    }

    fn fact(&mut self, event: Event) -> Result<(), String> {
        self.feed(event).map(drop)
    }

    /// Carries out effects in order; answers whether a command was undone.
    fn run(
        &mut self,
        mut effects: VecDeque<Effect>,
        mut undo: Option<(Vm, RequestId)>,
    ) -> Result<bool, String> {
        while let Some(effect) = effects.pop_front() {
            if matches!(effect, Effect::Persist | Effect::Delete) && self.store_down {
                if let Some((before, request)) = undo.take() {
                    self.vm = before;
                    self.answer(request)?;
                    self.agrees_with_store("an undone command")?;
                    return Ok(true);
                }
                effects.push_front(effect);
                self.held = Some(effects);
                for request in std::mem::take(&mut self.open) {
                    self.answer(request)?;
                }
                return Ok(false);
            }
            match effect {
                Effect::Persist => {
                    undo = None;
                    if self.vm.record.process.as_ref().map(|p| p.pid) == self.unrecorded {
                        self.unrecorded = None;
                    }
                    if self.stored.is_none() {
                        return Err("a record was written after its delete".into());
                    }
                    self.stored = Some(self.vm.record.clone());
                }
                Effect::Delete => {
                    undo = None;
                    self.stored = None;
                }
                Effect::Spawn => {
                    if !self.live.is_empty() || self.vm.record.process.is_some() {
                        return Err(format!(
                            "a spawn while VMM {:?} lives (record {:?})",
                            self.live, self.vm.record.process
                        ));
                    }
                    if self.stopped_by_user {
                        return Err("a spawn after the user's stop".into());
                    }
                    if self.stored.as_ref().map(|r| r.phase) != Some(self.vm.record.phase) {
                        return Err("a spawn before its launch was durable".into());
                    }
                    if !self
                        .stored
                        .as_ref()
                        .is_some_and(|r| r.resources.contains(&Resource::Tap))
                    {
                        return Err("a tap made before the ledger named it".into());
                    }
                    self.pending.push(Pending::Spawn);
                }
                Effect::Configure => {
                    let recorded = self.stored.as_ref().and_then(|r| r.process.clone());
                    if recorded.is_none() {
                        return Err("configured before the pid was durable".into());
                    }
                    self.pending.push(Pending::Configure);
                }
                Effect::Kill => {
                    if let Some(p) = &self.vm.record.process {
                        self.pending.push(Pending::Exit(p.pid));
                    }
                }
                Effect::KillUnrecorded => {
                    if let Some(pid) = self.unrecorded.take() {
                        self.live.retain(|&l| l != pid);
                    }
                }
                Effect::RemoveFiles => self.pending.push(Pending::RemoveFiles),
                Effect::Provision(_) => {
                    if self.stored.as_ref().map(|r| r.phase) != Some(Phase::Creating) {
                        return Err("a disk cloned before the ledger was durable".into());
                    }
                    self.pending.push(Pending::Provision);
                }
                Effect::Detach => {
                    if !self.vm.record.phase.at_rest() {
                        return Err("a tap removed from a VM that is not at rest".into());
                    }
                    self.pending.push(Pending::Detach);
                }
                Effect::Reply { request, .. } => {
                    // A request already answered (its client was told when
                    // a write was held, or its actor restarted) hears no more.
                    if self.open.contains(&request) {
                        self.answer(request)?;
                    }
                    let durable = match &self.stored {
                        Some(stored) => stored == &self.vm.record,
                        None => self.vm.removed,
                    };
                    if !durable {
                        return Err(format!(
                            "a reply ahead of the store: {:?} vs {:?}",
                            self.vm.record.phase,
                            self.stored.as_ref().map(|r| r.phase)
                        ));
                    }
                }
                Effect::AskPoweroff
                | Effect::ArmTimer(_)
                | Effect::ConnectAgent
                | Effect::DropAgent => {}
            }
        }
        Ok(false)
    }

    /// The store writes again: the held write, then the deferred facts.
    fn recover_store(&mut self) -> Result<(), String> {
        self.store_down = false;
        if let Some(held) = self.held.take() {
            self.run(held, None)?;
        }
        while self.held.is_none() {
            let Some(event) = self.deferred.pop_front() else {
                break;
            };
            self.feed(event)?;
        }
        Ok(())
    }

    /// Everything settles: the store writes, work finishes, time passes.
    /// Then every request has been answered, exactly once.
    fn settle(&mut self) -> Result<(), String> {
        self.recover_store()?;
        for _ in 0..200 {
            if !self.pending.is_empty() {
                self.act(Action::Finish(0, true))?;
            } else if !self.open.is_empty() {
                self.act(Action::Advance(60))?;
            } else {
                break;
            }
        }
        if !self.open.is_empty() {
            return Err(format!(
                "requests never answered: {:?} in {:?}",
                self.open, self.vm.record.phase
            ));
        }
        let issued: BTreeSet<RequestId> = (1..self.next_request).collect();
        let answered: BTreeSet<RequestId> = self.answered.keys().copied().collect();
        if issued != answered {
            return Err(format!("issued {issued:?}, answered {answered:?}"));
        }
        Ok(())
    }

    fn act(&mut self, action: Action) -> Result<(), String> {
        let timeout = Duration::from_secs(5);
        let user = |world: &mut World, event: Event, stops: Option<bool>| {
            // Set before the effects run (a spawn checks it), taken back
            // if the command did not take effect.
            let before = world.stopped_by_user;
            if let Some(stops) = stops
                && step(&world.vm, event.clone(), world.now).is_ok()
            {
                world.stopped_by_user = stops;
            }
            if !world.feed(event)? {
                world.stopped_by_user = before;
            }
            Ok(())
        };
        let request = self.next_request;
        if matches!(
            action,
            Action::Start | Action::Restart | Action::Stop | Action::Kill | Action::Remove(_)
        ) {
            self.next_request += 1;
        }
        match action {
            Action::Start => user(self, Event::Start { request }, Some(false)),
            Action::Restart => user(self, Event::Restart { request, timeout }, Some(false)),
            Action::Stop => user(self, Event::Stop { request, timeout }, Some(true)),
            Action::Kill => user(self, Event::Kill { request }, Some(true)),
            Action::Remove(force) => user(self, Event::Remove { request, force }, None),
            Action::Finish(n, ok) => {
                if self.pending.is_empty() {
                    return Ok(());
                }
                let work = self.pending.remove(n % self.pending.len());
                match (work, ok) {
                    (Pending::Spawn, true) => {
                        let pid = self.next_pid;
                        self.next_pid += 1;
                        self.live.push(pid);
                        self.unrecorded = Some(pid);
                        let before = self.vm.record.process.clone();
                        self.fact(Event::Spawned(process(pid)))?;
                        // Deferred behind a held write: heard when it goes.
                        if self.held.is_some() {
                            return Ok(());
                        }
                        if self.vm.record.process.as_ref().map(|p| p.pid) != Some(pid) {
                            self.unrecorded = None;
                            // Killed unrecorded, or killed at once.
                            self.live.retain(|&l| l != pid);
                            if before.is_some() && self.vm.record.process != before {
                                return Err("a recorded VMM was forgotten".into());
                            }
                        }
                        Ok(())
                    }
                    (Pending::Spawn, false) => self.fact(Event::LaunchFailed("spawn".into())),
                    (Pending::Configure, true) => self.fact(Event::Ready),
                    (Pending::Configure, false) => {
                        self.fact(Event::LaunchFailed("configure".into()))
                    }
                    (Pending::Provision, ok) => self.fact(Event::Provisioned(if ok {
                        Ok(Some(std::net::Ipv4Addr::new(172, 30, 0, 2)))
                    } else {
                        Err("no space".into())
                    })),
                    (Pending::Detach, ok) => self.fact(Event::Detached(if ok {
                        Ok(())
                    } else {
                        Err("busy".into())
                    })),
                    (Pending::Exit(pid), _) => {
                        if !self.live.contains(&pid) {
                            return Ok(());
                        }
                        self.live.retain(|&l| l != pid);
                        if self.vm.record.process.as_ref().map(|p| p.pid) == Some(pid) {
                            return self.fact(Event::Exited(Exit::default()));
                        }
                        Ok(())
                    }
                    (Pending::RemoveFiles, ok) => self.fact(Event::FilesRemoved(if ok {
                        Ok(())
                    } else {
                        Err("busy".into())
                    })),
                }
            }
            Action::Crash => {
                if let Some(p) = self.vm.record.process.clone()
                    && self.live.contains(&p.pid)
                {
                    self.live.retain(|&l| l != p.pid);
                    return self.fact(Event::Exited(Exit::default()));
                }
                Ok(())
            }
            Action::Announce => self.fact(Event::Announced(Announcement::poweroff())),
            Action::Advance(seconds) => {
                self.now = after(self.now, Duration::from_secs(seconds.into()));
                self.fact(Event::Timer)
            }
            Action::StoreFails => {
                self.store_down = true;
                Ok(())
            }
            Action::StoreRecovers => self.recover_store(),
            // An actor restart is a daemon restart for one VM: its memory
            // goes, its clients hear that it is unavailable, it reads the
            // store, and what it held beyond the store is killed.
            Action::DaemonRestart | Action::ActorRestart => {
                for request in std::mem::take(&mut self.open) {
                    self.answer(request)?;
                }
                self.held = None;
                self.deferred.clear();
                self.unrecorded = None;
                let Some(stored) = self.stored.clone() else {
                    // Deleted: the next daemon has no such VM.
                    self.vm.removed = true;
                    return Ok(());
                };
                // Work in flight dies with the daemon; an unrecorded VMM is
                // terminated by the start-up sweep.
                self.pending.clear();
                let recorded = stored.process.as_ref().map(|p| p.pid);
                self.live.retain(|&l| Some(l) == recorded);
                self.vm = Vm::new(stored);
                let view = if recorded.is_some_and(|pid| self.live.contains(&pid)) {
                    HostView::Alive
                } else {
                    HostView::Gone
                };
                self.fact(Event::Recovered(view))
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// At most one VMM, durable before reply, a stop wins over a pending
    /// restart, a removed VM never comes back, every request answered
    /// exactly once and in agreement with the store: whatever happens
    /// (refused writes, actor and daemon restarts), in whatever order.
    #[test]
    fn invariants_hold_over_random_histories(actions in proptest::collection::vec(action(), 1..60)) {
        let mut world = World::new();
        let create = Event::Create { request: 0, source: PathBuf::from("/images/base.ext4") };
        let (vm, effects) = step(&world.vm, create, world.now).expect("create");
        prop_assert_eq!(&effects[..2], &[Effect::Persist, Effect::Provision(PathBuf::from("/images/base.ext4"))]);
        world.vm = vm;
        world.stored = Some(world.vm.record.clone());
        world.pending.push(Pending::Provision);
        for action in actions {
            let result = world.act(action.clone());
            prop_assert!(result.is_ok(), "{:?} after {:?}", result, action);
            prop_assert!(world.live.len() <= 1, "two VMMs: {:?}", world.live);
        }
        let settled = world.settle();
        prop_assert!(settled.is_ok(), "{:?}", settled);
    }
}

#[test]
fn a_stop_survives_a_daemon_restart_and_ends_at_its_deadline() {
    let running = vm(Phase::Running, Some(7), false);
    let (stopping, _) = step(
        &running,
        Event::Stop {
            request: 1,
            timeout: Duration::from_secs(6),
        },
        at(0),
    )
    .expect("stop");
    // The daemon restarts: memory is gone, the record remains.
    let recovered = Vm::new(stopping.record.clone());
    let (still, effects) =
        step(&recovered, Event::Recovered(HostView::Alive), at(1)).expect("recover");
    assert_eq!(effects, [Effect::AskPoweroff, Effect::ArmTimer(at(6))]);
    let (killing, effects) = step(&still, Event::Timer, at(6)).expect("deadline");
    assert!(effects.contains(&Effect::Kill));
    let (stopped, _) = step(&killing, Event::Exited(Exit::default()), at(6)).expect("exit");
    assert_eq!(stopped.record.phase, Phase::Stopped);
    let exit = stopped.record.last_exit.expect("exit recorded");
    assert_eq!(exit.kind, ExitKind::Killed);
}

#[test]
fn a_failed_automatic_restart_is_a_crash_and_is_retried() {
    let restarting = vm(
        Phase::Launching {
            restart: true,
            retry: false,
            deadline: at(30),
        },
        None,
        true,
    );
    let (next, _) = step(
        &restarting,
        Event::LaunchFailed("no such binary".into()),
        at(1),
    )
    .expect("failed launch");
    assert!(
        matches!(next.record.phase, Phase::BackingOff { .. }),
        "{:?}",
        next.record.phase
    );
    assert_eq!(next.record.error.as_deref(), Some("no such binary"));
    let (again, effects) = step(&next, Event::Timer, at(100)).expect("backoff over");
    assert!(matches!(
        again.record.phase,
        Phase::Launching { restart: true, .. }
    ));
    assert!(effects.contains(&Effect::Spawn));
}

#[test]
fn a_second_start_shares_the_launch_and_its_failure() {
    let created = vm(Phase::Created, None, false);
    let (launching, _) = step(&created, Event::Start { request: 1 }, at(0)).expect("start");
    let (both, effects) = step(&launching, Event::Start { request: 2 }, at(0)).expect("second");
    assert!(effects.is_empty(), "{effects:?}");
    let (_, effects) = step(&both, Event::LaunchFailed("no kernel".into()), at(1)).expect("fail");
    let failed: Vec<_> = effects
        .iter()
        .filter(|e| {
            matches!(
                e,
                Effect::Reply {
                    outcome: Outcome::Failed(_),
                    ..
                }
            )
        })
        .collect();
    assert_eq!(failed.len(), 2, "{effects:?}");
}

#[test]
fn a_crash_keeps_the_tap_for_its_restart_and_a_stop_gives_it_back() {
    let mut running = networked(Phase::Running, true);
    running.record.process = Some(process(7));
    let (backing_off, effects) =
        step(&running, Event::Exited(Exit::default()), at(100)).expect("crash");
    assert!(matches!(backing_off.record.phase, Phase::BackingOff { .. }));
    assert!(backing_off.record.resources.contains(&Resource::Tap));
    assert!(!effects.contains(&Effect::Detach), "{effects:?}");

    let (stopped, effects) = step(
        &backing_off,
        Event::Stop {
            request: 1,
            timeout: Duration::from_secs(1),
        },
        at(101),
    )
    .expect("stop");
    assert_eq!(stopped.record.phase, Phase::Stopped);
    // The stop is durable before the tap goes.
    assert_eq!(effects.first(), Some(&Effect::Persist));
    assert_eq!(effects.last(), Some(&Effect::Detach));
    let (detached, effects) = step(&stopped, Event::Detached(Ok(())), at(102)).expect("detached");
    assert!(!detached.record.resources.contains(&Resource::Tap));
    assert_eq!(effects, [Effect::Persist]);
    // The lease stays until the VM is removed.
    assert_eq!(
        detached.record.network.as_ref().and_then(|n| n.address),
        Some(std::net::Ipv4Addr::new(172, 30, 0, 2))
    );

    // A launch names the tap in its ledger before it spawns.
    let (launching, effects) =
        step(&detached, Event::Start { request: 2 }, at(103)).expect("start");
    assert!(launching.record.resources.contains(&Resource::Tap));
    let persist = effects.iter().position(|e| *e == Effect::Persist);
    let spawn = effects.iter().position(|e| *e == Effect::Spawn);
    assert!(persist < spawn, "{effects:?}");
}

#[test]
fn a_failed_create_answers_once_its_undo_is_done() {
    let creating = vm(Phase::Creating, None, false);
    let source = PathBuf::from("/images/base.ext4");
    let (waiting, _) =
        step(&creating, Event::Create { request: 1, source }, at(0)).expect("create");
    let (undoing, effects) = step(
        &waiting,
        Event::Provisioned(Err("no address".into())),
        at(1),
    )
    .expect("fail");
    assert_eq!(effects, [Effect::Persist, Effect::RemoveFiles]);
    let (_, effects) = step(&undoing, Event::FilesRemoved(Ok(())), at(2)).expect("undone");
    assert_eq!(
        effects,
        [
            Effect::Delete,
            Effect::Reply {
                request: 1,
                outcome: Outcome::Failed("no address".into()),
            }
        ]
    );
}
