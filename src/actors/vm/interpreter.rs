//! The interpreter of `vm::machine::step`'s effects: an event goes
//! through the machine, and the effects it decides are carried out in
//! order. A `Persist` is awaited before what follows it; a write the store
//! refuses undoes the command that made it or holds the effects behind it
//! until the store writes again.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use jiff::Timestamp;
use rustix::process::Signal;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::files::{clone_rootfs, release_resources};
use super::settings::VmError;
use super::{VmActor, VmRemoved};
use crate::actors::netns::{Detach, Lease};
use crate::actors::store::{Delete, Put, StoreActor};
use crate::error_chain;
use crate::fault;
use crate::store::{StoreError, StoreHealth, Unwritable};
use crate::vm::machine::{self, Conflict, Effect, Event, Outcome, RequestId, Vm};
use crate::vm::phase::Phase;
use crate::vm::record::VmRecord;

/// A change to a VM's record.
#[derive(Clone)]
pub(super) enum Write {
    Put(VmRecord),
    Delete(VmRecord),
}

/// A write the store refused, held with what waits behind it.
pub(super) struct Held {
    write: Write,
    effects: VecDeque<Effect>,
    down: Unwritable,
    since: std::time::Instant,
    /// The timer that was armed when the hold began.
    timer_at: Option<Timestamp>,
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Written {
    Durable,
    /// The store refuses writes for now (see `store::health`).
    Refused(Unwritable),
    /// Anything else: the store is gone, or the record did not encode.
    Lost,
}

/// Applies one VM's writes in the order they were queued, answering each
/// with how it ended.
pub(super) async fn write_in_order(
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
    /// Feeds one event through the machine and carries out its effects. A
    /// fact that comes while a write is held waits behind it.
    pub(super) fn apply(&mut self, event: Event, ctx: &mut Context<Self>) -> Result<(), Conflict> {
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
    pub(super) fn hold(
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
    pub(super) fn store_down(&self) -> Option<Unwritable> {
        let health = self.settings.store_health.borrow();
        health
            .unwritable()
            .cloned()
            .or_else(|| self.held.as_ref().map(|held| held.down.clone()))
    }

    pub(super) fn not_recorded(&self, what: String, down: Unwritable) -> VmError {
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
    pub(super) fn run(&mut self, mut effects: VecDeque<Effect>, ctx: &mut Context<Self>) {
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

    pub(super) fn write(&mut self, write: Write) -> oneshot::Receiver<Written> {
        let (durable, done) = oneshot::channel();
        if self.writes.send((write, durable)).is_err() {
            error!(vm = %self.name(), "the VM's writer is gone; its state is not recorded");
        }
        done
    }

    /// Removed: nothing left to do or to watch.
    pub(super) fn become_tombstone(&mut self, ctx: &mut Context<Self>) {
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
}

pub(super) fn record_pid(record: &VmRecord) -> Option<i32> {
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
