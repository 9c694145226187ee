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

/// How many bytes one decompressed stream of an import may hold (the
/// package's data archive, the vmlinux, a module): past it, the import is
/// refused as a decompression bomb. `kernel.max_unpacked_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimit(pub u64);

impl UnpackLimit {
    /// 4 GiB: far above any real kernel package (Debian's cloud kernel
    /// unpacks to about 100 MiB).
    pub const DEFAULT: UnpackLimit = UnpackLimit(4 << 30);

    /// The error a stream past the limit reads as.
    fn exceeded(self) -> std::io::Error {
        std::io::Error::other(format!(
            "it unpacks past {} MiB (kernel.max_unpacked_mib); refused as a decompression bomb",
            self.0 >> 20
        ))
    }
}

/// A reader that fails once more than its limit has come through it.
pub struct Capped<R> {
    inner: R,
    left: u64,
    limit: UnpackLimit,
}

impl<R> Capped<R> {
    pub fn new(inner: R, limit: UnpackLimit) -> Capped<R> {
        Capped {
            inner,
            left: limit.0,
            limit,
        }
    }
}

impl<R: std::io::Read> std::io::Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self
            .left
            .checked_sub(n as u64)
            .ok_or_else(|| self.limit.exceeded())?;
        Ok(n)
    }
}

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

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn a_capped_stream_reads_up_to_its_limit_and_fails_past_it() {
        let mut out = Vec::new();
        Capped::new(&[7u8; 100][..], UnpackLimit(100))
            .read_to_end(&mut out)
            .expect("exactly the limit");
        assert_eq!(out.len(), 100);
        let error = Capped::new(&[7u8; 101][..], UnpackLimit(100))
            .read_to_end(&mut Vec::new())
            .expect_err("past the limit");
        assert!(
            error.to_string().contains("kernel.max_unpacked_mib"),
            "{error}"
        );
    }
}
