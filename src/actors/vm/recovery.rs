//! Recovery: the actor's start and restart, the recorded VMM held against
//! the host (pidfd first, then identity), the probes that tell a
//! re-adopted VMM's health, and the reload from the store after a restart.

use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use rustix::process::Signal;
use tracing::{info, warn};

use super::interpreter::record_pid;
use super::{OnStart, VmActor};
use crate::actors::store::Get;
use crate::error_chain;
use crate::vm::machine::{self, Event, HostView, Vm};
use crate::vm::phase::Phase;
use crate::vm::record::VmRecord;
use crate::vmm::process::{ProcessHandle, is_alive};

/// How often a degraded VM's VMM is probed again.
const PROBE_DEGRADED: Duration = Duration::from_secs(5);

/// A re-adopted VMM's API is probed this many times, with doubling waits
/// from 100 ms, before the VM is shown as degraded (it is never killed for
/// a slow answer).
const PROBE_ATTEMPTS: u32 = 3;

impl VmActor {
    /// Start-up (and actor restart): holds the recorded VMM against the
    /// host. The pidfd is opened before `/proc` is checked, so the process
    /// checked is the one watched (no pid-reuse window).
    pub(super) fn recover(&mut self, ctx: &mut Context<Self>) {
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
    pub(super) fn reload(&mut self, ctx: &mut Context<Self>) {
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
