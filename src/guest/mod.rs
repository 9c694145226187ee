//! The guest side as the host sees it: talking to banger-agent once the
//! VM runs (it arrives in the VM's initramfs, `crate::catalog::boot_image`).

pub mod link;
