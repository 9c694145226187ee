//! banger-agent: PID 1 inside every banger VM, and the protocol the host
//! speaks to it (the host's `banger` crate reuses these types).

// PID 1 never panics on I/O: no print macros (they panic when stdio fails).
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod children;
pub mod cmdline;
pub mod flow;
pub mod init;
pub mod log;
pub mod main_process;
pub mod network;
pub mod protocol;
pub mod server;
pub mod system;

/// Starts a named thread. `std::thread::spawn` panics when the kernel
/// refuses a thread, and a panic aborts PID 1 (a kernel panic): this answers
/// an error instead.
pub fn spawn_thread(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(body)
}
