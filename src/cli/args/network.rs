//! `banger network`'s subcommands.

use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum NetworkCommand {
    /// Create a network: a bridge, its gateway (the subnet's first
    /// address), leases for VMs, and NAT to the outside.
    Create {
        name: String,
        /// An IPv4 network for its VMs, e.g. 10.10.0.0/24 [default: the
        /// first free /24 that clashes with nothing on the host].
        #[arg(long)]
        subnet: Option<String>,
        /// Guests reach only each other (and the gateway's DNS), not the outside.
        #[arg(long)]
        no_nat: bool,
        /// Guests reach every service of the host, not only banger's.
        #[arg(long)]
        host_access: bool,
        /// The DNS server its guests are given [default: the daemon's].
        #[arg(long, value_name = "IP")]
        dns: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every network.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One network in detail, with its leases.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a network no VM uses.
    #[command(alias = "remove")]
    Rm { name: String },
    /// Remove the taps, bridges, rules and leases no record claims; make
    /// again what records claim and the host lacks.
    Reconcile {
        #[arg(long)]
        json: bool,
    },
}
