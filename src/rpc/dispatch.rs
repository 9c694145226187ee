//! From a typed request to its answer: each method's handler asks the
//! actors and does no I/O of its own beyond sending progress lines.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::protocol::{
    BackupParams, BackupResult, ErrorCode, ForgetResult, HelloParams, HelloResult,
    KernelImportDebParams, KernelImportParams, KernelRef, KernelResult, KernelsResult, LogsResult,
    METHODS, MemoryArg, MethodDescription, MethodsResult, Notification, OperationRef,
    OperationResult, OperationsResult, PROTOCOL_VERSION, PingResult, Progress, Request, RpcError,
    StatusResult, StoreSchemaResult, StoreStatus, VmCreateParams, VmForgetParams, VmPingParams,
    VmRef, VmResult, VmView, VmsResult, WithOpId,
};
use crate::actors::catalog::{
    CatalogActor, ImportKernel, ImportProgress, KernelSource, ListKernels, QuarantinedKernels,
    RemoveKernel,
};
use crate::actors::operation::{
    Begin, CancelOperation, GetOperation, ListOperations, OperationHandle, OperationRegistry,
    WatchOperation,
};
use crate::actors::store::{CountRecords, StoreActor, TakeSnapshot};
use crate::actors::vm::{
    AgentOf, CreateVm, DEFAULT_STOP_TIMEOUT, ForVm, ForgetVm, ListVms, QuarantinedVms, VmCommand,
    VmManager, VmSettings,
};
use crate::catalog::KernelRecord;
use crate::config::Mode;
use crate::error_chain;
use crate::guest::link::{AgentLink, ExecSession};
use crate::operations::{OperationOutcome, OperationRecord};
use crate::rpc::stream::LogFollow;
use crate::store::{Observed, backup};
use crate::vm::{
    InvalidVm, generate_name, parse_memory_mib, validate_name, validate_rootfs, validate_vcpus,
};
use banger_agent::protocol::ExecRequest;

/// How long `vm exec` and `vm ping` wait for a booting VM's agent.
const DEFAULT_AGENT_WAIT: Duration = Duration::from_secs(60);

/// Facts about the running daemon, fixed at start-up.
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    pub mode: Mode,
    pub started_at: Timestamp,
    pub started: Instant,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub store_path: PathBuf,
    /// The store's schema: fixed while the daemon runs, since migrations
    /// happen only at start-up under the state directory's lock.
    pub schema: Observed,
}

/// What request handlers reach.
pub struct Services {
    pub store: Addr<StoreActor>,
    pub catalog: Addr<CatalogActor>,
    pub operations: Addr<OperationRegistry>,
    pub vms: Addr<VmManager>,
    pub vm_settings: Arc<VmSettings>,
    pub kernels_dir: PathBuf,
    pub info: DaemonInfo,
}

/// One request's view of its connection: where its lines go, and whether
/// the client has gone.
pub struct Reply<'a> {
    pub id: &'a Value,
    pub op_id: &'a str,
    pub out: &'a mpsc::Sender<Vec<u8>>,
    pub closed: &'a CancellationToken,
}

