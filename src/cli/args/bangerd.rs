//! `bangerd`'s command line.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bangerd",
    about = "The banger daemon: owns and supervises the microVMs of this host"
)]
pub struct DaemonArgs {
    /// Run in system mode (the default for root): /etc/banger, /var/lib/banger, /run/banger.
    #[arg(long, conflicts_with = "user")]
    pub system: bool,
    /// Run in user mode (the default for other users): XDG directories.
    #[arg(long)]
    pub user: bool,
    /// Configuration file [default: the mode's bangerd.toml].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// State directory holding the store [default: from the configuration].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Unix socket to serve [default: from the configuration].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Log lines on stderr as text or as JSON objects.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Dry run: say whether this binary can open the store, change nothing,
    /// and exit 0 (compatible), 1 (migrations needed), 2 (incompatible) or 3
    /// (cannot tell). Safe while a daemon is running.
    #[arg(long)]
    pub check_migrations: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
