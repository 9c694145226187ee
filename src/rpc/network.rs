//! The `network.*` methods: create, list, inspect, remove, reconcile. They
//! ask the network manager.

use actix::Addr;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::protocol::{ErrorCode, Params, RpcError, requests};
use super::wire::Wire;
use crate::actors::netns::{
    CreateNetwork, ListNetworks, NetworkManager, NetworkView, ReconcileNetworks, ReconcileReport,
    RemoveNetwork,
};
use crate::network::NetworkRecord;
use crate::network::ipam::parse_subnet;
use crate::vm::validate_name;

requests! {
    /// Requests about networks.
    pub enum Request {
        Create(NetworkCreateParams) => "network.create",
            "Create a network: a bridge with its gateway, leases for its VMs, NAT unless no_nat.";
        List => "network.list", "Every network, with its leases.";
        Get(NetworkRef) => "network.get", "One network in detail, with its leases.";
        Remove(NetworkRef) => "network.remove", "Remove a network no VM uses.";
        Reconcile => "network.reconcile",
            "Hold the host's bridges, taps, nftables elements and leases against the records: remove what none claims, recreate what is missing.";
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreateParams {
    pub name: String,
    /// An IPv4 network, e.g. `10.10.0.0/24`; when absent, the first free
    /// /24 that clashes with nothing.
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub no_nat: bool,
    /// Guests reach every service of the host, not only banger's.
    #[serde(default)]
    pub host_access: bool,
    /// The DNS server guests are given (default: the daemon's).
    #[serde(default)]
    pub dns: Option<String>,
}

impl Params for NetworkCreateParams {
    fn validate(&self) -> Result<(), RpcError> {
        validate_name("name", &self.name)?;
        if let Some(subnet) = &self.subnet {
            parse_subnet(subnet).map_err(|e| RpcError::invalid_params("subnet", e))?;
        }
        if let Some(dns) = &self.dns {
            dns.parse::<std::net::Ipv4Addr>()
                .map_err(|_| RpcError::invalid_params("dns", "is not an IPv4 address"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRef {
    pub name: String,
}

impl Params for NetworkRef {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkResult {
    pub network: NetworkView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworksResult {
    pub networks: Vec<NetworkView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedResult {
    pub network: NetworkRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconcileResult {
    pub reconciled: ReconcileReport,
}

/// What the network handlers reach.
pub struct NetworkServices {
    pub networks: Addr<NetworkManager>,
}

pub async fn handle(
    services: &NetworkServices,
    wire: &Wire<'_>,
    request: Request,
) -> Result<Box<RawValue>, RpcError> {
    let networks = &services.networks;
    match request {
        Request::Create(params) => {
            let name = params.name.clone();
            let create = CreateNetwork {
                subnet: params
                    .subnet
                    .as_deref()
                    .map(parse_subnet)
                    .transpose()
                    .map_err(|e| RpcError::invalid_params("subnet", e))?,
                name: params.name,
                nat: !params.no_nat,
                host_access: params.host_access,
                dns: params.dns.as_deref().and_then(|d| d.parse().ok()),
            };
            let network = wire
                .operation("network.create", &name, async {
                    Ok(networks.send(create).await??)
                })
                .await?;
            wire.answer(NetworkResult { network })
        }
        Request::List => {
            let networks = networks.send(ListNetworks { name: None }).await??;
            wire.answer(NetworksResult { networks })
        }
        Request::Get(NetworkRef { name }) => {
            let network = networks
                .send(ListNetworks { name: Some(name) })
                .await??
                .into_iter()
                .next()
                .ok_or_else(|| RpcError::new(ErrorCode::Internal, "the network vanished"))?;
            wire.answer(NetworkResult { network })
        }
        Request::Remove(NetworkRef { name }) => {
            let network = wire
                .operation("network.remove", &name.clone(), async {
                    Ok(networks.send(RemoveNetwork { name }).await??)
                })
                .await?;
            wire.answer(RemovedResult { network })
        }
        Request::Reconcile => {
            let reconciled = wire
                .operation("network.reconcile", "networks", async {
                    Ok(networks.send(ReconcileNetworks).await??)
                })
                .await?;
            wire.answer(ReconcileResult { reconciled })
        }
    }
}
