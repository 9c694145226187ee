//! What can be asked of a VM (`VmCommand`): reads answered from the
//! durable record while reloading, commands refused while the store cannot
//! write, the rest fed to the machine as events.

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::settings::VmError;
use super::{OnStart, VmActor};
use crate::disk::DiskSource;
use crate::vm::machine::Event;
use crate::vm::record::VmRecord;

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
