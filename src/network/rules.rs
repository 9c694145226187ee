//! banger's nftables rules as text for `nft -f`, pure. Two tables, both
//! banger's alone: `inet banger` filters what guests send to the host and
//! routes through it, and masquerades; `bridge banger` holds the
//! anti-spoofing check, because frames bridged from one tap to another
//! never reach an `inet` hook (and this kernel's bridge family has no
//! `meta ibrname`, so banger's taps are a set of their own). Rules are fixed; what changes are the
//! elements of sets keyed by bridge and by VM, so attaching a VM is one
//! element, never a chain.

use std::fmt::Write as _;

use ipnet::Ipv4Net;

use super::Guest;

/// The table both families use.
pub const TABLE: &str = "banger";

/// What the rules know of one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRules {
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub nat: bool,
    pub host_access: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add,
    Remove,
}

/// The fixed part of both tables, with the elements they start with.
/// Applied as one transaction: the old tables (if any) are replaced
/// atomically, so no packet meets a half-built ruleset. `blocked` taps are
/// policed with no address allowed (a VM whose record does not decode:
/// its tap stays, its guest sends nothing).
pub fn tables(networks: &[NetworkRules], guests: &[Guest], blocked: &[String]) -> String {
    let mut script = String::new();
    // `add` then `delete`: the table goes whether or not it existed.
    for family in ["inet", "bridge"] {
        let _ = writeln!(
            script,
            "add table {family} {TABLE}\ndelete table {family} {TABLE}"
        );
    }
    script.push_str(&format!(
        r#"table inet {TABLE} {{
    set bridges {{ type ifname; }}
    set nat_bridges {{ type ifname; }}
    set host_access {{ type ifname; }}
    set own {{ type ifname . ifname; }}
    set nat_subnets {{ type ipv4_addr; flags interval; }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname @bridges ct state established,related accept
        iifname @host_access accept
        iifname @bridges drop
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname . oifname @own accept
        iifname @bridges oifname @bridges drop
        oifname @bridges ct state established,related accept
        oifname @bridges drop
        iifname @nat_bridges accept
        iifname @bridges drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr @nat_subnets oifname != @bridges masquerade
    }}
}}
table bridge {TABLE} {{
    set taps {{ type ifname; }}
    set guests {{ type ifname . ether_addr . ipv4_addr; }}
    chain prerouting {{
        type filter hook prerouting priority -200; policy accept;
        iifname @taps jump from_guest
    }}
    chain from_guest {{
        ether type arp iifname . ether saddr . arp saddr ip @guests iifname . arp saddr ether . arp saddr ip @guests accept
        ether type ip iifname . ether saddr . ip saddr @guests accept
        drop
    }}
}}
"#
    ));
    for network in networks {
        script.push_str(&network_elements(Change::Add, network));
    }
    for guest in guests {
        script.push_str(&guest_elements(Change::Add, guest));
    }
    for tap in blocked {
        elements(
            &mut script,
            Change::Add,
            "bridge",
            "taps",
            &format!("\"{tap}\""),
        );
    }
    script
}

fn elements(script: &mut String, change: Change, family: &str, set: &str, element: &str) {
    // Adding an element that exists is no error; deleting one that does
    // not is, so a removal adds first (one transaction: no window).
    let _ = writeln!(script, "add element {family} {TABLE} {set} {{ {element} }}");
    if change == Change::Remove {
        let _ = writeln!(
            script,
            "delete element {family} {TABLE} {set} {{ {element} }}"
        );
    }
}

/// A network's elements: its bridge, and what its flags allow.
pub fn network_elements(change: Change, network: &NetworkRules) -> String {
    let mut script = String::new();
    let bridge = format!("\"{}\"", network.bridge);
    elements(&mut script, change, "inet", "bridges", &bridge);
    elements(
        &mut script,
        change,
        "inet",
        "own",
        &format!("{bridge} . {bridge}"),
    );
    if network.nat {
        elements(&mut script, change, "inet", "nat_bridges", &bridge);
        elements(
            &mut script,
            change,
            "inet",
            "nat_subnets",
            &network.subnet.to_string(),
        );
    }
    if network.host_access {
        elements(&mut script, change, "inet", "host_access", &bridge);
    }
    script
}

