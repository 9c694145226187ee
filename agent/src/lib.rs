//! banger-agent: PID 1 inside every banger VM, and the protocol the host
//! speaks to it (the host's `banger` crate reuses these types).

pub mod children;
pub mod cmdline;
pub mod init;
pub mod protocol;
pub mod server;
pub mod system;
