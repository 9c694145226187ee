//! Reconciliation: the host's bridges, taps, nftables elements and leases
//! brought back to what the network and VM records claim, each failure
//! reported rather than stopping the rest.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use actix::prelude::*;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::manager::{NetworkManager, enable_forwarding, open_foreign_forwards, ready};
use super::network::{NetworkActor, ReconcileLeases};
use super::{NetworkError, host_error, rules_of};
use crate::actors::store::List;
use crate::error_chain;
use crate::network::host;
use crate::network::rules::{self, NetworkRules};
use crate::network::{Guest, NetworkRecord};
use crate::store::Listing;
use crate::vm::ledger::Resource;
use crate::vm::record::{VmRecord, VmmKind};

/// What the VM records claim of the host's network objects.
#[derive(Debug, Clone, Default)]
struct Claims {
    /// Every VM with a network: id -> (network, name, address).
    vms: HashMap<String, (String, String, Option<Ipv4Addr>)>,
    /// The VMs whose ledger names a tap: its network, guest and owner.
    taps: Vec<(String, Guest, Option<u32>)>,
    /// VM ids whose records do not decode: their taps and leases stay.
    quarantined: HashSet<String>,
}

impl Claims {
    /// From the VM records; `owner` is who a VM's tap belongs to.
    fn of(listing: &Listing<VmRecord>, owner: impl Fn(VmmKind) -> Option<u32>) -> Claims {
        let mut claims = Claims::default();
        for record in &listing.records {
            let Some(network) = &record.network else {
                continue;
            };
            claims.vms.insert(
                record.id.clone(),
                (
                    network.network.clone(),
                    record.name.clone(),
                    network.address,
                ),
            );
            if let Some((network, guest)) = record.guest()
                && record.resources.contains(&Resource::Tap)
            {
                claims.taps.push((network, guest, owner(record.vmm)));
            }
        }
        claims.quarantined = listing.undecodable.iter().map(|b| b.key.clone()).collect();
        claims
    }
}

/// What a reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub removed_links: Vec<String>,
    pub recreated_links: Vec<String>,
    pub removed_elements: usize,
    pub recreated_elements: usize,
    pub removed_leases: usize,
    pub recreated_leases: usize,
    /// What could not be done, each with its reason.
    pub failed: Vec<String>,
}

fn note_failure(report: &mut ReconcileReport, what: String, e: &dyn std::error::Error) {
    warn!(what = %what, error = %error_chain(e), "reconciliation could not do this");
    report.failed.push(format!("{what}: {}", error_chain(e)));
}

/// Holds the host against the records (start-up, before any VM actor
/// starts, and `network reconcile`). With the host held (no attach or
/// detach in between), the VM records are read, then: banger's links that
/// no record claims are removed in one request, bridges and claimed taps
/// that are missing are made again, the nftables tables are rebuilt whole
/// from the records (one transaction), and leases follow the VM records.
/// Nothing outside banger's interface group and tables is touched; a
/// failure is reported and the rest still done.
pub struct ReconcileNetworks;

impl Message for ReconcileNetworks {
    type Result = Result<ReconcileReport, NetworkError>;
}

impl Handler<ReconcileNetworks> for NetworkManager {
    type Result = AtomicResponse<Self, Result<ReconcileReport, NetworkError>>;

