//! VMM processes as the host sees them: `/proc/<pid>/stat` (liveness and
//! identity) and pidfds (exit notification and race-free signals), the
//! same for a child the daemon spawned and for one it re-adopted after a
//! restart, which is not its child.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, pidfd_open, pidfd_send_signal, waitid,
};
use tokio::io::unix::AsyncFd;

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z`, ...: a `Z` (zombie) or `X` process is dead.
    pub state: char,
    /// Clock ticks after boot: with the pid, the process's identity.
    pub start_time: u64,
    pub ppid: i32,
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let after_name = &line[line.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: state is field 3, ppid field 4, starttime field 22.
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let start_time = fields.nth(22 - 5)?.parse().ok()?;
    Some(ProcStat {
        state,
        start_time,
        ppid,
    })
}

/// The process's stat, or None when there is no such process.
pub fn read_stat(pid: i32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(line) => Ok(parse_stat(&line)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `pid` is the live process that started at `start_time`.
pub fn is_alive(pid: i32, start_time: u64) -> bool {
    matches!(read_stat(pid), Ok(Some(stat)) if stat.start_time == start_time && !matches!(stat.state, 'Z' | 'X'))
}

/// How a process ended, when it was our child; unknown for adopted ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// A pidfd on a VMM process.
pub struct ProcessHandle {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
}

impl ProcessHandle {
    /// Opens a pidfd; must run inside a tokio runtime.
    pub fn open(pid: i32) -> io::Result<ProcessHandle> {
        ProcessHandle::watch(pid, ProcessHandle::pidfd(pid)?)
    }

    /// A process's pidfd, not yet watched (any thread may open it).
    pub fn pidfd(pid: i32) -> io::Result<OwnedFd> {
        let raw = Pid::from_raw(pid)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))?;
        Ok(pidfd_open(raw, PidfdFlags::NONBLOCK)?)
    }

    /// Watches a pidfd `pidfd` opened; must run inside a tokio runtime.
    pub fn watch(pid: i32, fd: OwnedFd) -> io::Result<ProcessHandle> {
        #[allow(unsafe_code)]
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until
        // it is dropped, which happens only with the AsyncFd.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(ProcessHandle { pid, fd })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends a signal to this very process, never to a recycled pid.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        pidfd_send_signal(self.fd.get_ref().as_fd(), signal).map_err(io::Error::from)
    }

    /// Waits for the process to exit; reaps it when it is our child.
    pub async fn exited(&self) -> ExitStatus {
        // A pidfd becomes readable once, when the process exits.
        if self.fd.readable().await.is_err() {
            return ExitStatus::default();
        }
        match waitid(
            WaitId::PidFd(self.fd.get_ref().as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(status)) => ExitStatus {
                code: status.exit_status(),
                signal: status.terminating_signal(),
            },
            // Not our child (re-adopted), or already reaped.
            _ => ExitStatus::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let line = "4242 (fire cracker) (x)) S 1 4242 4242 0 -1 4194560 321 0 0 0 5 3 0 0 20 0 2 0 987654 10000 200 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                start_time: 987654,
                ppid: 1,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id() as i32;
        let stat = read_stat(pid).expect("read").expect("exists");
        assert!(is_alive(pid, stat.start_time));
        assert!(!is_alive(pid, stat.start_time + 1));
    }
}
