//! `banger vm`'s subcommands.

use std::path::PathBuf;

use clap::Subcommand;

use super::{RestartChoice, VmmChoice};

#[derive(Subcommand)]
pub(crate) enum VmCommand {
    /// Create a VM; prints its name (with --json, the whole VM).
    Create {
        /// Generated (adjective-noun) when absent.
        name: Option<String>,
        /// A kernel from the catalog (`banger kernel ls`) [default:
        /// vm.default_kernel, else the only kernel there is].
        #[arg(long)]
        kernel: Option<String>,
        /// An ext4 file as the root disk; the VM gets its own copy, the file
        /// is never changed.
        #[arg(long, required_unless_present = "image", conflicts_with = "image")]
        rootfs: Option<PathBuf>,
        /// An image from the catalog (name or digest, `banger image ls`):
        /// the VM's root disk is a copy-on-write clone of its disk.
        #[arg(long)]
        image: Option<String>,
        /// The root disk's size, such as 1G or 512M: the clone is grown
        /// (file and filesystem) before the first boot [default: as its
        /// source].
        #[arg(long, value_name = "SIZE")]
        disk: Option<String>,
        /// Run the image's Entrypoint and Cmd (with its Env, WorkingDir and
        /// User) as the VM's main process: its exit is the VM's, with its
        /// code, and the restart policy applies. Its output is in `vm logs`.
        #[arg(long)]
        run_image_cmd: bool,
        /// Virtual CPUs, 1 to 32.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// MiB, or a size such as 512M or 2G.
        #[arg(long, default_value = "512")]
        memory: String,
        #[arg(long, value_enum)]
        restart: Option<RestartChoice>,
        /// Seconds before the first restart after a crash (doubles each time).
        #[arg(long, value_name = "SECS")]
        restart_delay: Option<f64>,
        /// The longest wait between restarts.
        #[arg(long, value_name = "SECS")]
        restart_max_delay: Option<f64>,
        #[arg(long, value_enum)]
        vmm: Option<VmmChoice>,
        /// The network to join [default: default].
        #[arg(long, value_name = "NAME")]
        network: Option<String>,
        /// No network interface at all.
        #[arg(long, conflicts_with = "network")]
        no_network: bool,
        /// Start it right away.
        #[arg(long)]
        start: bool,
        #[arg(long)]
        json: bool,
    },
    /// Start a VM (a no-op when it is running).
    Start { name: String },
    /// Stop a VM: ask the guest, then SIGKILL after the timeout.
    Stop {
        name: String,
        #[arg(long, value_name = "SECS", default_value_t = 30.0)]
        timeout: f64,
    },
    /// SIGKILL a VM's VMM at once.
    Kill { name: String },
    /// Stop, then start a VM.
    Restart {
        name: String,
        #[arg(long, value_name = "SECS", default_value_t = 30.0)]
        timeout: f64,
    },
    /// Remove a VM and its files.
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Kill it first if it is running.
        #[arg(long, short)]
        force: bool,
    },
    /// Remove a quarantined VM record (one that does not decode, listed
    /// by `daemon status`) and the files it could own.
    Forget {
        /// The record's key: the VM's id.
        id: String,
    },
    /// Every VM.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One VM in detail.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in the VM through its agent; banger exits with the
    /// command's status (125 when banger itself fails).
    Exec {
        name: String,
        /// Set an environment variable (repeatable).
        #[arg(long = "env", short = 'e', value_name = "K=V")]
        env: Vec<String>,
        /// The command's working directory in the guest.
        #[arg(long, short = 'w', value_name = "DIR")]
        workdir: Option<String>,
        /// Seconds to wait for a booting VM's agent.
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        wait: f64,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Ping the VM's agent: round trip, kernel, boot times.
    Ping {
        name: String,
        /// Seconds to wait for a booting VM's agent.
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        wait: f64,
        #[arg(long)]
        json: bool,
    },
    /// The VM's serial console output.
    Logs {
        name: String,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Keep printing new output until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}
