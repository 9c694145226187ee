//! The VM lifecycle as one pure, deterministic transition function, in the
//! manner of quinn-proto: no actix, no I/O, no clock. [`step`] takes the VM
//! as it stands, one [`Event`] and the current time, and answers the VM as
//! it becomes and the [`Effect`]s to carry out, in order, or a [`Conflict`]
//! for a user command the phase does not allow.
//!
//! The [`Phase`] is part of the VM record and persisted: deadlines and the
//! stop intent survive a daemon restart, and [`Event::Recovered`] (what the
//! host shows at start-up) finds the next move from any persisted phase.
//! The interpreter (`actors::vm`) keeps two rules:
//! - effects run in order, and nothing after a [`Effect::Persist`] runs
//!   before that write is durable, so a client is never told more than the
//!   store knows and nothing is acquired that a record does not name;
//! - [`Effect::Spawn`] is only emitted while the record holds no process,
//!   and the VMM's pid is persisted right after [`Event::Spawned`], before
//!   [`Effect::Configure`]: a VM directory holds at most one live VMM.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::phase::{Intent, Phase, state_name};
use super::restart::{self, Decision};
use super::state::{self, Announcement, ExitKind, LastExit, StopIntent};
use crate::vm::ledger::Resource;
use crate::vm::record::{VmRecord, VmmProcess};

/// How long a launch may take from spawn to a running guest before the VMM
/// is killed and the launch counts as failed.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGKILLed VMM gets to exit before it is signalled again.
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// A client request, numbered by the interpreter so replies find it.
pub type RequestId = u64;

/// What a waiting client is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The VM's disk is cloned and the VM exists.
    Created,
    /// The launch under way ends: running, or failed.
    Launched,
    /// The VMM has exited and the exit is recorded.
    Exited,
    /// The VM is gone.
    Removed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub request: RequestId,
    pub until: Until,
}

/// The VM as the machine sees it: the persisted record, plus what lives
/// only as long as the daemon (waiting clients, the guest's announcement).
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub record: VmRecord,
    pub waiters: Vec<Waiter>,
    /// What the guest agent announced before the VMM exits.
    pub announced: Option<Announcement>,
    /// A spawn is under way: its answer serves the launch, and no second
    /// spawn may start before it.
    pub spawning: bool,
    /// The record is deleted: every later event is refused or ignored.
    pub removed: bool,
    /// An [`Effect::Detach`] is under way.
    pub detaching: bool,
    /// Why the create failed: its client hears it once the undo is done,
    /// so a failed create never shows a half-made VM.
    pub create_failure: Option<String>,
}

impl Vm {
    pub fn new(record: VmRecord) -> Vm {
        Vm {
            record,
            waiters: Vec::new(),
            announced: None,
            spawning: false,
            removed: false,
            detaching: false,
            create_failure: None,
        }
    }
}

/// What the host shows of a VM's recorded VMM at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostView {
    /// The recorded process (same pid and start time) is alive, and says
    /// its guest runs: a launch whose end the daemon did not record.
    Running,
    /// The recorded process (same pid and start time) is alive.
    Alive,
    /// No process recorded, or it is gone.
    Gone,
}

/// How a VMM process ended, when the daemon could see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `vm create`: clone `source` as the VM's disk.
    Create {
        request: RequestId,
        source: std::path::PathBuf,
    },
    Start {
        request: RequestId,
    },
    Stop {
        request: RequestId,
        timeout: Duration,
    },
    Kill {
        request: RequestId,
    },
    Restart {
        request: RequestId,
        timeout: Duration,
    },
    Remove {
        request: RequestId,
        force: bool,
    },
    /// The VMM process exists; the record must name it before anything else.
    Spawned(VmmProcess),
    /// The VMM is configured and the guest runs.
    Ready,
    /// The spawn or the configuration failed (the process, if any, lives on
    /// until killed).
    LaunchFailed(String),
    /// The recorded VMM exited.
    Exited(Exit),
    /// The guest agent announced a poweroff or reboot.
    Announced(Announcement),
    /// The timer armed by [`Effect::ArmTimer`] fired.
    Timer,
    /// Start-up (or an actor restart): the persisted phase meets the host.
    Recovered(HostView),
    /// [`Effect::Provision`] finished: the disk is cloned and the address
    /// (for a VM with a network) leased.
    Provisioned(Result<Option<std::net::Ipv4Addr>, String>),
    /// [`Effect::Detach`] finished.
    Detached(Result<(), String>),
    /// [`Effect::RemoveFiles`] finished.
    FilesRemoved(Result<(), String>),
    /// A re-adopted VMM's control socket answered, or kept failing.
    Probed(Result<(), String>),
}

