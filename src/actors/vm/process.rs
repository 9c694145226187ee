//! The VM's VMM process: spawned (its answer reaches whichever incarnation
//! of the actor is alive), configured, watched until it exits, asked to
//! power off.

use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use rustix::process::Signal;
use tracing::{info, warn};

use super::settings::VmError;
use super::{ORPHAN_EXIT_TIMEOUT, VmActor};
use crate::actors::catalog::{KernelError, PrepareBoot};
use crate::actors::netns::Attach;
use crate::error_chain;
use crate::fault;
use crate::vm::ledger::Resource;
use crate::vm::machine::{Event, Exit};
use crate::vm::phase::Phase;
use crate::vm::state::ShutdownAction;
use crate::vmm::process::ProcessHandle;
use crate::vmm::{self, LaunchSpec};

/// How long a graceful stop waits for the agent to take the request
/// before pressing Ctrl-Alt-Del instead.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(2);

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

impl VmActor {
    /// `Effect::Spawn`: the kernel, the directory's lock, the agent on the
    /// disk, the backend's files, the process; answers `Spawned` (the
    /// process is recorded before anything configures it) or `LaunchFailed`.
    pub(super) fn spawn_vmm(&mut self, ctx: &mut Context<Self>) {
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
    pub(super) fn configure(&mut self, ctx: &mut Context<Self>) {
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
    pub(super) fn watch(&mut self, process: Rc<ProcessHandle>, ctx: &mut Context<Self>) {
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
    pub(super) fn ask_poweroff(&mut self, ctx: &mut Context<Self>) {
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
}
