//! The guest agent link's life: connected in the background once the VMM
//! runs, its announcements fed to the machine, connected again when it
//! drops while the VMM lives; `GetAgent` waits for it.

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::VmActor;
use super::settings::VmError;
use crate::error_chain;
use crate::guest::link::AgentLink;
use crate::vm::machine::{Conflict, Event};
use crate::vm::phase::Phase;
use crate::vm::state::Announcement;

/// How long after a VMM starts (or is adopted) the agent is first sought.
const AGENT_FIRST_CONNECT: Duration = Duration::from_millis(100);

impl VmActor {
    /// Connects to the guest agent in the background (the guest may still
    /// be booting); on success the link is kept and waiters get it, and a
    /// link that ends while the VMM runs is connected again.
    pub(super) fn connect_agent(&mut self, ctx: &mut Context<Self>) {
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

    pub(super) fn drop_agent(&mut self, ctx: &mut Context<Self>) {
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
