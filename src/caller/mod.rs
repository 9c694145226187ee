//! Files a request names, opened with the caller's authority, never the
//! daemon's: on a thread of its own that takes the caller's filesystem uid,
//! gid and groups and drops every capability (per-thread credentials; the
//! thread ends after the open), so the kernel checks every directory on the
//! way and the file itself as it would for the caller, symlinks included.
//! Magic links (`/proc/self/fd/N`, which would reach the daemon's own open
//! files) are not followed, and files of procfs and sysfs are refused.
//! What is opened is then read through that descriptor only; nothing is
//! opened again by path. A daemon that is not root opens as itself, on the
//! same path through the code: it can give no one more than its own
//! authority.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::fcntl::{AT_FDCWD, FcntlArg, OFlag, OpenHow, ResolveFlag, fcntl, openat2};
use nix::sys::statfs::{PROC_SUPER_MAGIC, SYSFS_MAGIC, fstatfs};
use nix::unistd::{Gid, Uid};

pub mod stall;

pub use stall::{Stalled, Watch};

/// How long an open may take: a hung network or FUSE filesystem fails the
/// request, not the daemon (the thread stays behind until the kernel lets
/// it go).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Who sent a request: the connection's SO_PEERCRED and SO_PEERGROUPS,
/// as the kernel held them when the peer connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups.
    pub groups: Arc<[Gid]>,
}

/// A regular file the caller may read, open, with its size then.
#[derive(Debug)]
pub struct CallerFile {
    /// As the caller named it, for messages.
    pub path: PathBuf,
    pub file: Fd,
    pub len: u64,
}

/// A descriptor of a caller's file, closed on a thread of its own when
/// dropped: a close can wait on the filesystem (FUSE's flush waits for
/// its server), and neither a request nor the daemon's runtime waits
/// with it. The closing thread counts among the waiting ones.
#[derive(Debug)]
pub struct Fd(Option<File>);

impl Fd {
    fn file(&self) -> &File {
        match &self.0 {
            Some(file) => file,
            None => unreachable!("only drop takes an Fd's file"),
        }
    }
}

impl From<File> for Fd {
    fn from(file: File) -> Fd {
        Fd(Some(file))
    }
}

impl std::ops::Deref for Fd {
    type Target = File;
    fn deref(&self) -> &File {
        self.file()
    }
}

impl std::os::fd::AsFd for Fd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file().as_fd()
    }
}

impl io::Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file().read(buf)
    }
}

impl io::Seek for Fd {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        self.file().seek(to)
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        let Some(file) = self.0.take() else {
            return;
        };
        let waiting = Waiting::force();
        let closing = std::thread::Builder::new()
            .name("close-caller-file".into())
            .spawn(move || {
                drop(file);
                drop(waiting);
            });
        // No thread to be had: closed here, then.
        drop(closing);
    }
}

/// Threads waiting on callers' filesystems, at most: an open in flight,
/// or a read the daemon gave up on ([`stall`]). Each is held until the
/// kernel lets it go, so a filesystem that never answers costs a bounded
/// number of them; beyond it, new opens are refused.
pub const MAX_WAITING_THREADS: usize = 32;

static WAITING_THREADS: AtomicUsize = AtomicUsize::new(0);

/// A thread's place among the waiting ones, given back when dropped.
#[derive(Debug)]
struct Waiting(());

impl Waiting {
    /// A place, while fewer than [`MAX_WAITING_THREADS`] are taken.
    fn take() -> Option<Waiting> {
        if WAITING_THREADS.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING_THREADS {
            WAITING_THREADS.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Waiting(()))
    }

    /// A place even beyond the bound: a thread already stuck is counted
    /// whatever the count, so that it holds new opens back.
    fn force() -> Waiting {
        WAITING_THREADS.fetch_add(1, Ordering::AcqRel);
        Waiting(())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING_THREADS.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallerFileError {
    #[error("cannot open {path} as uid {uid}")]
    Open {
        path: PathBuf,
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path} is a file of procfs or sysfs, which a request may not name")]
    Kernel { path: PathBuf },
    #[error(
        "{MAX_WAITING_THREADS} threads are still waiting on callers' filesystems (hung opens or reads); refusing {path} until they end"
    )]
    Busy { path: PathBuf },
    #[error("{path} holds {len} bytes, more than the {cap} allowed ({setting})")]
    TooLarge {
        path: PathBuf,
        len: u64,
        cap: u64,
        setting: &'static str,
    },
    #[error("opening {path} did not finish within {}s (a hung filesystem?)", OPEN_TIMEOUT.as_secs())]
    TimedOut { path: PathBuf },
    #[error("cannot take uid {uid}'s credentials to open {path}")]
    Credentials {
        path: PathBuf,
        uid: u32,
        #[source]
        source: io::Error,
    },
}

