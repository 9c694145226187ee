//! The guest side as the host sees it: putting banger-agent into a VM's
//! root disk, and talking to it once the VM runs.

pub mod disk;
pub mod link;