    fn handle(&mut self, _: ReconcileNetworks, _: &mut Context<Self>) -> Self::Result {
        let host = match self.host() {
            Ok(host) => host,
            Err(NetworkError::Off(_)) => return ready(Ok(Default::default())),
            Err(e) => return ready(Err(e)),
        };
        let networks: Vec<(NetworkRecord, Addr<NetworkActor>)> =
            self.networks.values().cloned().collect();
        let (store, owner) = (self.store.clone(), self.settings.jailed_owner);
        let marker = self.settings.forwarding_marker.clone();
        let quarantined_networks = self.quarantined.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let started = std::time::Instant::now();
                let mut report = ReconcileReport::default();
                let records: Vec<&NetworkRecord> = networks.iter().map(|(r, _)| r).collect();
                let exclusive = host.exclusive().await;
                let as_of = Timestamp::now();
                let listing = store
                    .send(List::<VmRecord>::new())
                    .await
                    .map_err(|_| NetworkError::Unavailable("store"))??;
                let claims = Claims::of(&listing, |vmm| (vmm == VmmKind::Firecracker).then_some(owner).flatten());
                let all = "(reconciliation)";
                // Strays first: a claimed tap may need a stray's name. A
                // network whose record does not decode keeps every bridge.
                let bridges: HashSet<&str> = records.iter().map(|r| r.bridge.as_str()).collect();
                let taps: HashSet<String> = claims
                    .taps
                    .iter()
                    .map(|(_, guest, _)| guest.tap.clone())
                    .chain(claims.quarantined.iter().map(|id| crate::network::tap_name(id)))
                    .collect();
                let is_bridge = |name: &str| name == crate::network::DEFAULT_BRIDGE || name.starts_with("bn");
                let links = host.links().await.map_err(host_error(all))?;
                let mut present: HashSet<String> = links.iter().map(|l| l.name.clone()).collect();
                // Whatever a crash left in the sweep group goes too (a
                // claimed tap among them is made again below).
                let strays: Vec<_> = links
                    .into_iter()
                    .filter(|l| {
                        l.group == host.sweep_group()
                            || (l.group == host.group()
                                && !bridges.contains(l.name.as_str())
                                && !taps.contains(&l.name)
                                && (quarantined_networks.is_empty() || !is_bridge(&l.name)))
                    })
                    .collect();
                match host.remove_links(&strays).await {
                    Ok(()) => {
                        for link in &strays {
                            info!(link = %link.name, "removed a link no record claims");
                            present.remove(&link.name);
                        }
                        report.removed_links = strays.into_iter().map(|l| l.name).collect();
                    }
                    Err(e) => note_failure(&mut report, "remove stray links".into(), &e),
                }
                for record in &records {
                    if !present.contains(&record.bridge) {
                        info!(network = %record.name, bridge = %record.bridge, "making a missing bridge");
                        report.recreated_links.push(record.bridge.clone());
                    }
                    let made = host
                        .ensure_bridge(
                            &record.bridge,
                            record.gateway(),
                            record.subnet.prefix_len(),
                            record.mtu,
                        )
                        .await;
                    if let Err(e) = made {
                        note_failure(&mut report, format!("network {}'s bridge {}", record.name, record.bridge), &e);
                    }
                }
                let mut wanted = BTreeSet::new();
                for (network, guest, owner) in &claims.taps {
                    let Some(record) = records.iter().find(|r| &r.name == network) else {
                        warn!(network = %network, tap = %guest.tap, "a VM's tap names a network that does not exist");
                        continue;
                    };
                    if !present.contains(&guest.tap) {
                        info!(tap = %guest.tap, network = %network, "recreating a missing tap");
                        report.recreated_links.push(guest.tap.clone());
                    }
                    match host.ensure_tap(&guest.tap, &record.bridge, record.mtu, *owner).await {
                        Ok(()) => {
                            wanted.insert(guest.clone());
                        }
                        Err(e) => note_failure(&mut report, format!("tap {}", guest.tap), &e),
                    }
                }
                let found: BTreeSet<Guest> = match host::nft_guests().await {
                    Ok(found) => found.into_iter().collect(),
                    Err(e) => {
                        note_failure(&mut report, "list banger's nft elements".into(), &e);
                        BTreeSet::new()
                    }
                };
                for stray in found.difference(&wanted) {
                    info!(tap = %stray.tap, address = %stray.address, "removing an nft element no record claims");
                }
                for missing in wanted.difference(&found) {
                    info!(tap = %missing.tap, address = %missing.address, "recreating a VM's missing nft element");
                }
                report.removed_elements = found.difference(&wanted).count();
                report.recreated_elements = wanted.difference(&found).count();
                let rules: Vec<NetworkRules> = records.iter().map(|r| rules_of(r)).collect();
                let guests: Vec<Guest> = wanted.into_iter().collect();
                let blocked: Vec<String> = claims
                    .quarantined
                    .iter()
                    .map(|id| crate::network::tap_name(id))
                    .collect();
                if let Err(e) = host::nft(rules::tables(&rules, &guests, &blocked)).await {
                    note_failure(&mut report, "rebuild banger's nftables tables".into(), &e);
                }
                if let Err(e) = open_foreign_forwards(&rules).await {
                    note_failure(&mut report, "open other tables' forward chains".into(), &e);
                }
                if records.iter().any(|r| r.nat) {
                    enable_forwarding(&marker);
                }
                drop(exclusive);
                for (record, actor) in &networks {
                    let claimed = claims
                        .vms
                        .iter()
                        .filter(|(_, (network, _, _))| network == &record.name)
                        .map(|(id, (_, name, address))| (id.clone(), (name.clone(), *address)))
                        .collect();
                    let leases = actor
                        .send(ReconcileLeases {
                            claimed,
                            quarantined: claims.quarantined.clone(),
                            as_of,
                        })
                        .await
                        .map_err(|_| NetworkError::Unavailable("network actor"))?;
                    match leases {
                        Ok((removed, recreated)) => {
                            report.removed_leases += removed;
                            report.recreated_leases += recreated;
                        }
                        Err(e) => note_failure(&mut report, format!("network {}'s leases", record.name), &e),
                    }
                }
                info!(
                    networks = networks.len(),
                    removed_links = report.removed_links.len(),
                    recreated_links = report.recreated_links.len(),
                    removed_elements = report.removed_elements,
                    removed_leases = report.removed_leases,
                    failed = report.failed.len(),
                    ms = started.elapsed().as_secs_f64() * 1000.0,
                    "networks reconciled"
                );
                Ok(report)
            }
            .into_actor(self)
            .map(|report, _, _| {
                if let Err(e) = &report {
                    error!(error = %error_chain(e), "network reconciliation failed");
                }
                report
            }),
        ))
    }
}
