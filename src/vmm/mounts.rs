//! The mount table as `/proc/<pid>/mountinfo` gives it: what is mounted
//! where, on which filesystem, its paths unescaped. Read by the jail's
//! removal and messages and by the start-up sweep.

use std::path::{Path, PathBuf};

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
pub fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mounts(mountinfo)
        .map(|mount| mount.point)
        .filter(|point| point.starts_with(dir) && point != dir)
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    points.dedup();
    points
}

/// Names the filesystem holding `path`: its mount point and type.
pub fn filesystem_of(mountinfo: &str, path: &Path) -> String {
    mounts(mountinfo)
        .filter(|mount| path.starts_with(&mount.point))
        .max_by_key(|mount| mount.point.components().count())
        .map(|mount| format!("{} at {}", mount.fstype, mount.point.display()))
        .unwrap_or_else(|| "an unknown filesystem".into())
}

#[cfg(test)]
mod tests {
    use super::*;

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
