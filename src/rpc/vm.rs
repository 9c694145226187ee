//! The `vm.*` methods: create, start, stop, kill, restart, remove, forget,
//! list, get, logs, exec and ping. They ask only the VM manager (and use
//! the VM settings for paths); `vm.logs` with `follow` and `vm.exec` turn
//! their connection into a byte stream (`rpc::stream`).
//!
//! Its parts: `params` (what each method takes, checked at the boundary),
//! `views` (what it answers), `create` (a create checked whole before
//! anything is made) and `streams` (console reads, byte streams).

mod create;
mod params;
mod streams;
mod views;

pub use params::*;
pub use streams::{Opened, open_stream};
pub use views::*;

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use serde_json::value::RawValue;

use super::protocol::{ErrorCode, RpcError, requests};
use super::wire::Wire;
use crate::actors::catalog::CatalogActor;
use crate::actors::netns::NetworkManager;
use crate::actors::vm::{
    DEFAULT_STOP_TIMEOUT, ForVm, ForgetVm, ListVms, VmCommand, VmManager, VmSettings,
};
use crate::vm::InvalidVm;
use crate::vm::phase::Phase;
use create::validate_create;
use streams::{agent_of, console_path, read_tail};

/// How long `vm exec` and `vm ping` wait for a booting VM's agent.
const DEFAULT_AGENT_WAIT: Duration = Duration::from_secs(60);

requests! {
    /// Requests about VMs.
    pub enum Request {
        Create(VmCreateParams) => "vm.create",
            "Create a VM from a kernel and a root disk (a clone of an ext4 file or of an image's disk), optionally starting it.";
        Start(VmRef) => "vm.start", "Start a VM; a no-op when it is running.";
        Stop(VmStopParams) => "vm.stop",
            "Stop a VM gracefully, SIGKILL after the timeout; a no-op when stopped.";
        Kill(VmRef) => "vm.kill", "SIGKILL a VM's VMM at once.";
        Restart(VmStopParams) => "vm.restart", "Stop a VM, then start it.";
        Remove(VmRemoveParams) => "vm.remove",
            "Remove a stopped VM and everything it left on the host (force: kill it first).";
        Forget(VmForgetParams) => "vm.forget",
            "Remove a quarantined VM record (one that does not decode) and the files it could own.";
        List => "vm.list", "Every VM, by name.";
        Get(VmRef) => "vm.get", "One VM in detail.";
        Logs(VmLogsParams) => "vm.logs", "A VM's serial console output (the last lines with tail).";
        Exec(VmExecParams) => "vm.exec",
            "Run a command in a VM through its agent; the connection becomes a byte stream of stdin, stdout, stderr and the exit status.";
        Ping(VmPingParams) => "vm.ping",
            "Ping a VM's agent (waiting for a booting VM's agent to come up).";
    }
}

impl Request {
    /// Whether an accepted request switches its connection to a byte stream.
    pub fn is_streaming(&self) -> bool {
        matches!(
            self,
            Request::Logs(VmLogsParams { follow: true, .. }) | Request::Exec(_)
        )
    }
}

/// What the VM handlers reach.
pub struct VmServices {
    pub vms: Addr<VmManager>,
    pub networks: Addr<NetworkManager>,
    /// Kernels and images a create chooses.
    pub catalog: Addr<CatalogActor>,
    pub settings: Arc<VmSettings>,
}

