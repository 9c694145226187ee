//! A VM's resource ledger: every host resource it owns, written into its
//! record before the resource is acquired and removed after it is released.
//! Start-up reconciliation holds the ledgers against the host
//! (`crate::reconcile`): what no ledger claims is removed.

use serde::{Deserialize, Serialize};

/// One kind of host resource a VM owns; where it lives follows from the
/// VM's id and the daemon's settings (`actors::vm::VmSettings::path_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resource {
    /// `<state>/vms/<id>/`: the disk clone, the console log, the sockets.
    VmDirectory,
    /// `<state>/jail/firecracker/<id>/`: the jailer's chroot.
    Jail,
    /// The VM's address on its network (a record of the `leases` table).
    Lease,
    /// The VM's tap and its nftables element: from its launch until it
    /// stops for good (kept between a crash and its restart).
    Tap,
    /// A hold on the image the VM's disk was cloned from (`VmRecord::image`):
    /// the image may not be removed while a ledger names it. Nothing of the
    /// host to release: the hold ends with the record.
    Image,
}
