//! What the `vm.*` methods answer: a VM as clients see it, and results.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::actors::records::QuarantinedRecord;
use crate::guest::link::AgentLink;
use crate::vm::phase::Phase;
use crate::vm::phase::VmState;
use crate::vm::record::{Accel, VmImage, VmRecord, VmmKind};
use crate::vm::restart::RestartMode;
use crate::vm::state::LastExit;
use banger_agent::protocol::PROTOCOL_VERSION;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgetResult {
    pub forgotten: QuarantinedRecord,
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
    pub(super) fn of(link: &AgentLink) -> AgentView {
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
