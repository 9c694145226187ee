//! Host side effects that need root, behind one narrow trait, so that a
//! privilege-separated root helper can implement it later without the
//! actors changing: preparing and removing a VM's jail, and spawning its
//! VMM. [`LocalHost`] does them in-process (bangerd running as root).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::mounts::{filesystem_of, mounts_under};

/// A file to place in a jail: hard-linked from `source` to `name` under the
/// jail's root, else bind-mounted there (read-only unless `writable`),
/// optionally owned by the jail's user (files the VMM writes). A copy is
/// the last resort of a read-only file only: a copy of a writable disk
/// would silently lose everything the guest writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailFile {
    pub source: PathBuf,
    pub name: String,
    pub writable: bool,
}

/// A VMM process to spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// Its stderr: appended to this file. (Its stdout, the serial
    /// console, is the locked console log given to `spawn_vmm`.)
    pub errors: PathBuf,
}

pub trait HostOps: Send + Sync {
    /// Empties and re-creates the jail root `root` holding `files`, with
    /// writable files and `log_files` owned by `uid:gid`. Files bind-mounted
    /// there stay mounted until [`HostOps::remove_jail`] or the next
    /// preparation.
    fn prepare_jail(
        &self,
        root: &Path,
        files: &[JailFile],
        log_files: &[&str],
        uid: u32,
        gid: u32,
    ) -> io::Result<()>;

    /// Removes a jail directory and everything in it, unmounting first
    /// whatever is mounted under it.
    fn remove_jail(&self, dir: &Path) -> io::Result<()>;

    /// Starts a VMM in a session of its own, so that it outlives the daemon
    /// and no signal to the daemon's process group reaches it, with
    /// `console` as its stdout. Answers its pid.
    fn spawn_vmm(&self, command: &VmmCommand, console: File) -> io::Result<u32>;
}

pub struct LocalHost;

/// Rounds of unmounting a jail goes through before it gives up.
const MAX_JAIL_MOUNTS: usize = 16;

/// The files and log files of a jail's root (see [`HostOps::prepare_jail`]).
fn fill_jail(
    root: &Path,
    files: &[JailFile],
    log_files: &[&str],
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    for file in files {
        let target = root.join(&file.name);
        if let Err(link) = fs::hard_link(&file.source, &target) {
            bind_into_jail(file, &target, link)?;
        }
        if file.writable {
            chown(&target, Some(uid), Some(gid))?;
        }
    }
    for name in log_files {
        let path = root.join(name);
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        chown(&path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Puts a file the jail cannot link to (another filesystem) into it by a
/// bind mount of that one file; a read-only file may be copied as the last
/// resort, a writable one never.
fn bind_into_jail(file: &JailFile, target: &Path, link: io::Error) -> io::Result<()> {
    use nix::mount::{MsFlags, mount};
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(target)?;
    let bound = mount(
        Some(&file.source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .and_then(|()| {
        if file.writable {
            return Ok(());
        }
        let read_only = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, read_only, None::<&str>)
    });
    let Err(bind) = bound else {
        tracing::info!(file = %file.source.display(), jail = %target.display(), "bind-mounted into the jail (another filesystem)");
        return Ok(());
    };
    // A bind that half-worked (mounted, not made read-only) goes first.
    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    if !file.writable {
        tracing::warn!(file = %file.source.display(), jail = %target.display(), link = %link, bind = %bind, "copying a read-only file into the jail: neither a hard link nor a bind mount works");
        fs::remove_file(target)?;
        return fs::copy(&file.source, target).map(drop);
    }
    let _ = fs::remove_file(target);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    Err(io::Error::other(format!(
        "cannot put {} ({}) into the jail {} ({}): a hard link fails ({link}) and so does a bind mount ({bind}); set [firecracker] jail_dir to a directory on the filesystem of {}",
        file.source.display(),
        filesystem_of(&mountinfo, &file.source),
        target.display(),
        filesystem_of(&mountinfo, target),
        file.source.parent().unwrap_or(&file.source).display(),
    )))
}

fn append(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl HostOps for LocalHost {
    fn prepare_jail(
        &self,
        root: &Path,
        files: &[JailFile],
        log_files: &[&str],
        uid: u32,
        gid: u32,
    ) -> io::Result<()> {
        // The jailer refuses a root left by an earlier run (device nodes exist).
        self.remove_jail(root)?;
        fs::create_dir_all(root)?;
        let filled = fill_jail(root, files, log_files, uid, gid);
        if filled.is_err() {
            // Nothing half-made stays mounted.
            let _ = self.remove_jail(root);
        }
        filled
    }

    fn remove_jail(&self, dir: &Path) -> io::Result<()> {
        // mountinfo names real paths: the parent's, resolved (the jail
        // itself is never followed if it is a link).
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
            return Err(io::Error::other(format!("{} is not a jail", dir.display())));
        };
        let dir = match fs::canonicalize(parent) {
            Ok(parent) => parent.join(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // Until none is left: mounts may be stacked on one point.
        for _ in 0..MAX_JAIL_MOUNTS {
            let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
            let points = mounts_under(&mountinfo, &dir);
            if points.is_empty() {
                break;
            }
            for point in points {
                match nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
                    // Gone meanwhile, or not a mount point any more.
                    Ok(()) | Err(nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL) => {}
                    Err(e) => {
                        return Err(io::Error::new(
                            io::Error::from(e).kind(),
                            format!("cannot unmount {} in the jail: {e}", point.display()),
                        ));
                    }
                }
            }
        }
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn spawn_vmm(&self, vmm: &VmmCommand, console: File) -> io::Result<u32> {
        let mut command = Command::new(&vmm.program);
        command
            .args(&vmm.args)
            .current_dir(&vmm.cwd)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(append(&vmm.errors)?);
        let stop_before_exec = crate::fault::stop_before_exec();
        #[allow(unsafe_code)]
        // SAFETY: prctl, setsid and raise are async-signal-safe system calls
        // and touch no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                // Until exec the child is a copy of the daemon: the name
                // tells a start-up sweep what it is (`vmm::orphans`).
                nix::sys::prctl::set_name(crate::vmm::orphans::SPAWN_MARKER)
                    .map_err(io::Error::from)?;
                rustix::process::setsid().map_err(io::Error::from)?;
                if stop_before_exec {
                    nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP)
                        .map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        // The caller watches the child through a pidfd and reaps it there;
        // dropping the Child handle neither waits nor kills.
        Ok(command.spawn()?.id())
    }
}
