//! A real guest for end-to-end tests: Debian's cloud kernel from its
//! package, a busybox root disk, banger-agent as PID 1, on QEMU, driven
//! through the `banger` CLI of a daemon of its own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::*;

fn write_config(dir: &Path, agent: &Path) {
    std::fs::write(
        dir.join("bangerd.toml"),
        format!(
            "[agent]\nbinary = \"{}\"\n[restart]\ndelay_secs = 0.1\nmax_delay_secs = 1\n[rpc]\nheartbeat_secs = 0.5\n",
            agent.display()
        ),
    )
    .expect("write config");
}

/// Everything a guest boot needs, or the reason it cannot run here.
pub struct Guest {
    pub kernel_deb: PathBuf,
    pub agent: PathBuf,
}

pub fn guest_fixtures(test: &str) -> Option<Guest> {
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_file())
    };
    let Some(kernel_deb) = var("BANGER_TEST_KERNEL_DEB") else {
        skip(
            test,
            "BANGER_TEST_KERNEL_DEB is not set (scripts/test.sh downloads the Debian cloud kernel)",
        );
        return None;
    };
    let Some(agent) = var("BANGER_TEST_AGENT") else {
        skip(
            test,
            "BANGER_TEST_AGENT is not set (scripts/test.sh builds the static agent)",
        );
        return None;
    };
    if !tools_installed(test, &["qemu-system-x86_64", "mke2fs", "debugfs"]) {
        return None;
    }
    Some(Guest { kernel_deb, agent })
}

// Fields drop in order: the daemon before the reaper kills the VMMs it left.
pub struct Fixture {
    pub daemon: Option<Daemon>,
    /// The network namespace the daemon runs in (else one of its own).
    pub netns: Option<PathBuf>,
    pub reaper: ProcessReaper,
    pub tmp: tempfile::TempDir,
    pub rootfs: PathBuf,
}

impl Fixture {
    pub fn new(guest: &Guest) -> Fixture {
        Fixture::with_agent(&guest.agent)
    }

    /// A daemon whose VMs boot with the agent binary `agent`.
    pub fn with_agent(agent: &Path) -> Fixture {
        Fixture::build(agent, None)
    }

    /// A daemon inside the network namespace `netns` (`/run/netns/NAME`).
    pub fn in_netns(guest: &Guest, netns: PathBuf) -> Fixture {
        Fixture::build(&guest.agent, Some(netns))
    }

    fn build(agent: &Path, netns: Option<PathBuf>) -> Fixture {
        let tmp = state_dir();
        let dir = tmp.path();
        write_config(dir, agent);
        let rootfs = dir.join("busybox.ext4");
        let built = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/busybox-rootfs.sh"
        ))
        .arg(&rootfs)
        .output()
        .expect("run scripts/busybox-rootfs.sh");
        assert!(
            built.status.success(),
            "busybox root disk: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let mut fixture = Fixture {
            reaper: ProcessReaper(dir.join("state")),
            daemon: None,
            netns,
            rootfs,
            tmp,
        };
        fixture.start_daemon();
        fixture
    }

    /// The agent the next VM start injects (the daemon reads it at start).
    pub fn set_agent(&mut self, agent: &Path) {
        write_config(self.tmp.path(), agent);
    }

    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    pub fn start_daemon(&mut self) {
        let config = self.tmp.path().join("bangerd.toml");
        let args = ["--user", "--config", config.to_str().expect("utf-8 path")];
        let daemon = Daemon::spawn_in(
            self.netns.as_deref(),
            Path::new(BANGERD),
            &self.state(),
            &args,
            &[],
        );
        self.daemon = Some(Daemon::ready(daemon));
    }

    pub fn run(&self, args: &[&str]) -> Output {
        banger(&self.state(), args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.console()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("--json output")
    }

    /// Where the daemon's log stands: a mark for [`Fixture::wait_for_log`].
    pub fn log_mark(&mut self) -> usize {
        self.daemon.as_mut().expect("daemon").mark()
    }

    /// Waits for a daemon log line after `mark` holding every one of
    /// `needles`; `what` says what it shows, for the failure.
    pub fn wait_for_log(&mut self, needles: &[&str], mark: usize, what: &str) {
        self.daemon
            .as_mut()
            .expect("daemon")
            .wait_for_line_from(needles, mark)
            .unwrap_or_else(|| panic!("{what}: the daemon exited first"));
    }

    pub fn console(&self) -> String {
        let out = self.run(&["vm", "logs", "guest", "--tail", "40"]);
        format!(
            "\n--- console (last lines) ---\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    }

    /// `banger vm exec guest -- argv`, with `stdin` piped in.
    pub fn exec(&self, argv: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_banger"))
            .arg("--socket")
            .arg(socket_path(&self.state()))
            .args(["vm", "exec", "guest", "--"])
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn banger vm exec");
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin).expect("write stdin");
        drop(input);
        child.wait_with_output().expect("banger vm exec")
    }

    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv, b"");
        assert!(
            out.status.success(),
            "vm exec {argv:?}: {:?} {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            self.console()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn pid(&self) -> i64 {
        self.json(&["vm", "inspect", "guest", "--json"])["pid"]
            .as_i64()
            .expect("guest has a pid")
    }

    pub fn uptime(&self) -> f64 {
        self.exec_ok(&["cat", "/proc/uptime"])
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("uptime")
    }
}

pub fn import_kernel(f: &Fixture, deb: &Path) -> String {
    let kernel = f.json(&[
        "kernel",
        "import-deb",
        "debian",
        deb.to_str().expect("utf-8"),
        "--json",
    ]);
    kernel["version"]
        .as_str()
        .expect("the imported kernel has a version")
        .to_string()
}
