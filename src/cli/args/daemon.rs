//! `banger daemon`'s subcommands.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum DaemonCommand {
    /// Version, uptime, store schema and counts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent copy of the store to PATH, a file name in the
    /// daemon's backup directory (<state-dir>/backups) or a path there;
    /// it must not exist.
    Backup {
        path: PathBuf,
        /// Copy at most this many bytes per second.
        #[arg(long, value_name = "BYTES")]
        rate_limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Every RPC method the daemon serves.
    Methods {
        #[arg(long)]
        json: bool,
    },
}
