//! The `vm.*` methods: create, start, stop, kill, restart, remove, forget,
//! list, get, logs, exec and ping. They ask only the VM manager (and use
//! the VM settings for paths); `vm.logs` with `follow` and `vm.exec` turn
//! their connection into a byte stream (`rpc::stream`).

use crate::vmm::logs;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::protocol::{ErrorCode, Params, RpcError, check_wait, requests};
use super::stream::LogFollow;
use super::wire::Wire;
use crate::actors::catalog::{CatalogActor, ChooseKernel, FindImage, ImageError};
use crate::actors::netns::{NetworkManager, Resolve};
use crate::actors::vm::{
    AgentOf, CreateVm, DEFAULT_STOP_TIMEOUT, ForVm, ForgetVm, ListVms, VmCommand, VmManager,
    VmSettings,
};
use crate::disk::DiskSource;
use crate::error_chain;
use crate::guest::link::{AgentLink, ExecSession};
use crate::image::Lookup;
use crate::store::Undecodable;
use crate::vm::phase::Phase;
use crate::vm::phase::VmState;
use crate::vm::record::{Accel, VmImage, VmRecord, VmmKind};
use crate::vm::restart::RestartMode;
use crate::vm::state::LastExit;
use crate::vm::{
    InvalidVm, generate_name, parse_disk_bytes, parse_memory_mib, validate_name, validate_rootfs,
    validate_vcpus,
};
use banger_agent::protocol::{ExecRequest, PROTOCOL_VERSION};

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

