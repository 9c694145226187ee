//! Whether the store can write, and its recovery after a failed write.
//!
//! redb latches an I/O error: after one, every write transaction fails with
//! `PreviousIo` until the database is opened again. So a failed write (a
//! full disk, an EIO) marks the store unwritable, further writes fail at
//! once with a message naming the directory and its free space, and one
//! recovery thread re-opens the file: with doubling waits, and at once when
//! the directory's free space grows. A re-open is followed by a real write;
//! only when that commits is the store writable again, and every subscriber
//! of [`StoreHealth`] hears it (one notification, no polling on their side).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use jiff::Timestamp;
use tokio::sync::watch;

/// How often the recovery thread reads the directory's free space.
const SPACE_CHECK: Duration = Duration::from_millis(100);
/// Free space that grows by this much is worth a re-open at once.
const SPACE_GREW: u64 = 1 << 20;
/// The first and the longest wait between two re-open attempts.
const REOPEN_FIRST: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(2);

/// What the store's users are told about its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Writable,
    Unwritable(Unwritable),
}

/// Why the store cannot write, since when, and the space left where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unwritable {
    pub since: Timestamp,
    pub reason: String,
    pub dir: PathBuf,
    pub free_bytes: Option<u64>,
}

impl fmt::Display for Unwritable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "store unavailable since {}: {} on {}",
            self.since.strftime("%Y-%m-%dT%H:%M:%SZ"),
            self.reason,
            self.dir.display()
        )?;
        if let Some(free) = self.free_bytes {
            write!(f, ", {free} bytes free")?;
        }
        f.write_str("; it recovers by itself once the write can succeed")
    }
}

impl StoreHealth {
    pub fn unwritable(&self) -> Option<&Unwritable> {
        match self {
            StoreHealth::Writable => None,
            StoreHealth::Unwritable(down) => Some(down),
        }
    }
}

/// The reason a write failed, as a person reads it (none: redb refused
/// it because an earlier write failed).
pub fn describe(error: Option<&io::Error>) -> String {
    let Some(error) = error else {
        return "an earlier write failed".to_string();
    };
    match error.raw_os_error() {
        Some(code) if code == nix::libc::ENOSPC => "no space left".to_string(),
        Some(code) if code == nix::libc::EDQUOT => "disk quota exceeded".to_string(),
        _ => error.to_string(),
    }
}

/// Bytes an unprivileged writer may still use in `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(stat.blocks_available() * stat.fragment_size())
}

/// The health every user subscribes to, and the recovery thread's trigger.
pub struct Health {
    state: watch::Sender<StoreHealth>,
    dir: PathBuf,
}

impl Health {
    pub fn new(dir: PathBuf) -> Health {
        Health {
            state: watch::Sender::new(StoreHealth::Writable),
            dir,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<StoreHealth> {
        self.state.subscribe()
    }

    pub fn current(&self) -> StoreHealth {
        self.state.borrow().clone()
    }

    /// Marks the store unwritable; true if it was writable until now (the
    /// caller then starts the recovery). A later failure keeps the first
    /// one's time and refreshes the free space, and the reason unless it
    /// only echoes the first (`None`: redb's latched error).
    pub fn failed(&self, error: Option<&io::Error>) -> bool {
        let free_bytes = free_bytes(&self.dir);
        let mut was_writable = false;
        self.state.send_modify(|health| {
            let (since, reason) = match health {
                StoreHealth::Writable => {
                    was_writable = true;
                    (Timestamp::now(), describe(error))
                }
                StoreHealth::Unwritable(down) => (
                    down.since,
                    match error {
                        Some(_) => describe(error),
                        None => down.reason.clone(),
                    },
                ),
            };
            *health = StoreHealth::Unwritable(Unwritable {
                since,
                reason,
                dir: self.dir.clone(),
                free_bytes,
            });
        });
        was_writable
    }

    /// An unwritable state made now, for a refusal the health does not
    /// (or no longer) say.
    pub fn unwritable_now(&self, cause: Option<&io::Error>) -> Unwritable {
        Unwritable {
            since: Timestamp::now(),
            reason: match cause {
                Some(_) => describe(cause),
                None => "the store is being re-opened".into(),
            },
            dir: self.dir.clone(),
            free_bytes: free_bytes(&self.dir),
        }
    }

    pub fn recovered(&self) {
        self.state.send_replace(StoreHealth::Writable);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Runs until `attempt` succeeds (the store is writable again) or `stop`
/// is disconnected (the store is gone). `attempt` re-opens the file and commits a write.
/// It is tried after doubling waits, and at once when the directory's free
/// space grows by [`SPACE_GREW`] over what it was at the last failed attempt.
pub fn recover(
    dir: &Path,
    stop: &Receiver<()>,
    mut attempt: impl FnMut() -> Result<(), io::Error>,
) -> bool {
    let mut wait = REOPEN_FIRST;
    let mut last = Instant::now();
    let mut free_at_failure = free_bytes(dir);
    loop {
        match stop.recv_timeout(SPACE_CHECK) {
            Err(RecvTimeoutError::Disconnected) => return false,
            // Another failed write meanwhile: this recovery serves it too.
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
        }
        let grew = match (free_bytes(dir), free_at_failure) {
            (Some(now), Some(then)) => now >= then.saturating_add(SPACE_GREW),
            _ => false,
        };
        if !grew && last.elapsed() < wait {
            continue;
        }
        match attempt() {
            Ok(()) => return true,
            Err(e) => {
                tracing::info!(error = %e, "the store is still unwritable");
                free_at_failure = free_bytes(dir);
                last = Instant::now();
                wait = (wait * 2).min(REOPEN_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_keeps_its_time_and_later_ones_refresh_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let health = Health::new(dir.path().to_path_buf());
        let mut heard = health.subscribe();
        assert!(health.failed(Some(&io::Error::from_raw_os_error(nix::libc::ENOSPC))));
        assert!(heard.has_changed().expect("open"));
        let first = heard.borrow_and_update().clone();
        let first = first.unwritable().expect("unwritable").clone();
        // redb's latched error keeps the reason; a new one replaces it.
        assert!(!health.failed(None));
        assert_eq!(
            health.current().unwritable().map(|d| d.reason.clone()),
            Some(first.reason.clone())
        );
        assert!(!health.failed(Some(&io::Error::from_raw_os_error(nix::libc::EIO))));
        let second = health.current();
        let second = second.unwritable().expect("unwritable");
        assert_eq!(second.since, first.since);
        assert_ne!(second.reason, first.reason);
        let text = first.to_string();
        assert!(text.contains("no space left on"), "{text}");
        assert!(text.contains("bytes free"), "{text}");
        health.recovered();
        assert_eq!(health.current(), StoreHealth::Writable);
    }

    #[test]
    fn recovery_retries_until_a_write_commits_and_ends_when_the_store_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_keep, stop) = crossbeam_channel::bounded::<()>(1);
        let mut tries = 0;
        let recovered = recover(dir.path(), &stop, || {
            tries += 1;
            if tries < 3 {
                Err(io::Error::from_raw_os_error(nix::libc::ENOSPC))
            } else {
                Ok(())
            }
        });
        assert!(recovered);
        assert_eq!(tries, 3);
        let (gone, stop) = crossbeam_channel::bounded::<()>(1);
        drop(gone);
        assert!(!recover(dir.path(), &stop, || Err(io::Error::other(
            "never"
        ))));
    }
}
