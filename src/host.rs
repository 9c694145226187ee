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

/// A file to place in a jail: linked (or copied across filesystems) from
/// `source` to `name` under the jail's root, optionally owned by the jail's
/// user (files the VMM writes).
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
    /// writable files and `log_files` owned by `uid:gid`.
    fn prepare_jail(
        &self,
        root: &Path,
        files: &[JailFile],
        log_files: &[&str],
        uid: u32,
        gid: u32,
    ) -> io::Result<()>;

    /// Removes a jail directory and everything in it.
    fn remove_jail(&self, dir: &Path) -> io::Result<()>;

    /// Starts a VMM in a session of its own, so that it outlives the daemon
    /// and no signal to the daemon's process group reaches it, with
    /// `console` as its stdout. Answers its pid.
    fn spawn_vmm(&self, command: &VmmCommand, console: File) -> io::Result<u32>;
}

pub struct LocalHost;

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
        match fs::remove_dir_all(root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::create_dir_all(root)?;
        for file in files {
            let target = root.join(&file.name);
            if fs::hard_link(&file.source, &target).is_err() {
                fs::copy(&file.source, &target)?;
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

    fn remove_jail(&self, dir: &Path) -> io::Result<()> {
        match fs::remove_dir_all(dir) {
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
        #[allow(unsafe_code)]
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| rustix::process::setsid().map(drop).map_err(io::Error::from));
        }
        // The caller watches the child through a pidfd and reaps it there;
        // dropping the Child handle neither waits nor kills.
        Ok(command.spawn()?.id())
    }
}
