//! VMM backends behind one trait, and the process plumbing they share.
//! Firecracker is the default where KVM can boot a stock guest; QEMU runs
//! everywhere else (TCG when KVM cannot be used).

pub mod console;
pub mod firecracker;
pub mod orphans;
pub mod process;
pub mod qemu;

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::host::HostOps;
use crate::store::records::VmmProcess;
use process::ProcessHandle;

/// Where a VM's VMM keeps its files: the VM's directory, named by its short
/// id so socket paths stay short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    /// The serial console, appended by the VMM and capped by rotation.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// The kernel a VM boots, as its catalog entry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// The uncompressed ELF kernel (Firecracker's only choice).
    pub vmlinux: PathBuf,
    /// The compressed kernel, when the catalog has one (QEMU prefers it).
    pub bzimage: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The kernel command line, complete.
    pub args: String,
}

/// Everything a launch needs, whichever the backend.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub id: String,
    pub paths: VmPaths,
    pub boot: BootFiles,
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
}

/// A running VM's process, as the launch leaves it: the handle to watch and
/// what the record keeps to find it again.
pub struct Launched {
    pub process: ProcessHandle,
    pub recorded: VmmProcess,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Firecracker(#[from] firecracker::FirecrackerError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
}

/// One VMM backend.
pub trait Vmm: Send + Sync {
    /// Kernel arguments for a kernel whose catalog entry sets none.
    fn default_boot_args(&self) -> &'static str;

    /// Starts the VMM with its console appended to the VM's console log and
    /// the guest running. On failure the process is gone before this returns.
    fn launch<'a>(
        &'a self,
        host: &'a Arc<dyn HostOps>,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<Launched, VmmError>>;

    /// Whether a VMM found after a daemon restart answers on its control socket.
    fn probe<'a>(&'a self, process: &'a VmmProcess) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Presses Ctrl-Alt-Del in the guest: the graceful stop when its agent
    /// does not answer.
    fn ctrl_alt_del<'a>(&'a self, process: &'a VmmProcess) -> BoxFuture<'a, Result<(), VmmError>>;

    /// A directory outside the VM's own that holds its files (a jail).
    fn jail_dir(&self, id: &str) -> Option<PathBuf>;
}
