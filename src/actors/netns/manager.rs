//! `NetworkManager`: finds networks by name, creates (bridge, NAT,
//! forwarding), lists and removes them, and loads them at start-up.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use actix::prelude::*;
use ipnet::Ipv4Net;
use jiff::Timestamp;
use tracing::{error, info, warn};

use super::network::{Attach, Describe, Detach, Lease, NetworkActor, Release};
use super::{NetworkError, NetworkSettings, NetworkView, host_error, rules_of};
use crate::actors::store::{Delete, List, Put, StoreActor};
use crate::error_chain;
use crate::network::host::{self, HostNetError, HostNetwork};
use crate::network::ipam;
use crate::network::rules::{self, Change, NetworkRules};
use crate::network::{DEFAULT_NETWORK, GuestConfig, LeaseRecord, NetworkRecord, bridge_name};

/// Finds networks by name; creates, lists, removes and reconciles them.
pub struct NetworkManager {
    pub(super) store: Addr<StoreActor>,
    pub(super) settings: NetworkSettings,
    pub(super) host: Option<Arc<HostNetwork>>,
    pub(super) networks: BTreeMap<String, (NetworkRecord, Addr<NetworkActor>)>,
    /// Networks whose records do not decode: their bridges are left alone.
    pub(super) quarantined: Vec<String>,
}

impl NetworkManager {
    pub fn new(store: Addr<StoreActor>, settings: NetworkSettings) -> NetworkManager {
        NetworkManager {
            store,
            settings,
            host: None,
            networks: BTreeMap::new(),
            quarantined: Vec::new(),
        }
    }

    pub(super) fn host(&self) -> Result<Arc<HostNetwork>, NetworkError> {
        match (&self.host, &self.settings.off) {
            (Some(host), _) => Ok(host.clone()),
            (None, Some(reason)) => Err(NetworkError::Off(reason.clone())),
            (None, None) => Err(NetworkError::Off("the networks are not loaded yet".into())),
        }
    }

    pub(super) fn actor(&self, name: &str) -> Result<Addr<NetworkActor>, NetworkError> {
        self.host()?;
        self.networks
            .get(name)
            .map(|(_, actor)| actor.clone())
            .ok_or_else(|| NetworkError::NotFound(name.to_string()))
    }

    fn start_network(
        &mut self,
        record: NetworkRecord,
        leases: BTreeMap<String, LeaseRecord>,
        host: Arc<HostNetwork>,
    ) {
        let store = self.store.clone();
        let network = record.clone();
        let actor = Supervisor::start(move |_| NetworkActor {
            record: network,
            leases,
            store,
            host,
        });
        self.networks.insert(record.name.clone(), (record, actor));
    }
}

/// An answer known at once, in a handler that runs in one turn.
pub(super) fn ready<T: 'static>(value: T) -> AtomicResponse<NetworkManager, T> {
    AtomicResponse::new(Box::pin(fut::ready(value)))
}

impl Actor for NetworkManager {
    type Context = Context<Self>;
}

impl Supervised for NetworkManager {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("network manager restarting");
    }
}

/// A new network's record, checked against the host and the others.
async fn new_network(
    host: &HostNetwork,
    existing: &[(String, Ipv4Net)],
    request: &CreateNetwork,
    settings: &NetworkSettings,
) -> Result<NetworkRecord, NetworkError> {
    let routes = host.routes().await.map_err(host_error(&request.name))?;
    let others = existing.iter().map(|(name, net)| (name.as_str(), *net));
    let subnet = match (request.subnet, settings.default_subnet) {
        (Some(subnet), _) => subnet,
        (None, Some(subnet)) if request.name == DEFAULT_NETWORK => subnet,
        (None, _) => ipam::choose(&routes, others.clone())?,
    };
    ipam::clash(subnet, &routes, others)?;
    let id = crate::vm::new_vm_id()[2..].to_string();
    Ok(NetworkRecord {
        bridge: bridge_name(&request.name, &id),
        name: request.name.clone(),
        id,
        subnet,
        nat: request.nat,
        host_access: request.host_access,
        dns: request.dns.or(settings.dns),
        mtu: settings.mtu,
        created_at: Timestamp::now(),
    })
}

