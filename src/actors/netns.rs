//! `NetworkActor`, one per network, and `NetworkManager`, which creates,
//! finds, lists and removes them and reconciles the host with the records.
//!
//! A NetworkActor owns its network's leases (the store's `leases` table is
//! written before an address is handed out, and deleted after it is given
//! back) and carries out its VMs' attach and detach: the tap, then the
//! VM's anti-spoofing element. The manager owns what is shared: the
//! nftables tables and the interface group. Every change to the host goes
//! through `network::host` one at a time, so a reconciliation never
//! interleaves with an attach. Both actors run under an actix `Supervisor`
//! and keep nothing that the store and the host cannot give back.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::prelude::*;
use ipnet::Ipv4Net;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::actors::store::{Delete, List, Put, StoreActor};
use crate::error_chain;
use crate::network::host::{self, HostNetError, HostNetwork};
use crate::network::ipam::{self, SubnetError};
use crate::network::rules::{self, Change, NetworkRules};
use crate::network::{
    DEFAULT_NETWORK, Guest, GuestConfig, LeaseRecord, NetworkRecord, bridge_name,
};
use crate::store::{Listing, StoreError};
use crate::vm::ledger::Resource;
use crate::vm::record::{VmRecord, VmmKind};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("networking is off: {0}")]
    Off(String),
    #[error("no network named {0}; `banger network ls` lists them")]
    NotFound(String),
    #[error(
        "the default network was removed; `banger network create default` makes it again (so does the daemon's next start), or give --network NAME or --no-network"
    )]
    NoDefault,
    #[error("a network named {0} already exists")]
    Exists(String),
    #[error(transparent)]
    Subnet(#[from] SubnetError),
    #[error("network {name} is used by VM {vms}; remove the VMs first", vms = vms.join(", VM "))]
    InUse { name: String, vms: Vec<String> },
    #[error(
        "network {name} has no free address ({leased} of {capacity} leased); remove a VM or use a network with a larger subnet"
    )]
    Exhausted {
        name: String,
        leased: usize,
        capacity: u64,
    },
    #[error("VM {vm} holds no lease on network {network}")]
    NoLease { vm: String, network: String },
    #[error("network {name}")]
    Host {
        name: String,
        #[source]
        source: Box<HostNetError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
}

/// How networks are made, from the configuration.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// Why networking is off (configuration, or no CAP_NET_ADMIN).
    pub off: Option<String>,
    /// The default network's subnet; chosen to clash with nothing when
    /// not configured.
    pub default_subnet: Option<Ipv4Net>,
    pub dns: Option<Ipv4Addr>,
    pub mtu: u32,
    pub group: u32,
    /// Who a Firecracker VM's tap belongs to (the jailer's uid, when VMs
    /// run jailed).
    pub jailed_owner: Option<u32>,
    /// Says that banger turned IPv4 forwarding on, for as long as it is
    /// banger's to turn off again.
    pub forwarding_marker: PathBuf,
}

/// A network with its leases, as `network ls` and `network inspect` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    #[serde(flatten)]
    pub record: NetworkRecord,
    pub gateway: Ipv4Addr,
    pub capacity: u64,
    pub leases: Vec<LeaseRecord>,
}

fn rules_of(record: &NetworkRecord) -> NetworkRules {
    NetworkRules {
        bridge: record.bridge.clone(),
        subnet: record.subnet,
        nat: record.nat,
        host_access: record.host_access,
    }
}

fn host_error(name: &str) -> impl FnOnce(HostNetError) -> NetworkError + '_ {
    move |source| NetworkError::Host {
        name: name.to_string(),
        source: Box::new(source),
    }
}

/// One network: its record, its leases, its VMs' attachments.
pub struct NetworkActor {
    record: NetworkRecord,
    /// Leases by VM id.
    leases: BTreeMap<String, LeaseRecord>,
    store: Addr<StoreActor>,
    host: Arc<HostNetwork>,
}

impl Actor for NetworkActor {
    type Context = Context<Self>;
}

impl Supervised for NetworkActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!(network = %self.record.name, "network actor restarting");
    }
}

impl NetworkActor {
    fn view(&self) -> NetworkView {
        NetworkView {
            record: self.record.clone(),
            gateway: self.record.gateway(),
            capacity: ipam::capacity(self.record.subnet),
            leases: self.leases.values().cloned().collect(),
        }
    }

    fn guest_config(&self, address: Ipv4Addr) -> GuestConfig {
        GuestConfig {
            address,
            prefix: self.record.subnet.prefix_len(),
            gateway: self.record.gateway(),
            dns: self.record.dns,
            mtu: self.record.mtu,
        }
    }
}