/// A line ready to write: the JSON and its newline.
pub fn line(message: &impl Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(message).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

pub async fn handle(
    services: &Services,
    request: Request,
    reply: &Reply<'_>,
) -> Result<Box<RawValue>, RpcError> {
    match request {
        Request::Hello(params) => with_op_id(reply, hello(services, params)?),
        Request::Status => with_op_id(reply, status(services).await?),
        Request::Methods => with_op_id(reply, methods()),
        Request::StoreSchema => with_op_id(reply, store_schema(services)),
        Request::OperationsList(params) => {
            let operations = services
                .operations
                .send(ListOperations { all: params.all })
                .await??;
            with_op_id(reply, OperationsResult { operations })
        }
        Request::OperationsGet(OperationRef { op_id }) => {
            let operation = services.operations.send(GetOperation(op_id)).await??;
            with_op_id(reply, OperationResult { operation })
        }
        Request::OperationsCancel(OperationRef { op_id }) => {
            let operation = services.operations.send(CancelOperation(op_id)).await??;
            with_op_id(reply, OperationResult { operation })
        }
        Request::OperationsWatch(OperationRef { op_id }) => {
            if let Some(status) = services
                .operations
                .send(WatchOperation(op_id.clone()))
                .await?
            {
                forward_progress(status, reply).await;
            }
            let operation = services.operations.send(GetOperation(op_id)).await??;
            with_op_id(reply, OperationResult { operation })
        }
        Request::Backup(params) => with_op_id(reply, backup(services, params, reply).await?),
        Request::VmCreate(params) => {
            let create = validate_create(services, params)?;
            let name = create.name.clone();
            let vm = operation(services, reply, "vm.create", &name, async {
                Ok(services.vms.send(create).await??)
            })
            .await?;
            with_op_id(
                reply,
                VmResult {
                    vm: VmView::from(&vm),
                },
            )
        }
        Request::VmStart(VmRef { name }) => {
            vm_command(services, reply, "vm.start", name, VmCommand::Start).await
        }
        Request::VmStop(params) => {
            let timeout = stop_timeout(params.timeout_secs)?;
            vm_command(
                services,
                reply,
                "vm.stop",
                params.name,
                VmCommand::Stop { timeout },
            )
            .await
        }
        Request::VmKill(VmRef { name }) => {
            vm_command(services, reply, "vm.kill", name, VmCommand::Kill).await
        }
        Request::VmRestart(params) => {
            let timeout = stop_timeout(params.timeout_secs)?;
            vm_command(
                services,
                reply,
                "vm.restart",
                params.name,
                VmCommand::Restart { timeout },
            )
            .await
        }
        Request::VmRemove(params) => {
            let command = VmCommand::Remove {
                force: params.force,
            };
            vm_command(services, reply, "vm.remove", params.name, command).await
        }
        Request::VmForget(VmForgetParams { id }) => {
            let forgotten = operation(services, reply, "vm.forget", &id.clone(), async {
                Ok(services.vms.send(ForgetVm { id }).await??)
            })
            .await?;
            with_op_id(reply, ForgetResult { forgotten })
        }
        Request::VmList => {
            let vms = services.vms.send(ListVms).await??;
            with_op_id(
                reply,
                VmsResult {
                    vms: vms.iter().map(VmView::from).collect(),
                },
            )
        }
        Request::VmGet(VmRef { name }) => {
            let vm = services
                .vms
                .send(ForVm {
                    name,
                    command: VmCommand::Get,
                })
                .await??;
            with_op_id(
                reply,
                VmResult {
                    vm: VmView::from(&vm),
                },
            )
        }
        Request::VmLogs(params) => {
            let path = console_path(services, params.name).await?;
            let text = tokio::task::spawn_blocking(move || read_tail(&path, params.tail))
                .await
                .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))??;
            with_op_id(reply, LogsResult { text })
        }
        Request::VmPing(VmPingParams { name, wait_secs }) => {
            let link = agent_of(services, name, wait_secs).await?;
            let round_trip = link.ping().await?;
            let hello = link.hello();
            with_op_id(
                reply,
                PingResult {
                    round_trip_ms: round_trip.as_secs_f64() * 1000.0,
                    agent_version: hello.agent_version.clone(),
                    kernel: hello.kernel.clone(),
                    hostname: hello.hostname.clone(),
                    boot: hello.boot,
                },
            )
        }
        Request::VmExec(_) => Err(RpcError::new(
            ErrorCode::InvalidRequest,
            "vm.exec is a streaming request",
        )),
        Request::KernelImport(params) => {
            validate_name("name", &params.name)?;
            let name = params.name.clone();
            let kernel = operation(
                services,
                reply,
                "kernel.import",
                &name,
                import_kernel(services, params),
            )
            .await?;
            with_op_id(reply, KernelResult { kernel })
        }
        Request::KernelImportDeb(params) => {
            validate_name("name", &params.name)?;
            with_op_id(reply, import_package(services, params, reply).await?)
        }
        Request::KernelList => {
            let kernels = services.catalog.send(ListKernels).await??;
            with_op_id(reply, KernelsResult { kernels })
        }
        Request::KernelRemove(KernelRef { name }) => {
            let kernel = operation(services, reply, "kernel.remove", &name.clone(), async {
                Ok(services.catalog.send(RemoveKernel { name }).await??)
            })
            .await?;
            with_op_id(reply, KernelResult { kernel })
        }
    }
}

