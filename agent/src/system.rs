//! What the agent reports about the guest: listening ports from
//! `/proc/net`, the SSH host keys, and the boot clock.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::protocol::{HostKey, ListeningPort};

/// Milliseconds on the boot clock (time since the kernel started,
/// suspend included).
pub fn boot_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Listening sockets in one `/proc/net/{tcp,udp}[6]` table: TCP in LISTEN
/// (`0A`), UDP unconnected (`07`).
pub fn parse_net_table(text: &str, protocol: &str, v6: bool) -> Vec<ListeningPort> {
    let listening = if protocol == "tcp" { "0A" } else { "07" };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state) = (fields.get(1)?, fields.get(3)?);
            if *state != listening {
                return None;
            }
            let (address, port) = local.split_once(':')?;
            Some(ListeningPort {
                protocol: protocol.to_string(),
                address: decode_address(address, v6)?,
                port: u16::from_str_radix(port, 16).ok()?,
            })
        })
        .collect()
}

/// The kernel prints addresses as native-endian 32-bit words in hex.
fn decode_address(hex: &str, v6: bool) -> Option<String> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    match (v6, words.as_slice()) {
        (false, [word]) => Some(Ipv4Addr::from(word.to_le_bytes()).to_string()),
        (true, [a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (i, word) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
            }
            Some(Ipv6Addr::from(bytes).to_string())
        }
        _ => None,
    }
}

pub fn listening_ports() -> Vec<ListeningPort> {
    let mut ports = Vec::new();
    for (file, protocol, v6) in [
        ("tcp", "tcp", false),
        ("tcp6", "tcp", true),
        ("udp", "udp", false),
        ("udp6", "udp", true),
    ] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/net/{file}")) {
            ports.extend(parse_net_table(&text, protocol, v6));
        }
    }
    ports.sort_by(|a, b| (&a.protocol, a.port, &a.address).cmp(&(&b.protocol, b.port, &b.address)));
    ports.dedup();
    ports
}

pub fn host_keys() -> Vec<HostKey> {
    let Ok(entries) = std::fs::read_dir("/etc/ssh") else {
        return Vec::new();
    };
    let mut keys: Vec<HostKey> = entries
        .filter_map(|e| e.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let algorithm = name
                .strip_prefix("ssh_host_")?
                .strip_suffix("_key.pub")?
                .to_string();
            let public_key = std::fs::read_to_string(entry.path())
                .ok()?
                .trim()
                .to_string();
            Some(HostKey {
                algorithm,
                public_key,
            })
        })
        .collect();
    keys.sort_by(|a, b| a.algorithm.cmp(&b.algorithm));
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_and_others_skipped() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0200000A:0016 0100000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
";
        let ports = parse_net_table(tcp, "tcp", false);
        assert_eq!(
            ports,
            [
                ListeningPort {
                    protocol: "tcp".into(),
                    address: "0.0.0.0".into(),
                    port: 22
                },
                ListeningPort {
                    protocol: "tcp".into(),
                    address: "127.0.0.1".into(),
                    port: 8080
                },
            ]
        );
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A
";
        let ports = parse_net_table(tcp6, "tcp", true);
        assert_eq!(ports[0].address, "::");
        assert_eq!(ports[1].address, "::1");
        assert_eq!(ports[1].port, 631);
        let udp = "  sl  local_address rem_address   st
  10: 3500007F:0035 00000000:0000 07
  11: garbage
";
        let ports = parse_net_table(udp, "udp", false);
        assert_eq!(ports.len(), 1);
        assert_eq!(
            (ports[0].address.as_str(), ports[0].port),
            ("127.0.0.53", 53)
        );
    }
}
