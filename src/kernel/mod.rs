//! Distribution kernels made bootable: a Debian kernel package read
//! (`deb`), its vmlinux taken out of the bzImage (`bzimage`), the virtio
//! and vsock modules a VM needs put in load order (`modules`), and an
//! initramfs built around banger-agent (`initramfs`). Pure file work; the
//! catalog stores the results.

pub mod bzimage;
pub mod deb;
pub mod initramfs;
pub mod modules;

/// The drivers a VM's devices need on either backend: virtio over PCI
/// (QEMU) and MMIO (Firecracker), the disk, the network, the console port
/// (QEMU's agent channel) and vsock (Firecracker's). Dependencies are added.
pub const GUEST_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "net_failover",
    "failover",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport",
    "vmw_vsock_virtio_transport_common",
];

/// What can be wrong with a kernel package. Messages leave out the
/// package's path: the catalog's error names it.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("not a kernel package: {0}")]
    NotAPackage(String),
    #[error("the bzImage is not usable: {0}")]
    BzImage(String),
    #[error("module {module}: {reason}")]
    Module { module: String, reason: String },
    #[error("cannot read the package")]
    Io(#[from] std::io::Error),
    #[error("cannot keep the package's modules on disk")]
    Spool(#[source] std::io::Error),
    #[error("cannot build the initramfs")]
    Initramfs(#[source] std::io::Error),
}
