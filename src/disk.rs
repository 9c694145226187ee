//! A VM's own root disk: a copy-on-write clone of an image's ext4 or of a
//! user's file, made before the VM's first boot. A reflink (FICLONE)
//! shares every extent where the filesystem allows; elsewhere a sparse
//! copy moves only the data extents (SEEK_DATA/SEEK_HOLE), so an image's
//! holes stay holes. A disk asked to be larger is grown before its first
//! boot: the file extended, then its filesystem by `resize2fs`.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use rustix::fs::SeekFrom;

use crate::caller::{Fd, Watch};

/// An open source of a VM's root disk: `len` bytes of `file`, as much as
/// it held when it was opened (a file that grows since cannot grow the
/// copy). `named` is its path, for messages.
#[derive(Debug)]
pub struct DiskSource {
    pub named: PathBuf,
    pub file: Fd,
    pub len: u64,
    /// A caller's file (its reads are watched for stalls), not one of the
    /// daemon's own images.
    pub from_caller: bool,
}

impl From<crate::caller::CallerFile> for DiskSource {
    fn from(file: crate::caller::CallerFile) -> DiskSource {
        DiskSource {
            named: file.path,
            file: file.file,
            len: file.len,
            from_caller: true,
        }
    }
}

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloned {
    Reflink,
    /// A sparse copy of this many data bytes.
    Sparse {
        copied: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cloning {named} needs {needed} bytes free under {dir}, which has {available}; free space there or remove VMs and images (`banger image prune`)"
    )]
    NoSpace {
        named: PathBuf,
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("cannot grow the filesystem of {path} to {bytes} bytes: {reason}")]
    Grow {
        path: PathBuf,
        bytes: u64,
        reason: String,
    },
}

/// Clones `source` into the new file `target` (its parent exists), grown
/// to `size` bytes when that is larger (as root, the tools that grow it
/// run as `tool_uid`, banger's own). Every read of the source runs in
/// view of `watch`, when given (a caller's file may sit on a filesystem
/// that stops answering). The target is synced before this returns; on
/// an error it may be left behind for the caller's ledger.
pub fn clone_disk(
    source: &DiskSource,
    target: &Path,
    size: Option<u64>,
    tool_uid: u32,
    watch: Option<&Watch>,
    mid_copy: impl Fn(),
) -> Result<Cloned, DiskError> {
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskError::Io {
            action,
            path,
            source,
        }
    };
    // Read and write: resize2fs is handed this descriptor.
    let copy = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(io_err("create", target))?;
    let from = Source {
        file: &source.file,
        named: &Arc::from(source.named.as_path()),
        watch,
    };
    // Unwatched: a reflink shares extents within one filesystem, the
    // daemon's own (another answers EXDEV at once), and may rightly take
    // long on a large, fragmented file.
    let cloned = if reflink_copy::reflink_file(&source.file, &copy).is_ok() {
        copy.set_len(source.len).map_err(io_err("size", target))?;
        Cloned::Reflink
    } else {
        let needed = from
            .during(allocated)
            .map_err(io_err("stat", &source.named))?;
        let dir = target.parent().unwrap_or(target);
        let available = available(&copy).map_err(io_err("statvfs", dir))?;
        if needed > available {
            return Err(DiskError::NoSpace {
                named: source.named.clone(),
                dir: dir.to_path_buf(),
                needed,
                available,
            });
        }
        let copied = sparse_copy(&from, &copy, source.len, mid_copy)
            .map_err(io_err("copy", &source.named))?;
        Cloned::Sparse { copied }
    };
    if let Some(size) = size.filter(|&size| size > source.len) {
        copy.set_len(size).map_err(io_err("extend", target))?;
        copy.sync_all().map_err(io_err("sync", target))?;
        grow_filesystem(&copy, target, size, tool_uid)?;
    }
    copy.sync_all().map_err(io_err("sync", target))?;
    Ok(cloned)
}

/// Bytes the file's blocks take on its filesystem.
fn allocated(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.blocks() * 512)
}

