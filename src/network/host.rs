//! Every change banger makes to the host's network: links and addresses
//! through rtnetlink, taps through the tun driver's ioctls (the kernel
//! refuses tun creation over rtnetlink), rules through `nft -f`, and IPv4
//! forwarding through its sysctl. Never `ip`. Each bridge and tap joins
//! banger's interface group, which is how banger knows its own and how it
//! removes many at once (one request for the whole group). Changes are
//! made one at a time ([`HostNetwork::exclusive`]), so a reconciliation
//! never interleaves with an attach.

use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use nix::libc;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};
use tokio::sync::{Mutex, MutexGuard};

use super::Guest;
use super::ipam::HostRoute;
use super::rules::ForeignForward;

#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error("netlink: cannot {action} {name}")]
    Netlink {
        action: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot create the tap {name}")]
    Tap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "a link named {name} exists and is not banger's (not in interface group {group}); rename or remove it"
    )]
    Foreign { name: String, group: u32 },
    #[error("nft refused banger's rules: {stderr}")]
    Nft { stderr: String },
    #[error("iptables-nft-restore refused banger's accepts: {stderr}")]
    Iptables { stderr: String },
    #[error("cannot run nft; install nftables (scripts/prerequisites.sh does)")]
    NftMissing(#[source] io::Error),
    #[error("cannot open the netlink socket")]
    Connect(#[source] io::Error),
    #[error("the blocking thread pool is gone")]
    Pool,
}

/// One of the host's links as banger sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub group: u32,
}

fn link_of(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        group: 0,
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Group(group) => link.group = group,
            _ => {}
        }
    }
    link
}

pub struct HostNetwork {
    handle: Handle,
    group: u32,
    changes: Mutex<()>,
}

const EEXIST: i32 = libc::EEXIST;

fn is_errno(error: &rtnetlink::Error, errno: i32) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(message)
        if message.code.is_some_and(|code| code.get() == -errno))
}

/// A request whose one harmless failure (`errno`: it exists already, it is
/// gone already) counts as done.
fn allowing(
    errno: i32,
    result: Result<(), rtnetlink::Error>,
    action: &'static str,
    name: &str,
) -> Result<(), HostNetError> {
    match result {
        Err(e) if !is_errno(&e, errno) => Err(HostNetError::Netlink {
            action,
            name: name.to_string(),
            source: e,
        }),
        _ => Ok(()),
    }
}

