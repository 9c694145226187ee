//! VMM backends and the process plumbing they share.

pub mod console;
pub mod firecracker;
pub mod orphans;
pub mod process;