/// Bytes an unprivileged writer may still allocate where `file` lives.
fn available(file: &File) -> io::Result<u64> {
    let stat = rustix::fs::fstatvfs(file)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The file a copy reads, each operation on it in view of a watch when
/// there is one.
struct Source<'a> {
    file: &'a File,
    named: &'a Arc<Path>,
    watch: Option<&'a Watch>,
}

impl Source<'_> {
    fn during<T>(&self, op: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
        match self.watch {
            Some(watch) => watch.during(self.named, || op(self.file)),
            None => op(self.file),
        }
    }
}

/// The most one copy call moves: each is one operation a watch sees, so a
/// source as slow as 1 MiB per stall bound still counts as progressing.
const COPY_CHUNK: usize = 1 << 20;

/// Copies the first `len` bytes of `source` into the empty `target`,
/// data extents only: a hole of the source stays a hole. Returns the data
/// bytes copied. `mid_copy` runs after each extent (a crash test's
/// boundary).
fn sparse_copy(source: &Source, target: &File, len: u64, mid_copy: impl Fn()) -> io::Result<u64> {
    let mut copied = 0;
    let mut offset = 0;
    let mut fallback = None;
    while offset < len {
        let data = match source.during(|file| Ok(rustix::fs::seek(file, SeekFrom::Data(offset))))? {
            Ok(data) => data,
            // No data after `offset`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let hole = source
            .during(|file| Ok(rustix::fs::seek(file, SeekFrom::Hole(data))?))?
            .min(len);
        copy_extent(source, target, data, hole, &mut fallback)?;
        copied += hole - data;
        mid_copy();
        offset = hole;
    }
    target.set_len(len)?;
    Ok(copied)
}

/// Copies bytes `start..end` of `source` to the same offsets of `target`:
/// in the kernel (`copy_file_range`) until it refuses, as for a source on
/// another filesystem (EXDEV), then by reads and writes through
/// `fallback`, which is set then and kept for the next extents.
fn copy_extent(
    source: &Source,
    target: &File,
    start: u64,
    end: u64,
    fallback: &mut Option<Vec<u8>>,
) -> io::Result<()> {
    let mut at = start;
    while at < end {
        let want = usize::try_from(end - at).map_or(COPY_CHUNK, |left| left.min(COPY_CHUNK));
        let n = match fallback {
            None => {
                let (mut from, mut to) = (at, at);
                let copied = source.during(|file| {
                    Ok(rustix::fs::copy_file_range(
                        file,
                        Some(&mut from),
                        target,
                        Some(&mut to),
                        want,
                    ))
                })?;
                match copied {
                    Ok(n) => n,
                    Err(
                        rustix::io::Errno::XDEV
                        | rustix::io::Errno::NOSYS
                        | rustix::io::Errno::OPNOTSUPP
                        | rustix::io::Errno::INVAL,
                    ) => {
                        *fallback = Some(vec![0; 1 << 20]);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some(buffer) => {
                let len = want.min(buffer.len());
                let n = source.during(|file| file.read_at(&mut buffer[..len], at))?;
                target.write_all_at(&buffer[..n], at)?;
                n
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the source ended inside a data extent",
            ));
        }
        at += n as u64;
    }
    Ok(())
}

/// Grows the ext4 in `file` (already `size` bytes long) to fill it. It is
/// checked first (`e2fsck -fp`, which also replays a journal): resize2fs
/// refuses a filesystem mounted since its last check, as a hand-made
/// `--rootfs` usually is. The disk was never booted; both tools still run
/// with the least authority that can write it: as root, they drop to
/// `tool_uid` (banger's own, which no other process on the host shares:
/// checked at start) and reach the file only through its inherited
/// descriptor (`/dev/stdin`), the file lent to that uid meanwhile.
fn grow_filesystem(file: &File, path: &Path, size: u64, tool_uid: u32) -> Result<(), DiskError> {
    let grow_err = |reason: String| DiskError::Grow {
        path: path.to_path_buf(),
        bytes: size,
        reason,
    };
    let as_uid = rustix::process::geteuid().is_root().then_some(tool_uid);
    // One disk at a time lent to the uid: no tool sees another's disk.
    let _one_at_a_time = GROWING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(uid) = as_uid {
        std::os::unix::fs::fchown(file, Some(uid), Some(uid))
            .map_err(|e| grow_err(format!("cannot lend the disk to uid {uid}: {e}")))?;
    }
    let mut check = Command::new("e2fsck");
    check.arg("-fp");
    // e2fsck: 0 is clean, 1 is errors corrected.
    let grown = run_on_disk(file, check, 1, as_uid)
        .and_then(|()| run_on_disk(file, Command::new("resize2fs"), 0, as_uid));
    if as_uid.is_some() {
        std::os::unix::fs::fchown(file, Some(0), Some(0))
            .map_err(|e| grow_err(format!("cannot take the disk back: {e}")))?;
    }
    grown.map_err(grow_err)
}

/// Runs `command` on the disk in `file` as its `/dev/stdin` (as `as_uid`,
/// uid and gid, when given); exit codes up to `ok_up_to` are success. Of its
/// output (stdout and stderr, one pipe) only the end is kept for the
/// error: a damaged user disk can make e2fsck print a line per inode.
fn run_on_disk(
    file: &File,
    mut command: Command,
    ok_up_to: i32,
    as_uid: Option<u32>,
) -> Result<(), String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let cannot = |what: &str, e: io::Error| format!("cannot {what} {program}: {e}");
    let lent = file
        .try_clone()
        .map_err(|e| cannot("lend the disk's descriptor to", e))?;
    let (mut output, writer) = io::pipe().map_err(|e| cannot("make a pipe for", e))?;
    let writer_too = writer
        .try_clone()
        .map_err(|e| cannot("make a pipe for", e))?;
    command
        .arg("/dev/stdin")
        .stdin(Stdio::from(lent))
        .stdout(writer)
        .stderr(writer_too);
    if let Some(uid) = as_uid {
        std::os::unix::process::CommandExt::uid(&mut command, uid);
        std::os::unix::process::CommandExt::gid(&mut command, uid);
        // std drops the daemon's supplementary groups with the uid.
    }
    let mut child = command.spawn().map_err(|e| cannot("run", e))?;
    // The command holds the pipe's write ends too: the read ends only
    // once they are closed, by the tool and by whatever it left running.
    drop(command);
    let reader = std::thread::spawn(move || output_tail(&mut output, OUTPUT_TAIL));
    let status = child.wait().map_err(|e| cannot("wait for", e));
    if let Some(uid) = as_uid {
        end_all_of(uid).map_err(|e| cannot("end what is left of", e))?;
    }
    let said = reader.join().unwrap_or_default();
    let status = status?;
    match status.code() {
        Some(code) if (0..=ok_up_to).contains(&code) => Ok(()),
        _ => Err(format!("{program} {status}: {said}")),
    }
}

/// Who on this host already has `id`: a user or a group of that id, a
/// user given it as a subordinate id (`/etc/subuid`, `/etc/subgid`: it
/// may map it in a user namespace at any time), or a running process
/// holding it (any of its uids or gids, supplementary groups included).
/// None when no one does.
pub fn uid_taken(id: u32) -> Option<String> {
    if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id)) {
        return Some(format!("user {}", user.name));
    }
    if let Ok(Some(group)) = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(id)) {
        return Some(format!("group {}", group.name));
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        if let Some(owner) =
            subordinate_owner(&std::fs::read_to_string(file).unwrap_or_default(), id)
        {
            return Some(format!("{owner}'s subordinate id ({file})"));
        }
    }
    let wanted = id.to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue; // Gone meanwhile.
        };
        let holds = status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("Uid:")
                    .or_else(|| l.strip_prefix("Gid:"))
                    .or_else(|| l.strip_prefix("Groups:"))
            })
            .any(|ids| ids.split_whitespace().any(|i| i == wanted));
        if holds {
            let comm = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .map_or("", str::trim);
            return Some(format!("process {pid} ({comm})"));
        }
    }
    None
}

