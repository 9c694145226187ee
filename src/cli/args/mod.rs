//! The command lines of `banger` and `bangerd`, as clap definitions and
//! nothing else (std, clap and clap_complete; no type of the crate), so
//! that `build.rs` can include them: it checks them, and packaging can
//! generate man pages from them at build time. The version is set where
//! they run (`cli::parse`), since it carries the commit stamped by the
//! build.

mod bangerd;
mod daemon;
mod image;
mod kernel;
mod network;
mod ops;
mod vm;

pub use bangerd::{DaemonArgs, LogFormat};
pub(crate) use daemon::DaemonCommand;
pub(crate) use image::ImageCommand;
pub(crate) use kernel::KernelCommand;
pub(crate) use network::NetworkCommand;
pub(crate) use ops::OpsCommand;
pub(crate) use vm::VmCommand;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use clap_complete::Shell;

#[derive(Parser)]
#[command(
    name = "banger",
    about = "Run and supervise microVMs made from OCI images"
)]
pub(crate) struct Cli {
    /// The daemon's socket [default: the mode's, or the configuration's].
    #[arg(long, global = true, env = "BANGER_SOCKET", value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,
    /// Talk to the system daemon (the default for root).
    #[arg(long, global = true, conflicts_with = "user")]
    pub(crate) system: bool,
    /// Talk to your own user-mode daemon (the default for other users).
    #[arg(long, global = true)]
    pub(crate) user: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// The daemon itself: status, backups, methods.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Operations: state-changing requests in flight or finished.
    #[command(subcommand)]
    Ops(OpsCommand),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// The kernel catalog.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// The image catalog: OCI images as ext4 root disks.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Networks: bridges, leases and NAT for VMs.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Print a shell completion script.
    Completions { shell: Shell },
}

/// `--vmm`: the backend a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum VmmChoice {
    Firecracker,
    Qemu,
}

/// `--restart`: when a VM that exits is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RestartChoice {
    /// Never restart.
    No,
    /// Restart after a crash.
    OnFailure,
    /// Restart after a crash or a guest-initiated clean exit.
    Always,
}
