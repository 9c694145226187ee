//! The state directory's lock file: one bangerd per state directory. The
//! lock is an `flock` on `<state-dir>/bangerd.lock`, released by the kernel
//! when the holder exits however it exits, so a crash never leaves it stale.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::StoreError;

pub const LOCK_FILE: &str = "bangerd.lock";

/// Held for the daemon's life; dropping it releases the lock.
pub struct StateLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> Result<StateLock, StoreError> {
        let path = state_dir.join(LOCK_FILE);
        let io_err = |action, source| StoreError::Io {
            action,
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err("open the lock file", e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                // The holder's pid, for the message a second daemon prints.
                lock.set_len(0)
                    .and_then(|()| lock.rewind())
                    .and_then(|()| writeln!(lock, "{}", std::process::id()))
                    .map_err(|e| io_err("write the lock file", e))?;
                Ok(StateLock { _lock: lock, path })
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                };
                let pid = pid.trim().parse().ok();
                Err(StoreError::Locked { path, holder, pid })
            }
            Err((_, errno)) => Err(io_err("lock", errno.into())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