/// Makes a network's bridge and rules.
async fn build_network(
    host: &HostNetwork,
    record: &NetworkRecord,
    forwarding_marker: &Path,
) -> Result<(), NetworkError> {
    let _exclusive = host.exclusive().await;
    host.ensure_bridge(
        &record.bridge,
        record.gateway(),
        record.subnet.prefix_len(),
        record.mtu,
    )
    .await
    .map_err(host_error(&record.name))?;
    host::nft(rules::network_elements(Change::Add, &rules_of(record)))
        .await
        .map_err(host_error(&record.name))?;
    if record.nat {
        enable_forwarding(forwarding_marker);
    }
    Ok(())
}

/// Opens every other table's dropping forward chain (Docker's, firewalld's)
/// to banger's NAT networks, replacing what banger opened before: without
/// it their policy would drop the guests' traffic whatever banger's own
/// table accepts. Answers how many such chains there are.
pub(super) async fn open_foreign_forwards(
    networks: &[NetworkRules],
) -> Result<usize, HostNetError> {
    let chains = host::nft_foreign_forwards().await?;
    if chains.is_empty() {
        return Ok(0);
    }
    for chain in chains.iter().filter(|c| c.ours.is_empty()) {
        info!(family = %chain.family, table = %chain.table, chain = %chain.chain, "a forward chain of another table drops by default; banger accepts its NAT networks' traffic there");
    }
    for chain in &chains {
        let mut chain = chain.clone();
        // A table of iptables-nft (Docker's `ip filter`) gets rules in its
        // own syntax: it cannot read nft's native `ct state`, and Docker
        // manages its rules through it. Native rules an older banger put
        // there go first, so that it can read the chain again.
        let listing = if chain.family == "ip" {
            if !chain.ours.is_empty() {
                host::nft(rules::foreign_accepts(std::slice::from_ref(&chain), &[])).await?;
                chain.ours.clear();
            }
            host::iptables_listing(&chain.table, &chain.chain).await
        } else {
            None
        };
        if let Some(listing) = listing {
            let ours = rules::iptables_ours(&listing);
            let script = rules::iptables_accepts(&chain.table, &chain.chain, &ours, networks);
            match host::iptables_restore(script).await {
                Ok(()) => continue,
                // The guests' traffic must not stay dropped: native rules.
                Err(e) => {
                    warn!(table = %chain.table, chain = %chain.chain, error = %e, "iptables-nft refused banger's accepts; writing them with nft")
                }
            }
        }
        host::nft(rules::foreign_accepts(&[chain], networks)).await?;
    }
    Ok(chains.len())
}

pub(super) fn enable_forwarding(marker: &Path) {
    match host::enable_forwarding(marker) {
        Ok(true) => {
            info!(record = %marker.display(), "enabled IPv4 forwarding for banger's NAT networks; it was off, and is turned off again when the last of them goes")
        }
        Ok(false) => {}
        Err(e) => {
            error!(error = %e, "cannot enable IPv4 forwarding; NAT networks cannot reach the outside")
        }
    }
}

/// banger's last NAT network is gone: forwarding goes back to what it was.
fn restore_forwarding(marker: &Path) {
    match host::restore_forwarding(marker) {
        Ok(true) => info!(
            "turned IPv4 forwarding off again: banger turned it on, and its last NAT network is gone"
        ),
        Ok(false) => info!(
            "IPv4 forwarding stays on: banger did not turn it on (it was on before, or the host has rebooted since)"
        ),
        Err(e) => {
            error!(error = %e, "cannot turn IPv4 forwarding off again after banger's last NAT network")
        }
    }
}