impl HostNetwork {
    /// A netlink connection, driven on the current runtime. Every link
    /// banger makes joins `group`; strays are swept through `group + 1`.
    pub fn connect(group: u32) -> Result<HostNetwork, HostNetError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(HostNetError::Connect)?;
        tokio::spawn(connection);
        Ok(HostNetwork {
            handle,
            group,
            changes: Mutex::new(()),
        })
    }

    pub fn group(&self) -> u32 {
        self.group
    }

    /// Held for a change to the host: one at a time.
    pub async fn exclusive(&self) -> MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// Every link of the host.
    pub async fn links(&self) -> Result<Vec<Link>, HostNetError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| HostNetError::Netlink {
                action: "list",
                name: "links".into(),
                source,
            })?;
        Ok(messages.into_iter().map(link_of).collect())
    }

    /// The link named `name`, asked for by name: one message, however
    /// many links the host has.
    async fn find(&self, name: &str) -> Result<Option<Link>, HostNetError> {
        let found = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match found {
            Ok(message) => Ok(message.map(link_of)),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(source) => Err(HostNetError::Netlink {
                action: "find",
                name: name.to_string(),
                source,
            }),
        }
    }

    /// banger's link named `name`, or none; one of that name outside
    /// banger's group is an error, never touched.
    async fn own(&self, name: &str) -> Result<Option<Link>, HostNetError> {
        match self.find(name).await? {
            Some(link) if link.group != self.group => Err(HostNetError::Foreign {
                name: name.to_string(),
                group: self.group,
            }),
            found => Ok(found),
        }
    }

    async fn change(
        &self,
        action: &'static str,
        name: &str,
        message: LinkMessage,
    ) -> Result<(), HostNetError> {
        self.handle
            .link()
            .change(message)
            .execute()
            .await
            .map_err(|source| HostNetError::Netlink {
                action,
                name: name.to_string(),
                source,
            })
    }

    /// The bridge `name`, up, in banger's group, holding `gateway/prefix`.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Addr,
        prefix: u8,
        mtu: u32,
    ) -> Result<(), HostNetError> {
        let link = match self.own(name).await? {
            Some(link) => link,
            None => {
                let created = self
                    .handle
                    .link()
                    .add(
                        LinkBridge::new(name)
                            .mtu(mtu)
                            .link_group(self.group)
                            .build(),
                    )
                    .execute()
                    .await;
                allowing(EEXIST, created, "create the bridge", name)?;
                self.own(name).await?.ok_or_else(|| HostNetError::Foreign {
                    name: name.to_string(),
                    group: self.group,
                })?
            }
        };
        let added = self
            .handle
            .address()
            .add(link.index, IpAddr::V4(gateway), prefix)
            .execute()
            .await;
        allowing(EEXIST, added, "address", name)?;
        self.change(
            "raise",
            name,
            LinkUnspec::new_with_index(link.index).mtu(mtu).up().build(),
        )
        .await
    }

    /// The tap `name` on `bridge`, up, in banger's group; owned by `owner`
    /// (a jailed VMM's uid, which then opens it without privileges).
    pub async fn ensure_tap(
        &self,
        name: &str,
        bridge: &str,
        mtu: u32,
        owner: Option<u32>,
    ) -> Result<(), HostNetError> {
        let bridge_index = self
            .own(bridge)
            .await?
            .ok_or_else(|| HostNetError::Netlink {
                action: "find the bridge",
                name: bridge.to_string(),
                source: rtnetlink::Error::RequestFailed,
            })?
            .index;
        let attach = |index| {
            LinkUnspec::new_with_index(index)
                .controller(bridge_index)
                .mtu(mtu)
                .link_group(self.group)
                .up()
                .build()
        };
        if let Some(link) = self.own(name).await? {
            return self.change("attach", name, attach(link.index)).await;
        }
        // A new tap lives only while its descriptor is open until it is in
        // banger's group and on the bridge; only then is it made
        // persistent. A crash or a failure before leaves nothing behind.
        let tap_error = |source| HostNetError::Tap {
            name: name.to_string(),
            source,
        };
        let tap = name.to_string();
        let fd = tokio::task::spawn_blocking(move || open_tap(&tap, owner))
            .await
            .map_err(|_| HostNetError::Pool)?
            .map_err(tap_error)?;
        let index = self
            .find(name)
            .await?
            .ok_or_else(|| tap_error(io::Error::other("the tap vanished after its creation")))?
            .index;
        self.change("attach", name, attach(index)).await?;
        tokio::task::spawn_blocking(move || persist_tap(&fd))
            .await
            .map_err(|_| HostNetError::Pool)?
            .map_err(tap_error)
    }

    /// The group strays pass through on their way out (`group + 1`).
    pub fn sweep_group(&self) -> u32 {
        self.group + 1
    }

    /// Removes banger's link `name`; one already gone is fine.
    pub async fn remove_link(&self, name: &str) -> Result<(), HostNetError> {
        match self.own(name).await? {
            Some(link) => self.remove_index(&link).await,
            None => Ok(()),
        }
    }

    async fn remove_index(&self, link: &Link) -> Result<(), HostNetError> {
        let removed = self.handle.link().del(link.index).execute().await;
        allowing(libc::ENODEV, removed, "remove", &link.name)
    }

    /// Removes these links of banger's group in one request: each moves
    /// into the sweep group (`group + 1`), then that group goes at once
    /// (one request per link costs the kernel a synchronisation each).
    pub async fn remove_links(&self, links: &[Link]) -> Result<(), HostNetError> {
        if links.is_empty() {
            return Ok(());
        }
        let sweep = self.sweep_group();
        for link in links.iter().filter(|l| l.group != sweep) {
            self.change(
                "sweep",
                &link.name,
                LinkUnspec::new_with_index(link.index)
                    .link_group(sweep)
                    .build(),
            )
            .await?;
        }
        // The group request only when the sweep group holds exactly these
        // links; else one request each, so nothing else is ever removed.
        let moved: std::collections::HashSet<u32> = links.iter().map(|l| l.index).collect();
        let in_sweep: Vec<Link> = self
            .links()
            .await?
            .into_iter()
            .filter(|l| l.group == sweep)
            .collect();
        if in_sweep.iter().any(|l| !moved.contains(&l.index)) {
            for link in links {
                self.remove_index(link).await?;
            }
            return Ok(());
        }
        let mut request = self.handle.link().del(0);
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::Group(sweep));
        request
            .execute()
            .await
            .map_err(|source| HostNetError::Netlink {
                action: "remove the links of group",
                name: sweep.to_string(),
                source,
            })
    }

    /// The host's IPv4 routes and addresses, except those on banger's
    /// own links: what a new network must not overlap.
    pub async fn routes(&self) -> Result<Vec<HostRoute>, HostNetError> {
        let links = self.links().await?;
        let name_of = |index: u32| links.iter().find(|l| l.index == index);
        let ours = |index: u32| name_of(index).is_some_and(|l| l.group == self.group);
        let device = |index: u32| name_of(index).map(|l| l.name.clone()).unwrap_or_default();
        let mut found = Vec::new();
        let routes: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|source| HostNetError::Netlink {
                action: "list",
                name: "routes".into(),
                source,
            })?;
        for route in routes {
            if route.header.kind != RouteType::Unicast {
                continue;
            }
            let mut destination = None;
            let mut oif = 0;
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Destination(RouteAddress::Inet(address)) => {
                        destination = Some(*address)
                    }
                    RouteAttribute::Oif(index) => oif = *index,
                    _ => {}
                }
            }
            let Some(destination) = destination else {
                continue;
            };
            if ours(oif) {
                continue;
            }
            if let Ok(net) = Ipv4Net::new(destination, route.header.destination_prefix_length) {
                found.push(HostRoute {
                    destination: net.trunc(),
                    device: device(oif),
                    address: false,
                });
            }
        }
        let addresses: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| HostNetError::Netlink {
                action: "list",
                name: "addresses".into(),
                source,
            })?;
        for address in addresses {
            let index = address.header.index;
            if ours(index) {
                continue;
            }
            for attribute in &address.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = attribute
                    && let Ok(net) = Ipv4Net::new(*ip, address.header.prefix_len)
                {
                    found.push(HostRoute {
                        destination: net.trunc(),
                        device: device(index),
                        address: true,
                    });
                }
            }
        }
        Ok(found)
    }
}

