//! `banger image`'s subcommands.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum ImageCommand {
    /// Import an OCI image layout directory, an OCI archive or a
    /// docker-archive tarball (`docker save`) as an ext4 image.
    Import {
        path: PathBuf,
        /// [default: the image's own ref name or repo tag]
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every image in the catalog.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One image in detail, by name or digest: its config and layers.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (by name or digest), its disk and the blobs no other
    /// image uses. Refused while a VM holds it.
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Remove it even while VMs hold it: they keep their own disks.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove every image no VM holds, with the disks and blobs no image
    /// left uses; prints what it freed.
    Prune {
        #[arg(long)]
        json: bool,
    },
}
