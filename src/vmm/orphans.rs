//! VMM processes banger launched that no VM record claims (left by a
//! daemon that died between launching a VMM and recording it, or by a
//! store restored from a backup). They are found by their API socket path
//! under `<state-dir>/vms/` or their chroot under `<state-dir>/jail/`.

use std::path::{Path, PathBuf};

/// Where banger's VMMs are recognised from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub vms_dir: PathBuf,
    pub jail_base: PathBuf,
}

impl Layout {
    /// The VM id a process belongs to, from its arguments (an unjailed
    /// firecracker's `--api-sock <vms_dir>/<id>/...`) or its root
    /// directory (a jailed one's `<jail_base>/firecracker/<id>/root`).
    pub fn vm_id(&self, args: &[String], root: Option<&Path>) -> Option<String> {
        let from_socket = args
            .windows(2)
            .find(|w| w[0] == "--api-sock")
            .and_then(|w| {
                Path::new(&w[1])
                    .strip_prefix(&self.vms_dir)
                    .ok()
                    .map(Path::to_path_buf)
            })
            .and_then(|rest| {
                rest.components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
            });
        let from_root = root
            .and_then(|root| root.strip_prefix(self.jail_base.join("firecracker")).ok())
            .and_then(|rest| {
                rest.components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
            });
        from_socket.or(from_root)
    }

    /// Every live process on the host that is one of banger's VMMs, with
    /// the VM id it belongs to.
    pub fn scan(&self) -> Vec<(i32, String)> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let root = std::fs::read_link(format!("/proc/{pid}/root")).ok();
                let id = self.vm_id(&args, root.as_deref())?;
                let stat = super::process::read_stat(pid).ok()??;
                (!matches!(stat.state, 'Z' | 'X')).then_some((pid, id))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            vms_dir: "/var/lib/banger/vms".into(),
            jail_base: "/var/lib/banger/jail".into(),
        }
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_unjailed_vmm_is_known_by_its_socket() {
        let a = args(&[
            "firecracker",
            "--api-sock",
            "/var/lib/banger/vms/abc123/firecracker.sock",
            "--id",
            "abc123",
        ]);
        assert_eq!(
            layout().vm_id(&a, Some(Path::new("/"))),
            Some("abc123".into())
        );
    }

    #[test]
    fn a_jailed_vmm_is_known_by_its_root() {
        let a = args(&["/firecracker", "--api-sock", "/run/firecracker.socket"]);
        let root = Path::new("/var/lib/banger/jail/firecracker/xyz789/root");
        assert_eq!(layout().vm_id(&a, Some(root)), Some("xyz789".into()));
    }

    #[test]
    fn other_processes_are_not_banger_vmms() {
        let a = args(&["firecracker", "--api-sock", "/tmp/other.sock"]);
        assert_eq!(layout().vm_id(&a, Some(Path::new("/"))), None);
        assert_eq!(layout().vm_id(&args(&["bash"]), None), None);
    }
}