/// The most a file may hold, and the setting that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeCap {
    pub bytes: u64,
    pub setting: &'static str,
}

impl Caller {
    /// Opens `path` for reading as the caller: a regular file of at most
    /// `cap` bytes. FIFOs and devices are refused without blocking on them.
    pub async fn open_file(
        &self,
        path: &Path,
        cap: SizeCap,
    ) -> Result<CallerFile, CallerFileError> {
        let named = path.to_path_buf();
        self.on_own_thread(path, move |caller, answer, waiting| {
            let _ = answer.send(open_as(caller, &named, cap));
            drop(waiting);
        })
        .await
    }

    /// Opens `path` as the caller: a regular file of at most `cap` bytes,
    /// or a directory whose files are then opened beneath it, each as the
    /// caller too (see [`CallerDir`]).
    pub async fn open_file_or_dir(
        &self,
        path: &Path,
        cap: SizeCap,
    ) -> Result<CallerPath, CallerFileError> {
        let named = path.to_path_buf();
        self.on_own_thread(path, move |caller, answer, waiting| {
            serve_path(caller, &named, cap, answer, waiting)
        })
        .await
    }

    /// Runs `open` on a thread of its own (which takes the caller's
    /// credentials and ends with it) and waits for its first answer. The
    /// thread holds its place among the waiting ones until it drops it.
    async fn on_own_thread<T: Send + 'static>(
        &self,
        path: &Path,
        open: impl FnOnce(Caller, tokio::sync::oneshot::Sender<Result<T, CallerFileError>>, Waiting)
        + Send
        + 'static,
    ) -> Result<T, CallerFileError> {
        let caller = self.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let waiting = Waiting::take().ok_or_else(|| CallerFileError::Busy {
            path: path.to_path_buf(),
        })?;
        let spawned = std::thread::Builder::new()
            .name("open-as-caller".into())
            .spawn(move || open(caller, answer, waiting));
        if let Err(source) = spawned {
            return Err(CallerFileError::Open {
                path: path.to_path_buf(),
                uid: self.uid.as_raw(),
                source,
            });
        }
        match tokio::time::timeout(OPEN_TIMEOUT, answered).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(_)) => Err(CallerFileError::Open {
                path: path.to_path_buf(),
                uid: self.uid.as_raw(),
                source: io::Error::other("the opening thread ended without an answer"),
            }),
            Err(_) => Err(CallerFileError::TimedOut {
                path: path.to_path_buf(),
            }),
        }
    }
}

/// What [`Caller::open_file_or_dir`] opened.
#[derive(Debug)]
pub enum CallerPath {
    File(CallerFile),
    Dir(CallerDir),
}

/// A directory the caller may read, open on a thread that holds the
/// caller's credentials for as long as this lives: every file opened in
/// it is opened there, beneath the directory (`RESOLVE_BENEATH`: no `..`,
/// absolute name or symlink leads out of it), so the kernel checks each as
/// it would for the caller. Blocking; the thread ends when this is dropped.
#[derive(Debug, Clone)]
pub struct CallerDir {
    pub path: PathBuf,
    requests: crossbeam_channel::Sender<(String, crossbeam_channel::Sender<io::Result<File>>)>,
}

impl CallerDir {
    /// Opens the regular file `name` inside the directory, as the caller.
    pub fn open(&self, name: &str) -> io::Result<Fd> {
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "opening {name} in {} did not finish within {}s",
                    self.path.display(),
                    OPEN_TIMEOUT.as_secs()
                ),
            )
        };
        let (answer, answered) = crossbeam_channel::bounded(1);
        // The thread may still be stuck in an earlier open.
        self.requests
            .send_timeout((name.to_string(), answer), OPEN_TIMEOUT)
            .map_err(|e| match e {
                crossbeam_channel::SendTimeoutError::Timeout(_) => timed_out(),
                crossbeam_channel::SendTimeoutError::Disconnected(_) => {
                    io::Error::other("the caller's opening thread has ended")
                }
            })?;
        answered
            .recv_timeout(OPEN_TIMEOUT)
            .unwrap_or_else(|_| Err(timed_out()))
            .map(Fd::from)
    }
}

