//! The kernel command line, as far as the agent reads it: the root disk
//! (`root=`, `rootfstype=`, `ro`/`rw`) and banger's own `banger.*` keys.

/// What the agent takes from `/proc/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub root: String,
    pub rootfstype: String,
    pub read_only: bool,
    pub hostname: Option<String>,
    /// `banger.ip=ADDR/PREFIX`: eth0's address.
    pub ip: Option<String>,
    pub gateway: Option<String>,
    pub dns: Option<String>,
    /// `banger.mtu=BYTES`: eth0's MTU (its network's).
    pub mtu: Option<String>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut cmdline = Cmdline {
            root: "/dev/vda".into(),
            rootfstype: "ext4".into(),
            read_only: false,
            hostname: None,
            ip: None,
            gateway: None,
            dns: None,
            mtu: None,
        };
        for word in text.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            let value = (!value.is_empty()).then(|| value.to_string());
            match key {
                "root" => cmdline.root = value.unwrap_or(cmdline.root),
                "rootfstype" => cmdline.rootfstype = value.unwrap_or(cmdline.rootfstype),
                "ro" => cmdline.read_only = true,
                "rw" => cmdline.read_only = false,
                "banger.hostname" => cmdline.hostname = value,
                "banger.ip" => cmdline.ip = value,
                "banger.gw" => cmdline.gateway = value,
                "banger.dns" => cmdline.dns = value,
                "banger.mtu" => cmdline.mtu = value,
                _ => {}
            }
        }
        cmdline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_hold_without_keys_and_the_last_ro_or_rw_wins() {
        let plain = Cmdline::parse("console=ttyS0 reboot=k panic=1\n");
        assert_eq!(plain.root, "/dev/vda");
        assert_eq!(plain.rootfstype, "ext4");
        assert!(!plain.read_only);
        assert_eq!(plain.hostname, None);
        let set = Cmdline::parse(
            "root=/dev/vdb rootfstype=xfs ro rw ro banger.hostname=web banger.ip=10.0.0.2/24 banger.gw=10.0.0.1 banger.dns=10.0.0.1 banger.mtu=1400 banger.hostname=",
        );
        assert_eq!(set.mtu.as_deref(), Some("1400"));
        assert_eq!(set.root, "/dev/vdb");
        assert_eq!(set.rootfstype, "xfs");
        assert!(set.read_only);
        assert_eq!(set.hostname, None, "an empty value unsets");
        assert_eq!(set.ip.as_deref(), Some("10.0.0.2/24"));
        assert_eq!(set.gateway.as_deref(), Some("10.0.0.1"));
        assert_eq!(set.dns.as_deref(), Some("10.0.0.1"));
    }
}
