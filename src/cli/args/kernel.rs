//! `banger kernel`'s subcommands.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum KernelCommand {
    /// Copy a vmlinux (and initrd) into the catalog under NAME.
    Import {
        name: String,
        #[arg(long)]
        vmlinux: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line [default: the backend's, see docs/cli.md].
        #[arg(long)]
        cmdline: Option<String>,
    },
    /// Import a Debian kernel package (linux-image-*.deb) under NAME: its
    /// bzImage, the vmlinux inside it, and an initramfs of the virtio and
    /// vsock modules (banger-agent joins it at boot).
    ImportDeb {
        name: String,
        /// The .deb file (`apt-get download linux-image-<version>-cloud-amd64`).
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Every kernel in the catalog.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One kernel in detail: its files, notes and boot image.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a kernel no VM uses.
    #[command(alias = "remove")]
    Rm { name: String },
}
