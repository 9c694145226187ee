//! VMM processes banger launched that no VM record claims (left by a
//! daemon that died between launching a VMM and recording it, or by a
//! store restored from a backup). Every stage of a launch is recognised:
//! the child between fork and exec (named [`SPAWN_MARKER`], working in
//! `<state-dir>/vms/<id>`), the jailer before its pivot (`--id` under
//! banger's `--chroot-base-dir`), and the VMM itself (its API socket
//! under `<state-dir>/vms/`, or its chroot under the jail base).

use std::path::{Path, PathBuf};

/// A live VMM process of banger's, as a scan of `/proc` finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundVmm {
    pub pid: i32,
    pub start_time: u64,
    /// The VM id its arguments or its jail name.
    pub id: String,
    /// A launch's child that has not exec'd yet.
    pub launch_child: bool,
}

/// The name (`comm`) a launch's child takes between fork and exec, when it
/// is still a copy of the daemon.
pub const SPAWN_MARKER: &std::ffi::CStr = c"banger-spawn";

fn is_spawn_marker(comm: &str) -> bool {
    comm.as_bytes() == SPAWN_MARKER.to_bytes()
}

/// What `/proc` shows of a process, as far as recognising it goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub args: Vec<String>,
    /// The source of its root mount.
    pub root: Option<PathBuf>,
    pub comm: String,
    pub cwd: Option<PathBuf>,
}

/// Where banger's VMMs are recognised from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub vms_dir: PathBuf,
    pub jail_base: PathBuf,
}

impl Layout {
    /// The VM id a process belongs to, from its arguments (an unjailed
    /// firecracker's `--api-sock <vms_dir>/<id>/...`, QEMU's `-qmp
    /// unix:<vms_dir>/<id>/...`) or the source of its
    /// root mount (the jailer pivots a jailed one into
    /// `<jail_base>/firecracker/<id>/root`; the source is relative to its
    /// filesystem, so it is matched as a suffix of the jail base).
    pub fn vm_id(&self, seen: &Seen) -> Option<String> {
        let (args, root) = (&seen.args, seen.root.as_deref());
        let flag = |name: &str| {
            args.windows(2)
                .find_map(|w| (w[0] == name).then(|| w[1].as_str()))
        };
        // A launch's child before exec: still the daemon, in the VM's directory.
        let from_child = seen
            .cwd
            .as_deref()
            .filter(|_| is_spawn_marker(&seen.comm))
            .and_then(|cwd| self.id_under(&self.vms_dir, cwd));
        // A jailer before its pivot (or a program it runs through).
        let from_jailer = flag("--chroot-base-dir")
            .filter(|base| Path::new(base) == self.jail_base)
            .and_then(|_| flag("--id"))
            .map(str::to_string);
        let from_socket = args
            .windows(2)
            .find_map(|w| match w[0].as_str() {
                "--api-sock" => Some(w[1].as_str()),
                // QEMU's `-qmp unix:<path>,server=on,wait=off`.
                "-qmp" => w[1]
                    .strip_prefix("unix:")
                    .and_then(|rest| rest.split(',').next()),
                _ => None,
            })
            .and_then(|socket| self.id_under(&self.vms_dir, Path::new(socket)));
        let from_root = root.and_then(|root| {
            let mut parts: Vec<String> = root
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let (Some(last), Some(id), Some(exec)) = (parts.pop(), parts.pop(), parts.pop()) else {
                return None;
            };
            // Without its leading `/`, so it matches the end of the base.
            let base: PathBuf = parts.iter().skip(1).collect();
            let ours = last == "root" && exec == "firecracker" && !base.as_os_str().is_empty();
            (ours && self.jail_base.ends_with(&base)).then_some(id)
        });
        from_child.or(from_jailer).or(from_socket).or(from_root)
    }

    /// The first component of `path` below `dir`: a VM id.
    fn id_under(&self, dir: &Path, path: &Path) -> Option<String> {
        let rest = path.strip_prefix(dir).ok()?;
        rest.components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
    }

    /// Every live process on the host that is one of banger's VMMs, with
    /// the VM id it belongs to.
    pub fn scan(&self) -> Vec<FoundVmm> {
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
                let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok();
                let seen = Seen {
                    args,
                    root: mounts.as_deref().and_then(root_mount_source),
                    comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|c| c.trim_end().to_string())
                        .unwrap_or_default(),
                    cwd: std::fs::read_link(format!("/proc/{pid}/cwd")).ok(),
                };
                let id = self.vm_id(&seen)?;
                let launch_child = is_spawn_marker(&seen.comm);
                let stat = super::process::read_stat(pid).ok()??;
                (!matches!(stat.state, 'Z' | 'X')).then_some(FoundVmm {
                    pid,
                    start_time: stat.start_time,
                    id,
                    launch_child,
                })
            })
            .collect()
    }
}