/// Runs `work` as a recorded operation on `target`.
async fn operation<T>(
    services: &Services,
    reply: &Reply<'_>,
    method: &'static str,
    target: &str,
    work: impl Future<Output = Result<T, RpcError>>,
) -> Result<T, RpcError> {
    let op = services
        .operations
        .send(Begin {
            method,
            target: Some(target.to_string()),
            op_id: reply.op_id.to_string(),
            cancellable: false,
            intent_first: false,
        })
        .await??;
    let result = work.await;
    finish(op, result).await
}

/// Records how an operation ended; its result stays the request's answer.
async fn finish<T>(op: OperationHandle, result: Result<T, RpcError>) -> Result<T, RpcError> {
    let (outcome, error) = match &result {
        Ok(_) => (OperationOutcome::Succeeded, None),
        Err(e) if e.code == ErrorCode::Cancelled => {
            (OperationOutcome::Cancelled, Some(e.message.clone()))
        }
        Err(e) => (OperationOutcome::Failed, Some(e.message.clone())),
    };
    let finished = op.finish(outcome, error).await;
    result.and_then(|value| finished.map(|_| value).map_err(RpcError::from))
}

async fn vm_command(
    services: &Services,
    reply: &Reply<'_>,
    method: &'static str,
    name: String,
    command: VmCommand,
) -> Result<Box<RawValue>, RpcError> {
    let target = name.clone();
    let vm = operation(services, reply, method, &target, async {
        Ok(services.vms.send(ForVm { name, command }).await??)
    })
    .await?;
    with_op_id(
        reply,
        VmResult {
            vm: VmView::from(&vm),
        },
    )
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

fn validate_create(services: &Services, params: VmCreateParams) -> Result<CreateVm, RpcError> {
    let name = params.name.unwrap_or_else(generate_name);
    validate_name("name", &name)?;
    validate_name("kernel", &params.kernel)?;
    let rootfs = validate_rootfs(&params.rootfs)?;
    let vcpus = validate_vcpus(params.vcpus.unwrap_or(1))?;
    let memory_mib = match params.memory {
        None => 512,
        Some(MemoryArg::Mib(mib)) => parse_memory_mib(&mib.to_string())?,
        Some(MemoryArg::Size(text)) => parse_memory_mib(&text)?,
    };
    let seconds = |field: &'static str, value: Option<f64>| {
        value
            .map(|s| crate::config::seconds_to_ms(field, s))
            .transpose()
            .map_err(|e| {
                RpcError::new(
                    ErrorCode::InvalidParams,
                    format!("invalid params: {}", error_chain(&e)),
                )
            })
    };
    let restart_delay_ms = seconds("restart_delay_secs", params.restart_delay_secs)?;
    let restart_max_delay_ms = seconds("restart_max_delay_secs", params.restart_max_delay_secs)?;
    let defaults = services.vm_settings.restart_defaults;
    if restart_max_delay_ms.unwrap_or(defaults.max_delay_ms)
        < restart_delay_ms.unwrap_or(defaults.delay_ms)
    {
        return Err(InvalidVm {
            field: "restart_max_delay_secs",
            reason: "is shorter than the restart delay".into(),
        }
        .into());
    }
    Ok(CreateVm {
        name,
        kernel: params.kernel,
        rootfs,
        vcpus,
        memory_mib,
        vmm: params.vmm,
        restart: params.restart,
        restart_delay_ms,
        restart_max_delay_ms,
        start: params.start,
    })
}

async fn import_kernel(
    services: &Services,
    params: KernelImportParams,
) -> Result<KernelRecord, RpcError> {
    let import = ImportKernel {
        name: params.name,
        source: KernelSource::Vmlinux {
            vmlinux: params.vmlinux,
            initrd: params.initrd,
            cmdline: params.cmdline,
        },
        progress: Arc::new(|_, _| {}),
    };
    Ok(services.catalog.send(import).await??)
}

