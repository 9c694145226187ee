//! VMM backends behind one trait, and the process plumbing they share.
//! Firecracker is the default where KVM can boot a stock guest; QEMU runs
//! everywhere else (TCG when KVM cannot be used).

pub mod console;
pub mod firecracker;
pub mod orphans;
pub mod process;
pub mod qemu;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rustix::process::Signal;

use crate::host::{HostOps, VmmCommand};
use crate::store::records::VmmProcess;
use process::{ProcessHandle, read_stat};

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

/// Spawns a VMM (in its own session, console appended to the VM's log) and
/// runs `ready` on it: its configuration and first check. A VMM that does
/// not get ready is killed and reaped before this returns. Answers the
/// handle and the process's start time (for re-adoption).
pub async fn start_vmm<E>(
    host: &Arc<dyn HostOps>,
    command: &VmmCommand,
    spawn_failed: impl FnOnce(io::Error) -> E,
    watch_failed: impl FnOnce(io::Error) -> E,
    ready: impl AsyncFnOnce(&ProcessHandle) -> Result<(), E>,
) -> Result<(ProcessHandle, u64), E> {
    let pid = host.spawn_vmm(command).map_err(spawn_failed)? as i32;
    // The pidfd is the handle from here on: the pid cannot be recycled
    // before we reap it, and we reap through the pidfd.
    let process = ProcessHandle::open(pid).map_err(watch_failed)?;
    match ready(&process).await {
        Ok(()) => {
            let start_time = read_stat(pid)
                .ok()
                .flatten()
                .map(|s| s.start_time)
                .unwrap_or(0);
            Ok((process, start_time))
        }
        Err(e) => {
            let _ = process.signal(Signal::KILL);
            process.exited().await;
            Err(e)
        }
    }
}

/// Why a VMM's control socket never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketWait {
    Exited,
    TimedOut,
}

/// A VMM binds its control socket shortly after exec: poll until it takes
/// a connection, giving up early if the process dies.
pub async fn wait_for_socket(
    socket: &Path,
    process: &ProcessHandle,
    timeout: Duration,
) -> Result<(), SocketWait> {
    let deadline = tokio::time::Instant::now() + timeout;
    let exited = process.exited();
    tokio::pin!(exited);
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SocketWait::TimedOut);
        }
        tokio::select! {
            _ = &mut exited => return Err(SocketWait::Exited),
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
}