/// Who `/etc/subuid` (or `subgid`) text gives `id` to: `name:start:count`
/// lines.
fn subordinate_owner(text: &str, id: u32) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let (owner, start, count) = (fields.next()?, fields.next()?, fields.next()?);
        let (start, count) = (
            start.trim().parse::<u64>().ok()?,
            count.trim().parse::<u64>().ok()?,
        );
        (start..start + count)
            .contains(&u64::from(id))
            .then_some(owner)
    })
}

/// Held while a disk is lent to the tool uid.
static GROWING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Kills every process of `uid` (what a tool run as it may have left
/// behind: nothing of it may outlive the disk it was lent), from a child
/// that takes the uid itself, so that the kernel picks them: kill(-1)
/// reaches exactly the processes of its sender's uid.
fn end_all_of(uid: u32) -> io::Result<()> {
    let mut sweep = Command::new("true");
    std::os::unix::process::CommandExt::uid(&mut sweep, uid);
    std::os::unix::process::CommandExt::gid(&mut sweep, uid);
    #[allow(unsafe_code)]
    // SAFETY: kill is an async-signal-safe system call; the closure runs
    // after the child took `uid` and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut sweep, || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-1),
                nix::sys::signal::Signal::SIGKILL,
            );
            Ok(())
        });
    }
    sweep
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    sweep.status().map(|_| ())
}

