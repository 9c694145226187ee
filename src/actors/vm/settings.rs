//! What VM actors run with (`VmSettings`: paths, backends, caps) and what
//! they answer when something fails (`VmError`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::actors::catalog::{ImageError, KernelError, VmReserveError};
use crate::actors::netns::NetworkError;
use crate::actors::records::StoreFailure;
use crate::caller::{SizeCap, Stalled};
use crate::catalog::CatalogError;
use crate::catalog::KernelRecord;
use crate::disk::DiskError;
use crate::network::GuestConfig;
use crate::store::{StoreError, StoreHealth, Unwritable};
use crate::vm::InvalidVm;
use crate::vm::ledger::Resource;
use crate::vm::machine::Conflict;
use crate::vm::record::{VmRecord, VmmKind};
use crate::vm::restart::RestartPolicy;
use crate::vmm::firecracker::Firecracker;
use crate::vmm::host::HostOps;
use crate::vmm::logs::LogCap;
use crate::vmm::qemu::Qemu;
use crate::vmm::{BootFiles, LaunchSpec, Nic, VmPaths, Vmm, VmmError};

/// Where VMs live and what they run with.
pub struct VmSettings {
    pub firecracker: Firecracker,
    pub qemu: Qemu,
    /// The backend of a VM created without `--vmm`.
    pub default_vmm: VmmKind,
    /// The kernel of a VM created without `--kernel` (else the only one).
    pub default_kernel: Option<String>,
    pub vms_dir: PathBuf,
    /// Where jails live (also where orphaned jailed VMMs are recognised).
    pub jail_base: PathBuf,
    pub restart_defaults: RestartPolicy,
    pub host: Arc<dyn HostOps>,
    /// The most a root disk a request names may hold.
    pub max_rootfs: SizeCap,
    /// How long one read of a root disk's source may wait.
    pub io_stall: Duration,
    /// Caps the VMs' logs as they grow.
    pub log_cap: LogCap,
    /// The uid (and gid) the tools run as that check and grow a new root
    /// disk (`[host] tool_uid`).
    pub tool_uid: u32,
    /// Whether the store writes: commands are refused while it does not,
    /// and held work goes on when it does again.
    pub store_health: watch::Receiver<StoreHealth>,
}

impl VmSettings {
    pub fn paths(&self, id: &str) -> VmPaths {
        VmPaths {
            dir: self.vms_dir.join(id),
        }
    }

    pub fn backend(&self, kind: VmmKind) -> &dyn Vmm {
        match kind {
            VmmKind::Firecracker => &self.firecracker,
            VmmKind::Qemu => &self.qemu,
        }
    }

    /// Why the store cannot write now, if it cannot.
    pub fn store_unwritable(&self) -> Option<String> {
        self.store_health
            .borrow()
            .unwritable()
            .map(ToString::to_string)
    }

    /// The jailer's directory for a VM: `<jail base>/firecracker/<id>`.
    pub fn jail_dir(&self, id: &str) -> PathBuf {
        crate::vmm::firecracker::jail_dir(&self.jail_base, id)
    }

    /// Where one resource of a VM's ledger lives (none: the backend has no
    /// such thing, e.g. a jail for QEMU).
    pub fn path_of(&self, record: &VmRecord, resource: Resource) -> Option<PathBuf> {
        match resource {
            Resource::VmDirectory => Some(self.paths(&record.id).dir),
            // Wherever the jailer would put it, configured now or not: a
            // jail made under another configuration is still this VM's.
            Resource::Jail => {
                (record.vmm == VmmKind::Firecracker).then(|| self.jail_dir(&record.id))
            }
            // Not files: the network actors release them.
            Resource::Lease | Resource::Tap | Resource::Image => None,
        }
    }

    pub(super) fn launch_spec(
        &self,
        record: &VmRecord,
        kernel: &KernelRecord,
        network: Option<GuestConfig>,
    ) -> LaunchSpec {
        let mut args = kernel
            .cmdline
            .clone()
            .unwrap_or_else(|| self.backend(record.vmm).default_boot_args().to_string());
        if let Some(config) = &network {
            args = format!("{args} {}", config.boot_args());
        }
        LaunchSpec {
            nic: network.map(|_| Nic {
                tap: crate::network::tap_name(&record.id),
                mac: crate::network::mac_of(&record.id),
            }),
            id: record.id.clone(),
            boot: BootFiles {
                vmlinux: kernel.vmlinux.clone(),
                bzimage: kernel.bzimage.clone(),
                initrd: kernel.boot_image.as_ref().map(|image| image.path.clone()),
                args: format!("{args} banger.hostname={}", record.name),
            },
            rootfs: record.rootfs.clone(),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            paths: self.paths(&record.id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Invalid(#[from] InvalidVm),
    #[error("no VM named {0}; `banger vm ls` lists them")]
    NotFound(String),
    #[error("a VM named {0} already exists")]
    Exists(String),
    #[error(
        "no kernel named {0}; `banger kernel ls` lists them and `banger kernel import` adds one"
    )]
    NoKernel(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("no quarantined VM record has the id {0}; `banger daemon status` lists them")]
    NotQuarantined(String),
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("VM {name}: {reason}")]
    Failed { name: String, reason: String },
    #[error("VM {name} failed to start")]
    Launch {
        name: String,
        #[source]
        source: VmmError,
    },
    #[error("VM {name}'s agent is not answering: {reason}")]
    Agent { name: String, reason: String },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Store(StoreFailure),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
    #[error("VM {name}: {what}: {down}")]
    NotRecorded {
        name: String,
        what: String,
        down: Box<Unwritable>,
    },
    #[error("VM {0} is being read again from the store; try again in a moment")]
    Reloading(String),
    #[error(transparent)]
    Stalled(#[from] Stalled),
}

impl From<StoreError> for VmError {
    fn from(e: StoreError) -> VmError {
        VmError::Store(e.into())
    }
}

impl From<VmReserveError> for VmError {
    fn from(e: VmReserveError) -> VmError {
        match e {
            VmReserveError::Kernel(e) => e.into(),
            VmReserveError::Image(e) => e.into(),
        }
    }
}