/// The address of VM `vm` on this network: its lease if it holds one,
/// else the first free address, durable before it is answered.
pub struct Lease {
    pub network: String,
    pub vm: String,
    pub vm_name: String,
}

impl Message for Lease {
    type Result = Result<Ipv4Addr, NetworkError>;
}

impl Handler<Lease> for NetworkActor {
    type Result = ResponseFuture<Result<Ipv4Addr, NetworkError>>;

    fn handle(&mut self, msg: Lease, _: &mut Context<Self>) -> Self::Result {
        if let Some(lease) = self.leases.get(&msg.vm) {
            let address = lease.address;
            return Box::pin(async move { Ok(address) });
        }
        let leased: BTreeSet<Ipv4Addr> = self.leases.values().map(|l| l.address).collect();
        let Some(address) = ipam::first_free(self.record.subnet, &leased) else {
            let error = NetworkError::Exhausted {
                name: self.record.name.clone(),
                leased: leased.len(),
                capacity: ipam::capacity(self.record.subnet),
            };
            return Box::pin(async move { Err(error) });
        };
        let lease = LeaseRecord {
            vm: msg.vm.clone(),
            vm_name: msg.vm_name,
            network: self.record.name.clone(),
            address,
            created_at: Timestamp::now(),
        };
        // Taken at once, so no concurrent lease picks the same address; a
        // write that fails gives it back (`Release` of the same VM).
        self.leases.insert(msg.vm, lease.clone());
        let store = self.store.clone();
        Box::pin(async move {
            store
                .send(Put(lease))
                .await
                .map_err(|_| NetworkError::Unavailable("store"))??;
            Ok(address)
        })
    }
}

/// Gives VM `vm`'s address back (its record is going); none is fine.
pub struct Release {
    pub network: String,
    pub vm: String,
}

impl Message for Release {
    type Result = Result<(), NetworkError>;
}

impl Handler<Release> for NetworkActor {
    type Result = ResponseFuture<Result<(), NetworkError>>;

    fn handle(&mut self, msg: Release, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let had = self.leases.remove(&msg.vm);
        Box::pin(async move {
            // Deleted whether or not this actor held it: a failed write
            // may have left it in the store.
            store
                .send(Delete::<LeaseRecord>::new(msg.vm))
                .await
                .map_err(|_| NetworkError::Unavailable("store"))??;
            if let Some(lease) = had {
                info!(network = %lease.network, vm = %lease.vm_name, address = %lease.address, "lease released");
            }
            Ok(())
        })
    }
}

/// Makes VM `vm`'s tap and lets its leased address and MAC leave it;
/// answers what its agent configures. Idempotent.
pub struct Attach {
    pub network: String,
    pub vm: String,
    pub guest: Guest,
    /// The uid that may open the tap without privileges (a jailed VMM).
    pub owner: Option<u32>,
}

impl Message for Attach {
    type Result = Result<GuestConfig, NetworkError>;
}

impl Handler<Attach> for NetworkActor {
    type Result = ResponseFuture<Result<GuestConfig, NetworkError>>;

    fn handle(&mut self, msg: Attach, _: &mut Context<Self>) -> Self::Result {
        let name = self.record.name.clone();
        // Only the address this network leased to this VM may be let out.
        if self.leases.get(&msg.vm).map(|l| l.address) != Some(msg.guest.address) {
            let error = NetworkError::NoLease {
                vm: msg.vm,
                network: name,
            };
            return Box::pin(async move { Err(error) });
        }
        let config = self.guest_config(msg.guest.address);
        let (host, bridge, mtu) = (
            self.host.clone(),
            self.record.bridge.clone(),
            self.record.mtu,
        );
        Box::pin(async move {
            let started = std::time::Instant::now();
            let _exclusive = host.exclusive().await;
            // The element names the tap and needs nothing of it: both at
            // once (a failure of either fails the attach; detach undoes both).
            let (tapped, allowed) = tokio::join!(
                host.ensure_tap(&msg.guest.tap, &bridge, mtu, msg.owner),
                host::nft(rules::guest_elements(Change::Add, &msg.guest)),
            );
            tapped.and(allowed).map_err(host_error(&name))?;
            let us = started.elapsed().as_micros() as u64;
            info!(network = %name, tap = %msg.guest.tap, address = %msg.guest.address, us, "VM attached");
            Ok(config)
        })
    }
}

/// Removes a VM's tap and its element (the VM stopped for good, or goes).
pub struct Detach {
    pub network: String,
    pub guest: Guest,
}

impl Message for Detach {
    type Result = Result<(), NetworkError>;
}

impl Handler<Detach> for NetworkActor {
    type Result = ResponseFuture<Result<(), NetworkError>>;