pub async fn handle(
    services: &VmServices,
    wire: &Wire<'_>,
    request: Request,
) -> Result<Box<RawValue>, RpcError> {
    match request {
        Request::Create(params) => {
            let create = validate_create(services, wire, params).await?;
            let name = create.name.clone();
            let vm = wire
                .operation("vm.create", &name, async {
                    Ok(services.vms.send(create).await??)
                })
                .await?;
            wire.answer(VmResult {
                vm: VmView::from(&vm),
                store_unavailable: None,
            })
        }
        Request::Start(VmRef { name }) => {
            command(services, wire, "vm.start", name, VmCommand::Start).await
        }
        Request::Stop(params) => {
            let timeout = stop_timeout(params.timeout_secs)?;
            let stop = VmCommand::Stop { timeout };
            command(services, wire, "vm.stop", params.name, stop).await
        }
        Request::Kill(VmRef { name }) => {
            command(services, wire, "vm.kill", name, VmCommand::Kill).await
        }
        Request::Restart(params) => {
            let timeout = stop_timeout(params.timeout_secs)?;
            let restart = VmCommand::Restart { timeout };
            command(services, wire, "vm.restart", params.name, restart).await
        }
        Request::Remove(params) => {
            let remove = VmCommand::Remove {
                force: params.force,
            };
            command(services, wire, "vm.remove", params.name, remove).await
        }
        Request::Forget(VmForgetParams { id }) => {
            let forgotten = wire
                .operation("vm.forget", &id.clone(), async {
                    Ok(services.vms.send(ForgetVm { id }).await??)
                })
                .await?;
            wire.answer(ForgetResult { forgotten })
        }
        Request::List => {
            let vms = services.vms.send(ListVms).await??;
            wire.answer(VmsResult {
                vms: vms.iter().map(VmView::from).collect(),
                store_unavailable: store_unavailable(services),
            })
        }
        Request::Get(VmRef { name }) => {
            let get = ForVm {
                name,
                command: VmCommand::Get,
            };
            let vm = services.vms.send(get).await??;
            let mut view = VmView::from(&vm);
            if vm.phase == Phase::Running {
                // Only an agent already connected: inspect never waits.
                let link = agent_of(services, vm.name.clone(), Some(0.0)).await;
                view.agent = link.ok().as_ref().map(AgentView::of);
            }
            wire.answer(VmResult {
                vm: view,
                store_unavailable: store_unavailable(services),
            })
        }
        Request::Logs(params) => {
            let path = console_path(services, params.name).await?;
            let text = tokio::task::spawn_blocking(move || read_tail(&path, params.tail))
                .await
                .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))??;
            wire.answer(LogsResult { text })
        }
        Request::Ping(VmPingParams { name, wait_secs }) => {
            let link = agent_of(services, name, wait_secs).await?;
            let round_trip = link.ping().await?;
            let hello = link.hello();
            wire.answer(PingResult {
                round_trip_ms: round_trip.as_secs_f64() * 1000.0,
                agent_version: hello.agent_version.clone(),
                kernel: hello.kernel.clone(),
                hostname: hello.hostname.clone(),
                boot: hello.boot,
            })
        }
        Request::Exec(_) => Err(RpcError::new(
            ErrorCode::InvalidRequest,
            "vm.exec is a streaming request",
        )),
    }
}

/// A lifecycle command, recorded as an operation on the VM.
async fn command(
    services: &VmServices,
    wire: &Wire<'_>,
    method: &'static str,
    name: String,
    command: VmCommand,
) -> Result<Box<RawValue>, RpcError> {
    let target = name.clone();
    let vm = wire
        .operation(method, &target, async {
            Ok(services.vms.send(ForVm { name, command }).await??)
        })
        .await?;
    wire.answer(VmResult {
        vm: VmView::from(&vm),
        store_unavailable: None,
    })
}

/// Why the store cannot write, when it cannot.
fn store_unavailable(services: &VmServices) -> Option<String> {
    services.settings.store_unwritable()
}

fn stop_timeout(seconds: Option<f64>) -> Result<Duration, RpcError> {
    match seconds {
        None => Ok(DEFAULT_STOP_TIMEOUT),
        Some(s) if s.is_finite() && (0.0..=3600.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(InvalidVm {
            field: "timeout_secs",
            reason: format!("{s} is outside 0 to 3600 seconds"),
        }
        .into()),
    }
}