/// Start-up: the networks and their leases from the store, the interface
/// group's connection, and the default network (made on first start).
/// Networking off: said once, and nothing touched.
pub struct LoadNetworks;

impl Message for LoadNetworks {
    type Result = Result<usize, NetworkError>;
}

impl Handler<LoadNetworks> for NetworkManager {
    type Result = AtomicResponse<Self, Result<usize, NetworkError>>;

    fn handle(&mut self, _: LoadNetworks, _: &mut Context<Self>) -> Self::Result {
        if let Some(reason) = &self.settings.off {
            warn!(reason = %reason, "networking is off: VMs are created without a network");
            return ready(Ok(0));
        }
        let (store, settings) = (self.store.clone(), self.settings.clone());
        AtomicResponse::new(Box::pin(
            async move {
                let host = Arc::new(
                    HostNetwork::connect(settings.group).map_err(host_error("(all)"))?,
                );
                let networks = store
                    .send(List::<NetworkRecord>::new())
                    .await
                    .map_err(|_| NetworkError::Unavailable("store"))??;
                let leases = store
                    .send(List::<LeaseRecord>::new())
                    .await
                    .map_err(|_| NetworkError::Unavailable("store"))??;
                for bad in networks.undecodable.iter().chain(&leases.undecodable) {
                    warn!(table = %bad.table, key = %bad.key, reason = %bad.reason, "a network record does not decode; it is left alone");
                }
                let quarantined: Vec<String> =
                    networks.undecodable.iter().map(|b| b.key.clone()).collect();
                let mut records = networks.records;
                // Leases of networks that are gone (and not merely
                // unreadable) are nobody's.
                for lease in &leases.records {
                    let known = records.iter().any(|n| n.name == lease.network)
                        || quarantined.contains(&lease.network);
                    if !known {
                        store
                            .send(Delete::<LeaseRecord>::new(lease.vm.clone()))
                            .await
                            .map_err(|_| NetworkError::Unavailable("store"))??;
                        info!(network = %lease.network, vm = %lease.vm_name, "removed a lease of a network that does not exist");
                    }
                }
                if quarantined.iter().any(|name| name == DEFAULT_NETWORK) {
                    warn!("the default network's record does not decode; it is not made again");
                } else if !records.iter().any(|n| n.name == DEFAULT_NETWORK) {
                    let existing: Vec<_> =
                        records.iter().map(|n| (n.name.clone(), n.subnet)).collect();
                    let request = CreateNetwork {
                        name: DEFAULT_NETWORK.into(),
                        subnet: None,
                        nat: true,
                        host_access: false,
                        dns: None,
                    };
                    let record = new_network(&host, &existing, &request, &settings).await?;
                    store
                        .send(Put(record.clone()))
                        .await
                        .map_err(|_| NetworkError::Unavailable("store"))??;
                    info!(network = %record.name, subnet = %record.subnet, bridge = %record.bridge, "created the default network");
                    records.push(record);
                }
                Ok::<_, NetworkError>((host, records, leases.records, quarantined))
            }
            .into_actor(self)
            .map(|loaded, manager, _| {
                let (host, records, leases, quarantined) = loaded?;
                manager.quarantined = quarantined;
                for record in records {
                    let own = leases
                        .iter()
                        .filter(|l| l.network == record.name)
                        .map(|l| (l.vm.clone(), l.clone()))
                        .collect();
                    manager.start_network(record, own, host.clone());
                }
                manager.host = Some(host);
                Ok(manager.networks.len())
            }),
        ))
    }
}

/// `vm create`'s network: the one named, or `default` when networking is
/// on (none when it is off), or none (`--no-network`).
pub struct Resolve {
    pub network: Option<String>,
    pub none: bool,
}

impl Message for Resolve {
    type Result = Result<Option<String>, NetworkError>;
}

impl Handler<Resolve> for NetworkManager {
    type Result = Result<Option<String>, NetworkError>;

