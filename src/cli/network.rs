//! `banger network`: create, list, inspect, remove and reconcile networks.

use super::*;

#[derive(Subcommand)]
pub(super) enum NetworkCommand {
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

pub(super) fn run(
    client: &mut Client,
    command: NetworkCommand,
    now: Timestamp,
) -> Result<(), Failure> {
    match command {
        NetworkCommand::Create {
            name,
            subnet,
            no_nat,
            host_access,
            dns,
            json,
        } => {
            let params = json!({
                "name": name, "subnet": subnet, "no_nat": no_nat,
                "host_access": host_access, "dns": dns,
            });
            let network = client
                .call::<NetworkResult>("network.create", params)?
                .result
                .network;
            if json {
                println!("{}", output::json(&network));
            } else {
                println!(
                    "{} {} (bridge {}, gateway {})",
                    network.record.name,
                    network.record.subnet,
                    network.record.bridge,
                    network.gateway
                );
            }
        }
        NetworkCommand::Ls { json } => {
            let networks = client.call::<NetworksResult>("network.list", json!({}))?;
            show(json, &networks.result.networks, |v| {
                output::networks_table(v, now)
            });
        }
        NetworkCommand::Inspect { name, json } => {
            let network = client
                .call::<NetworkResult>("network.get", json!({"name": name}))?
                .result
                .network;
            show(json, &network, |v| output::network_details(v, now));
        }
        NetworkCommand::Rm { name } => {
            client.call::<RemovedResult>("network.remove", json!({"name": name}))?;
            println!("{name} removed");
        }
        NetworkCommand::Reconcile { json } => {
            let report = client
                .call::<ReconcileResult>("network.reconcile", json!({}))?
                .result
                .reconciled;
            for failure in &report.failed {
                eprintln!("could not reconcile {failure}");
            }
            if json {
                println!("{}", output::json(&report));
            } else {
                println!(
                    "removed {} links, {} nft elements, {} leases; recreated {} links, {} nft elements, {} leases",
                    report.removed_links.len(),
                    report.removed_elements,
                    report.removed_leases,
                    report.recreated_links.len(),
                    report.recreated_elements,
                    report.recreated_leases
                );
            }
        }
    }
    Ok(())
}
