//! The files a VMM writes and a guest drives: its serial console, its
//! own log and its stderr. Each is capped by rotation: past the cap, its
//! last bytes are copied to `<name>.1` (replacing the previous copy) and
//! the file is emptied. Nothing is reopened, so the VMM keeps writing
//! and a daemon restart changes nothing. The size that counts is the
//! blocks a file holds: firecracker writes its own log through a
//! descriptor without `O_APPEND`, so after an emptying its next write
//! lands past a hole, and the file's length is no measure of it.
//!
//! A log is checked when it grows ([`LogCap`], inotify on each log) and
//! on a timer besides, one rotation at a time. `vm logs` reads only what
//! it prints, from the end.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tracing::warn;

/// Logs are kept under this size (plus one rotated copy).
pub const MAX_LOG_BYTES: u64 = 4 * 1024 * 1024;

/// The files in a VM's directory (or its jail's root) that are capped.
pub const CAPPED: &[&str] = &["console.log", "firecracker.log", "qemu.log"];

/// Held while a log is rotated: the watcher and the timer never rotate
/// one file at once.
static ROTATING: Mutex<()> = Mutex::new(());

/// When `path` holds more than `max` bytes, puts its last `max` bytes in
/// `<path>.1` (written beside and renamed over it) and empties it.
/// Answers whether it rotated.
pub fn rotate_if_larger(path: &Path, max: u64) -> io::Result<bool> {
    // Most checks find the log small: a stat, without the lock or an open.
    match std::fs::metadata(path) {
        Ok(meta) if meta.blocks() * 512 <= max => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let _one_at_a_time = ROTATING.lock().unwrap_or_else(PoisonError::into_inner);
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // Again under the lock: the other checker may have rotated it.
    let meta = file.metadata()?;
    if meta.blocks() * 512 <= max {
        return Ok(false);
    }
    let start = meta.len().saturating_sub(max);
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    let dir = path.parent().unwrap_or(Path::new("."));
    let staged = tempfile::NamedTempFile::new_in(dir)?;
    let (mut from, mut to) = (start, 0);
    let mut left = meta.len() - start;
    while left > 0 {
        let n = rustix::fs::copy_file_range(
            &file,
            Some(&mut from),
            staged.as_file(),
            Some(&mut to),
            usize::try_from(left).unwrap_or(usize::MAX),
        )?;
        if n == 0 {
            break; // Emptied meanwhile.
        }
        left -= n as u64;
    }
    staged
        .persist(PathBuf::from(rotated))
        .map_err(|e| e.error)?;
    file.set_len(0)?;
    Ok(true)
}

/// How much of a log is read at a time, from the end.
const CHUNK: usize = 64 * 1024;

/// Where the end of the log in `file` (`len` bytes) starts: its last
/// `lines` lines (a final newline ends the last line), or everything
/// without `lines`, but never more than its last `max` bytes. Reads
/// backwards from the end, no more than it answers.
pub fn tail_start(file: &File, len: u64, lines: Option<usize>, max: u64) -> io::Result<u64> {
    let floor = len.saturating_sub(max);
    let Some(wanted) = lines else {
        return Ok(floor);
    };
    if wanted == 0 {
        return Ok(len);
    }
    let mut found = 0;
    let mut end = len;
    let mut chunk = vec![0; CHUNK];
    while end > floor {
        let start = end.saturating_sub(CHUNK as u64).max(floor);
        let window = &mut chunk[..(end - start) as usize];
        // A rotation may empty the file meanwhile: what is there is read.
        let n = read_up_to(file, window, start)?;
        for (i, byte) in window[..n].iter().enumerate().rev() {
            let at = start + i as u64;
            if *byte == b'\n' && at + 1 != len {
                found += 1;
                if found == wanted {
                    return Ok(at + 1);
                }
            }
        }
        end = start;
    }
    Ok(floor)
}

/// The end of the log at `path` (see [`tail_start`]); a missing log is
/// empty.
pub fn read_tail(path: &Path, lines: Option<usize>, max: u64) -> io::Result<Vec<u8>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = tail_start(&file, len, lines, max)?;
    let mut text = vec![0; (len - start) as usize];
    let read = read_up_to(&file, &mut text, start)?;
    text.truncate(read);
    Ok(text)
}

