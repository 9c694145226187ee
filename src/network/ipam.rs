//! Addresses, pure: which subnets a network may have, and which address a
//! VM gets. The host's routes and the other networks are passed in.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The shortest prefix a network may have (a /8 is 16 million leases).
pub const MIN_PREFIX: u8 = 8;
/// The longest: a /30 holds the gateway and one VM.
pub const MAX_PREFIX: u8 = 30;

/// Where the default network goes when the configuration names no subnet:
/// the first of these that clashes with nothing on the host.
pub const DEFAULT_CANDIDATES: &[&str] = &[
    "172.30.0.0/24",
    "172.31.0.0/24",
    "10.222.0.0/24",
    "10.233.0.0/24",
    "192.168.222.0/24",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("invalid subnet {text:?}: expected an IPv4 network such as 10.10.0.0/24")]
    Syntax { text: String },
    #[error("invalid subnet {subnet}: it is not a network address; did you mean {network}?")]
    NotNetwork { subnet: Ipv4Net, network: Ipv4Net },
    #[error("invalid subnet {subnet}: the prefix must be between /{MIN_PREFIX} and /{MAX_PREFIX}")]
    Size { subnet: Ipv4Net },
    #[error("invalid subnet {subnet}: it overlaps {what}")]
    Clash { subnet: Ipv4Net, what: String },
}

/// A route or address of the host that a network must not overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: Ipv4Net,
    /// Its device, for messages.
    pub device: String,
    /// An address on `device` rather than a route to it.
    pub address: bool,
}

/// `--subnet`: an IPv4 network address with a prefix between the bounds.
pub fn parse_subnet(text: &str) -> Result<Ipv4Net, SubnetError> {
    let subnet: Ipv4Net = text.trim().parse().map_err(|_| SubnetError::Syntax {
        text: text.to_string(),
    })?;
    if subnet.addr() != subnet.network() {
        return Err(SubnetError::NotNetwork {
            subnet,
            network: subnet.trunc(),
        });
    }
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&subnet.prefix_len()) {
        return Err(SubnetError::Size { subnet });
    }
    Ok(subnet)
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// What `subnet` overlaps: another network of banger's (by name), or a
/// route or address of the host. Default routes overlap everything and
/// are not counted.
pub fn clash<'a>(
    subnet: Ipv4Net,
    routes: &[HostRoute],
    networks: impl IntoIterator<Item = (&'a str, Ipv4Net)>,
) -> Result<(), SubnetError> {
    for (name, other) in networks {
        if overlaps(subnet, other) {
            return Err(SubnetError::Clash {
                subnet,
                what: format!("network {name} ({other})"),
            });
        }
    }
    for route in routes {
        if route.destination.prefix_len() > 0 && overlaps(subnet, route.destination) {
            let kind = if route.address {
                "the address"
            } else {
                "the host route"
            };
            return Err(SubnetError::Clash {
                subnet,
                what: format!("{kind} {} on {}", route.destination, route.device),
            });
        }
    }
    Ok(())
}

