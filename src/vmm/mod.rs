//! VMM backends behind one trait, and the process plumbing they share.
//! Firecracker is the default where KVM can boot a stock guest; QEMU runs
//! everywhere else (TCG when KVM cannot be used).

pub mod firecracker;
pub mod host;
pub mod logs;
pub mod mounts;
pub mod orphans;
pub mod process;
pub mod qemu;

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rustix::fs::{FlockOperation, flock};
use rustix::io::Errno;

use crate::vm::record::{Accel, AgentEndpoint, VmmProcess};
use crate::vmm::host::{HostOps, VmmCommand};
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

/// A VM's network interface: the host's tap, and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub tap: String,
    pub mac: String,
}

/// Everything a launch needs, whichever the backend.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub id: String,
    /// The network interface, for a VM with a network.
    pub nic: Option<Nic>,
    pub paths: VmPaths,
    pub boot: BootFiles,
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
}

/// What a backend has made ready for its VMM: the command to spawn and
/// the endpoints the record keeps to reach it.
pub struct Prepared {
    pub command: VmmCommand,
    pub api_socket: PathBuf,
    pub agent: Option<AgentEndpoint>,
    pub accel: Option<Accel>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Firecracker(#[from] firecracker::FirecrackerError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error("another VMM still runs for this VM: it holds the lock on {console}")]
    Locked { console: PathBuf },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {binary}; check that it is installed and the configuration names it")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One VMM backend. A launch is [`spawn`] (which calls `prepare`), then
/// `configure`: the caller records the process in between.
pub trait Vmm: Send + Sync {
    /// Kernel arguments for a kernel whose catalog entry sets none.
    fn default_boot_args(&self) -> &'static str;

    /// The uid a VM's tap is given to, when the VMM opens it without
    /// privileges (a jailed firecracker).
    fn tap_owner(&self) -> Option<u32> {
        None
    }

    /// Makes the VMM's files ready (its jail; no stale sockets) and answers
    /// the command to spawn. Runs while the caller holds the VM directory's
    /// lock, so no live VMM uses these files.
    fn prepare<'a>(
        &'a self,
        host: &'a Arc<dyn HostOps>,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<Prepared, VmmError>>;

    /// Configures the spawned VMM and boots the guest; answers once it runs.
    fn configure<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        process: &'a ProcessHandle,
    ) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Whether a VMM found after a daemon restart answers on its control
    /// socket.
    /// Answers whether the guest runs (configured and booted).
    fn probe<'a>(&'a self, process: &'a VmmProcess) -> BoxFuture<'a, Result<bool, VmmError>>;

    /// Presses Ctrl-Alt-Del in the guest: the graceful stop when its agent
    /// does not answer.
    fn ctrl_alt_del<'a>(&'a self, process: &'a VmmProcess) -> BoxFuture<'a, Result<(), VmmError>>;
}

/// Takes the VM directory's lock: an exclusive flock on the console log,
/// which becomes the VMM's stdout. The VMM keeps it for its whole life
/// (the jailer closes every descriptor above 2, not stdout), so a live VMM
/// of this VM, re-adopted or orphaned, makes this fail.
pub fn lock_console(path: &Path) -> Result<File, VmmError> {
    let io_err = |source| VmmError::Io {
        action: "open the console log",
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(Errno::WOULDBLOCK) => Err(VmmError::Locked {
            console: path.to_path_buf(),
        }),
        Err(e) => Err(io_err(e.into())),
    }
}

/// Spawns a VM's VMM, given the directory's lock (the `console` from
/// [`lock_console`]): the backend's preparation, then the process (in its
/// own session, holding the lock).
/// Answers the pidfd and what the record keeps, right after the spawn and
/// before any configuration.
pub async fn spawn(
    host: &Arc<dyn HostOps>,
    backend: &dyn Vmm,
    spec: &LaunchSpec,
    console: File,
) -> Result<(ProcessHandle, VmmProcess), VmmError> {
    let prepared = backend.prepare(host, spec).await?;
    let program = prepared.command.program.clone();
    let watch_err = |program: PathBuf| {
        move |source| VmmError::Io {
            action: "watch the process of",
            path: program,
            source,
        }
    };
    // fork/exec, the pidfd and /proc: off the actors' thread.
    let (host, command) = (host.clone(), prepared.command.clone());
    let started = tokio::task::spawn_blocking(move || {
        let pid = host
            .spawn_vmm(&command, console)
            .map_err(|source| VmmError::Spawn {
                binary: command.program.clone(),
                source,
            })? as i32;
        // The pidfd is the handle from here on: the pid cannot be recycled
        // before we reap it, and we reap through the pidfd.
        let fd = ProcessHandle::pidfd(pid).map_err(watch_err(command.program.clone()))?;
        let start_time = read_stat(pid)
            .ok()
            .flatten()
            .map(|s| s.start_time)
            .unwrap_or(0);
        Ok::<_, VmmError>((pid, fd, start_time))
    })
    .await
    .map_err(|e| watch_err(program.clone())(io::Error::other(e)))?;
    let (pid, fd, start_time) = started?;
    let process = ProcessHandle::watch(pid, fd).map_err(watch_err(program))?;
    let recorded = VmmProcess {
        pid,
        start_time,
        api_socket: prepared.api_socket,
        agent: prepared.agent,
        accel: prepared.accel,
    };
    Ok((process, recorded))
}

/// Removes sockets a dead VMM left (a VMM refuses to bind over one). Only
/// called under the VM directory's lock.
pub fn remove_stale(paths: &[PathBuf]) -> Result<(), VmmError> {
    for stale in paths {
        match std::fs::remove_file(stale) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(VmmError::Io {
                    action: "remove the stale socket",
                    path: stale.clone(),
                    source: e,
                });
            }
            _ => {}
        }
    }
    Ok(())
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
