//! Start-up reconciliation: the ledgers held against the host. Each owner
//! loads its records (with the keys of those that do not decode, which
//! count as claims), terminates processes no record claims, then sweeps its
//! directories: whatever no record claims is removed and logged. Only then
//! do its actors start. The order at daemon start: operations, the catalog
//! (`kernels/`), the VMs (VMMs, then `vms/` and the jail base), the socket.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// The entries of `found` that `claimed` does not name.
pub fn strays(
    found: impl IntoIterator<Item = PathBuf>,
    claimed: &HashSet<PathBuf>,
) -> Vec<PathBuf> {
    let mut strays: Vec<PathBuf> = found.into_iter().filter(|p| !claimed.contains(p)).collect();
    strays.sort();
    strays
}

/// Removes every entry of `root` that `claimed` does not name, with
/// `remove`, logging each. A missing root has nothing to sweep. Blocking.
pub fn sweep(
    root: &Path,
    claimed: &HashSet<PathBuf>,
    remove: impl Fn(&Path) -> io::Result<()>,
) -> usize {
    let found = match std::fs::read_dir(root) {
        Ok(entries) => entries
            .filter_map(|e| Some(e.ok()?.path()))
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
        Err(e) => {
            warn!(dir = %root.display(), error = %e, "cannot read a directory to reconcile it");
            return 0;
        }
    };
    let strays = strays(found, claimed);
    for stray in &strays {
        match remove(stray) {
            Ok(()) => info!(path = %stray.display(), "removed what no record claims"),
            Err(e) => {
                warn!(path = %stray.display(), error = %e, "cannot remove what no record claims")
            }
        }
    }
    strays.len()
}

/// Removes a file or a directory tree; one already gone is fine.
pub fn remove_any(path: &Path) -> io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_no_record_claims_is_a_stray() {
        let claimed: HashSet<PathBuf> = ["/s/vms/a", "/s/vms/b"].map(PathBuf::from).into();
        let found = ["/s/vms/b", "/s/vms/.tmp", "/s/vms/a", "/s/vms/z"].map(PathBuf::from);
        assert_eq!(
            strays(found, &claimed),
            [PathBuf::from("/s/vms/.tmp"), PathBuf::from("/s/vms/z")]
        );
    }

    #[test]
    fn a_sweep_removes_strays_and_keeps_claims() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keep = dir.path().join("keep");
        std::fs::create_dir(&keep).expect("keep");
        std::fs::create_dir_all(dir.path().join("stray/deep")).expect("stray");
        std::fs::write(dir.path().join(".staging-file"), b"x").expect("file");
        let claimed: HashSet<PathBuf> = [keep.clone()].into();
        assert_eq!(sweep(dir.path(), &claimed, remove_any), 2);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(left, [keep]);
        assert_eq!(sweep(&dir.path().join("missing"), &claimed, remove_any), 0);
    }
}