/// Bytes of a tool's output kept for its error: the end, where e2fsck
/// and resize2fs say why they stopped.
const OUTPUT_TAIL: usize = 4096;

/// The last `keep` bytes `reader` gives before its end, as text.
fn output_tail(reader: &mut impl io::Read, keep: usize) -> String {
    let mut tail = Vec::with_capacity(2 * keep);
    let mut chunk = [0; 4096];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > keep {
                    tail.drain(..tail.len() - keep);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&tail).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_name_their_owner() {
        let text = "alice:100000:65536\nbob:165536:65536\nbroken\n";
        assert_eq!(subordinate_owner(text, 100_000), Some("alice"));
        assert_eq!(subordinate_owner(text, 165_535), Some("alice"));
        assert_eq!(subordinate_owner(text, 165_536), Some("bob"));
        assert_eq!(subordinate_owner(text, 231_072), None);
        assert_eq!(subordinate_owner(text, 99_999), None);
    }

    fn source(dir: &Path, len: u64, data_at: &[u64]) -> DiskSource {
        let path = dir.join("source");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create");
        file.set_len(len).expect("size");
        for &at in data_at {
            file.write_all_at(&[0xab; 8192], at).expect("write");
        }
        file.sync_all().expect("sync");
        DiskSource {
            named: path.clone(),
            file: Fd::from(File::open(&path).expect("open")),
            len,
            from_caller: true,
        }
    }

    fn watched(source: &DiskSource) -> (Arc<Path>, Watch) {
        (
            Arc::from(source.named.as_path()),
            Watch::new(std::time::Duration::from_secs(30)),
        )
    }

    fn reading<'a>(source: &'a DiskSource, named: &'a Arc<Path>, watch: &'a Watch) -> Source<'a> {
        Source {
            file: &source.file,
            named,
            watch: Some(watch),
        }
    }

    #[test]
    fn an_extent_is_copied_by_reads_and_writes_where_the_kernel_cannot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = 1 << 20;
        let source = source(dir.path(), 4 << 20, &[at]);
        let copy = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("copy"))
            .expect("create");
        let mut fallback = Some(vec![0; 4096]);
        let (named, watch) = watched(&source);
        let from = reading(&source, &named, &watch);
        copy_extent(&from, &copy, at, at + 8192, &mut fallback).expect("copy");
        assert!(fallback.is_some());
        let mut buf = [0; 8192];
        copy.read_exact_at(&mut buf, at).expect("read");
        assert!(buf.iter().all(|&b| b == 0xab));
        assert_eq!(copy.metadata().expect("stat").len(), at + 8192);
    }

    #[test]
    fn a_disk_that_is_no_filesystem_fails_its_check_saying_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = source(dir.path(), 4 << 20, &[]).file;
        let mut check = Command::new("e2fsck");
        check.arg("-fp");
        let err = run_on_disk(&disk, check, 1, None).expect_err("zeros are no ext4");
        assert!(err.starts_with("e2fsck exit status: 8"), "{err}");
        assert!(err.contains("superblock"), "{err}");
    }

    #[test]
    fn what_a_tool_leaves_running_as_its_uid_is_ended() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: taking another uid needs root");
            return;
        }
        let uid = 3_987_654_322;
        let mut left = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "sleep",
                "600",
            ])
            .spawn()
            .expect("setpriv");
        // Once it runs as the uid, the sweep reaches it.
        let status = format!("/proc/{}/status", left.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !std::fs::read_to_string(&status)
            .unwrap_or_default()
            .contains(&uid.to_string())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "setpriv never took the uid"
            );
            std::thread::yield_now();
        }
        end_all_of(uid).expect("sweep");
        let ended = left.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&ended),
            Some(9)
        );
    }

    #[test]
    fn a_tool_s_output_is_kept_only_to_its_end() {
        let mut said = "line\n".repeat(100_000).into_bytes();
        said.extend_from_slice(b"UNEXPECTED INCONSISTENCY\n");
        let tail = output_tail(&mut said.as_slice(), 64);
        assert!(tail.len() <= 64, "{tail}");
        assert!(tail.ends_with("UNEXPECTED INCONSISTENCY"), "{tail}");
    }

    #[test]
    fn a_sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 1 << 30;
        let at = [0, 256 << 20, len - 8192];
        let source = source(dir.path(), len, &at);
        let target = dir.path().join("copy");
        let copy = File::options()
            .write(true)
            .create_new(true)
            .open(&target)
            .expect("create");
        let extents = std::cell::Cell::new(0);
        let (named, watch) = watched(&source);
        let from = reading(&source, &named, &watch);
        let copied =
            sparse_copy(&from, &copy, len, || extents.set(extents.get() + 1)).expect("copy");
        let copy = File::open(&target).expect("open");
        assert_eq!(copy.metadata().expect("stat").len(), len);
        // Only the written blocks moved (a filesystem may round them up),
        // not the gigabyte of holes around them.
        assert!((3 * 8192..8 << 20).contains(&copied), "{copied}");
        assert!(allocated(&copy).expect("blocks") < 8 << 20);
        assert!(extents.get() >= 1);
        for &at in &at {
            let mut buf = [0; 8192];
            copy.read_exact_at(&mut buf, at).expect("read");
            assert!(buf.iter().all(|&b| b == 0xab), "data at {at}");
        }
        let mut buf = [0xff; 4096];
        copy.read_exact_at(&mut buf, 512 << 20).expect("read");
        assert!(buf.iter().all(|&b| b == 0), "a hole reads as zeros");
    }

    #[test]
    fn a_source_of_holes_only_copies_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = source(dir.path(), 64 << 20, &[]);
        let target = dir.path().join("copy");
        let cloned =
            clone_disk(&source, &target, None, 0, Some(&watched(&source).1), || {}).expect("clone");
        assert!(matches!(
            cloned,
            Cloned::Reflink | Cloned::Sparse { copied: 0 }
        ));
        assert_eq!(std::fs::metadata(&target).expect("stat").len(), 64 << 20);
    }

    #[test]
    fn a_clone_never_replaces_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = source(dir.path(), 4096, &[0]);
        let target = dir.path().join("copy");
        std::fs::write(&target, b"mine").expect("write");
        let err = clone_disk(&source, &target, None, 0, Some(&watched(&source).1), || {})
            .expect_err("exists");
        assert!(
            matches!(
                err,
                DiskError::Io {
                    action: "create",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(&target).expect("read"), b"mine");
    }
}
