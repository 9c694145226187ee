//! The typed records the store holds, one table each. Fields added later
//! carry `#[serde(default)]` so older records still decode; anything else is
//! a schema change with a migration.

use std::path::PathBuf;

use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::vm::ledger::Resource;
use crate::vm::machine::Phase;
use crate::vm::restart::{RestartHistory, RestartPolicy};
use crate::vm::state::LastExit;

/// A record type and the table it lives in.
pub trait Record: Serialize + DeserializeOwned + Send + 'static {
    const TABLE: &'static str;
    fn key(&self) -> String;
}

/// A VM's state as `vm ls` shows it: a stable view derived from its
/// [`Phase`], which scripts depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Creating,
    Created,
    Starting,
    Running,
    Stopping,
    Stopped,
    Crashed,
    CrashLoop,
    Failed,
    Removing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    Firecracker,
    Qemu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Short immutable id used in paths, sockets and interface names.
    pub id: String,
    pub name: String,
    /// Where the VM is in its lifecycle, with its deadline (`vm::machine`).
    pub phase: Phase,
    /// The host resources the VM owns, written before each is acquired
    /// and removed after it is released (`vm::ledger`).
    pub resources: Vec<Resource>,
    pub vmm: VmmKind,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: String,
    /// The VM's own root disk (a clone of what the user gave).
    pub rootfs: PathBuf,
    pub created_at: Timestamp,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub restart_count: u32,
    #[serde(default)]
    pub restart_history: RestartHistory,
    #[serde(default)]
    pub last_exit: Option<LastExit>,
    /// The running VMM, when there is one.
    #[serde(default)]
    pub process: Option<VmmProcess>,
    /// Why the VM's last launch failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Why a re-adopted VMM counts as degraded: alive, its control socket
    /// not answering. Cleared when it answers or exits.
    #[serde(default)]
    pub degraded: Option<String>,
}

/// A VMM process as recorded before the VM is reported running: enough to
/// find it again after a daemon restart and to tell it from a recycled pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmProcess {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_time: u64,
    /// The VMM's control socket: firecracker's API, or QEMU's QMP.
    pub api_socket: PathBuf,
    /// Where the host reaches the guest agent.
    #[serde(default)]
    pub agent: Option<AgentEndpoint>,
    /// How QEMU runs the guest (Firecracker always uses KVM).
    #[serde(default)]
    pub accel: Option<Accel>,
}

/// The host end of a VM's agent channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum AgentEndpoint {
    /// A QEMU virtio-serial port's chardev socket.
    Serial { socket: PathBuf },
    /// Firecracker's hybrid vsock: a Unix socket and a `CONNECT <port>` handshake.
    Vsock { socket: PathBuf, port: u32 },
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Record for VmRecord {
    const TABLE: &'static str = "vms";
    fn key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference the image was pulled as, e.g. `docker.io/library/debian:12`.
    pub reference: String,
    /// Digest of the image manifest, `sha256:...`.
    pub digest: String,
    pub rootfs: PathBuf,
    pub size_bytes: u64,
    pub created_at: Timestamp,
}

impl Record for ImageRecord {
    const TABLE: &'static str = "images";
    fn key(&self) -> String {
        self.reference.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub name: String,
    pub vmlinux: PathBuf,
    #[serde(default)]
    pub vmlinux_sha256: Option<String>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub initrd_sha256: Option<String>,
    /// The compressed kernel (QEMU boots it), from a package import.
    #[serde(default)]
    pub bzimage: Option<PathBuf>,
    #[serde(default)]
    pub bzimage_sha256: Option<String>,
    /// `uname -r`, for kernels imported from a package.
    #[serde(default)]
    pub version: Option<String>,
    /// The package's file name, for kernels imported from one.
    #[serde(default)]
    pub package: Option<String>,
    /// Modules in the initramfs, in load order.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Kernel command line; banger's default when absent.
    #[serde(default)]
    pub cmdline: Option<String>,
    pub created_at: Timestamp,
}

impl Record for KernelRecord {
    const TABLE: &'static str = "kernels";
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub name: String,
    pub bridge: String,
    /// The network's CIDR, e.g. `172.30.0.0/24`; the gateway is its first address.
    pub cidr: String,
    pub created_at: Timestamp,
}

impl Record for NetworkRecord {
    const TABLE: &'static str = "networks";
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub network: String,
    pub address: String,
    pub vm_id: String,
    pub leased_at: Timestamp,
}

impl Record for LeaseRecord {
    const TABLE: &'static str = "leases";
    fn key(&self) -> String {
        format!("{}/{}", self.network, self.address)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationOutcome {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// The daemon stopped while the operation was in flight.
    Interrupted,
}

/// A state-changing request: recorded when it starts (an intent record) and
/// again when it ends, so a crash in between is found at the next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub op_id: String,
    pub method: String,
    /// What the operation works on: a VM name, a path, ...
    #[serde(default)]
    pub target: Option<String>,
    pub outcome: OperationOutcome,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub current: Option<u64>,
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub cancellable: bool,
    pub started_at: Timestamp,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Record for OperationRecord {
    const TABLE: &'static str = "operations";
    fn key(&self) -> String {
        self.op_id.clone()
    }
}

/// SSH host keys pinned on first use, one record per VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostKeyRecord {
    pub vm_id: String,
    /// Public keys in `authorized_keys` form (`ssh-ed25519 AAAA...`).
    pub keys: Vec<String>,
    pub pinned_at: Timestamp,
}

impl Record for HostKeyRecord {
    const TABLE: &'static str = "host_keys";
    fn key(&self) -> String {
        self.vm_id.clone()
    }
}
