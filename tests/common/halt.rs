//! A daemon on the real firecracker binary with the halt kernel imported,
//! shared by the tests that supervise many cheap, real VMs.

use std::path::{Path, PathBuf};
use std::process::Output;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::*;

/// A daemon configured with the firecracker fixture, a halt kernel
/// imported as `halt`, and a root filesystem file to clone.
// Fields drop in order: the daemon goes before the reaper kills the VMMs it
// left (else it would restart them), and the directory goes last.
pub struct Fixture {
    pub daemon: Option<Daemon>,
    /// The network namespace the daemon runs in (else one of its own).
    pub netns: Option<PathBuf>,
    pub reaper: ProcessReaper,
    /// A filesystem of its own under the state directory, if asked for.
    pub mounted: Option<Mounted>,
    pub tmp: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub jailed: bool,
}

impl Fixture {
    pub fn new(test: &str) -> Option<Fixture> {
        Fixture::with_jailer(test, false)
    }

    /// With `jailed`, firecracker runs under the real jailer (root only).
    pub fn with_jailer(test: &str, jailed: bool) -> Option<Fixture> {
        Fixture::build(test, jailed, None, &[])
    }

    /// The state directory on a tmpfs of `size` (e.g. `64m`), the daemon
    /// started with `env` (root only: it mounts).
    pub fn on_tmpfs(test: &str, size: &str, env: &[(&str, &str)]) -> Option<Fixture> {
        if !nix::unistd::geteuid().is_root() {
            skip(test, "mounting a tmpfs needs root");
            return None;
        }
        Fixture::build(test, false, Some(("state", size)), env)
    }

    /// Jailed, with the jail base (`[firecracker] jail_dir`) on a tmpfs of
    /// its own: another filesystem than the VMs' directory.
    pub fn jailed_on_tmpfs(test: &str) -> Option<Fixture> {
        Fixture::build(test, true, Some(("jail", "256m")), &[])
    }