/// A VM's element: the one address and MAC its tap may send from.
pub fn guest_elements(change: Change, guest: &Guest) -> String {
    let mut script = String::new();
    let tap = format!("\"{}\"", guest.tap);
    let element = format!("{tap} . {} . {}", guest.mac, guest.address);
    elements(&mut script, change, "bridge", "taps", &tap);
    elements(&mut script, change, "bridge", "guests", &element);
    script
}

/// Another table's forward chain whose policy drops: what banger must
/// open in it for its NAT networks, and what it opened there before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignForward {
    pub family: String,
    pub table: String,
    pub chain: String,
    /// Handles of the rules banger put there (comment `banger`).
    pub ours: Vec<u64>,
}

/// The comment that marks banger's rules in other tables' chains.
pub const FOREIGN_COMMENT: &str = "banger";

/// Replaces banger's accepts in other tables' dropping forward chains (a
/// Docker or firewalld host): for each NAT network, its guests' traffic
/// out and the answers back in, matched by bridge name, first in the
/// chain; nothing else. One transaction.
pub fn foreign_accepts(chains: &[ForeignForward], networks: &[NetworkRules]) -> String {
    let mut script = String::new();
    for chain in chains {
        let at = format!("{} {} {}", chain.family, chain.table, chain.chain);
        for handle in &chain.ours {
            let _ = writeln!(script, "delete rule {at} handle {handle}");
        }
        for network in networks.iter().filter(|n| n.nat) {
            let bridge = &network.bridge;
            let _ = writeln!(
                script,
                "insert rule {at} oifname \"{bridge}\" ct state established,related accept comment \"{FOREIGN_COMMENT}\""
            );
            let _ = writeln!(
                script,
                "insert rule {at} iifname \"{bridge}\" accept comment \"{FOREIGN_COMMENT}\""
            );
        }
    }
    script
}

/// The same accepts for a chain of a table that iptables-nft manages (an
/// `ip` table: Docker's `filter`), as an `iptables-nft-restore --noflush`
/// script, so that iptables-nft can still list and save the chain (it
/// cannot read nft's native `ct state`). `ours`: banger's rules there now,
/// as `iptables -S` prints them; they go in the same transaction.
pub fn iptables_accepts(
    table: &str,
    chain: &str,
    ours: &[String],
    networks: &[NetworkRules],
) -> String {
    let mut script = format!("*{table}\n");
    for rule in ours {
        if let Some(spec) = rule.strip_prefix("-A ") {
            let _ = writeln!(script, "-D {spec}");
        }
    }
    for network in networks.iter().filter(|n| n.nat) {
        let bridge = &network.bridge;
        let _ = writeln!(
            script,
            "-I {chain} 1 -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment {FOREIGN_COMMENT} -j ACCEPT"
        );
        let _ = writeln!(
            script,
            "-I {chain} 1 -i {bridge} -m comment --comment {FOREIGN_COMMENT} -j ACCEPT"
        );
    }
    script.push_str("COMMIT\n");
    script
}

