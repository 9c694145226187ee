//! `NetworkActor`, one per network: its leases (written before an address
//! is handed out, deleted after it is given back), its VMs' taps and
//! anti-spoofing elements, and its leases reconciled with the VM records.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use actix::prelude::*;
use jiff::Timestamp;
use tracing::{info, warn};

use super::{NetworkError, NetworkView, host_error};
use crate::actors::store::{Delete, Put, StoreActor};
use crate::network::host::{self, HostNetwork};
use crate::network::ipam;
use crate::network::rules::{self, Change};
use crate::network::{Guest, GuestConfig, LeaseRecord, NetworkRecord};

/// One network: its record, its leases, its VMs' attachments.
pub struct NetworkActor {
    pub(super) record: NetworkRecord,
    /// Leases by VM id.
    pub(super) leases: BTreeMap<String, LeaseRecord>,
    pub(super) store: Addr<StoreActor>,
    pub(super) host: Arc<HostNetwork>,
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
    pub(super) fn view(&self) -> NetworkView {
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
pub(super) struct Describe;

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
pub(super) struct ReconcileLeases {
    /// VM id -> (name, address) of every VM record on this network.
    pub(super) claimed: HashMap<String, (String, Option<Ipv4Addr>)>,
    /// VM ids whose records do not decode: their leases stay.
    pub(super) quarantined: HashSet<String>,
    /// When the VM records were read.
    pub(super) as_of: Timestamp,
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