/// How a reply ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success: the client gets the record as it stands (durable).
    Done,
    /// The operation did not happen, with the reason.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write the record as it stands; later effects wait until it is durable.
    Persist,
    /// Delete the record (the VM's last write); later effects wait for it.
    Delete,
    /// Lease the VM's address (when it has a network) and clone this file
    /// as its root disk, in its directory (its ledger already names both);
    /// answers [`Event::Provisioned`].
    Provision(std::path::PathBuf),
    /// Spawn the VMM (in its own session, holding the VM directory's lock),
    /// its tap made first when its ledger names one; answers
    /// [`Event::Spawned`] or [`Event::LaunchFailed`].
    Spawn,
    /// Remove the tap of a VM that stopped for good; answers
    /// [`Event::Detached`].
    Detach,
    /// Configure the recorded VMM and boot the guest; answers
    /// [`Event::Ready`] or [`Event::LaunchFailed`].
    Configure,
    /// SIGKILL the VMM through its pidfd.
    Kill,
    /// SIGKILL the process an unexpected [`Event::Spawned`] named; it is
    /// never recorded.
    KillUnrecorded,
    /// Ask the guest to power off: agent first, Ctrl-Alt-Del as fallback.
    AskPoweroff,
    /// (Re)arm the VM's one timer; [`Event::Timer`] fires at that time.
    ArmTimer(Timestamp),
    /// Seek the guest agent (the VM runs).
    ConnectAgent,
    /// Drop the agent link (the VMM is gone).
    DropAgent,
    /// Release every resource of the VM's ledger (its tap, its lease, its
    /// jail, its directory); answers [`Event::FilesRemoved`].
    RemoveFiles,
    Reply {
        request: RequestId,
        outcome: Outcome,
    },
}

/// A user command the phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VM {name} is {state}; {hint}")]
pub struct Conflict {
    pub name: String,
    pub state: &'static str,
    pub hint: &'static str,
}

/// One transition. Pure: the same VM, event and time give the same answer.
pub fn step(vm: &Vm, event: Event, now: Timestamp) -> Result<(Vm, Vec<Effect>), Conflict> {
    let mut next = vm.clone();
    let mut effects = Vec::new();
    if vm.removed {
        return match request_of(&event) {
            Some(_) => Err(Conflict {
                name: vm.record.name.clone(),
                state: "removed",
                hint: "`banger vm ls` lists the VMs",
            }),
            None => Ok((next, effects)),
        };
    }
    let mut t = Transition {
        vm: &mut next,
        effects: &mut effects,
        now,
    };
    t.apply(event)?;
    t.detach_at_rest();
    Ok((next, effects))
}

/// Whether a user command whose step gave `effects` can be undone when the
/// store refuses its first write: only when that write comes first, so
/// nothing of the command happened before it. The interpreter then puts
/// the VM back as it was and fails the command; any other refused write is
/// held until the store writes again.
pub fn undoable(effects: &[Effect]) -> bool {
    matches!(effects.first(), Some(Effect::Persist | Effect::Delete))
}

/// The client request an event carries, if it is a user command.
fn request_of(event: &Event) -> Option<RequestId> {
    match *event {
        Event::Create { request, .. }
        | Event::Start { request }
        | Event::Stop { request, .. }
        | Event::Kill { request }
        | Event::Restart { request, .. }
        | Event::Remove { request, .. } => Some(request),
        _ => None,
    }
}

fn conflict(vm: &Vm, hint: &'static str) -> Conflict {
    Conflict {
        name: vm.record.name.clone(),
        state: state_name(vm.record.phase.state()),
        hint,
    }
}