    fn handle(&mut self, msg: Detach, _: &mut Context<Self>) -> Self::Result {
        let (host, name) = (self.host.clone(), self.record.name.clone());
        Box::pin(async move {
            let _exclusive = host.exclusive().await;
            host::nft(rules::guest_elements(Change::Remove, &msg.guest))
                .await
                .map_err(host_error(&name))?;
            host.remove_link(&msg.guest.tap)
                .await
                .map_err(host_error(&name))
        })
    }
}

/// The network as it stands.
struct Describe;

impl Message for Describe {
    type Result = NetworkView;
}

impl Handler<Describe> for NetworkActor {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.view())
    }
}

/// Reconciliation of the leases: those no VM record claims go (unless
/// taken after the records were read); a VM record's address whose lease
/// is missing is leased again, unless another VM holds it. Answers how many
/// of each.
struct ReconcileLeases {
    /// VM id -> (name, address) of every VM record on this network.
    claimed: HashMap<String, (String, Option<Ipv4Addr>)>,
    /// VM ids whose records do not decode: their leases stay.
    quarantined: HashSet<String>,
    /// When the VM records were read.
    as_of: Timestamp,
}

impl Message for ReconcileLeases {
    type Result = Result<(usize, usize), NetworkError>;
}

impl Handler<ReconcileLeases> for NetworkActor {
    type Result = ResponseFuture<Result<(usize, usize), NetworkError>>;

    fn handle(&mut self, msg: ReconcileLeases, _: &mut Context<Self>) -> Self::Result {
        let stray: Vec<LeaseRecord> = self
            .leases
            .values()
            .filter(|l| !msg.claimed.contains_key(&l.vm) && !msg.quarantined.contains(&l.vm))
            .filter(|l| l.created_at < msg.as_of)
            .cloned()
            .collect();
        for lease in &stray {
            self.leases.remove(&lease.vm);
        }
        let mut missing = Vec::new();
        for (vm, (vm_name, address)) in msg.claimed {
            let Some(address) = address else { continue };
            if self.leases.contains_key(&vm) {
                continue;
            }
            let holder = self.leases.values().find(|l| l.address == address);
            if let Some(holder) = holder {
                warn!(network = %self.record.name, vm = %vm_name, address = %address, holder = %holder.vm_name, "a VM's address is leased to another VM; not leasing it twice");
                continue;
            }
            if !self.record.subnet.contains(&address) || address == self.record.gateway() {
                warn!(network = %self.record.name, vm = %vm_name, address = %address, "a VM's address is not one of its network's; not leasing it");
                continue;
            }
            let lease = LeaseRecord {
                vm: vm.clone(),
                vm_name,
                network: self.record.name.clone(),
                address,
                created_at: Timestamp::now(),
            };
            self.leases.insert(vm, lease.clone());
            missing.push(lease);
        }
        let store = self.store.clone();
        Box::pin(async move {
            for lease in &stray {
                store
                    .send(Delete::<LeaseRecord>::new(lease.vm.clone()))
                    .await
                    .map_err(|_| NetworkError::Unavailable("store"))??;
                info!(network = %lease.network, vm = %lease.vm_name, address = %lease.address, "removed a lease no VM record claims");
            }
            for lease in &missing {
                store
                    .send(Put(lease.clone()))
                    .await
                    .map_err(|_| NetworkError::Unavailable("store"))??;
                info!(network = %lease.network, vm = %lease.vm_name, address = %lease.address, "recreated a VM's missing lease");
            }
            Ok((stray.len(), missing.len()))
        })
    }
}

/// Finds networks by name; creates, lists, removes and reconciles them.
pub struct NetworkManager {
    store: Addr<StoreActor>,
    settings: NetworkSettings,
    host: Option<Arc<HostNetwork>>,
    networks: BTreeMap<String, (NetworkRecord, Addr<NetworkActor>)>,
    /// Networks whose records do not decode: their bridges are left alone.
    quarantined: Vec<String>,
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

    fn host(&self) -> Result<Arc<HostNetwork>, NetworkError> {
        match (&self.host, &self.settings.off) {
            (Some(host), _) => Ok(host.clone()),
            (None, Some(reason)) => Err(NetworkError::Off(reason.clone())),
            (None, None) => Err(NetworkError::Off("the networks are not loaded yet".into())),
        }
    }

    fn actor(&self, name: &str) -> Result<Addr<NetworkActor>, NetworkError> {
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
fn ready<T: 'static>(value: T) -> AtomicResponse<NetworkManager, T> {
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
async fn open_foreign_forwards(networks: &[NetworkRules]) -> Result<usize, HostNetError> {
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

fn enable_forwarding(marker: &Path) {
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