/// Feeds `script` to `program args` on its stdin; answers its stderr when
/// it refuses the script.
fn feed_script(program: &str, args: &[&str], script: &str) -> io::Result<Result<(), String>> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    Ok(if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    })
}

/// Runs an `nft -f` script: one transaction, all or nothing.
pub async fn nft(script: String) -> Result<(), HostNetError> {
    tokio::task::spawn_blocking(move || {
        feed_script("nft", &["-f", "-"], &script)
            .map_err(HostNetError::NftMissing)?
            .map_err(|stderr| HostNetError::Nft { stderr })
    })
    .await
    .map_err(|_| HostNetError::Pool)?
}

/// The guests `bridge banger` lets send (its `guests` set), as `nft -j`
/// lists them; none when the table does not exist.
pub async fn nft_guests() -> Result<Vec<Guest>, HostNetError> {
    tokio::task::spawn_blocking(|| {
        let output = Command::new("nft")
            .args(["-j", "list", "set", "bridge", super::rules::TABLE, "guests"])
            .stdin(Stdio::null())
            .output()
            .map_err(HostNetError::NftMissing)?;
        if !output.status.success() {
            return Ok(Vec::new());
        }
        let listing: serde_json::Value =
            serde_json::from_slice(&output.stdout).map_err(|e| HostNetError::Nft {
                stderr: format!("unreadable `nft -j` output: {e}"),
            })?;
        let mut guests = Vec::new();
        let objects = listing["nftables"].as_array().into_iter().flatten();
        for element in objects
            .filter_map(|o| o["set"]["elem"].as_array())
            .flatten()
        {
            let parts = element["concat"].as_array();
            let text = |i: usize| parts.and_then(|p| p.get(i)).and_then(|v| v.as_str());
            if let (Some(tap), Some(mac), Some(Ok(address))) =
                (text(0), text(1), text(2).map(str::parse))
            {
                guests.push(Guest {
                    tap: tap.to_string(),
                    mac: mac.to_string(),
                    address,
                });
            }
        }
        Ok(guests)
    })
    .await
    .map_err(|_| HostNetError::Pool)?
}

