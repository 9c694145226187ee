//! VMM backends and the process plumbing they share.

pub mod firecracker;
pub mod process;