/// `--memory`: MiB as a number, or a size such as "512M" or "2G".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MemoryArg {
    Mib(u64),
    Size(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCreateParams {
    /// Generated (`adjective-noun`) when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Default: `vm.default_kernel`, else the only kernel in the catalog.
    #[serde(default)]
    pub kernel: Option<String>,
    /// The root disk: a user's ext4 file, or an image (one of the two).
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// An image's name, digest or unique digest prefix.
    #[serde(default)]
    pub image: Option<String>,
    /// The root disk's size (`1G`, `512M`): grown before the first boot.
    #[serde(default)]
    pub disk: Option<String>,
    /// Run the image's Entrypoint and Cmd as the VM's main process.
    #[serde(default)]
    pub run_image_cmd: bool,
    #[serde(default)]
    pub vcpus: Option<u8>,
    #[serde(default)]
    pub memory: Option<MemoryArg>,
    #[serde(default)]
    pub restart: Option<RestartMode>,
    #[serde(default)]
    pub restart_delay_secs: Option<f64>,
    #[serde(default)]
    pub restart_max_delay_secs: Option<f64>,
    #[serde(default)]
    pub vmm: Option<VmmKind>,
    /// The network to join (default: `default`, when networking is on).
    #[serde(default)]
    pub network: Option<String>,
    /// No network at all.
    #[serde(default)]
    pub no_network: bool,
    #[serde(default)]
    pub start: bool,
}

impl Params for VmCreateParams {
    fn validate(&self) -> Result<(), RpcError> {
        match (&self.rootfs, &self.image) {
            (Some(_), Some(_)) => {
                return Err(RpcError::invalid_params(
                    "image",
                    "cannot be given with rootfs: the root disk is one or the other",
                ));
            }
            (None, None) => {
                return Err(RpcError::invalid_params(
                    "rootfs",
                    "give a root disk: rootfs (an ext4 file) or image (an imported image)",
                ));
            }
            _ => {}
        }
        if self.run_image_cmd && self.image.is_none() {
            return Err(RpcError::invalid_params(
                "run_image_cmd",
                "needs image: a root disk file has no command to run",
            ));
        }
        if let Some(network) = &self.network {
            validate_name("network", network)?;
            if self.no_network {
                return Err(RpcError::invalid_params(
                    "no_network",
                    "cannot be given with network",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    pub name: String,
}

impl Params for VmRef {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStopParams {
    pub name: String,
    /// Seconds to wait for the guest before SIGKILL (default 30).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

impl Params for VmStopParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmForgetParams {
    /// The quarantined record's key: the VM's id.
    pub id: String,
}

impl Params for VmForgetParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgetResult {
    pub forgotten: Undecodable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRemoveParams {
    pub name: String,
    /// Stop (kill) a running VM first.
    #[serde(default)]
    pub force: bool,
}

impl Params for VmRemoveParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLogsParams {
    pub name: String,
    /// Only the last N lines.
    #[serde(default)]
    pub tail: Option<usize>,
    /// Keep sending new output: the connection becomes a byte stream.
    #[serde(default)]
    pub follow: bool,
}

impl Params for VmLogsParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmExecParams {
    pub name: String,
    /// The program and its arguments; the program is looked up in the
    /// guest's PATH.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A pseudo-terminal (not yet served).
    #[serde(default)]
    pub tty: bool,
    /// How long to wait for the agent of a VM that is still booting (default 60).
    #[serde(default)]
    pub wait_secs: Option<f64>,
}

impl Params for VmExecParams {
    fn validate(&self) -> Result<(), RpcError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(RpcError::invalid_params("argv", "must name a program"));
        }
        if self.tty {
            return Err(RpcError::invalid_params(
                "tty",
                "a pseudo-terminal is not served yet; run without -t",
            ));
        }
        if let Some(key) = self.env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return Err(RpcError::invalid_params(
                "env",
                format!("{key:?} is not a variable name"),
            ));
        }
        check_wait("wait_secs", self.wait_secs)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPingParams {
    pub name: String,
    /// How long to wait for the agent of a VM that is still booting (default 60).
    #[serde(default)]
    pub wait_secs: Option<f64>,
}

impl Params for VmPingParams {
    fn validate(&self) -> Result<(), RpcError> {
        check_wait("wait_secs", self.wait_secs)
    }
}

/// The agent's answer to `vm.ping`, with what it said in its hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub round_trip_ms: f64,
    pub agent_version: String,
    pub kernel: String,
    pub hostname: String,
    /// Guest boot clock (ms) when the agent's stages started and when it
    /// began serving.
    pub boot: banger_agent::protocol::BootTimes,
}

/// A VM as `vm ls --json` and `vm inspect --json` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    pub id: String,
    pub state: VmState,
    /// The lifecycle phase behind `state`, with its deadline or next timer.
    pub phase: Phase,
    pub vmm: VmmKind,
    /// The VMM's pid; null unless a VMM process exists.
    pub pid: Option<i32>,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: String,
    pub rootfs: PathBuf,
    /// The image its root disk was cloned from.
    #[serde(default)]
    pub image: Option<VmImage>,
    /// The size its root disk was grown to at create.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// The main process's command (`--run-image-cmd`): Entrypoint then Cmd.
    #[serde(default)]
    pub main: Option<Vec<String>>,
    pub restart_policy: RestartMode,
    pub restart_delay_secs: f64,
    pub restart_max_delay_secs: f64,
    pub restart_count: u32,
    pub next_restart_at: Option<jiff::Timestamp>,
    pub last_exit: Option<LastExit>,
    pub created_at: jiff::Timestamp,
    pub started_at: Option<jiff::Timestamp>,
    /// Why the VM is `failed`.
    pub error: Option<String>,
    /// QEMU's accelerator while it runs (`kvm` or `tcg`).
    pub accel: Option<Accel>,
    /// Why a re-adopted VMM counts as degraded (alive, not answering).
    pub degraded: Option<String>,
    /// The network the VM joins, its address there and its MAC.
    pub network: Option<String>,
    pub ip: Option<std::net::Ipv4Addr>,
    pub mac: Option<String>,
    /// The agent a running VM answers with (`vm inspect` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentView>,
}

/// The agent inside a running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub version: String,
    /// The agent protocol version the daemon speaks with it.
    pub protocol: u32,
    /// Set when the agent is older than this daemon's: what that means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl AgentView {
    fn of(link: &AgentLink) -> AgentView {
        let hello = link.hello();
        let note = (hello.protocol < PROTOCOL_VERSION).then(|| {
            format!(
                "an older agent (protocol {}, without flow control or signals); the VM gets banger's agent at its next start",
                hello.protocol
            )
        });
        AgentView {
            version: hello.agent_version.clone(),
            protocol: hello.protocol,
            note,
        }
    }
}

impl From<&VmRecord> for VmView {
    fn from(vm: &VmRecord) -> VmView {
        VmView {
            name: vm.name.clone(),
            id: vm.id.clone(),
            state: vm.phase.state(),
            phase: vm.phase,
            vmm: vm.vmm,
            pid: vm.process.as_ref().map(|p| p.pid),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel: vm.kernel.clone(),
            rootfs: vm.rootfs.clone(),
            image: vm.image.clone(),
            disk_bytes: vm.disk_bytes,
            main: vm.main.as_ref().map(|main| main.main_request().argv),
            restart_policy: vm.restart_policy.mode,
            restart_delay_secs: vm.restart_policy.delay_ms as f64 / 1000.0,
            restart_max_delay_secs: vm.restart_policy.max_delay_ms as f64 / 1000.0,
            restart_count: vm.restart_count,
            next_restart_at: match vm.phase {
                Phase::BackingOff { until, .. } => Some(until),
                _ => None,
            },
            last_exit: vm.last_exit,
            created_at: vm.created_at,
            started_at: vm.started_at,
            error: vm.error.clone(),
            accel: vm.process.as_ref().and_then(|p| p.accel),
            degraded: vm.degraded.clone(),
            network: vm.network.as_ref().map(|n| n.network.clone()),
            ip: vm.network.as_ref().and_then(|n| n.address),
            mac: vm.network.as_ref().map(|_| crate::network::mac_of(&vm.id)),
            agent: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmResult {
    pub vm: VmView,
    /// Set while the store cannot write: the VM is shown from the
    /// daemon's memory, and this says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_unavailable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmsResult {
    pub vms: Vec<VmView>,
    /// As in [`VmResult`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_unavailable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogsResult {
    pub text: String,
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
    let health = services.settings.store_health.borrow();
    health.unwritable().map(ToString::to_string)
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

/// Validates a create, then opens its root disk as the caller, last, so a
/// refused request opens nothing.
async fn validate_create(
    services: &VmServices,
    wire: &Wire<'_>,
    params: VmCreateParams,
) -> Result<CreateVm, RpcError> {
    let name = params.name.unwrap_or_else(generate_name);
    validate_name("name", &name)?;
    if let Some(kernel) = &params.kernel {
        validate_name("kernel", kernel)?;
    }
    let rootfs = params.rootfs.as_deref().map(validate_rootfs).transpose()?;
    let disk_bytes = params.disk.as_deref().map(parse_disk_bytes).transpose()?;
    if let Some(bytes) = disk_bytes
        && bytes > services.settings.max_rootfs.bytes
    {
        return Err(InvalidVm {
            field: "disk",
            reason: format!(
                "{bytes} bytes is more than the {} allowed ({})",
                services.settings.max_rootfs.bytes, services.settings.max_rootfs.setting
            ),
        }
        .into());
    }
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
    let defaults = services.settings.restart_defaults;
    if restart_max_delay_ms.unwrap_or(defaults.max_delay_ms)
        < restart_delay_ms.unwrap_or(defaults.delay_ms)
    {
        return Err(InvalidVm {
            field: "restart_max_delay_secs",
            reason: "is shorter than the restart delay".into(),
        }
        .into());
    }
    // Resolved before anything is opened: a network that cannot be had
    // fails the create at once, naming why.
    let network = services
        .networks
        .send(Resolve {
            network: params.network,
            none: params.no_network,
        })
        .await??;
    let kernel = match params.kernel {
        Some(kernel) => kernel,
        None => services
            .catalog
            .send(ChooseKernel {
                preferred: services.settings.default_kernel.clone(),
            })
            .await
            .map_err(|_| RpcError::new(ErrorCode::Unavailable, "the catalog is not answering"))??,
    };
    // Opened last, so a refused request opens nothing: the user's file
    // with the caller's authority, an image's disk (the daemon's own,
    // never written) by the daemon.
    let (rootfs, image, main) = match (rootfs, params.image) {
        (Some(rootfs), _) => {
            let opened = wire
                .open_named("rootfs", &rootfs, services.settings.max_rootfs)
                .await?;
            (DiskSource::from(opened), None, None)
        }
        (None, Some(wanted)) => {
            let image = services
                .catalog
                .send(FindImage(wanted))
                .await
                .map_err(|_| {
                    RpcError::new(ErrorCode::Unavailable, "the catalog is not answering")
                })??;
            crate::fault::pause("image-found").await;
            let disk = image.disk.clone();
            let file = tokio::task::spawn_blocking(move || std::fs::File::open(&disk))
                .await
                .map_err(|_| RpcError::new(ErrorCode::Unavailable, "blocking pool gone"))?
                .map_err(|e| match e.kind() {
                    // `image rm` won the race since the image was found.
                    std::io::ErrorKind::NotFound => {
                        RpcError::from(ImageError::Lookup(Lookup::NotFound(image.name.clone())))
                    }
                    _ => RpcError::new(
                        ErrorCode::Internal,
                        format!(
                            "cannot open image {}'s disk {}: {e}",
                            image.name,
                            image.disk.display()
                        ),
                    ),
                })?;
            crate::fault::pause("image-opened").await;
            let source = DiskSource {
                named: image.disk.clone(),
                file: file.into(),
                len: image.disk_bytes,
                from_caller: false,
            };
            let main = match params.run_image_cmd {
                true if image.config.entrypoint.is_empty() && image.config.cmd.is_empty() => {
                    return Err(RpcError::invalid_params(
                        "run_image_cmd",
                        format!("image {} sets no Entrypoint or Cmd", image.name),
                    ));
                }
                true => Some(image.config.clone()),
                false => None,
            };
            let held = VmImage {
                name: image.name,
                digest: image.digest,
            };
            (source, Some(held), main)
        }
        (None, None) => return Err(RpcError::invalid_params("rootfs", "no root disk given")),
    };
    if let Some(bytes) = disk_bytes
        && bytes < rootfs.len
    {
        return Err(InvalidVm {
            field: "disk",
            reason: format!(
                "{bytes} bytes is smaller than the {} of {}: a root disk can grow, not shrink",
                rootfs.len,
                rootfs.named.display()
            ),
        }
        .into());
    }
    Ok(CreateVm {
        network,
        name,
        kernel,
        rootfs,
        image,
        disk_bytes,
        main,
        vcpus,
        memory_mib,
        vmm: params.vmm,
        restart: params.restart,
        restart_delay_ms,
        restart_max_delay_ms,
        start: params.start,
    })
}

/// The console log of the VM named `name`.
async fn console_path(services: &VmServices, name: String) -> Result<PathBuf, RpcError> {
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
async fn agent_of(
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
fn read_tail(path: &Path, tail: Option<usize>) -> Result<String, RpcError> {
    let bytes = logs::read_tail(path, tail, logs::MAX_LOG_BYTES).map_err(|e| log_error(path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn log_error(path: &Path, e: std::io::Error) -> RpcError {
    RpcError::new(
        ErrorCode::Internal,
        format!("cannot read {}: {e}", path.display()),
    )
}