/// banger's rules among a chain's `iptables -S` lines.
pub fn iptables_ours(listing: &str) -> Vec<String> {
    let marker = format!("-m comment --comment {FOREIGN_COMMENT} ");
    listing
        .lines()
        .filter(|line| line.starts_with("-A ") && line.contains(&marker))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn network(nat: bool, host_access: bool) -> NetworkRules {
        NetworkRules {
            bridge: "banger0".into(),
            subnet: "172.30.0.0/24".parse().expect("net"),
            nat,
            host_access,
        }
    }

    #[test]
    fn a_network_adds_only_the_sets_its_flags_name() {
        let plain = network_elements(Change::Add, &network(false, false));
        assert!(plain.contains("add element inet banger bridges { \"banger0\" }"));
        assert!(plain.contains("own { \"banger0\" . \"banger0\" }"));
        assert!(!plain.contains("nat_") && !plain.contains("host_access"));
        let all = network_elements(Change::Add, &network(true, true));
        assert!(all.contains("nat_subnets { 172.30.0.0/24 }"));
        assert!(all.contains("host_access { \"banger0\" }"));
        assert!(!all.contains("delete"));
    }

    #[test]
    fn a_removal_cannot_fail_on_a_missing_element() {
        let guest = Guest::of("abcdefghjk", Ipv4Addr::new(172, 30, 0, 2));
        let script = guest_elements(Change::Remove, &guest);
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[1],
            "delete element bridge banger taps { \"btabcdefghjk\" }"
        );
        assert!(lines[2].starts_with("add element bridge banger guests { \"btabcdefghjk\" . 02:"));
        assert!(lines[3].starts_with("delete element bridge banger guests"));
        assert!(lines[3].ends_with(". 172.30.0.2 }"));
    }

    #[test]
    fn an_iptables_chain_gets_the_same_accepts_in_its_own_syntax_in_one_commit() {
        let listing = "-P FORWARD DROP\n\
            -A FORWARD -i banger0 -m comment --comment banger -j ACCEPT\n\
            -A FORWARD -j DOCKER-USER\n\
            -A FORWARD -i eth0 -m comment --comment bangers -j ACCEPT\n";
        let ours = iptables_ours(listing);
        assert_eq!(
            ours,
            ["-A FORWARD -i banger0 -m comment --comment banger -j ACCEPT"]
        );
        let mut isolated = network(false, false);
        isolated.bridge = "banger1".into();
        let script = iptables_accepts(
            "filter",
            "FORWARD",
            &ours,
            &[network(true, false), isolated],
        );
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines.first(), Some(&"*filter"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert_eq!(
            lines[1],
            "-D FORWARD -i banger0 -m comment --comment banger -j ACCEPT"
        );
        assert!(
            lines[2]
                .starts_with("-I FORWARD 1 -o banger0 -m conntrack --ctstate RELATED,ESTABLISHED")
        );
        assert_eq!(
            lines[3],
            "-I FORWARD 1 -i banger0 -m comment --comment banger -j ACCEPT"
        );
        assert_eq!(lines.len(), 5, "{script}");
    }

    #[test]
    fn foreign_dropping_chains_get_narrow_accepts_for_nat_networks_only() {
        let chain = ForeignForward {
            family: "ip".into(),
            table: "filter".into(),
            chain: "FORWARD".into(),
            ours: vec![7],
        };
        let mut isolated = network(false, false);
        isolated.bridge = "bnisolated".into();
        let script = foreign_accepts(&[chain], &[network(true, false), isolated]);
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "delete rule ip filter FORWARD handle 7");
        assert_eq!(
            lines[2],
            "insert rule ip filter FORWARD iifname \"banger0\" accept comment \"banger\""
        );
        assert!(lines[1].contains("oifname \"banger0\" ct state established,related accept"));
        assert_eq!(lines.len(), 3, "{script}");
    }

    #[test]
    fn the_tables_are_replaced_whole() {
        let script = tables(&[network(true, false)], &[], &["btquarantin".into()]);
        assert!(script.starts_with("add table inet banger\ndelete table inet banger\n"));
        assert!(script.contains("table bridge banger {"));
        assert!(script.contains("nat_subnets { 172.30.0.0/24 }"));
        assert!(script.contains("add element bridge banger taps { \"btquarantin\" }"));
        assert!(!script.contains("guests { \"btquarantin\""));
    }
}
