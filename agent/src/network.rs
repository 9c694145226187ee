//! The guest's network from `banger.ip=`/`banger.gw=`/`banger.dns=`/
//! `banger.mtu=`, set with the kernel's old interface ioctls (SIOCSIFADDR,
//! SIOCSIFNETMASK, SIOCSIFMTU, SIOCSIFFLAGS, SIOCADDRT) rather than the root disk's `ip`: most OCI
//! images have no `ip`, and netlink would need a crate or a page of code.
//! IPv4 only, as banger's networks are.

use std::ffi::c_char;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::libc;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::cmdline::Cmdline;

/// Brings `lo` up and configures `eth0` as the command line says. Each
/// failure is logged and the rest still tried.
pub fn configure(cmdline: &Cmdline) {
    let log = |what: &str, result: io::Result<()>| {
        if let Err(e) = result {
            crate::log!("network: {what}: {e}");
        }
    };
    let socket = match control_socket() {
        Ok(socket) => socket,
        Err(e) => return log("socket", Err(e)),
    };
    log("lo up", set_up(&socket, "lo"));
    if let Some(text) = &cmdline.mtu {
        match text.parse::<i32>() {
            Ok(mtu) if (68..=65535).contains(&mtu) => {
                log("eth0 mtu", set_mtu(&socket, "eth0", mtu))
            }
            _ => crate::log!("network: banger.mtu={text} is not an MTU"),
        }
    }
    if let Some(text) = &cmdline.ip {
        match parse_cidr(text) {
            Some((address, prefix)) => {
                log(
                    "eth0 address",
                    set_address(&socket, "eth0", address, prefix),
                );
                log("eth0 up", set_up(&socket, "eth0"));
            }
            None => crate::log!("network: banger.ip={text} is not ADDR/PREFIX"),
        }
    }
    if let Some(text) = &cmdline.gateway {
        match text.parse() {
            Ok(gateway) => log("default route", add_default_route(&socket, gateway)),
            Err(_) => crate::log!("network: banger.gw={text} is not an address"),
        }
    }
    if let Some(dns) = &cmdline.dns {
        log(
            "/etc/resolv.conf",
            std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n")),
        );
    }
}

/// `ADDR/PREFIX`, IPv4.
pub fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, prefix) = text.split_once('/')?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some((address.parse().ok()?, prefix))
}

pub fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

fn control_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn set_address(socket: &OwnedFd, interface: &str, address: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let mut request = ifreq(interface)?;
    request.ifr_ifru.ifru_addr = sockaddr(address);
    ioctl_ifreq(socket, libc::SIOCSIFADDR, &mut request)?;
    request.ifr_ifru.ifru_netmask = sockaddr(netmask(prefix));
    ioctl_ifreq(socket, libc::SIOCSIFNETMASK, &mut request)
}

fn set_mtu(socket: &OwnedFd, interface: &str, mtu: i32) -> io::Result<()> {
    let mut request = ifreq(interface)?;
    request.ifr_ifru.ifru_mtu = mtu;
    ioctl_ifreq(socket, libc::SIOCSIFMTU, &mut request)
}

fn set_up(socket: &OwnedFd, interface: &str) -> io::Result<()> {
    let mut request = ifreq(interface)?;
    ioctl_ifreq(socket, libc::SIOCGIFFLAGS, &mut request)?;
    #[allow(unsafe_code)]
    // SAFETY: SIOCGIFFLAGS just filled in the flags member.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl_ifreq(socket, libc::SIOCSIFFLAGS, &mut request)
}

/// Linux's `struct rtentry` (net/route.h), which the libc crate lacks for
/// glibc. The pointer members are only ever null, so they are words here.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: usize,
    rt_metric: libc::c_short,
    rt_dev: usize,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn add_default_route(socket: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(gateway),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY),
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: 0,
        rt_metric: 0,
        rt_dev: 0,
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: SIOCADDRT reads one `struct rtentry`, which `RtEntry` lays
    // out exactly; it lives across the call and its device pointer is null.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &mut route) };
    match result {
        0.. => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn ifreq(interface: &str) -> io::Result<libc::ifreq> {
    if interface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("{interface}: name too long")));
    }
    let mut ifr_name = [0 as c_char; libc::IFNAMSIZ];
    for (to, from) in ifr_name.iter_mut().zip(interface.bytes()) {
        *to = from as c_char;
    }
    Ok(libc::ifreq {
        ifr_name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    })
}

/// An IPv4 `sockaddr_in` as the generic `sockaddr` the ioctls take: the
/// port in the first two data bytes, the address in the next four.
fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let mut sa_data = [0 as c_char; 14];
    for (to, from) in sa_data[2..6].iter_mut().zip(address.octets()) {
        *to = from as c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data,
    }
}

#[allow(unsafe_code)]
fn ioctl_ifreq(
    socket: &OwnedFd,
    request: libc::c_ulong,
    ifreq: &mut libc::ifreq,
) -> io::Result<()> {
    // SAFETY: the SIOC[GS]IF* requests used here read or write one
    // `struct ifreq`, which lives across the call.
    match unsafe { libc::ioctl(socket.as_raw_fd(), request, ifreq as *mut libc::ifreq) } {
        0.. => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_prefixes_parse() {
        assert_eq!(
            parse_cidr("172.16.0.5/24"),
            Some((Ipv4Addr::new(172, 16, 0, 5), 24))
        );
        for bad in ["172.16.0.5", "172.16.0.5/33", "x/24", "::1/64", "1.2.3.4/"] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(17), Ipv4Addr::new(255, 255, 128, 0));
    }

    /// The real ioctls against the real kernel, in a network namespace of
    /// this thread's own; skipped without root.
    #[test]
    fn the_ioctls_configure_an_interface_and_a_route() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let checked = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let tap = std::process::Command::new("ip")
                .args(["tuntap", "add", "dev", "eth0", "mode", "tap"])
                .status()
                .expect("ip tuntap");
            assert!(tap.success());
            configure(&Cmdline::parse(
                "banger.ip=10.7.0.2/24 banger.gw=10.7.0.1 banger.mtu=1400",
            ));
            let show = |args: &[&str]| {
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .expect("ip");
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            (
                show(&["-4", "addr", "show", "eth0"]),
                show(&["-4", "route"]),
                show(&["link", "show", "lo"]),
            )
        })
        .join()
        .expect("the namespace thread");
        let (addresses, routes, lo) = checked;
        assert!(addresses.contains("inet 10.7.0.2/24"), "{addresses}");
        assert!(addresses.contains(",UP"), "{addresses}");
        assert!(addresses.contains("mtu 1400"), "{addresses}");
        assert!(routes.contains("default via 10.7.0.1 dev eth0"), "{routes}");
        assert!(lo.contains(",UP"), "{lo}");
    }
}
