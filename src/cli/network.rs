//! `banger network`: create, list, inspect, remove and reconcile networks.

use super::*;

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
