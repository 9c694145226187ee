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
//!
//! Its parts: `network` (`NetworkActor`: leases, attach, detach),
//! `manager` (`NetworkManager`: create, list, remove, load, forwarding) and
//! `reconcile` (the host brought back to the records).

mod manager;
mod network;
mod reconcile;

pub use manager::{
    CreateNetwork, ListNetworks, LoadNetworks, NetworkManager, RemoveNetwork, Resolve,
};
pub use network::{Attach, Detach, Lease, NetworkActor, Release};
pub use reconcile::{ReconcileNetworks, ReconcileReport};

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::actors::records::StoreFailure;
use crate::network::host::HostNetError;
use crate::network::ipam::SubnetError;
use crate::network::rules::NetworkRules;
use crate::network::{LeaseRecord, NetworkRecord};
use crate::store::StoreError;

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
    Store(StoreFailure),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
}

impl From<StoreError> for NetworkError {
    fn from(e: StoreError) -> NetworkError {
        NetworkError::Store(e.into())
    }
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
