//! The `vm.*` methods that read a VM's console or turn their connection
//! into a byte stream (`vm.logs --follow`, `vm.exec`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{DEFAULT_AGENT_WAIT, Request, VmServices};
use crate::actors::vm::{AgentOf, ForVm, VmCommand};
use crate::guest::link::{AgentLink, ExecSession};
use crate::rpc::protocol::{ErrorCode, RpcError};
use crate::rpc::stream::LogFollow;
use crate::vmm::logs;
use banger_agent::protocol::ExecRequest;

/// The console log of the VM named `name`.
pub(super) async fn console_path(services: &VmServices, name: String) -> Result<PathBuf, RpcError> {
    let vm = services
        .vms
        .send(ForVm {
            name,
            command: VmCommand::Get,
        })
        .await??;
    Ok(services.settings.paths(&vm.id).console_log())
}

/// The agent of a VM, waiting for a booting VM's agent up to `wait_secs`.
pub(super) async fn agent_of(
    services: &VmServices,
    name: String,
    wait_secs: Option<f64>,
) -> Result<AgentLink, RpcError> {
    let timeout = wait_secs.map_or(DEFAULT_AGENT_WAIT, Duration::from_secs_f64);
    Ok(services.vms.send(AgentOf { name, timeout }).await??)
}

/// What a streaming request streams.
pub enum Opened {
    Logs(LogFollow),
    Exec(ExecSession),
}

/// Accepts a streaming request: what to stream, ready to run.
pub async fn open_stream(services: &VmServices, request: Request) -> Result<Opened, RpcError> {
    match request {
        Request::Logs(params) => {
            let path = console_path(services, params.name).await?;
            let offset = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || tail_offset(&path, params.tail))
                    .await
                    .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))??
            };
            Ok(Opened::Logs(LogFollow { path, offset }))
        }
        Request::Exec(params) => {
            let link = agent_of(services, params.name, params.wait_secs).await?;
            let session = link
                .exec(ExecRequest {
                    argv: params.argv,
                    env: params.env.into_iter().collect(),
                    cwd: params.cwd,
                    pty: false,
                })
                .await?;
            Ok(Opened::Exec(session))
        }
        _ => Err(RpcError::new(
            ErrorCode::InvalidRequest,
            "not a streaming request",
        )),
    }
}

/// Where the last `tail` lines of a log start (its last
/// [`logs::MAX_LOG_BYTES`] without a tail): read from its end.
fn tail_offset(path: &Path, tail: Option<usize>) -> Result<u64, RpcError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(log_error(path, e)),
    };
    let len = file.metadata().map_err(|e| log_error(path, e))?.len();
    logs::tail_start(&file, len, tail, logs::MAX_LOG_BYTES).map_err(|e| log_error(path, e))
}

/// The console log's last `tail` lines (its last
/// [`logs::MAX_LOG_BYTES`] without a tail), and nothing before them read.
pub(super) fn read_tail(path: &Path, tail: Option<usize>) -> Result<String, RpcError> {
    let bytes = logs::read_tail(path, tail, logs::MAX_LOG_BYTES).map_err(|e| log_error(path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn log_error(path: &Path, e: std::io::Error) -> RpcError {
    RpcError::new(
        ErrorCode::Internal,
        format!("cannot read {}: {e}", path.display()),
    )
}