/// The thread behind [`Caller::open_file_or_dir`]: the caller's
/// credentials, the open, and for a directory the opens beneath it. A
/// directory's thread lives as long as its import but is counted among
/// the waiting ones only while an open is in flight.
fn serve_path(
    caller: Caller,
    path: &Path,
    cap: SizeCap,
    answer: tokio::sync::oneshot::Sender<Result<CallerPath, CallerFileError>>,
    waiting: Waiting,
) {
    let opened = take_as(&caller, path).and_then(|()| {
        let (file, metadata) = open_checked(&caller, AT_FDCWD, path, ResolveFlag::empty())?;
        Ok((file, metadata))
    });
    let (file, metadata) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let _ = answer.send(Err(e));
            return;
        }
    };
    if !metadata.is_dir() {
        let _ = answer
            .send(regular(file, &metadata, path, cap, caller.uid.as_raw()).map(CallerPath::File));
        return;
    }
    let (requests, incoming) = crossbeam_channel::bounded(1);
    let dir = CallerDir {
        path: path.to_path_buf(),
        requests,
    };
    if answer.send(Ok(CallerPath::Dir(dir))).is_err() {
        return;
    }
    drop(waiting);
    // The directory stays open here until every CallerDir is dropped.
    for (name, reply) in incoming {
        let Some(_waiting) = Waiting::take() else {
            let _ = reply.send(Err(io::Error::other(format!(
                "{MAX_WAITING_THREADS} threads are still waiting on callers' filesystems; refusing {name} until they end"
            ))));
            continue;
        };
        let opened = open_checked(
            &caller,
            std::os::fd::AsFd::as_fd(&file),
            Path::new(&name),
            ResolveFlag::RESOLVE_BENEATH,
        )
        .map_err(|e| io::Error::other(crate::error_chain(&e)))
        .and_then(|(opened, metadata)| {
            if metadata.is_file() {
                fcntl(&opened, FcntlArg::F_SETFL(OFlag::empty()))?;
                Ok(opened)
            } else {
                Err(io::Error::other(format!("{name} is not a regular file")))
            }
        });
        let _ = reply.send(opened);
    }
}

/// On the thread it ends with: the caller's credentials, then the open.
fn open_as(caller: Caller, path: &Path, cap: SizeCap) -> Result<CallerFile, CallerFileError> {
    take_as(&caller, path)?;
    let (file, metadata) = open_checked(&caller, AT_FDCWD, path, ResolveFlag::empty())?;
    regular(file, &metadata, path, cap, caller.uid.as_raw())
}

/// This thread takes the caller's credentials (when the daemon is root).
fn take_as(caller: &Caller, path: &Path) -> Result<(), CallerFileError> {
    if nix::unistd::geteuid().is_root() {
        take_credentials(caller).map_err(|source| CallerFileError::Credentials {
            path: path.to_path_buf(),
            uid: caller.uid.as_raw(),
            source,
        })?;
    }
    Ok(())
}

/// Opens `path` (relative to `at`) without following magic links or
/// blocking on a FIFO, refusing procfs and sysfs.
fn open_checked<Fd: std::os::fd::AsFd>(
    caller: &Caller,
    at: Fd,
    path: &Path,
    resolve: ResolveFlag,
) -> Result<(File, std::fs::Metadata), CallerFileError> {
    let open_err = |source| CallerFileError::Open {
        path: path.to_path_buf(),
        uid: caller.uid.as_raw(),
        source,
    };
    // Non-blocking, so a FIFO neither hangs the open nor passes as a file.
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS | resolve);
    let file = File::from(openat2(at, path, how).map_err(|e| open_err(e.into()))?);
    let on = fstatfs(&file)
        .map_err(|e| open_err(e.into()))?
        .filesystem_type();
    if on == PROC_SUPER_MAGIC || on == SYSFS_MAGIC {
        return Err(CallerFileError::Kernel {
            path: path.to_path_buf(),
        });
    }
    let metadata = file.metadata().map_err(open_err)?;
    Ok((file, metadata))
}