fn after(now: Timestamp, duration: Duration) -> Timestamp {
    now.checked_add(SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

struct Transition<'a> {
    vm: &'a mut Vm,
    effects: &'a mut Vec<Effect>,
    now: Timestamp,
}

impl Transition<'_> {
    fn apply(&mut self, event: Event) -> Result<(), Conflict> {
        let phase = self.vm.record.phase;
        let has_process = self.vm.record.process.is_some();
        if phase == Phase::Creating {
            return self.creating(event);
        }
        match event {
            Event::Create { .. } => Err(conflict(self.vm, "it exists already")),
            Event::Provisioned(_) => Ok(()),
            // A failed detach is not retried at once (it would spin): the
            // next launch, or the next recovery, tries again.
            Event::Detached(result) => {
                if result.is_ok() {
                    self.vm.detaching = false;
                    if phase.at_rest() && self.vm.record.resources.contains(&Resource::Tap) {
                        self.vm.record.resources.retain(|r| *r != Resource::Tap);
                        self.effects.push(Effect::Persist);
                    }
                }
                Ok(())
            }
            Event::Start { request } => self.start(phase, request),
            Event::Stop { request, timeout } => self.stop(phase, request, Intent::Stop, timeout),
            Event::Kill { request } => self.stop(phase, request, Intent::Kill, KILL_GRACE),
            Event::Restart { request, timeout } => self.restart(phase, request, timeout),
            Event::Remove { request, force } => self.remove(phase, request, force),
            Event::Spawned(process) => {
                self.spawned(phase, process);
                Ok(())
            }
            Event::Ready => {
                if let Phase::Launching { retry: false, .. } = phase
                    && has_process
                {
                    self.vm.record.phase = Phase::Running;
                    self.vm.record.started_at = Some(self.now);
                    self.vm.announced = None;
                    self.effects.push(Effect::Persist);
                    self.effects.push(Effect::ConnectAgent);
                    self.reply_all(Until::Launched, Outcome::Done);
                }
                Ok(())
            }
            Event::LaunchFailed(error) => {
                self.launch_failed(phase, error);
                Ok(())
            }
            Event::Exited(exit) => {
                if has_process {
                    self.exited(phase, exit);
                }
                Ok(())
            }
            Event::Announced(action) => {
                if matches!(phase, Phase::Running | Phase::Stopping { .. }) {
                    self.vm.announced = Some(action);
                }
                Ok(())
            }
            Event::Timer => {
                self.timer(phase);
                Ok(())
            }
            Event::Recovered(view) => {
                self.recovered(phase, view);
                Ok(())
            }
            Event::Probed(result) => {
                let degraded = result.err();
                if has_process && self.vm.record.degraded != degraded {
                    self.vm.record.degraded = degraded;
                    self.effects.push(Effect::Persist);
                }
                Ok(())
            }
            Event::FilesRemoved(result) => {
                if let Phase::Removing { .. } = phase
                    && !has_process
                {
                    let create_failure = self.vm.create_failure.take();
                    match result {
                        Ok(()) => {
                            self.vm.removed = true;
                            self.effects.push(Effect::Delete);
                            self.reply_all(Until::Removed, Outcome::Done);
                            if let Some(failure) = create_failure {
                                self.reply_all(Until::Created, Outcome::Failed(failure));
                            }
                        }
                        Err(error) => {
                            if let Some(failure) = create_failure {
                                self.reply_all(
                                    Until::Created,
                                    Outcome::Failed(format!(
                                        "{failure}; undoing the create failed too: {error}"
                                    )),
                                );
                            }
                            self.reply_all(Until::Removed, Outcome::Failed(error));
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// A VM being created: only its own create moves it; any other
    /// command waits for it to exist; recovery undoes an interrupted one.
    fn creating(&mut self, event: Event) -> Result<(), Conflict> {
        match event {
            Event::Create { request, source } => {
                self.effects.push(Effect::Persist);
                self.effects.push(Effect::Provision(source));
                self.wait(request, Until::Created);
            }
            Event::Provisioned(Ok(address)) => {
                if let Some(network) = &mut self.vm.record.network {
                    network.address = address;
                }
                self.vm.record.phase = Phase::Created;
                self.effects.push(Effect::Persist);
                self.reply_all(Until::Created, Outcome::Done);
            }
            Event::Provisioned(Err(error)) => {
                self.vm.create_failure = Some(error);
                self.undo_create();
            }
            Event::Recovered(_) => {
                self.vm.waiters.clear();
                self.undo_create();
            }
            Event::Start { .. }
            | Event::Stop { .. }
            | Event::Kill { .. }
            | Event::Restart { .. }
            | Event::Remove { .. } => {
                return Err(conflict(self.vm, "wait for vm create to finish"));
            }
            Event::Spawned(_) => self.effects.push(Effect::KillUnrecorded),
            Event::Ready
            | Event::LaunchFailed(_)
            | Event::Exited(_)
            | Event::Announced(_)
            | Event::Timer
            | Event::FilesRemoved(_)
            | Event::Detached(_)
            | Event::Probed(_) => {}
        }
        Ok(())
    }

    /// A VM with a network that stopped for good gives its tap back (a
    /// crash awaiting its restart keeps it).
    fn detach_at_rest(&mut self) {
        let record = &self.vm.record;
        if record.phase.at_rest()
            && record.process.is_none()
            && !self.vm.spawning
            && !self.vm.detaching
            && record.resources.contains(&Resource::Tap)
        {
            self.vm.detaching = true;
            self.effects.push(Effect::Detach);
        }
    }

    /// An unfinished create: everything its ledger names goes, then the
    /// record.
    fn undo_create(&mut self) {
        self.vm.record.phase = Phase::Removing {
            deadline: after(self.now, KILL_GRACE),
        };
        self.effects.push(Effect::Persist);
        self.effects.push(Effect::RemoveFiles);
    }

    fn wait(&mut self, request: RequestId, until: Until) {
        self.vm.waiters.push(Waiter { request, until });
    }

    fn reply(&mut self, request: RequestId, outcome: Outcome) {
        self.effects.push(Effect::Reply { request, outcome });
    }

    fn reply_all(&mut self, until: Until, outcome: Outcome) {
        let (done, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.vm.waiters)
            .into_iter()
            .partition(|w| w.until == until);
        self.vm.waiters = waiting;
        for waiter in done {
            self.reply(waiter.request, outcome.clone());
        }
    }

    /// A fresh launch: persisted as `Launching` before the spawn, its tap
    /// (for a VM with a network) in the ledger before it is made.
    fn launch(&mut self, restart: bool) {
        if self.vm.record.network.is_some() && !self.vm.record.resources.contains(&Resource::Tap) {
            self.vm.record.resources.push(Resource::Tap);
        }
        self.vm.detaching = false;
        self.vm.record.phase = Phase::Launching {
            restart,
            retry: false,
            deadline: after(self.now, LAUNCH_TIMEOUT),
        };
        self.vm.record.error = None;
        self.vm.record.degraded = None;
        if restart {
            self.vm.record.restart_count += 1;
        }
        self.effects.push(Effect::Persist);
        self.effects
            .push(Effect::ArmTimer(after(self.now, LAUNCH_TIMEOUT)));
        if !self.vm.spawning {
            self.vm.spawning = true;
            self.effects.push(Effect::Spawn);
        }
    }

    fn start(&mut self, phase: Phase, request: RequestId) -> Result<(), Conflict> {
        match phase {
            Phase::Creating
            | Phase::Created
            | Phase::Stopped
            | Phase::Crashed
            | Phase::Failed
            | Phase::BackingOff { .. } => {
                self.launch(false);
                self.wait(request, Until::Launched);
            }
            // A second start shares the launch under way (or the restart's).
            Phase::Launching { .. }
            | Phase::Stopping {
                intent: Intent::Restart,
                ..
            } => self.wait(request, Until::Launched),
            Phase::Running => self.reply(request, Outcome::Done),
            Phase::Stopping { .. } => {
                return Err(conflict(self.vm, "wait for it or use vm kill"));
            }
            Phase::Removing { .. } => return Err(conflict(self.vm, "it cannot be started")),
        }
        Ok(())
    }

    /// `vm stop` (graceful, up to `timeout`) and `vm kill` (`Intent::Kill`).
    fn stop(
        &mut self,
        phase: Phase,
        request: RequestId,
        intent: Intent,
        timeout: Duration,
    ) -> Result<(), Conflict> {
        match phase {
            Phase::Creating | Phase::Created | Phase::Stopped | Phase::Failed => {
                self.reply(request, Outcome::Done)
            }
            // A stop wins over a pending restart, and ends a crash's story.
            Phase::Crashed | Phase::BackingOff { .. } => {
                self.vm.record.phase = Phase::Stopped;
                self.effects.push(Effect::Persist);
                self.reply(request, Outcome::Done);
            }
            // A half-started VMM has no guest to power off gracefully.
            Phase::Launching { .. } => {
                // Without a process yet, the spawn's answer ends the stop.
                self.kill_now(intent);
                self.reply_all(
                    Until::Launched,
                    Outcome::Failed("a stop ended the start".into()),
                );
                self.wait(request, Until::Exited);
            }
            Phase::Running => {
                if intent == Intent::Kill {
                    self.kill_now(intent);
                } else {
                    self.ask_to_stop(intent, timeout);
                }
                self.wait(request, Until::Exited);
            }
            Phase::Stopping {
                intent: current,
                killed,
                deadline,
            } => {
                // A kill is the strongest; a stop replaces a restart.
                let next = match (intent, current) {
                    (Intent::Kill, _) => Intent::Kill,
                    (_, Intent::Restart) => intent,
                    _ => current,
                };
                if intent == Intent::Kill && !killed {
                    self.kill_now(next);
                } else if next != current {
                    self.vm.record.phase = Phase::Stopping {
                        intent: next,
                        killed,
                        deadline,
                    };
                    self.effects.push(Effect::Persist);
                }
                if current == Intent::Restart {
                    self.reply_all(
                        Until::Launched,
                        Outcome::Failed("a stop replaced the restart".into()),
                    );
                }
                self.wait(request, Until::Exited);
            }
            Phase::Removing { .. } => return Err(conflict(self.vm, "it cannot be stopped")),
        }
        Ok(())
    }

    /// A graceful stop begins: persisted with its deadline, then the guest
    /// asked to power off.
    fn ask_to_stop(&mut self, intent: Intent, timeout: Duration) {
        let deadline = after(self.now, timeout);
        self.vm.record.phase = Phase::Stopping {
            intent,
            killed: false,
            deadline,
        };
        self.effects.push(Effect::Persist);
        self.effects.push(Effect::AskPoweroff);
        self.effects.push(Effect::ArmTimer(deadline));
    }

    /// Kill now: `Stopping { killed }` persisted, then SIGKILL.
    fn kill_now(&mut self, intent: Intent) {
        self.kill_into(Phase::Stopping {
            intent,
            killed: true,
            deadline: after(self.now, KILL_GRACE),
        });
    }

    /// `phase` persisted, then SIGKILL (when there is a process), and the
    /// timer set to the phase's deadline.
    fn kill_into(&mut self, phase: Phase) {
        self.vm.record.phase = phase;
        self.effects.push(Effect::Persist);
        if self.vm.record.process.is_some() {
            self.effects.push(Effect::Kill);
        }
        if let Some(deadline) = phase.deadline() {
            self.effects.push(Effect::ArmTimer(deadline));
        }
    }

    fn restart(
        &mut self,
        phase: Phase,
        request: RequestId,
        timeout: Duration,
    ) -> Result<(), Conflict> {
        match phase {
            Phase::Creating
            | Phase::Created
            | Phase::Stopped
            | Phase::Crashed
            | Phase::Failed
            | Phase::BackingOff { .. } => {
                self.launch(false);
                self.wait(request, Until::Launched);
            }
            Phase::Running => {
                self.ask_to_stop(Intent::Restart, timeout);
                self.wait(request, Until::Launched);
            }
            Phase::Stopping {
                intent: Intent::Restart,
                ..
            } => self.wait(request, Until::Launched),
            Phase::Launching { .. } => {
                return Err(conflict(self.vm, "wait for it to finish starting"));
            }
            Phase::Stopping { .. } => {
                return Err(conflict(self.vm, "wait for it to stop, then start it"));
            }
            Phase::Removing { .. } => return Err(conflict(self.vm, "it cannot be restarted")),
        }
        Ok(())
    }

    fn remove(&mut self, phase: Phase, request: RequestId, force: bool) -> Result<(), Conflict> {
        let has_process = self.vm.record.process.is_some();
        match phase {
            Phase::Creating
            | Phase::Created
            | Phase::Stopped
            | Phase::Crashed
            | Phase::Failed
            | Phase::BackingOff { .. } => {
                self.vm.record.phase = Phase::Removing {
                    deadline: after(self.now, KILL_GRACE),
                };
                self.effects.push(Effect::Persist);
                self.effects.push(Effect::RemoveFiles);
                self.wait(request, Until::Removed);
            }
            Phase::Launching { .. } | Phase::Running | Phase::Stopping { .. } => {
                if !force {
                    return Err(conflict(self.vm, "stop it first, or use --force"));
                }
                self.kill_into(Phase::Removing {
                    deadline: after(self.now, KILL_GRACE),
                });
                self.reply_all(
                    Until::Launched,
                    Outcome::Failed("the VM was removed".into()),
                );
                self.reply_all(Until::Exited, Outcome::Failed("the VM was removed".into()));
                self.wait(request, Until::Removed);
            }
            Phase::Removing { .. } => {
                // Removal goes on; a failed file removal is tried again.
                if !has_process && !self.vm.waiters.iter().any(|w| w.until == Until::Removed) {
                    self.effects.push(Effect::RemoveFiles);
                }
                self.wait(request, Until::Removed);
            }
        }
        Ok(())
    }

    fn spawned(&mut self, phase: Phase, process: VmmProcess) {
        if !self.vm.spawning || self.vm.record.process.is_some() {
            // No spawn of ours is under way: not a process this VM records.
            self.effects.push(Effect::KillUnrecorded);
            return;
        }
        self.vm.spawning = false;
        // Recorded first, whatever follows: the VMM is never unaccounted.
        self.vm.record.process = Some(process);
        self.effects.push(Effect::Persist);
        match phase {
            Phase::Launching { .. } => self.effects.push(Effect::Configure),
            // A stop or removal came while the spawn was under way.
            _ => self.effects.push(Effect::Kill),
        }
    }

    fn launch_failed(&mut self, phase: Phase, error: String) {
        let has_process = self.vm.record.process.is_some();
        if !has_process {
            if !self.vm.spawning {
                return;
            }
            self.vm.spawning = false;
        }
        match phase {
            Phase::Launching { restart, .. } => {
                if has_process {
                    // The exit of the half-started VMM ends the launch; the
                    // failure is durable first, so recovery finishes it.
                    self.vm.record.error = Some(error);
                    self.effects.push(Effect::Persist);
                    self.effects.push(Effect::Kill);
                } else {
                    self.fail_launch(restart, error);
                }
            }
            Phase::Stopping { .. } if !has_process => self.finish_stop(),
            Phase::Removing { .. } if !has_process => self.effects.push(Effect::RemoveFiles),
            _ => {}
        }
    }

    /// A launch that did not reach a running guest. An automatic restart's
    /// failure is a crash and follows the policy; a user's start fails.
    fn fail_launch(&mut self, restart: bool, error: String) {
        self.vm.record.error = Some(error.clone());
        self.vm.record.degraded = None;
        // Whoever waits for this VM's agent hears that it will not come.
        self.effects.push(Effect::DropAgent);
        if restart {
            self.crashed(ExitKind::Crash, Duration::ZERO);
        } else {
            self.vm.record.phase = Phase::Failed;
            self.effects.push(Effect::Persist);
        }
        self.reply_all(Until::Launched, Outcome::Failed(error));
    }

    /// An exit nobody asked for: the restart policy decides.
    fn crashed(&mut self, kind: ExitKind, ran_for: Duration) {
        let decision = restart::after_exit(
            &self.vm.record.restart_policy,
            &mut self.vm.record.restart_history,
            kind,
            ran_for,
            self.now,
        );
        match decision {
            Decision::RestartAfter { delay, .. } if delay.is_zero() => self.launch(true),
            Decision::RestartAfter { delay, crash_loop } => {
                let until = after(self.now, delay);
                self.vm.record.phase = Phase::BackingOff { until, crash_loop };
                self.effects.push(Effect::Persist);
                self.effects.push(Effect::ArmTimer(until));
            }
            Decision::Stay => {
                self.vm.record.phase = match kind {
                    ExitKind::Crash => Phase::Crashed,
                    _ => Phase::Stopped,
                };
                self.effects.push(Effect::Persist);
            }
        }
    }

    fn finish_stop(&mut self) {
        self.vm.record.phase = Phase::Stopped;
        self.effects.push(Effect::Persist);
        self.reply_all(Until::Exited, Outcome::Done);
    }

    fn record_exit(&mut self, kind: ExitKind, exit: Exit) {
        self.vm.record.process = None;
        self.vm.record.degraded = None;
        self.vm.record.last_exit = Some(LastExit {
            kind,
            code: exit.code,
            signal: exit.signal,
            at: self.now,
        });
    }

    fn exited(&mut self, phase: Phase, exit: Exit) {
        let announced = self.vm.announced.take();
        match phase {
            Phase::Launching {
                restart,
                retry: true,
                ..
            } => {
                self.vm.record.process = None;
                self.launch(restart);
            }
            Phase::Launching { restart, .. } => {
                self.vm.record.process = None;
                let error = self.vm.record.error.take().unwrap_or_else(|| {
                    "the VMM exited while starting; `banger vm logs` shows its console".into()
                });
                self.fail_launch(restart, error);
            }
            Phase::Running => {
                self.effects.push(Effect::DropAgent);
                let kind = state::classify(StopIntent::None, announced);
                let ran_for = self
                    .vm
                    .record
                    .started_at
                    .map(|started| {
                        Duration::from_millis(
                            self.now
                                .as_millisecond()
                                .saturating_sub(started.as_millisecond())
                                .max(0) as u64,
                        )
                    })
                    .unwrap_or_default();
                // The main process's exit is the VM's.
                let exit = match announced.and_then(|a| a.main_exit) {
                    Some(main) => Exit {
                        code: main.code,
                        signal: main.signal,
                    },
                    None => exit,
                };
                self.record_exit(kind, exit);
                self.crashed(kind, ran_for);
            }
            Phase::Stopping { intent, killed, .. } => {
                self.effects.push(Effect::DropAgent);
                let stop = match (intent, killed) {
                    (Intent::Kill, _) => StopIntent::Kill,
                    (_, true) => StopIntent::StopEscalated,
                    _ => StopIntent::Stop,
                };
                self.record_exit(state::classify(stop, announced), exit);
                match intent {
                    Intent::Restart => self.launch(false),
                    Intent::Stop | Intent::Kill => self.finish_stop(),
                }
            }
            Phase::Removing { .. } => {
                self.effects.push(Effect::DropAgent);
                self.record_exit(ExitKind::Killed, exit);
                self.effects.push(Effect::Persist);
                self.effects.push(Effect::RemoveFiles);
            }
            // No process belongs to these phases.
            Phase::Creating
            | Phase::Created
            | Phase::Stopped
            | Phase::Crashed
            | Phase::Failed
            | Phase::BackingOff { .. } => {}
        }
    }

    fn timer(&mut self, phase: Phase) {
        let has_process = self.vm.record.process.is_some();
        let Some(deadline) = phase.deadline() else {
            return;
        };
        if self.now < deadline {
            self.effects.push(Effect::ArmTimer(deadline));
            return;
        }
        match phase {
            // The spawn itself always answers; its answer decides.
            Phase::Launching { .. } | Phase::Stopping { .. } | Phase::Removing { .. }
                if !has_process && self.vm.spawning =>
            {
                self.effects
                    .push(Effect::ArmTimer(after(self.now, KILL_GRACE)));
            }
            Phase::Launching { restart, .. } => {
                if has_process {
                    if self.vm.record.error.is_none() {
                        self.vm.record.error = Some(format!(
                            "the VMM did not get ready within {}s",
                            LAUNCH_TIMEOUT.as_secs()
                        ));
                        self.effects.push(Effect::Persist);
                    }
                    self.effects.push(Effect::Kill);
                    self.effects
                        .push(Effect::ArmTimer(after(self.now, KILL_GRACE)));
                } else {
                    self.fail_launch(
                        restart,
                        format!("the VMM did not start within {}s", LAUNCH_TIMEOUT.as_secs()),
                    );
                }
            }
            Phase::Stopping { intent, .. } => {
                if has_process {
                    self.kill_now(intent);
                } else {
                    self.finish_stop();
                }
            }
            Phase::BackingOff { .. } => self.launch(true),
            Phase::Removing { .. } if has_process => {
                self.effects.push(Effect::Kill);
                self.effects
                    .push(Effect::ArmTimer(after(self.now, KILL_GRACE)));
            }
            _ => {}
        }
    }

    fn recovered(&mut self, phase: Phase, view: HostView) {
        // Whatever was in flight ended with the daemon (or the actor).
        self.vm.spawning = false;
        self.vm.waiters.clear();
        let recorded = self.vm.record.process.is_some();
        let alive = recorded && view != HostView::Gone;
        if recorded && !alive {
            // The VMM died while nobody watched: an exit of unknown status.
            match phase {
                Phase::Launching { restart, .. } => {
                    // A launch cut short by the daemon is tried again, not
                    // counted as a failure; one that had failed ends so.
                    self.vm.record.process = None;
                    match self.vm.record.error.take() {
                        Some(error) => self.fail_launch(restart, error),
                        None => self.launch(restart),
                    }
                    return;
                }
                Phase::Running | Phase::Stopping { .. } | Phase::Removing { .. } => {
                    self.exited(phase, Exit::default());
                    return;
                }
                // A process in a phase that has none: forget it.
                _ => {
                    self.vm.record.process = None;
                    self.effects.push(Effect::Persist);
                }
            }
        }
        match phase {
            Phase::Creating | Phase::Created | Phase::Stopped | Phase::Crashed | Phase::Failed => {
                if alive {
                    // A live VMM in a phase that has none: make it go.
                    self.kill_now(Intent::Kill);
                }
            }
            Phase::BackingOff { until, .. } => {
                if alive {
                    self.kill_now(Intent::Kill);
                } else {
                    self.effects.push(Effect::ArmTimer(until));
                }
            }
            // Configured and booted before the daemon died: adopted.
            Phase::Launching { retry: false, .. }
                if alive && view == HostView::Running && self.vm.record.error.is_none() =>
            {
                self.vm.record.phase = Phase::Running;
                self.vm.record.started_at = Some(self.now);
                self.effects.push(Effect::Persist);
                self.effects.push(Effect::ConnectAgent);
            }
            Phase::Launching { restart, .. } => {
                if alive {
                    // Its configuration is unknown: kill it, then launch
                    // anew; unless the launch had failed, which its exit ends.
                    self.kill_into(Phase::Launching {
                        restart,
                        retry: self.vm.record.error.is_none(),
                        deadline: after(self.now, LAUNCH_TIMEOUT),
                    });
                } else if let Some(error) = self.vm.record.error.take() {
                    self.fail_launch(restart, error);
                } else {
                    self.launch(restart);
                }
            }
            Phase::Running => {
                if alive {
                    self.effects.push(Effect::ConnectAgent);
                } else {
                    self.crashed(ExitKind::Crash, Duration::ZERO);
                }
            }
            Phase::Stopping {
                killed, deadline, ..
            } => {
                if alive {
                    // The stop goes on: asked again, killed at its deadline.
                    self.effects.push(if killed {
                        Effect::Kill
                    } else {
                        Effect::AskPoweroff
                    });
                    self.effects.push(Effect::ArmTimer(deadline));
                } else {
                    self.finish_stop();
                }
            }
            Phase::Removing { deadline } => {
                if alive {
                    self.effects.push(Effect::Kill);
                    self.effects.push(Effect::ArmTimer(deadline));
                } else {
                    self.effects.push(Effect::RemoveFiles);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