    fn handle(&mut self, msg: Resolve, _: &mut Context<Self>) -> Self::Result {
        match (msg.network, msg.none) {
            (_, true) => Ok(None),
            (Some(name), false) => self.actor(&name).map(|_| Some(name)),
            (None, false) if self.host.is_some() => match self.actor(DEFAULT_NETWORK) {
                Ok(_) => Ok(Some(DEFAULT_NETWORK.to_string())),
                Err(NetworkError::NotFound(_)) => Err(NetworkError::NoDefault),
                Err(e) => Err(e),
            },
            (None, false) => Ok(None),
        }
    }
}

/// Forwards a VM's request to its network's actor.
macro_rules! forward {
    ($message:ty, $result:ty) => {
        impl Handler<$message> for NetworkManager {
            type Result = ResponseFuture<Result<$result, NetworkError>>;

            fn handle(&mut self, msg: $message, _: &mut Context<Self>) -> Self::Result {
                let actor = self.actor(&msg.network);
                Box::pin(async move {
                    actor?
                        .send(msg)
                        .await
                        .map_err(|_| NetworkError::Unavailable("network actor"))?
                })
            }
        }
    };
}

forward!(Lease, Ipv4Addr);
forward!(Release, ());
forward!(Attach, GuestConfig);
forward!(Detach, ());

/// `network create`.
#[derive(Debug, Clone)]
pub struct CreateNetwork {
    pub name: String,
    pub subnet: Option<Ipv4Net>,
    pub nat: bool,
    pub host_access: bool,
    pub dns: Option<Ipv4Addr>,
}

impl Message for CreateNetwork {
    type Result = Result<NetworkView, NetworkError>;
}

impl Handler<CreateNetwork> for NetworkManager {
    type Result = AtomicResponse<Self, Result<NetworkView, NetworkError>>;

    fn handle(&mut self, msg: CreateNetwork, _: &mut Context<Self>) -> Self::Result {
        let host = match self.host() {
            Ok(host) => host,
            Err(e) => return ready(Err(e)),
        };
        if self.networks.contains_key(&msg.name) {
            return ready(Err(NetworkError::Exists(msg.name)));
        }
        let existing: Vec<_> = self
            .networks
            .values()
            .map(|(r, _)| (r.name.clone(), r.subnet))
            .collect();
        let others: Vec<NetworkRules> = self.networks.values().map(|(r, _)| rules_of(r)).collect();
        let (store, settings) = (self.store.clone(), self.settings.clone());
        let building = async move {
            // Checked before anything changes: a refused network leaves
            // the host as it was.
            let record = new_network(&host, &existing, &msg, &settings).await?;
            store
                .send(Put(record.clone()))
                .await
                .map_err(|_| NetworkError::Unavailable("store"))??;
            if let Err(e) = build_network(&host, &record, &settings.forwarding_marker).await {
                // Undone: the record, then whatever of the bridge exists.
                let _ = store
                    .send(Delete::<NetworkRecord>::new(record.name.clone()))
                    .await;
                let _exclusive = host.exclusive().await;
                let _ = host.remove_link(&record.bridge).await;
                let _ =
                    host::nft(rules::network_elements(Change::Remove, &rules_of(&record))).await;
                return Err(e);
            }
            let mut all = others;
            all.push(rules_of(&record));
            {
                let _exclusive = host.exclusive().await;
                if let Err(e) = open_foreign_forwards(&all).await {
                    warn!(network = %record.name, error = %error_chain(&e), "cannot open other tables' forward chains");
                }
            }
            info!(network = %record.name, subnet = %record.subnet, bridge = %record.bridge, nat = record.nat, "network created");
            Ok((record, host))
        };
        // ctx.wait: two creates cannot both pass the clash check.
        AtomicResponse::new(Box::pin(building.into_actor(self).map(
            |built, manager, _| {
                let (record, host) = built?;
                manager.start_network(record.clone(), BTreeMap::new(), host);
                Ok(NetworkView {
                    gateway: record.gateway(),
                    capacity: ipam::capacity(record.subnet),
                    record,
                    leases: Vec::new(),
                })
            },
        )))
    }
}

