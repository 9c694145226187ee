//! `banger ops`'s subcommands.

use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum OpsCommand {
    /// Operations in flight (with --all, finished ones too).
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// One operation in detail.
    Show {
        op_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Ask an operation in flight to stop.
    Cancel { op_id: String },
    /// Follow an operation's progress until it ends.
    Watch {
        op_id: String,
        #[arg(long)]
        json: bool,
    },
}
