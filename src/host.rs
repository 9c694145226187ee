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

/// One line of a `/proc/<pid>/mountinfo`.
pub struct Mount<'a> {
    /// The mounted path within its filesystem (a bind mount's source).
    pub root: PathBuf,
    pub point: PathBuf,
    pub fstype: &'a str,
}

/// The mounts of a `/proc/<pid>/mountinfo`: fields are `id parent
/// major:minor root mount-point options... - fstype source ...`.
pub fn mounts(mountinfo: &str) -> impl Iterator<Item = Mount<'_>> {
    mountinfo.lines().filter_map(|line| {
        let mut fields = line.split(' ').skip(3);
        let (root, point) = (fields.next()?, fields.next()?);
        let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
        Some(Mount {
            root: PathBuf::from(unescape_mount_path(root)),
            point: PathBuf::from(unescape_mount_path(point)),
            fstype,
        })
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(raw: &str) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points under `dir`, deepest first (unmount order).
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mounts(mountinfo)
        .map(|mount| mount.point)
        .filter(|point| point.starts_with(dir) && point != dir)
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    points.dedup();
    points
}

/// Names the filesystem holding `path`: its mount point and type.
fn filesystem_of(mountinfo: &str, path: &Path) -> String {
    mounts(mountinfo)
        .filter(|mount| path.starts_with(&mount.point))
        .max_by_key(|mount| mount.point.components().count())
        .map(|mount| format!("{} at {}", mount.fstype, mount.point.display()))
        .unwrap_or_else(|| "an unknown filesystem".into())
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
        if let Some(owner) = subordinate_owner(&fs::read_to_string(file).unwrap_or_default(), id) {
            return Some(format!("{owner}'s subordinate id ({file})"));
        }
    }
    let wanted = id.to_string();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
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

/// Gives the heap's free memory back to the system when dropped: an
/// image build frees hundreds of megabytes on whichever thread ran it,
/// and glibc keeps a thread's freed memory in that thread's arena, so
/// builds on different threads would each keep their peak.
pub struct HeapTrim;

impl Drop for HeapTrim {
    fn drop(&mut self) {
        #[cfg(target_env = "gnu")]
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim takes a plain integer and only returns free
        // pages of glibc's own heaps.
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }
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

    const MOUNTINFO: &str = "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
        90 22 0:50 / /var/lib/banger/jail rw,relatime - tmpfs tmpfs rw,size=65536k\n\
        91 90 254:0 /var/lib/banger/vms/abc/rootfs.ext4 /var/lib/banger/jail/firecracker/abc/root/rootfs.ext4 rw - ext4 /dev/vda rw\n\
        92 90 254:0 /k /var/lib/banger/jail/firecracker/abc/root/odd\\040name ro - ext4 /dev/vda rw\n\
        93 22 0:51 / /var/lib/banger/jail-other rw - tmpfs tmpfs rw\n";

    #[test]
    fn the_mounts_under_a_jail_are_found_deepest_first_and_unescaped() {
        let jail = Path::new("/var/lib/banger/jail/firecracker/abc");
        let found = mounts_under(MOUNTINFO, jail);
        assert_eq!(
            found,
            [
                PathBuf::from("/var/lib/banger/jail/firecracker/abc/root/rootfs.ext4"),
                PathBuf::from("/var/lib/banger/jail/firecracker/abc/root/odd name"),
            ]
        );
        // A sibling whose name merely starts the same is not under it.
        let base = Path::new("/var/lib/banger/jail");
        assert_eq!(mounts_under(MOUNTINFO, base).len(), 2);
        assert!(
            !mounts_under(MOUNTINFO, base).contains(&PathBuf::from("/var/lib/banger/jail-other"))
        );
    }

    #[test]
    fn an_escape_that_is_no_byte_stays_as_written() {
        assert_eq!(unescape_mount_path("a\\040b\\777c\\"), "a b\\777c\\");
    }

    #[test]
    fn a_path_is_named_by_the_filesystem_that_holds_it() {
        let vms = Path::new("/var/lib/banger/vms/abc/rootfs.ext4");
        assert_eq!(filesystem_of(MOUNTINFO, vms), "ext4 at /");
        let jail = Path::new("/var/lib/banger/jail/firecracker/abc/root");
        assert_eq!(
            filesystem_of(MOUNTINFO, jail),
            "tmpfs at /var/lib/banger/jail"
        );
    }
}
