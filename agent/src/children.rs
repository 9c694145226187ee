//! Every child of the agent is reaped by one loop (as PID 1 it also reaps
//! orphans it never started), so `Child::wait` cannot be used: exit
//! statuses go to whoever registered the pid, through this registry.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{LazyLock, Mutex};

use nix::errno::Errno;
use nix::sys::signal::SigSet;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::protocol::ExitStatus;

/// PATH for the processes the agent starts when a request sets none
/// (PID 1 starts with none).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static WAITING: LazyLock<Mutex<HashMap<i32, Sender<ExitStatus>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Spawns `command`; its exit status arrives on the receiver. The pid is
/// registered under the lock the reaper holds, so a child that exits at
/// once is not lost.
pub fn spawn(command: &mut Command) -> io::Result<(Child, Receiver<ExitStatus>)> {
    // PID 1 blocks the signals its loop waits for, in every thread; a child
    // must not inherit that, or SIGINT and SIGTERM never reach it.
    #[allow(unsafe_code)]
    // SAFETY: sigprocmask is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| SigSet::empty().thread_set_mask().map_err(io::Error::from));
    }
    let (tx, rx) = mpsc::channel();
    let mut waiting = WAITING
        .lock()
        .map_err(|_| io::Error::other("registry poisoned"))?;
    let child = command.spawn()?;
    waiting.insert(child.id() as i32, tx);
    Ok((child, rx))
}

/// Runs a helper program to its end; None if it could not run.
pub fn run(command: &mut Command) -> Option<ExitStatus> {
    let (child, exited) = spawn(command).ok()?;
    drop(child);
    exited.recv().ok()
}

/// Reaps every child that has exited; answers false once none are left.
/// The registry stays locked while reaping: std's `spawn` reaps a child
/// whose exec failed itself, and must not find it gone.
pub fn reap() -> bool {
    let Ok(mut waiting) = WAITING.lock() else {
        return false;
    };
    loop {
        let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (
                pid,
                ExitStatus {
                    code: Some(code),
                    signal: None,
                },
            ),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (
                pid,
                ExitStatus {
                    code: None,
                    signal: Some(signal as i32),
                },
            ),
            Ok(WaitStatus::StillAlive) => return true,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return false,
        };
        if let Some(tx) = waiting.remove(&pid.as_raw()) {
            let _ = tx.send(status);
        }
    }
}