/// The source of the mount at `/` in a `/proc/<pid>/mountinfo` (its root
/// within its filesystem).
pub fn root_mount_source(mountinfo: &str) -> Option<PathBuf> {
    crate::vmm::mounts::mounts(mountinfo)
        .find(|mount| mount.point == Path::new("/"))
        .map(|mount| mount.root)
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

    fn seen(list: &[&str], root: Option<&Path>) -> Seen {
        Seen {
            args: args(list),
            root: root.map(Path::to_path_buf),
            ..Seen::default()
        }
    }

    #[test]
    fn a_launch_child_before_exec_is_known_by_its_name_and_directory() {
        // A copy of the daemon: its argv says nothing of the VM.
        let child = Seen {
            args: args(&["bangerd", "--user"]),
            comm: "banger-spawn".into(),
            cwd: Some("/var/lib/banger/vms/abc123".into()),
            ..Seen::default()
        };
        assert_eq!(layout().vm_id(&child), Some("abc123".into()));
        // The daemon itself, or another daemon's child, is not.
        let daemon = Seen {
            comm: "bangerd".into(),
            ..child.clone()
        };
        assert_eq!(layout().vm_id(&daemon), None);
        let elsewhere = Seen {
            cwd: Some("/srv/other/vms/abc123".into()),
            ..child
        };
        assert_eq!(layout().vm_id(&elsewhere), None);
    }

    #[test]
    fn a_jailer_before_its_pivot_is_known_by_its_id_and_base() {
        let jailer = args(&[
            "/usr/bin/jailer",
            "--id",
            "abc123",
            "--exec-file",
            "/usr/bin/firecracker",
            "--uid",
            "65534",
            "--chroot-base-dir",
            "/var/lib/banger/jail",
            "--",
            "--api-sock",
            "/run/firecracker.socket",
        ]);
        let root = Some(Path::new("/"));
        let s = Seen {
            args: jailer.clone(),
            root: root.map(Path::to_path_buf),
            ..Seen::default()
        };
        assert_eq!(layout().vm_id(&s), Some("abc123".into()));
        // Through a wrapper that runs the real jailer: the same argv follows.
        let mut wrapped = args(&["/bin/sh", "/tmp/wrapper"]);
        wrapped.extend(jailer[1..].iter().cloned());
        assert_eq!(
            layout().vm_id(&Seen {
                args: wrapped,
                ..Seen::default()
            }),
            Some("abc123".into())
        );
        // Another jail base is another daemon's.
        let other: Vec<String> = jailer
            .iter()
            .map(|a| a.replace("/var/lib/banger/jail", "/srv/jailer"))
            .collect();
        assert_eq!(
            layout().vm_id(&Seen {
                args: other,
                ..Seen::default()
            }),
            None
        );
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
            layout().vm_id(&Seen {
                args: a,
                root: Some("/".into()),
                ..Seen::default()
            }),
            Some("abc123".into())
        );
    }

    #[test]
    fn a_jailed_vmm_is_known_by_its_root_mount() {
        let a = &["/firecracker", "--api-sock", "/run/firecracker.socket"];
        let mountinfo = "67 44 254:0 /var/lib/banger/jail/firecracker/xyz789/root / rw,relatime - ext4 /dev/vda rw\n\
                         68 67 0:5 / /dev rw - devtmpfs udev rw";
        let root = root_mount_source(mountinfo).expect("root mount");
        assert_eq!(layout().vm_id(&seen(a, Some(&root))), Some("xyz789".into()));
        // The state dir on a filesystem of its own: the source is relative.
        let relative = Path::new("/banger/jail/firecracker/xyz789/root");
        assert_eq!(
            layout().vm_id(&seen(a, Some(relative))),
            Some("xyz789".into())
        );
        let elsewhere = Path::new("/srv/jailer/firecracker/xyz789/root");
        assert_eq!(layout().vm_id(&seen(a, Some(elsewhere))), None);
        assert_eq!(layout().vm_id(&seen(a, Some(Path::new("/")))), None);
    }

    #[test]
    fn a_qemu_is_known_by_its_qmp_socket() {
        let layout = Layout {
            vms_dir: "/var/lib/banger/vms".into(),
            jail_base: "/var/lib/banger/jail".into(),
        };
        let args: Vec<String> = [
            "qemu-system-x86_64",
            "-qmp",
            "unix:/var/lib/banger/vms/k3j9x2m4qa/qmp.sock,server=on,wait=off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let seen = Seen {
            args,
            ..Seen::default()
        };
        assert_eq!(layout.vm_id(&seen), Some("k3j9x2m4qa".into()));
    }

    #[test]
    fn other_processes_are_not_banger_vmms() {
        let a = &["firecracker", "--api-sock", "/tmp/other.sock"];
        assert_eq!(layout().vm_id(&seen(a, Some(Path::new("/")))), None);
        assert_eq!(layout().vm_id(&seen(&["bash"], None)), None);
    }
}