/// `kernel.import_deb`: the catalog's import, its phases as progress.
async fn import_package(
    services: &Services,
    params: KernelImportDebParams,
    reply: &Reply<'_>,
) -> Result<KernelResult, RpcError> {
    let begin = Begin {
        method: "kernel.import_deb",
        target: Some(params.name.clone()),
        op_id: reply.op_id.to_string(),
        cancellable: false,
        intent_first: false,
    };
    let kernel = with_progress(services, reply, begin, |report, _| async move {
        // The import reports from its blocking thread.
        let report = std::sync::Mutex::new(report);
        let progress: ImportProgress = Arc::new(move |phase, step| {
            if let Ok(report) = report.lock() {
                report(phase, Some(step), Some(4));
            }
        });
        let import = ImportKernel {
            name: params.name,
            source: KernelSource::Package { path: params.path },
            progress,
        };
        Ok(services.catalog.send(import).await??)
    })
    .await?;
    Ok(KernelResult { kernel })
}

/// The console log of the VM named `name`.
async fn console_path(services: &Services, name: String) -> Result<PathBuf, RpcError> {
    let vm = services
        .vms
        .send(ForVm {
            name,
            command: VmCommand::Get,
        })
        .await??;
    Ok(services.vm_settings.paths(&vm.id).console_log())
}