/// `network ls` and `network inspect`: every network, or the one named.
pub struct ListNetworks {
    pub name: Option<String>,
}

impl Message for ListNetworks {
    type Result = Result<Vec<NetworkView>, NetworkError>;
}

impl Handler<ListNetworks> for NetworkManager {
    type Result = ResponseFuture<Result<Vec<NetworkView>, NetworkError>>;

    fn handle(&mut self, msg: ListNetworks, _: &mut Context<Self>) -> Self::Result {
        let actors: Result<Vec<_>, _> = match msg.name {
            Some(name) => self.actor(&name).map(|actor| vec![actor]),
            None => self
                .host()
                .map(|_| self.networks.values().map(|(_, a)| a.clone()).collect()),
        };
        Box::pin(async move {
            let mut views = Vec::new();
            for actor in actors? {
                views.push(
                    actor
                        .send(Describe)
                        .await
                        .map_err(|_| NetworkError::Unavailable("network actor"))?,
                );
            }
            Ok(views)
        })
    }
}

/// `network rm`: refused while any VM holds a lease on it.
pub struct RemoveNetwork {
    pub name: String,
}

impl Message for RemoveNetwork {
    type Result = Result<NetworkRecord, NetworkError>;
}

impl Handler<RemoveNetwork> for NetworkManager {
    type Result = AtomicResponse<Self, Result<NetworkRecord, NetworkError>>;

    fn handle(&mut self, msg: RemoveNetwork, _: &mut Context<Self>) -> Self::Result {
        let (actor, host) = match (self.actor(&msg.name), self.host()) {
            (Ok(actor), Ok(host)) => (actor, host),
            (Err(e), _) | (_, Err(e)) => return ready(Err(e)),
        };
        let others: Vec<NetworkRules> = self
            .networks
            .values()
            .filter(|(r, _)| r.name != msg.name)
            .map(|(r, _)| rules_of(r))
            .collect();
        // A quarantined network's bridge and rules may still forward.
        let last_nat = others.iter().all(|n| !n.nat) && self.quarantined.is_empty();
        let marker = self.settings.forwarding_marker.clone();
        let store = self.store.clone();
        let name = msg.name.clone();
        let removing = async move {
            let view = actor
                .send(Describe)
                .await
                .map_err(|_| NetworkError::Unavailable("network actor"))?;
            if !view.leases.is_empty() {
                return Err(NetworkError::InUse {
                    name: msg.name,
                    vms: view.leases.iter().map(|l| l.vm_name.clone()).collect(),
                });
            }
            let record = view.record;
            {
                let _exclusive = host.exclusive().await;
                host::nft(rules::network_elements(Change::Remove, &rules_of(&record)))
                    .await
                    .map_err(host_error(&record.name))?;
                host.remove_link(&record.bridge)
                    .await
                    .map_err(host_error(&record.name))?;
                if let Err(e) = open_foreign_forwards(&others).await {
                    warn!(network = %record.name, error = %error_chain(&e), "cannot update other tables' forward chains");
                }
            }
            store
                .send(Delete::<NetworkRecord>::new(record.name.clone()))
                .await
                .map_err(|_| NetworkError::Unavailable("store"))??;
            if record.nat && last_nat {
                restore_forwarding(&marker);
            }
            info!(network = %record.name, bridge = %record.bridge, "network removed");
            Ok(record)
        };
        // ctx.wait: no VM leases on it between the check and the removal.
        AtomicResponse::new(Box::pin(removing.into_actor(self).map(
            move |removed, manager, _| {
                if removed.is_ok() {
                    manager.networks.remove(&name);
                }
                removed
            },
        )))
    }
}
