//! A bound on blocking work that reads callers' files: every operation on
//! such a file runs under a [`Watch`], and the work's future fails with
//! [`Stalled`] once one operation has been in flight for the limit
//! (`[caller] io_stall_secs`). It is a stall, not a total: a copy of many
//! gigabytes takes as long as it makes progress. The thread stuck in the
//! filesystem cannot be taken back; it is counted among the waiting
//! threads until the kernel lets it go, and any operation it starts after
//! that fails at once, so the work it was doing ends there.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::Waiting;

/// Watches one piece of work's operations on callers' files, run by one
/// thread at a time. Clones watch the same work.
#[derive(Debug, Clone)]
pub struct Watch(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    limit: Duration,
    /// One lock for what is in flight and whether the work was given up
    /// on: an operation that ends after the watchdog saw it stall always
    /// sees that it did.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_flight: Option<InFlight>,
    given_up: bool,
    /// Taken when the work is given up on, dropped with the last clone
    /// (which the stuck thread holds).
    stuck: Option<Waiting>,
}

#[derive(Debug, Clone)]
struct InFlight {
    since: Instant,
    path: Arc<Path>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "reading {} made no progress for {}s (a hung filesystem?); gave up on it ([caller] io_stall_secs sets the bound)",
    path.display(),
    limit.as_secs_f64()
)]
pub struct Stalled {
    pub path: PathBuf,
    pub limit: Duration,
}

impl Watch {
    pub fn new(limit: Duration) -> Watch {
        Watch(Arc::new(Shared {
            limit,
            state: Mutex::new(State::default()),
        }))
    }

    /// Runs `op`, an operation on the caller's file at `path`, in view of
    /// the watch. Once the work is given up on, it fails instead, and so
    /// does an operation that was in flight then.
    pub fn during<T>(&self, path: &Arc<Path>, op: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let outer = {
            let mut state = self.state();
            if state.given_up {
                return Err(given_up());
            }
            state.in_flight.replace(InFlight {
                since: Instant::now(),
                path: path.clone(),
            })
        };
        let restore = Restore { watch: self, outer };
        let done = op();
        drop(restore);
        if self.state().given_up {
            return Err(given_up());
        }
        done
    }

    /// Whether the work was given up on: what it made may be another's by
    /// now (a blob a later import found in place).
    pub fn given_up(&self) -> bool {
        self.state().given_up
    }

    /// `inner`, a reader of the caller's file at `path`, each read in
    /// view of the watch.
    pub fn reader<R>(&self, path: Arc<Path>, inner: R) -> Watched<R> {
        Watched {
            watch: self.clone(),
            path,
            inner,
        }
    }

    /// Waits for `work` (which runs the watched operations elsewhere),
    /// failing once one of them has been in flight for the limit.
    pub async fn bound<F: Future>(&self, work: F) -> Result<F::Output, Stalled> {
        let limit = self.0.limit;
        tokio::pin!(work);
        loop {
            let wait = {
                let mut state = self.state();
                match state.in_flight.clone() {
                    None => limit,
                    Some(InFlight { since, path }) => match limit.checked_sub(since.elapsed()) {
                        Some(left) if !left.is_zero() => left,
                        _ => {
                            state.given_up = true;
                            state.stuck = Some(Waiting::force());
                            return Err(Stalled {
                                path: path.to_path_buf(),
                                limit,
                            });
                        }
                    },
                }
            };
            tokio::select! {
                biased;
                done = &mut work => return Ok(done),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn given_up() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "given up on after a stalled read")
}

/// Puts back what was in flight around an operation (also when it
/// panics); an outer operation's wait starts again, as it is a stall
/// that is bounded, not a total.
struct Restore<'a> {
    watch: &'a Watch,
    outer: Option<InFlight>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        self.watch.state().in_flight = self.outer.take().map(|outer| InFlight {
            since: Instant::now(),
            ..outer
        });
    }
}

/// A reader whose reads run in view of a [`Watch`].
#[derive(Debug)]
pub struct Watched<R> {
    watch: Watch,
    path: Arc<Path>,
    inner: R,
}

impl<R: io::Read> io::Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Watched { watch, path, inner } = self;
        watch.during(path, || inner.read(buf))
    }
}

impl<R: io::Seek> io::Seek for Watched<R> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let Watched { watch, path, inner } = self;
        watch.during(path, || inner.seek(to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> Arc<Path> {
        Arc::from(Path::new("/hung/disk"))
    }

    #[tokio::test]
    async fn an_operation_in_flight_past_the_limit_fails_the_work_and_its_thread_stops() {
        let watch = Watch::new(Duration::from_millis(200));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let worker = watch.clone();
        let thread = std::thread::spawn(move || {
            let first = worker.during(&path(), || {
                let _ = released.recv();
                Ok(())
            });
            let next = worker.during(&path(), || Ok(()));
            (first, next)
        });
        let stalled = watch
            .bound(std::future::pending::<()>())
            .await
            .expect_err("stalled");
        assert_eq!(stalled.path, Path::new("/hung/disk"));
        assert!(stalled.to_string().contains("io_stall_secs"), "{stalled}");
        assert!(super::super::WAITING_THREADS.load(std::sync::atomic::Ordering::Acquire) >= 1);
        drop(watch);
        let _ = release.send(());
        let (first, next) = thread.join().expect("join");
        // What the stuck operation brought back is not used, nor may the
        // work go on.
        assert!(first.is_err() && next.is_err());
    }

    #[tokio::test]
    async fn work_that_keeps_making_progress_is_not_bounded_in_total() {
        let limit = Duration::from_millis(300);
        let watch = Watch::new(limit);
        let worker = watch.clone();
        // Operations of a third of the limit each, three limits in all.
        let work = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            while started.elapsed() < 3 * limit {
                worker.during(&path(), || {
                    std::thread::sleep(limit / 3);
                    Ok(())
                })?;
            }
            Ok::<_, io::Error>(())
        });
        let done = watch.bound(work).await.expect("never stalled");
        done.expect("joined").expect("every operation ran");
    }

    #[test]
    fn a_watched_reader_reads_through() {
        let watch = Watch::new(Duration::from_secs(1));
        let mut read = String::new();
        io::Read::read_to_string(&mut watch.reader(path(), &b"bytes"[..]), &mut read)
            .expect("read");
        assert_eq!(read, "bytes");
    }
}
