//! Who may talk to the daemon: root, the daemon's own user, and members of
//! the configured group. Checked on every connection with SO_PEERCRED and
//! SO_PEERGROUPS; the socket's file mode is only the first fence.

use std::io;
use std::os::fd::AsRawFd;

use nix::unistd::{Gid, Group, Uid};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    pub owner: Uid,
    pub group: Option<Gid>,
}

impl AccessPolicy {
    /// Decides for a peer; `groups` are its supplementary groups.
    pub fn admits(&self, uid: Uid, gid: Gid, groups: &[Gid]) -> bool {
        if uid.is_root() || uid == self.owner {
            return true;
        }
        match self.group {
            Some(group) => gid == group || groups.contains(&group),
            None => false,
        }
    }

    /// The group a system-mode socket is shared with, if it exists.
    pub fn lookup_group(name: &str) -> Option<Gid> {
        Group::from_name(name).ok().flatten().map(|g| g.gid)
    }
}

/// A peer's supplementary groups as the kernel held them when it
/// connected (SO_PEERGROUPS): no group database, nothing that can block.
pub fn peer_groups(socket: &impl AsRawFd) -> io::Result<Vec<Gid>> {
    let size = std::mem::size_of::<nix::libc::gid_t>();
    let mut groups: Vec<nix::libc::gid_t> = vec![0; 32];
    loop {
        let mut len =
            nix::libc::socklen_t::try_from(groups.len() * size).map_err(io::Error::other)?;
        #[allow(unsafe_code)]
        // SAFETY: the kernel writes at most `len` bytes into the buffer,
        // which holds that many, and sets `len` to what it wrote or needs.
        let rc = unsafe {
            nix::libc::getsockopt(
                socket.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                nix::libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = usize::try_from(len).unwrap_or(0) / size;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups.into_iter().map(Gid::from_raw).collect());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(nix::libc::ERANGE) || needed <= groups.len() {
            return Err(error);
        }
        groups.resize(needed, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: u32 = 1000;
    const GROUP: u32 = 990;

    fn policy(group: Option<u32>) -> AccessPolicy {
        AccessPolicy {
            owner: Uid::from_raw(OWNER),
            group: group.map(Gid::from_raw),
        }
    }

    fn admits(policy: &AccessPolicy, uid: u32, gid: u32, groups: &[u32]) -> bool {
        let groups: Vec<Gid> = groups.iter().copied().map(Gid::from_raw).collect();
        policy.admits(Uid::from_raw(uid), Gid::from_raw(gid), &groups)
    }

    #[test]
    fn root_and_the_owner_are_always_admitted() {
        assert!(admits(&policy(None), 0, 0, &[]));
        assert!(admits(&policy(None), OWNER, 5, &[]));
    }

    #[test]
    fn group_members_are_admitted_by_primary_or_supplementary_group() {
        assert!(admits(&policy(Some(GROUP)), 2000, GROUP, &[]));
        assert!(admits(&policy(Some(GROUP)), 2000, 2000, &[27, GROUP]));
    }

    #[test]
    fn everyone_else_is_refused() {
        assert!(!admits(&policy(Some(GROUP)), 2000, 2000, &[27]));
        assert!(!admits(&policy(None), 2000, GROUP, &[GROUP]));
    }
}