/// Other tables' IPv4 forward chains whose policy drops, with the rules
/// banger put in them ([`super::rules::foreign_accepts`]).
pub async fn nft_foreign_forwards() -> Result<Vec<ForeignForward>, HostNetError> {
    tokio::task::spawn_blocking(|| {
        let output = Command::new("nft")
            .args(["-j", "list", "ruleset"])
            .stdin(Stdio::null())
            .output()
            .map_err(HostNetError::NftMissing)?;
        if !output.status.success() {
            return Err(HostNetError::Nft {
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let listing: serde_json::Value =
            serde_json::from_slice(&output.stdout).map_err(|e| HostNetError::Nft {
                stderr: format!("unreadable `nft -j` output: {e}"),
            })?;
        let objects: Vec<&serde_json::Value> = listing["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let text =
            |v: &serde_json::Value, key: &str| v[key].as_str().unwrap_or_default().to_string();
        let mut chains: Vec<ForeignForward> = objects
            .iter()
            .filter_map(|o| o.get("chain"))
            .filter(|c| c["hook"] == "forward" && c["policy"] == "drop")
            .filter(|c| {
                c["table"] != super::rules::TABLE
                    && matches!(c["family"].as_str(), Some("ip" | "inet"))
            })
            .map(|c| ForeignForward {
                family: text(c, "family"),
                table: text(c, "table"),
                chain: text(c, "name"),
                ours: Vec::new(),
            })
            .collect();
        for rule in objects.iter().filter_map(|o| o.get("rule")) {
            if rule["comment"] != super::rules::FOREIGN_COMMENT {
                continue;
            }
            let place = (
                text(rule, "family"),
                text(rule, "table"),
                text(rule, "chain"),
            );
            if let Some(chain) = chains
                .iter_mut()
                .find(|c| (c.family.clone(), c.table.clone(), c.chain.clone()) == place)
                && let Some(handle) = rule["handle"].as_u64()
            {
                chain.ours.push(handle);
            }
        }
        Ok(chains)
    })
    .await
    .map_err(|_| HostNetError::Pool)?
}

/// A chain of a table iptables-nft manages, as `iptables-nft -S` lists it;
/// none when iptables-nft is missing or cannot read the chain (a table
/// nft made, or one holding rules iptables-nft does not know).
pub async fn iptables_listing(table: &str, chain: &str) -> Option<String> {
    let (table, chain) = (table.to_string(), chain.to_string());
    tokio::task::spawn_blocking(move || {
        let output = Command::new("iptables-nft")
            .args(["-w", "-t", &table, "-S", &chain])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    })
    .await
    .ok()
    .flatten()
}

/// Applies an `iptables-nft-restore --noflush` script in one transaction.
pub async fn iptables_restore(script: String) -> Result<(), HostNetError> {
    tokio::task::spawn_blocking(move || {
        let refused = |stderr: String| HostNetError::Iptables { stderr };
        feed_script("iptables-nft-restore", &["-w", "--noflush"], &script)
            .map_err(|e| refused(e.to_string()))?
            .map_err(refused)
    })
    .await
    .map_err(|_| HostNetError::Pool)?
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Turns IPv4 forwarding on; answers whether it was off. When it was,
/// `marker` records so (with this boot's id) before it is turned on, and
/// keeps the record until [`restore_forwarding`].
pub fn enable_forwarding(marker: &Path) -> io::Result<bool> {
    if std::fs::read_to_string(IP_FORWARD)?.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(marker, std::fs::read_to_string(BOOT_ID)?)?;
    std::fs::write(IP_FORWARD, "1")?;
    Ok(true)
}

/// Turns IPv4 forwarding off again if `marker` says banger turned it on
/// in this boot (after a reboot, whatever turned it on is the host's);
/// answers whether it did.
pub fn restore_forwarding(marker: &Path) -> io::Result<bool> {
    let recorded = match std::fs::read_to_string(marker) {
        Ok(recorded) => recorded,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let ours = recorded.trim() == std::fs::read_to_string(BOOT_ID)?.trim();
    if ours {
        std::fs::write(IP_FORWARD, "0")?;
    }
    std::fs::remove_file(marker)?;
    Ok(ours)
}

/// Whether this process may change the host's network (CAP_NET_ADMIN in
/// its effective set).
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tun_set_persist,
    nix::request_code_write!(b'T', 203, std::mem::size_of::<libc::c_int>())
);
nix::ioctl_write_int_bad!(
    tun_set_owner,
    nix::request_code_write!(b'T', 204, std::mem::size_of::<libc::c_int>())
);

/// A tap named `name` (TUNSETIFF and TUNSETOWNER on `/dev/net/tun`); it
/// lives as long as the answered descriptor until [`persist_tap`]. Blocking.
fn open_tap(name: &str, owner: Option<u32>) -> io::Result<std::fs::File> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: all-zero is a valid ifreq (a C struct of integers and arrays).
    #[allow(unsafe_code)]
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= request.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    let fd = tun.as_raw_fd();
    // SAFETY: `fd` is an open tun descriptor and `request` a valid ifreq
    // that outlives the call; TUNSETOWNER takes a plain integer.
    #[allow(unsafe_code)]
    unsafe {
        tun_set_iff(fd, &request)?;
        if let Some(uid) = owner {
            tun_set_owner(fd, uid as libc::c_int)?;
        }
    }
    Ok(tun)
}

/// Makes the tap behind `tun` outlive its descriptor (TUNSETPERSIST).
fn persist_tap(tun: &std::fs::File) -> io::Result<()> {
    // SAFETY: `tun` is an open tun descriptor attached to a device;
    // TUNSETPERSIST takes a plain integer.
    #[allow(unsafe_code)]
    unsafe {
        tun_set_persist(tun.as_raw_fd(), 1)?;
    }
    Ok(())
}