/// A subnet for a network created without one: the first of the default
/// candidates, then of 10.100.0.0/24 to 10.254.0.0/24, that clashes with
/// nothing on the host and no other network; or the reason none fits.
pub fn choose<'a>(
    routes: &[HostRoute],
    networks: impl IntoIterator<Item = (&'a str, Ipv4Net)> + Clone,
) -> Result<Ipv4Net, SubnetError> {
    let fixed = DEFAULT_CANDIDATES.iter().filter_map(|c| c.parse().ok());
    let more = (100..=254u8).map(|n| Ipv4Net::new(Ipv4Addr::new(10, n, 0, 0), 24));
    let mut last = None;
    for subnet in fixed.chain(more.filter_map(Result::ok)) {
        match clash(subnet, routes, networks.clone()) {
            Ok(()) => return Ok(subnet),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(SubnetError::Syntax {
        text: String::new(),
    }))
}

/// The gateway: the subnet's first host address.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// How many VMs a subnet holds: every host address but the gateway.
pub fn capacity(subnet: Ipv4Net) -> u64 {
    (1u64 << (32 - subnet.prefix_len())).saturating_sub(3)
}

/// The lowest address after the gateway that no lease holds.
pub fn first_free(subnet: Ipv4Net, leased: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(gateway(subnet)) + 1;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    // Leases are sorted: walk them until a gap.
    let mut next = first;
    for address in leased.range(Ipv4Addr::from(first)..) {
        let address = u32::from(*address);
        if address > next {
            break;
        }
        next = address + 1;
    }
    (next <= last).then(|| Ipv4Addr::from(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Ipv4Net {
        text.parse().expect("net")
    }

    #[test]
    fn subnets_are_network_addresses_of_a_usable_size() {
        assert_eq!(parse_subnet("10.1.0.0/16"), Ok(net("10.1.0.0/16")));
        assert!(matches!(
            parse_subnet("10.1.0.5/16"),
            Err(SubnetError::NotNetwork { network, .. }) if network == net("10.1.0.0/16")
        ));
        assert!(matches!(
            parse_subnet("10.0.0.0/31"),
            Err(SubnetError::Size { .. })
        ));
        assert!(matches!(
            parse_subnet("10.0.0.0/7"),
            Err(SubnetError::Size { .. })
        ));
        for bad in ["10.0.0.0", "banana", "10.0.0.0/33", "fd00::/64", ""] {
            assert!(
                matches!(parse_subnet(bad), Err(SubnetError::Syntax { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn clashes_name_the_network_or_route() {
        let routes = [
            HostRoute {
                destination: net("0.0.0.0/0"),
                device: "eth0".into(),
                address: false,
            },
            HostRoute {
                destination: net("192.168.1.0/24"),
                device: "eth0".into(),
                address: false,
            },
        ];
        assert_eq!(clash(net("10.0.0.0/24"), &routes, []), Ok(()));
        let err = clash(net("192.168.0.0/16"), &routes, []).expect_err("clash");
        assert!(
            err.to_string()
                .contains("host route 192.168.1.0/24 on eth0"),
            "{err}"
        );
        let err =
            clash(net("10.0.0.128/25"), &routes, [("lab", net("10.0.0.0/24"))]).expect_err("clash");
        assert!(
            err.to_string().contains("network lab (10.0.0.0/24)"),
            "{err}"
        );
    }

    #[test]
    fn the_default_subnet_avoids_the_host() {
        let taken = |text: &str| HostRoute {
            destination: net(text),
            device: "eth0".into(),
            address: true,
        };
        assert_eq!(choose(&[], []), Ok(net("172.30.0.0/24")));
        assert_eq!(
            choose(&[taken("172.16.0.0/12")], []),
            Ok(net("10.222.0.0/24"))
        );
        let everything = [
            taken("172.16.0.0/12"),
            taken("10.0.0.0/8"),
            taken("192.168.0.0/16"),
        ];
        assert!(choose(&everything, []).is_err());
        let mut most = everything.to_vec();
        most[1] = taken("10.0.0.0/9");
        assert_eq!(choose(&most, []), Ok(net("10.222.0.0/24")));
        // Other networks count as taken too.
        assert_eq!(
            choose(&[], [("default", net("172.30.0.0/24"))]),
            Ok(net("172.31.0.0/24"))
        );
    }

    #[test]
    fn leases_fill_the_first_gap_after_the_gateway() {
        let subnet = net("10.0.0.0/29");
        assert_eq!(gateway(subnet), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(capacity(subnet), 5);
        let mut leased = BTreeSet::new();
        for expected in 2..=6 {
            let address = first_free(subnet, &leased).expect("free");
            assert_eq!(address, Ipv4Addr::new(10, 0, 0, expected));
            leased.insert(address);
        }
        assert_eq!(first_free(subnet, &leased), None);
        leased.remove(&Ipv4Addr::new(10, 0, 0, 4));
        assert_eq!(
            first_free(subnet, &leased),
            Some(Ipv4Addr::new(10, 0, 0, 4))
        );
        assert_eq!(
            first_free(net("10.0.0.0/30"), &BTreeSet::new()),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
    }
}