/// The agent of a VM, waiting for a booting VM's agent up to `wait_secs`.
async fn agent_of(
    services: &Services,
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
pub async fn open_stream(services: &Services, request: Request) -> Result<Opened, RpcError> {
    match request {
        Request::VmLogs(params) => {
            let path = console_path(services, params.name).await?;
            let offset = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || tail_offset(&path, params.tail))
                    .await
                    .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))??
            };
            Ok(Opened::Logs(LogFollow { path, offset }))
        }
        Request::VmExec(params) => {
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

/// Where the last `tail` lines of a log start (all of it without a tail).
fn tail_offset(path: &Path, tail: Option<usize>) -> Result<u64, RpcError> {
    let bytes = read_log(path)?;
    Ok(tail.map_or(0, |n| tail_start(&bytes, n)) as u64)
}

/// The console log, or its last `tail` lines.
fn read_tail(path: &Path, tail: Option<usize>) -> Result<String, RpcError> {
    let bytes = read_log(path)?;
    let start = tail.map_or(0, |n| tail_start(&bytes, n));
    Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
}

fn read_log(path: &Path) -> Result<Vec<u8>, RpcError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(RpcError::new(
            ErrorCode::Internal,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

/// The byte offset where the last `n` lines of `text` begin.
fn tail_start(text: &[u8], n: usize) -> usize {
    if n == 0 {
        return text.len();
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    body.iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n - 1)
        .map_or(0, |(i, _)| i + 1)
}

fn with_op_id<T: Serialize>(reply: &Reply<'_>, result: T) -> Result<Box<RawValue>, RpcError> {
    serde_json::value::to_raw_value(&WithOpId {
        op_id: reply.op_id.to_string(),
        result,
    })
    .map_err(|e| {
        RpcError::new(
            ErrorCode::Internal,
            format!("cannot encode the result: {e}"),
        )
    })
}

fn hello(services: &Services, params: HelloParams) -> Result<HelloResult, RpcError> {
    if params.protocol_version != PROTOCOL_VERSION {
        return Err(RpcError::new(
            ErrorCode::ProtocolMismatch,
            format!(
                "the client speaks protocol v{}, this daemon (banger {}) speaks v{PROTOCOL_VERSION}; use the banger CLI of the daemon's release",
                params.protocol_version, services.info.version
            ),
        ));
    }
    Ok(HelloResult {
        protocol_version: PROTOCOL_VERSION,
        daemon_version: services.info.version.clone(),
    })
}

async fn status(services: &Services) -> Result<StatusResult, RpcError> {
    let (records, running, vms, kernels) = tokio::join!(
        services.store.send(CountRecords),
        services.operations.send(ListOperations { all: false }),
        services.vms.send(QuarantinedVms),
        services.catalog.send(QuarantinedKernels),
    );
    let (records, running) = (records??, running??);
    let mut quarantined = vms?;
    quarantined.extend(kernels?);
    let info = &services.info;
    Ok(StatusResult {
        version: info.version.clone(),
        protocol_version: PROTOCOL_VERSION,
        pid: info.pid,
        mode: match info.mode {
            Mode::System => "system".into(),
            Mode::User => "user".into(),
        },
        started_at: info.started_at,
        uptime_seconds: info.started.elapsed().as_secs(),
        state_dir: info.state_dir.clone(),
        socket: info.socket.clone(),
        store: StoreStatus {
            path: info.store_path.clone(),
            tables: info.schema.tables.clone(),
            applied_migrations: info.schema.applied.iter().cloned().collect(),
            records,
        },
        operations_running: running.len() as u64,
        quarantined,
    })
}

fn methods() -> MethodsResult {
    MethodsResult {
        methods: METHODS
            .iter()
            .map(|m| MethodDescription {
                name: m.name.into(),
                summary: m.summary.into(),
            })
            .collect(),
    }
}

fn store_schema(services: &Services) -> StoreSchemaResult {
    StoreSchemaResult {
        tables: services.info.schema.tables.clone(),
        applied_migrations: services.info.schema.applied.iter().cloned().collect(),
    }
}

/// Sends the operation's status as `progress` notifications, now and at
/// every change, until it ends or the client goes away.
async fn forward_progress(mut status: watch::Receiver<OperationRecord>, reply: &Reply<'_>) {
    loop {
        let record = status.borrow_and_update().clone();
        if record.outcome == OperationOutcome::Running {
            let progress = Progress {
                id: reply.id.clone(),
                op_id: record.op_id,
                phase: record.phase.unwrap_or_default(),
                current: record.current,
                total: record.total,
            };
            if reply
                .out
                .send(line(&Notification::progress(&progress)))
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            _ = reply.closed.cancelled() => return,
        }
    }
}

async fn backup(
    services: &Services,
    params: BackupParams,
    reply: &Reply<'_>,
) -> Result<BackupResult, RpcError> {
    let begin = Begin {
        method: "daemon.backup",
        target: Some(params.path.display().to_string()),
        op_id: reply.op_id.to_string(),
        cancellable: true,
        // A killed daemon's partial copy is found through this record.
        intent_first: true,
    };
    let path = params.path.clone();
    let copied = with_progress(services, reply, begin, |report, cancel| async move {
        let snapshot = services.store.send(TakeSnapshot).await??;
        tokio::task::spawn_blocking(move || {
            backup::write(
                snapshot,
                &path,
                params.rate_limit,
                &cancel,
                |current, total| report("copying", Some(current), Some(total)),
            )
        })
        .await
        .map_err(|e| {
            RpcError::new(
                ErrorCode::Internal,
                format!("the backup thread failed: {e}"),
            )
        })?
        .map_err(RpcError::from)
    })
    .await?;
    Ok(BackupResult {
        path: params.path,
        records: copied.records,
        bytes: copied.bytes,
    })
}

/// A progress reporter for blocking work: phase, current, total.
type Reporter = Box<dyn Fn(&str, Option<u64>, Option<u64>) + Send>;

/// Runs `work` as a recorded operation whose progress reaches the client
/// as notifications; the last one precedes the answer.
async fn with_progress<T, F>(
    services: &Services,
    reply: &Reply<'_>,
    begin: Begin,
    work: impl FnOnce(Reporter, CancellationToken) -> F,
) -> Result<T, RpcError>
where
    F: Future<Output = Result<T, RpcError>>,
{
    let operation = services.operations.send(begin).await??;
    let progress = forward_progress(operation.status(), reply);
    let work = work(Box::new(operation.reporter()), operation.cancel.clone());
    let (result, ()) = tokio::join!(async { finish(operation, work.await).await }, progress);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_starts_after_the_nth_newline_from_the_end() {
        let text = b"one\ntwo\nthree\n";
        assert_eq!(&text[tail_start(text, 1)..], b"three\n");
        assert_eq!(&text[tail_start(text, 2)..], b"two\nthree\n");
        assert_eq!(tail_start(text, 9), 0);
        assert_eq!(tail_start(text, 0), text.len());
        assert_eq!(&b"a\nb"[tail_start(b"a\nb", 1)..], b"b");
    }
}
