//! Who may talk to the daemon: root, the daemon's own user, and members of
//! the configured group. Checked on every connection with SO_PEERCRED; the
//! socket's file mode is only the first fence.

use std::ffi::CString;

use nix::unistd::{Gid, Group, Uid, User, getgrouplist};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    pub owner: Uid,
    pub group: Option<Gid>,
}

impl AccessPolicy {
    /// Decides for a peer; `groups` lists the peer's supplementary groups
    /// and is only consulted when the answer depends on them.
    pub fn admits(&self, uid: Uid, gid: Gid, groups: impl FnOnce() -> Vec<Gid>) -> bool {
        if uid.is_root() || uid == self.owner {
            return true;
        }
        match self.group {
            Some(group) => gid == group || groups().contains(&group),
            None => false,
        }
    }

    /// The group a system-mode socket is shared with, if it exists.
    pub fn lookup_group(name: &str) -> Option<Gid> {
        Group::from_name(name).ok().flatten().map(|g| g.gid)
    }
}

/// The supplementary groups of a user, from the group database.
pub fn groups_of(uid: Uid) -> Vec<Gid> {
    let Ok(Some(user)) = User::from_uid(uid) else {
        return Vec::new();
    };
    let Ok(name) = CString::new(user.name) else {
        return Vec::new();
    };
    getgrouplist(&name, user.gid).unwrap_or_default()
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
        policy.admits(Uid::from_raw(uid), Gid::from_raw(gid), || groups)
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
