//! Networks: a bridge with the gateway address, one tap per VM, leases
//! and nftables rules. What a network is and how it is named lives here;
//! addresses are [`ipam`] (pure), the rules are [`rules`] (pure), and every
//! change to the host goes through [`host`]. The actors that own them are
//! in `actors::netns`.

pub mod host;
pub mod ipam;
pub mod rules;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::store::Record;

/// The network every VM joins unless told otherwise.
pub const DEFAULT_NETWORK: &str = "default";
/// The default network's bridge; other bridges are named from their id.
pub const DEFAULT_BRIDGE: &str = "banger0";

/// A network as the store keeps it (table `networks`, keyed by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub name: String,
    /// Short immutable id: the bridge's name follows from it.
    pub id: String,
    pub subnet: Ipv4Net,
    pub bridge: String,
    /// Guests reach the outside through masquerading.
    pub nat: bool,
    /// Guests reach every service of the host, not only banger's.
    pub host_access: bool,
    /// The DNS server guests are given.
    pub dns: Option<Ipv4Addr>,
    pub mtu: u32,
    pub created_at: Timestamp,
}

impl NetworkRecord {
    /// The bridge's address: the subnet's first host.
    pub fn gateway(&self) -> Ipv4Addr {
        ipam::gateway(self.subnet)
    }
}

impl Record for NetworkRecord {
    const TABLE: &'static str = "networks";
    fn key(&self) -> String {
        self.name.clone()
    }
}

/// A VM's address on its network (table `leases`, keyed by the VM's id):
/// taken when the VM is created, kept across crashes, restarts and daemon
/// restarts, given back when the VM is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub vm: String,
    pub vm_name: String,
    pub network: String,
    pub address: Ipv4Addr,
    pub created_at: Timestamp,
}

impl Record for LeaseRecord {
    const TABLE: &'static str = "leases";
    fn key(&self) -> String {
        self.vm.clone()
    }
}

/// A network's bridge: `banger0` for `default`, else `bn` and its id
/// (10 bytes, within the kernel's 15).
pub fn bridge_name(network: &str, id: &str) -> String {
    if network == DEFAULT_NETWORK {
        DEFAULT_BRIDGE.to_string()
    } else {
        format!("bn{id}")
    }
}

/// A VM's tap: `bt` and the VM's id (12 bytes).
pub fn tap_name(vm_id: &str) -> String {
    format!("bt{vm_id}")
}

/// A VM's MAC, stable and derived from its id: locally administered,
/// unicast (`02:`), then the id's last eight base32 characters (40 bits,
/// random in a ULID-made id) as five bytes.
pub fn mac_of(vm_id: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let bits = vm_id
        .bytes()
        .rev()
        .take(8)
        .collect::<Vec<u8>>()
        .into_iter()
        .rev()
        .fold(0u64, |acc, c| {
            let value = ALPHABET.iter().position(|&a| a == c).unwrap_or(0) as u64;
            (acc << 5) | value
        });
    let bytes = bits.to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        bytes[3], bytes[4], bytes[5], bytes[6], bytes[7]
    )
}

/// What a network is told about a VM it carries: its tap, and the address
/// and MAC that alone may leave that tap.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guest {
    pub tap: String,
    pub mac: String,
    pub address: Ipv4Addr,
}

impl Guest {
    pub fn of(vm_id: &str, address: Ipv4Addr) -> Guest {
        Guest {
            tap: tap_name(vm_id),
            mac: mac_of(vm_id),
            address,
        }
    }
}

/// What a guest's agent configures: everything after the VM's own address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Option<Ipv4Addr>,
    pub mtu: u32,
}

impl GuestConfig {
    /// The agent's kernel-command-line parameters (`banger.*`; never the
    /// kernel's own `ip=`).
    pub fn boot_args(&self) -> String {
        let mut args = format!(
            "banger.ip={}/{} banger.gw={} banger.mtu={}",
            self.address, self.prefix, self.gateway, self.mtu
        );
        if let Some(dns) = self.dns {
            args.push_str(&format!(" banger.dns={dns}"));
        }
        args
    }
}

/// The first IPv4 nameserver of a resolv.conf that a guest can reach
/// (not loopback: a host's local resolver is not the guest's).
pub fn first_nameserver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .find(|address| !address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_gets_the_hosts_first_reachable_nameserver() {
        let text = "# x\nnameserver 127.0.0.53\nnameserver fd00::1\nnameserver 192.0.2.9\nnameserver 192.0.2.10\n";
        assert_eq!(first_nameserver(text), Some(Ipv4Addr::new(192, 0, 2, 9)));
        assert_eq!(first_nameserver("nameserver 127.0.0.1\n"), None);
    }

    #[test]
    fn names_fit_the_kernel_limit_and_macs_follow_the_id() {
        assert_eq!(bridge_name("default", "abcdefgh"), "banger0");
        assert_eq!(bridge_name("lab", "abcdefgh"), "bnabcdefgh");
        assert!(tap_name("0123456789").len() <= 15);
        assert_eq!(mac_of("xx00000000"), "02:00:00:00:00:00");
        assert_eq!(mac_of("xxzzzzzzzz"), "02:ff:ff:ff:ff:ff");
        assert_eq!(mac_of("ab00000001"), "02:00:00:00:00:01");
        assert_ne!(mac_of("abcdefghjk"), mac_of("abcdefghjm"));
    }

    #[test]
    fn guest_boot_args_name_everything_the_agent_sets() {
        let config = GuestConfig {
            address: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            dns: Some(Ipv4Addr::new(9, 9, 9, 9)),
            mtu: 1400,
        };
        assert_eq!(
            config.boot_args(),
            "banger.ip=10.0.0.2/24 banger.gw=10.0.0.1 banger.mtu=1400 banger.dns=9.9.9.9"
        );
    }
}