    /// `tmpfs`: a directory of the fixture (`state` or `jail`) and a size.
    fn build(
        test: &str,
        jailed: bool,
        tmpfs: Option<(&str, &str)>,
        env: &[(&str, &str)],
    ) -> Option<Fixture> {
        let firecracker = firecracker_fixture(test)?;
        let jailer = if jailed {
            if !nix::unistd::geteuid().is_root() {
                skip(test, "the jailer needs root");
                return None;
            }
            let Some(jailer) = std::env::var_os("BANGER_TEST_JAILER") else {
                skip(
                    test,
                    "BANGER_TEST_JAILER is not set (scripts/test.sh installs it)",
                );
                return None;
            };
            format!(
                "jailer = true\njailer_binary = \"{}\"\n",
                Path::new(&jailer).display()
            )
        } else {
            String::new()
        };
        let tmp = state_dir();
        let dir = tmp.path().to_path_buf();
        let dir = dir.as_path();
        // Unjailed, firecracker runs through a link the tests can take away.
        let firecracker = if jailed {
            firecracker
        } else {
            let link = dir.join("firecracker");
            std::os::unix::fs::symlink(&firecracker, &link).expect("link firecracker");
            link
        };
        let jailer = match tmpfs {
            Some(("jail", _)) => format!("{jailer}jail_dir = \"{}\"\n", dir.join("jail").display()),
            _ => jailer,
        };
        let config = dir.join("bangerd.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\nbinary = \"{}\"\n[firecracker]\nbinary = \"{}\"\n{jailer}[restart]\ndelay_secs = 0.05\nmax_delay_secs = 0.2\n",
                stub_agent(dir).display(),
                firecracker.display()
            ),
        )
        .expect("write config");
        halt_kernel(&dir.join("halt.elf"));
        let rootfs = dir.join("rootfs.img");
        std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("write rootfs");
        let mounted = tmpfs.map(|(under, size)| Mounted::tmpfs(&dir.join(under), size));
        let mut fixture = Fixture {
            reaper: ProcessReaper(dir.join("state")),
            daemon: None,
            netns: None,
            rootfs,
            jailed,
            mounted,
            tmp,
        };
        fixture.start_daemon_with(env);
        let kernel = dir.join("halt.elf");
        fixture.ok(&[
            "kernel",
            "import",
            "halt",
            "--vmlinux",
            kernel.to_str().expect("utf-8"),
        ]);
        Some(fixture)
    }

    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    pub fn start_daemon(&mut self) {
        self.start_daemon_with(&[]);
    }

    pub fn start_daemon_with(&mut self, env: &[(&str, &str)]) {
        self.start(&[], env);
    }

    /// Starts the daemon through a program that then runs it (e.g.
    /// `setpriv` dropping a capability); the one running goes first.
    pub fn start_daemon_through(&mut self, wrapper: &[&str]) {
        self.start(wrapper, &[]);
    }

    fn start(&mut self, wrapper: &[&str], env: &[(&str, &str)]) {
        drop(self.daemon.take());
        let config = self.tmp.path().join("bangerd.toml");
        let mut args: Vec<&str> = wrapper.iter().skip(1).copied().collect();
        if !wrapper.is_empty() {
            args.push(BANGERD);
        }
        args.extend(["--user", "--config", config.to_str().expect("utf-8 path")]);
        let binary = wrapper.first().map(Path::new).unwrap_or(Path::new(BANGERD));
        let daemon = Daemon::spawn_in(self.netns.as_deref(), binary, &self.state(), &args, env);
        self.daemon = Some(Daemon::ready(daemon));
    }

    /// Waits until the VM's state satisfies `done`; answers its view.
    pub fn wait_for(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let vm = self.vm(name);
            if done(&vm) {
                return vm;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never became {what}: {vm}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits until no VM is named `name`; false if it never goes.
    pub fn wait_for_gone(&self, name: &str) -> bool {
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while std::time::Instant::now() < deadline {
            let listed: Value =
                serde_json::from_str(&self.ok(&["vm", "ls", "--json"])).expect("json");
            if !listed
                .as_array()
                .expect("array")
                .iter()
                .any(|vm| vm["name"] == name)
            {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// The live VMM processes of this fixture's state directory.
    pub fn vmms(&self) -> Vec<i32> {
        let daemon = self.daemon.as_ref().map(|d| d.pid().as_raw());
        let mut pids = self.reaper.pids();
        pids.retain(|&pid| Some(pid) != daemon);
        pids
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon running")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        banger(&self.state(), args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("--json output")
    }

    pub fn create(&self, name: &str, extra: &[&str]) -> Value {
        let rootfs = self.rootfs.to_str().expect("utf-8");
        let mut args = vec![
            "vm",
            "create",
            name,
            "--kernel",
            "halt",
            "--rootfs",
            rootfs,
            "--memory",
            "128M",
            "--vmm",
            "firecracker",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&args)).expect("vm create --json")
    }

    pub fn vm(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["vm", "inspect", name, "--json"]))
            .expect("vm inspect --json")
    }

    pub fn pid(&self, name: &str) -> i64 {
        self.vm(name)["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("{name} has no pid"))
    }
}

pub fn sigkill(pid: i64) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL");
}

pub fn vm_files_left(state: &Path) -> usize {
    std::fs::read_dir(state.join("vms"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The daemon killed at one boundary of a command, then started again.
pub fn kill_daemon_during(f: &mut Fixture, boundary: &str, command: impl FnOnce(&Fixture)) {
    f.daemon.take().expect("daemon").stop();
    f.start_daemon_with(&[("BANGER_FAULT_KILL", boundary)]);
    command(f);
    let daemon = f.daemon();
    assert!(
        daemon
            .wait_for_line("fault injection: killing the daemon")
            .is_some(),
        "{boundary} was never reached"
    );
    daemon.wait_exit();
    f.daemon = None;
    f.start_daemon();
}