/// Reads into `buf` from `offset` until it is full or the file ends;
/// answers the bytes read.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut read = 0;
    while read < buf.len() {
        match file.read_at(&mut buf[read..], offset + read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(read)
}

/// Checks VMs' logs as they grow: one inotify instance for the daemon,
/// a watch per log file (a VM's directory also holds its disk, whose
/// every write the watcher would hear), each change checked against
/// [`MAX_LOG_BYTES`] on a blocking thread.
#[derive(Clone)]
pub struct LogCap {
    inotify: Arc<Inotify>,
    logs: Arc<Mutex<HashMap<WatchDescriptor, PathBuf>>>,
}

impl LogCap {
    /// Starts the watcher on the current tokio runtime.
    pub fn start() -> io::Result<LogCap> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let cap = LogCap {
            inotify: Arc::new(inotify),
            logs: Arc::default(),
        };
        #[allow(unsafe_code)]
        // SAFETY: the descriptor is the inotify instance's, which the
        // AsyncFd's own Arc keeps open for as long as it lives.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                InotifyFd(cap.inotify.clone()),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(io::Error::from)?;
        let watcher = cap.clone();
        tokio::spawn(async move { watcher.run(fd).await });
        Ok(cap)
    }

    /// Watches the capped logs that exist in each of `dirs` (a VM's
    /// directory, its jail's root) until they are removed or
    /// [`LogCap::unwatch`]; watching one again changes nothing. A log
    /// that cannot be watched is left to the timer, with a warning.
    pub fn watch(&self, dirs: &[PathBuf]) {
        for path in dirs
            .iter()
            .flat_map(|d| CAPPED.iter().map(|name| d.join(name)))
        {
            match self.inotify.add_watch(&path, AddWatchFlags::IN_MODIFY) {
                Ok(wd) => {
                    self.logs().insert(wd, path);
                }
                Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => {
                    warn!(log = %path.display(), error = %e, "cannot watch the log; it is checked every few seconds")
                }
            }
        }
    }

    /// Stops watching the logs in each of `dirs`.
    pub fn unwatch(&self, dirs: &[PathBuf]) {
        let mut logs = self.logs();
        let gone: Vec<WatchDescriptor> = logs
            .iter()
            .filter(|(_, log)| {
                log.parent()
                    .is_some_and(|d| dirs.iter().any(|dir| dir == d))
            })
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            logs.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
    }

    fn logs(&self) -> std::sync::MutexGuard<'_, HashMap<WatchDescriptor, PathBuf>> {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(self, fd: tokio::io::unix::AsyncFd<InotifyFd>) {
        loop {
            let Ok(mut ready) = fd.readable().await else {
                warn!("the log watcher stopped; logs are checked every few seconds");
                return;
            };
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "the log watcher stopped; logs are checked every few seconds");
                    return;
                }
            };
            // One check per file per batch, however many writes it saw.
            let mut grown: Vec<PathBuf> = Vec::new();
            {
                let mut logs = self.logs();
                for event in events {
                    // Removed (its VM's directory went): the watch is gone.
                    if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                        logs.remove(&event.wd);
                        continue;
                    }
                    if let Some(path) = logs.get(&event.wd)
                        && !grown.contains(path)
                    {
                        grown.push(path.clone());
                    }
                }
            }
            if grown.is_empty() {
                continue;
            }
            let checked = tokio::task::spawn_blocking(move || {
                for path in grown {
                    if let Err(e) = rotate_if_larger(&path, MAX_LOG_BYTES) {
                        warn!(log = %path.display(), error = %e, "cannot rotate the log");
                    }
                }
            });
            // Writes meanwhile queue as events: the next batch sees them.
            let _ = checked.await;
        }
    }
}

/// The inotify descriptor, for the runtime to poll.
struct InotifyFd(Arc<Inotify>);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&*self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_large_log_keeps_its_end_aside_and_is_emptied_and_appends_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        writer.write_all(&[b'a'; 8192]).expect("write");
        assert!(!rotate_if_larger(&path, 8192).expect("rotate"));
        writer.write_all(&[b'b'; 4096]).expect("write");
        writer.sync_all().expect("sync");
        assert!(rotate_if_larger(&path, 8192).expect("rotate"));
        let kept = std::fs::read(dir.path().join("console.log.1")).expect("copy");
        assert_eq!(kept.len(), 8192);
        assert!(kept.ends_with(&[b'b'; 4096]));
        writer.write_all(b"after").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"after");
    }

    #[test]
    fn a_writer_without_append_leaves_a_hole_that_does_not_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("firecracker.log");
        let mut writer = File::create(&path).expect("create");
        writer.write_all(&vec![b'x'; 64 << 10]).expect("write");
        writer.sync_all().expect("sync");
        assert!(rotate_if_larger(&path, 32 << 10).expect("rotate"));
        // Its next write lands at its own offset, past a hole.
        writer.write_all(b"later").expect("write");
        writer.sync_all().expect("sync");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            (64 << 10) + 5
        );
        assert!(!rotate_if_larger(&path, 32 << 10).expect("a hole holds nothing"));
    }

    #[test]
    fn the_tail_is_read_from_the_end_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"one\ntwo\nthree\n").expect("write");
        let tail = |lines, max| read_tail(&path, lines, max).expect("tail");
        assert_eq!(tail(Some(1), 1 << 20), b"three\n");
        assert_eq!(tail(Some(2), 1 << 20), b"two\nthree\n");
        assert_eq!(tail(Some(9), 1 << 20), b"one\ntwo\nthree\n");
        assert_eq!(tail(Some(0), 1 << 20), b"");
        assert_eq!(tail(None, 6), b"three\n");
        assert_eq!(tail(Some(9), 6), b"three\n");
        std::fs::write(&path, b"a\nb").expect("write");
        assert_eq!(tail(Some(1), 1 << 20), b"b");
        // Lines longer than a chunk, found across chunks.
        let long = format!("{}\n{}\n", "x".repeat(100_000), "y".repeat(100_000));
        std::fs::write(&path, &long).expect("write");
        assert_eq!(
            tail(Some(1), 1 << 20),
            format!("{}\n", "y".repeat(100_000)).as_bytes()
        );
        assert!(tail(Some(5), 1 << 20).len() == long.len());
        assert!(
            read_tail(&dir.path().join("none"), Some(1), 10)
                .expect("missing")
                .is_empty()
        );
    }
}