/// A regular file of at most `cap` bytes, made blocking again.
fn regular(
    file: File,
    metadata: &std::fs::Metadata,
    path: &Path,
    cap: SizeCap,
    uid: u32,
) -> Result<CallerFile, CallerFileError> {
    if !metadata.file_type().is_file() {
        return Err(CallerFileError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    if metadata.len() > cap.bytes {
        return Err(CallerFileError::TooLarge {
            path: path.to_path_buf(),
            len: metadata.len(),
            cap: cap.bytes,
            setting: cap.setting,
        });
    }
    fcntl(&file, FcntlArg::F_SETFL(OFlag::empty())).map_err(|e| CallerFileError::Open {
        path: path.to_path_buf(),
        uid,
        source: e.into(),
    })?;
    Ok(CallerFile {
        path: path.to_path_buf(),
        file: Fd::from(file),
        len: metadata.len(),
    })
}

/// This thread's filesystem identity becomes the caller's: its groups,
/// fsgid, fsuid, then no capabilities at all (fsuid clears only the
/// filesystem ones; CAP_SYS_PTRACE would still open other processes' /proc
/// files). Raw system calls: libc's wrappers would change every thread of
/// the daemon.
fn take_credentials(caller: &Caller) -> io::Result<()> {
    let raw: Vec<nix::libc::gid_t> = caller.groups.iter().map(|g| g.as_raw()).collect();
    #[allow(unsafe_code)]
    // SAFETY: setgroups reads `raw.len()` gids from a live buffer; setfsgid
    // and setfsuid take plain integers. Each affects this thread only.
    unsafe {
        if nix::libc::syscall(nix::libc::SYS_setgroups, raw.len(), raw.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        nix::libc::syscall(nix::libc::SYS_setfsgid, caller.gid.as_raw());
        nix::libc::syscall(nix::libc::SYS_setfsuid, caller.uid.as_raw());
        // Both answer the previous value: asking again shows what holds.
        let fsgid = nix::libc::syscall(nix::libc::SYS_setfsgid, u32::MAX) as u32;
        let fsuid = nix::libc::syscall(nix::libc::SYS_setfsuid, u32::MAX) as u32;
        if fsgid != caller.gid.as_raw() || fsuid != caller.uid.as_raw() {
            return Err(io::Error::other(format!(
                "the thread holds fsuid {fsuid} and fsgid {fsgid}"
            )));
        }
        // capset(2), version 3: two words per set, all empty.
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let none = [[0u32; 3]; 2];
        if nix::libc::syscall(nix::libc::SYS_capset, &header, none.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: SizeCap = SizeCap {
        bytes: 1 << 20,
        setting: "test.cap",
    };

    fn me() -> Caller {
        Caller {
            uid: nix::unistd::getuid(),
            gid: nix::unistd::getgid(),
            groups: nix::unistd::getgroups().unwrap_or_default().into(),
        }
    }

    #[tokio::test]
    async fn a_regular_file_opens_and_fifos_and_big_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk");
        std::fs::write(&file, b"bytes").expect("write");
        let opened = me().open_file(&file, CAP).await.expect("open");
        assert_eq!(opened.len, 5);

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let refused = me().open_file(&fifo, CAP).await.expect_err("a fifo");
        assert!(
            matches!(refused, CallerFileError::NotRegular { .. }),
            "{refused}"
        );

        let small = SizeCap {
            bytes: 4,
            setting: "test.cap",
        };
        let big = me().open_file(&file, small).await.expect_err("too big");
        assert!(big.to_string().contains("test.cap"), "{big}");

        let missing = me()
            .open_file(&dir.path().join("gone"), CAP)
            .await
            .expect_err("missing");
        assert!(missing.to_string().contains("gone"), "{missing}");

        // The daemon's own open files are not reachable through procfs.
        let held = std::fs::File::open(&file).expect("hold it");
        let magic = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&held)
        ));
        let refused = me().open_file(&magic, CAP).await.expect_err("a magic link");
        assert!(refused.to_string().contains("/proc/self/fd"), "{refused}");
        let status = me()
            .open_file(Path::new("/proc/self/status"), CAP)
            .await
            .expect_err("procfs");
        assert!(matches!(status, CallerFileError::Kernel { .. }), "{status}");
    }

    #[tokio::test]
    async fn open_directories_hold_no_place_among_the_waiting_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("blob");
        std::fs::write(&file, b"bytes").expect("write");
        let mut held = Vec::new();
        for _ in 0..MAX_WAITING_THREADS + 8 {
            match me()
                .open_file_or_dir(dir.path(), CAP)
                .await
                .expect("open dir")
            {
                CallerPath::Dir(dir) => held.push(dir),
                CallerPath::File(_) => panic!("a directory opened as a file"),
            }
        }
        // Every directory still opens its files, and other opens go on.
        for dir in &held {
            dir.open("blob").expect("open beneath");
        }
        me().open_file(&file, CAP).await.expect("open a file");
    }

    #[tokio::test]
    async fn as_root_a_caller_cannot_open_what_it_may_not_read() {
        if !nix::unistd::geteuid().is_root() {
            return; // The unprivileged case is the caller's own authority.
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"root only").expect("write");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let nobody = Caller {
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
            groups: vec![Gid::from_raw(65534)].into(),
        };
        let refused = nobody.open_file(&secret, CAP).await.expect_err("root only");
        assert!(refused.to_string().contains("as uid 65534"), "{refused}");
        // The daemon's own threads keep their authority.
        assert!(std::fs::read(&secret).is_ok());
    }
}
