//! VMs on the real firecracker binary (v1.12.1) booting the halt kernel:
//! lifecycle, crash restarts with backoff, crash loops, stop winning over a
//! pending restart, re-adoption after a daemon SIGKILL, and refusal of bad
//! requests. Skips (with the reason) where the fixture or KVM is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// A daemon configured with the firecracker fixture, a halt kernel
/// imported as `halt`, and a root filesystem file to clone.
// Fields drop in order: the daemon goes before the reaper kills the VMMs it
// left (else it would restart them), and the directory goes last.
struct Fixture {
    daemon: Option<Daemon>,
    _reaper: ProcessReaper,
    tmp: tempfile::TempDir,
    rootfs: PathBuf,
    jailed: bool,
}

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        Fixture::with_jailer(test, false)
    }

    /// With `jailed`, firecracker runs under the real jailer (root only).
    fn with_jailer(test: &str, jailed: bool) -> Option<Fixture> {
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
        let config = dir.join("bangerd.toml");
        std::fs::write(
            &config,
            format!(
                "[firecracker]\nbinary = \"{}\"\n{jailer}[restart]\ndelay_secs = 0.05\nmax_delay_secs = 0.2\n",
                firecracker.display()
            ),
        )
        .expect("write config");
        halt_kernel(&dir.join("halt.elf"));
        let rootfs = dir.join("rootfs.img");
        std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("write rootfs");
        let mut fixture = Fixture {
            _reaper: ProcessReaper(dir.join("state")),
            daemon: None,
            rootfs,
            jailed,
            tmp,
        };
        fixture.start_daemon();
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

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn start_daemon(&mut self) {
        self.start_daemon_with(&[]);
    }

    fn start_daemon_with(&mut self, env: &[(&str, &str)]) {
        let config = self.tmp.path().join("bangerd.toml");
        let args = ["--user", "--config", config.to_str().expect("utf-8 path")];
        self.daemon = Some(Daemon::ready(Daemon::spawn_with_env(
            &self.state(),
            &args,
            env,
        )));
    }

    /// Waits until the VM's state satisfies `done`; answers its view.
    fn wait_for(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
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
    fn wait_for_gone(&self, name: &str) -> bool {
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
    fn vmms(&self) -> Vec<i32> {
        let daemon = self.daemon.as_ref().map(|d| d.pid().as_raw());
        let mut pids = self._reaper.pids();
        pids.retain(|&pid| Some(pid) != daemon);
        pids
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon running")
    }

    fn run(&self, args: &[&str]) -> Output {
        banger(&self.state(), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn create(&self, name: &str, extra: &[&str]) -> Value {
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

    fn vm(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["vm", "inspect", name, "--json"]))
            .expect("vm inspect --json")
    }

    fn pid(&self, name: &str) -> i64 {
        self.vm(name)["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("{name} has no pid"))
    }
}

fn sigkill(pid: i64) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL");
}

fn vm_files_left(state: &Path) -> usize {
    std::fs::read_dir(state.join("vms"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_vm_is_created_started_listed_stopped_and_removed_without_a_trace() {
    let Some(f) =
        Fixture::new("a_vm_is_created_started_listed_stopped_and_removed_without_a_trace")
    else {
        return;
    };
    lifecycle(&f);
}

#[test]
fn a_jailed_vm_runs_in_its_chroot_and_leaves_nothing_behind() {
    let Some(f) = Fixture::with_jailer(
        "a_jailed_vm_runs_in_its_chroot_and_leaves_nothing_behind",
        true,
    ) else {
        return;
    };
    lifecycle(&f);
    let jails = f.state().join("jail/firecracker");
    assert_eq!(
        std::fs::read_dir(&jails).map(|d| d.count()).unwrap_or(0),
        0,
        "the chroot is removed"
    );
}

fn lifecycle(f: &Fixture) {
    let before = fingerprint(&f.rootfs);
    let vm = f.create("web", &["--start"]);
    assert_eq!(vm["state"], "running", "{vm}");
    let pid = vm["pid"].as_i64().expect("pid");
    assert!(pid_alive(pid));
    let id = vm["id"].as_str().expect("id").to_string();
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        cmdline.contains(&id),
        "the VMM is named by the VM's id: {cmdline:?}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    assert!(
        !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"),
        "the VMM never inherits the daemon's systemd socket"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root = banger::vmm::orphans::root_mount_source(&mountinfo).expect("root mount");
    if f.jailed {
        let jail = f.state().join("jail/firecracker").join(&id).join("root");
        assert_eq!(root, jail, "a jailed VMM runs pivoted into its jail");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or_default()
            .to_string();
        assert!(
            uid.contains("65534"),
            "a jailed VMM runs as the jail's uid: {uid}"
        );
    } else {
        assert_eq!(root, Path::new("/"));
    }

    let listed: Value = serde_json::from_str(&f.ok(&["vm", "ls", "--json"])).expect("vm ls --json");
    let fields = [
        "name",
        "id",
        "state",
        "vmm",
        "pid",
        "vcpus",
        "memory_mib",
        "kernel",
        "restart_policy",
        "restart_count",
        "next_restart_at",
        "last_exit",
        "created_at",
        "started_at",
    ];
    for field in fields {
        assert!(
            listed[0].get(field).is_some(),
            "vm ls --json lacks {field}: {listed}"
        );
    }
    assert_eq!(
        (listed[0]["vmm"].as_str(), listed[0]["memory_mib"].as_u64()),
        (Some("firecracker"), Some(128))
    );

    f.ok(&["vm", "start", "web"]);
    assert_eq!(f.pid("web"), pid, "starting a running VM is a no-op");

    f.ok(&["vm", "restart", "web", "--timeout", "0.2"]);
    let restarted = f.vm("web");
    assert_eq!(restarted["state"], "running");
    assert_ne!(
        restarted["pid"].as_i64(),
        Some(pid),
        "a restart runs a new VMM"
    );
    assert!(!pid_alive(pid));
    let pid = restarted["pid"].as_i64().expect("pid");

    // The halt kernel ignores Ctrl-Alt-Del: the stop times out into SIGKILL.
    f.ok(&["vm", "stop", "web", "--timeout", "0.2"]);
    let stopped = f.vm("web");
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["pid"], Value::Null);
    assert_eq!(stopped["last_exit"]["kind"], "killed");
    assert!(!pid_alive(pid));
    f.ok(&["vm", "stop", "web"]);

    f.ok(&["vm", "rm", "web"]);
    assert_eq!(vm_files_left(&f.state()), 0, "no socket, log or disk left");
    assert_eq!(f.run(&["vm", "rm", "web"]).status.code(), Some(1));
    assert_eq!(
        fingerprint(&f.rootfs),
        before,
        "the user's root filesystem is never written"
    );
}

#[test]
fn a_crashed_vmm_is_restarted_after_its_backoff_and_a_stop_wins_over_a_pending_restart() {
    let Some(mut f) = Fixture::new(
        "a_crashed_vmm_is_restarted_after_its_backoff_and_a_stop_wins_over_a_pending_restart",
    ) else {
        return;
    };
    f.create("crashy", &["--start"]);
    let first = f.pid("crashy");
    let mark = f.daemon().mark();
    sigkill(first);
    f.daemon()
        .wait_for_line_from(&["VM running", "vm=crashy"], mark)
        .expect("restarted");
    let vm = f.vm("crashy");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["restart_count"], 1);
    assert_eq!(vm["last_exit"]["kind"], "crash");
    assert_ne!(vm["pid"].as_i64(), Some(first));

    // A long backoff, then a stop before it fires.
    f.create(
        "patient",
        &[
            "--start",
            "--restart-delay",
            "30",
            "--restart-max-delay",
            "60",
        ],
    );
    let mark = f.daemon().mark();
    sigkill(f.pid("patient"));
    f.daemon()
        .wait_for_line_from(&["VMM exited", "vm=patient"], mark)
        .expect("crash seen");
    let crashed = f.vm("patient");
    assert_eq!(crashed["state"], "crashed");
    assert!(crashed["next_restart_at"].is_string(), "{crashed}");
    f.ok(&["vm", "stop", "patient"]);
    let stopped = f.vm("patient");
    assert_eq!(
        (stopped["state"].as_str(), &stopped["next_restart_at"]),
        (Some("stopped"), &Value::Null)
    );
}

#[test]
fn six_fast_crashes_make_a_crash_loop_still_retried() {
    let Some(mut f) = Fixture::new("six_fast_crashes_make_a_crash_loop_still_retried") else {
        return;
    };
    f.create("loopy", &["--start"]);
    for crash in 1..=6 {
        let mark = f.daemon().mark();
        sigkill(f.pid("loopy"));
        let (_, backoff) = f
            .daemon()
            .wait_for_line_from(&["VM phase", "vm=loopy", "BackingOff"], mark)
            .expect("exit seen");
        let expected = if crash == 6 {
            "crash_loop: true"
        } else {
            "crash_loop: false"
        };
        assert!(backoff.contains(expected), "crash {crash}: {backoff}");
        f.daemon()
            .wait_for_line_from(&["VM running", "vm=loopy"], mark)
            .expect("retried");
    }
    assert_eq!(f.vm("loopy")["restart_count"], 6);
}

#[test]
fn a_daemon_sigkill_leaves_vms_running_and_the_next_daemon_adopts_them() {
    let Some(mut f) =
        Fixture::new("a_daemon_sigkill_leaves_vms_running_and_the_next_daemon_adopts_them")
    else {
        return;
    };
    let names = ["a", "b", "c", "d", "e"];
    for name in names {
        f.create(name, &["--start"]);
    }
    let pids: Vec<i64> = names.iter().map(|n| f.pid(n)).collect();
    let daemon = f.daemon.take().expect("daemon");
    kill(daemon.pid(), Signal::SIGKILL).expect("SIGKILL bangerd");
    drop(daemon.wait_output());
    assert!(pids.iter().all(|&p| pid_alive(p)), "VMs outlive the daemon");
    sigkill(pids[0]);

    f.start_daemon();
    f.daemon()
        .wait_for_line_from(&["VM running", "vm=a"], 0)
        .expect("the VM that died meanwhile is restarted");
    for (name, pid) in names.iter().zip(&pids).skip(1) {
        let vm = f.vm(name);
        assert_eq!(
            (vm["state"].as_str(), vm["pid"].as_i64()),
            (Some("running"), Some(*pid)),
            "{name} adopted"
        );
        assert_eq!(vm["restart_count"], 0);
    }
    let a = f.vm("a");
    assert_eq!(
        (a["restart_count"].as_u64(), a["last_exit"]["kind"].as_str()),
        (Some(1), Some("crash"))
    );
    assert_ne!(a["pid"].as_i64(), Some(pids[0]));
}

#[test]
fn a_vmm_no_record_claims_is_terminated_at_start_up() {
    let test = "a_vmm_no_record_claims_is_terminated_at_start_up";
    let Some(f) = Fixture::new(test) else { return };
    orphans(f);
}

#[test]
fn a_jailed_vmm_no_record_claims_is_terminated_at_start_up() {
    let test = "a_jailed_vmm_no_record_claims_is_terminated_at_start_up";
    let Some(f) = Fixture::with_jailer(test, true) else {
        return;
    };
    orphans(f);
}

fn orphans(mut f: Fixture) {
    f.create("kept", &["--start"]);
    f.create("forgotten", &["--start"]);
    let (kept, forgotten) = (f.pid("kept"), f.pid("forgotten"));
    let id = f.vm("forgotten")["id"].as_str().expect("id").to_string();
    assert!(f.daemon.take().expect("daemon").stop().success());
    // As if the record never made it to the store.
    let opened =
        banger::store::open(&f.state(), banger::store::Schema::production()).expect("open");
    assert!(
        opened
            .store
            .delete::<banger::store::records::VmRecord>(&id)
            .expect("delete")
    );
    drop(opened);

    f.start_daemon();
    f.daemon()
        .wait_for_line_from(&["terminating a VMM that no VM record claims", &id], 0)
        .expect("the orphan is found");
    assert!(pid_alive(kept), "a claimed VMM is left alone");
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while pid_alive(forgotten) {
        assert!(std::time::Instant::now() < deadline, "the orphan survived");
        std::thread::yield_now();
    }
}

#[test]
fn logs_show_the_console_and_follow_what_the_vmm_appends() {
    let Some(f) = Fixture::new("logs_show_the_console_and_follow_what_the_vmm_appends") else {
        return;
    };
    let id = f.create("chatty", &["--start"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let console = f.state().join("vms").join(&id).join("console.log");
    let append = |text: &str| {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .expect("open console");
        file.write_all(text.as_bytes()).expect("append");
    };
    append("first line\nsecond line\n");
    assert_eq!(
        f.ok(&["vm", "logs", "chatty", "--tail", "1"]),
        "second line\n"
    );

    let mut follow = std::process::Command::new(BANGER)
        .arg("--socket")
        .arg(socket_path(&f.state()))
        .args(["vm", "logs", "chatty", "--follow", "--tail", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("banger vm logs --follow");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        follow.stdout.take().expect("stdout"),
    ));
    assert_eq!(lines.next().expect("a line").expect("read"), "second line");
    append("third line\n");
    assert_eq!(
        lines.next().expect("a line").expect("read"),
        "third line",
        "new output is followed"
    );
    follow.kill().expect("stop following");
    follow.wait().expect("reap");
}

#[test]
fn a_clean_daemon_stop_leaves_vms_running_for_the_next_daemon() {
    let test = "a_clean_daemon_stop_leaves_vms_running_for_the_next_daemon";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    f.create("steady", &["--start"]);
    let pid = f.pid("steady");
    assert!(
        f.daemon.take().expect("daemon").stop().success(),
        "SIGTERM exits 0"
    );
    assert!(pid_alive(pid), "stopping the daemon never stops a VM");
    f.start_daemon();
    f.daemon()
        .wait_for_line_from(&["re-adopted running VM", "vm=steady"], 0)
        .expect("adopted");
    let vm = f.vm("steady");
    assert_eq!(
        (vm["state"].as_str(), vm["pid"].as_i64()),
        (Some("running"), Some(pid))
    );
}

#[test]
fn a_stopping_vm_refuses_a_start_and_yields_to_a_kill() {
    let test = "a_stopping_vm_refuses_a_start_and_yields_to_a_kill";
    let Some(f) = Fixture::new(test) else { return };
    f.create("slow", &["--start"]);
    // The halt kernel ignores Ctrl-Alt-Del: this stop waits out its timeout.
    let mut stopper = Conn::open(&f.state());
    stopper.send(&request(
        1,
        "vm.stop",
        serde_json::json!({"name": "slow", "timeout_secs": 60}),
    ));
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while f.vm("slow")["state"] != "stopping" {
        assert!(std::time::Instant::now() < deadline, "the stop never began");
    }
    let start = f.run(&["vm", "start", "slow"]);
    assert_eq!(start.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&start.stderr).contains("is stopping"),
        "{start:?}"
    );
    f.ok(&["vm", "kill", "slow"]);
    let (stopped, _) = stopper.response(1);
    assert_eq!(stopped["result"]["vm"]["state"], "stopped", "{stopped}");
    assert_eq!(f.vm("slow")["last_exit"]["kind"], "killed");
}

#[test]
fn bad_requests_are_refused_and_leave_no_vm() {
    let Some(f) = Fixture::new("bad_requests_are_refused_and_leave_no_vm") else {
        return;
    };
    let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "vm", "create", "Bad_Name", "--kernel", "halt", "--rootfs", &rootfs,
            ],
            "invalid params: name:",
        ),
        (
            &[
                "vm", "create", "a", "--kernel", "missing", "--rootfs", &rootfs,
            ],
            "no kernel named missing",
        ),
        (
            &[
                "vm", "create", "a", "--kernel", "halt", "--rootfs", &rootfs, "--memory", "0",
            ],
            "invalid params: memory:",
        ),
        (
            &[
                "vm",
                "create",
                "a",
                "--kernel",
                "halt",
                "--rootfs",
                "/no/such/file",
            ],
            "invalid params: rootfs:",
        ),
        (
            &[
                "vm", "create", "a", "--kernel", "halt", "--rootfs", &rootfs, "--vcpus", "0",
            ],
            "invalid params: vcpus:",
        ),
    ];
    for (args, expected) in cases {
        let out = f.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let listed: Value = serde_json::from_str(&f.ok(&["vm", "ls", "--json"])).expect("json");
    assert_eq!(listed, Value::Array(vec![]));
    assert_eq!(vm_files_left(&f.state()), 0);

    f.create("user", &[]);
    let refused = f.run(&["kernel", "rm", "halt"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("used by VM user"));
    let named = f.run(&[
        "vm",
        "create",
        "user",
        "--kernel",
        "halt",
        "--rootfs",
        &rootfs,
        "--vmm",
        "firecracker",
    ]);
    assert!(String::from_utf8_lossy(&named.stderr).contains("already exists"));
}

/// Settled: no launch, stop or removal under way.
fn settled(vm: &Value) -> bool {
    !matches!(
        vm["state"].as_str(),
        Some("starting" | "stopping" | "removing")
    )
}

/// After a daemon restart: the VM (if it still exists) has exactly the
/// VMM its record names, or none; and it starts and stops again.
fn check_one_vmm_or_none(f: &Fixture, name: &str, case: &str) {
    let listed: Value = serde_json::from_str(&f.ok(&["vm", "ls", "--json"])).expect("json");
    let exists = listed
        .as_array()
        .expect("array")
        .iter()
        .any(|vm| vm["name"] == name);
    if !exists {
        assert!(f.vmms().is_empty(), "{case}: VMMs left: {:?}", f.vmms());
        return;
    }
    let vm = f.wait_for(name, "settled", settled);
    let live = f.vmms();
    match vm["state"].as_str() {
        Some("running") => {
            let pid = vm["pid"].as_i64().expect("pid") as i32;
            assert_eq!(
                live,
                [pid],
                "{case}: the record names the one live VMM: {vm}"
            );
        }
        _ => assert!(
            live.is_empty(),
            "{case}: no VMM without a record: {live:?} {vm}"
        ),
    }
    f.ok(&["vm", "start", name]);
    let started = f.vm(name);
    assert_eq!(started["state"], "running", "{case}: {started}");
    assert_eq!(f.vmms().len(), 1, "{case}: one VMM after a start");
    f.ok(&["vm", "stop", name, "--timeout", "0.2"]);
    assert_eq!(f.vm(name)["state"], "stopped", "{case}");
    assert!(f.vmms().is_empty(), "{case}: no VMM after a stop");
}

/// The daemon killed at one boundary of a command, then started again.
fn kill_daemon_during(f: &mut Fixture, boundary: &str, command: impl FnOnce(&Fixture)) {
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

#[test]
fn a_daemon_killed_at_any_lifecycle_boundary_leaves_one_vmm_or_none() {
    let test = "a_daemon_killed_at_any_lifecycle_boundary_leaves_one_vmm_or_none";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    let start = [
        "persist:1",
        "arm-timer:1",
        "spawn:1",
        "spawned:1",
        "persist:2",
        "configure:1",
        "persist:3",
        "connect-agent:1",
        "reply:1",
    ];
    let stop = [
        "persist:1",
        "ask-poweroff:1",
        "arm-timer:1",
        "persist:2",
        "kill:1",
        "persist:3",
        "reply:1",
    ];
    let restart = [
        "persist:1",
        "ask-poweroff:1",
        "persist:2",
        "kill:1",
        "persist:3",
        "spawn:1",
        "spawned:1",
        "persist:4",
        "configure:1",
        "persist:5",
        "reply:1",
    ];
    let remove = [
        "persist:1",
        "kill:1",
        "remove-files:1",
        "delete:1",
        "reply:1",
    ];
    let crash = [
        "persist:1",
        "arm-timer:1",
        "persist:2",
        "spawn:1",
        "spawned:1",
        "persist:3",
        "configure:1",
        "persist:4",
    ];
    let mut case = 0;
    let mut next = |f: &Fixture, running: bool| {
        case += 1;
        let name = format!("vm{case}");
        f.create(&name, if running { &["--start"] } else { &[] });
        name
    };
    // The command's output does not matter: the daemon may die under it.
    for boundary in start {
        let name = next(&f, false);
        kill_daemon_during(&mut f, boundary, |f| drop(f.run(&["vm", "start", &name])));
        check_one_vmm_or_none(&f, &name, &format!("start at {boundary}"));
    }
    for boundary in stop {
        let name = next(&f, true);
        kill_daemon_during(&mut f, boundary, |f| {
            drop(f.run(&["vm", "stop", &name, "--timeout", "0.3"]))
        });
        check_one_vmm_or_none(&f, &name, &format!("stop at {boundary}"));
    }
    for boundary in restart {
        let name = next(&f, true);
        kill_daemon_during(&mut f, boundary, |f| {
            drop(f.run(&["vm", "restart", &name, "--timeout", "0.3"]))
        });
        check_one_vmm_or_none(&f, &name, &format!("restart at {boundary}"));
    }
    for boundary in remove {
        let name = next(&f, true);
        kill_daemon_during(&mut f, boundary, |f| {
            drop(f.run(&["vm", "rm", &name, "--force"]))
        });
        // Once durable, a removal goes on after the restart: the VM ends
        // gone. Killed before that, the VM stays as it was.
        if boundary != "persist:1" {
            assert!(f.wait_for_gone(&name), "rm at {boundary}: {name} came back");
        }
        check_one_vmm_or_none(&f, &name, &format!("rm at {boundary}"));
    }
    for boundary in crash {
        let name = next(&f, true);
        kill_daemon_during(&mut f, boundary, |f| sigkill(f.pid(&name)));
        check_one_vmm_or_none(&f, &name, &format!("automatic restart at {boundary}"));
    }
    let left: Vec<_> = std::fs::read_dir(f.state().join("vms"))
        .expect("vms dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let listed: Value = serde_json::from_str(&f.ok(&["vm", "ls", "--json"])).expect("json");
    assert_eq!(
        left.len(),
        listed.as_array().expect("array").len(),
        "every VM directory is a VM's: {left:?}"
    );
}

#[test]
fn a_stop_in_progress_survives_a_daemon_restart_and_ends_at_its_deadline() {
    let test = "a_stop_in_progress_survives_a_daemon_restart_and_ends_at_its_deadline";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    f.create("patient", &["--start"]);
    let pid = f.pid("patient");
    // The halt kernel ignores the poweroff: the stop runs to its deadline.
    let mut stopper = Conn::open(&f.state());
    stopper.send(&request(
        1,
        "vm.stop",
        serde_json::json!({"name": "patient", "timeout_secs": 3}),
    ));
    let stopping = f.wait_for("patient", "stopping", |vm| vm["state"] == "stopping");
    let deadline: jiff::Timestamp = stopping["phase"]["deadline"]
        .as_str()
        .expect("deadline shown")
        .parse()
        .expect("timestamp");
    sigkill(f.daemon().pid().as_raw() as i64);
    f.daemon().wait_exit();
    f.daemon = None;
    assert!(pid_alive(pid), "a daemon's death never stops a VM");
    f.start_daemon();
    let stopped = f.wait_for("patient", "stopped", |vm| vm["state"] == "stopped");
    assert!(
        jiff::Timestamp::now() >= deadline,
        "killed only at the stop's deadline"
    );
    assert_eq!(stopped["last_exit"]["kind"], "killed", "{stopped}");
    assert_eq!(stopped["restart_count"], 0, "a stop is never restarted");
    assert!(!pid_alive(pid));
}

#[test]
fn an_automatic_restart_that_cannot_launch_is_retried_until_it_can() {
    let test = "an_automatic_restart_that_cannot_launch_is_retried_until_it_can";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    f.create("phoenix", &["--start"]);
    let link = f.tmp.path().join("firecracker");
    let target = std::fs::read_link(&link).expect("link");
    std::fs::remove_file(&link).expect("take the binary away");
    let mark = f.daemon().mark();
    sigkill(f.pid("phoenix"));
    // Two failed launches, each a crash that backs off (never `failed`).
    for _ in 0..2 {
        f.daemon()
            .wait_for_line_from(&["VM failed to start", "vm=phoenix"], mark)
            .expect("the launch fails");
        let mark = f.daemon().mark();
        f.daemon()
            .wait_for_line_from(&["VM phase", "vm=phoenix", "BackingOff"], mark)
            .expect("backs off");
    }
    let vm = f.vm("phoenix");
    assert_ne!(vm["state"], "failed", "{vm}");
    assert!(
        vm["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot start"),
        "{vm}"
    );
    std::os::unix::fs::symlink(&target, &link).expect("the binary is back");
    let vm = f.wait_for("phoenix", "running", |vm| vm["state"] == "running");
    assert!(vm["restart_count"].as_i64().unwrap_or(0) >= 2, "{vm}");
    assert_eq!(f.vmms().len(), 1);
}

#[test]
fn concurrent_commands_on_one_vm_get_success_or_a_conflict_naming_the_phase() {
    let test = "concurrent_commands_on_one_vm_get_success_or_a_conflict_naming_the_phase";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    for round in 0..3 {
        let name = format!("storm{round}");
        f.create(&name, &["--start"]);
        let commands: [&[&str]; 5] = [
            &["vm", "start"],
            &["vm", "stop", "--timeout", "0.2"],
            &["vm", "kill"],
            &["vm", "restart", "--timeout", "0.2"],
            &["vm", "rm", "--force"],
        ];
        let state = f.state();
        let outcomes: Vec<(String, std::process::Output)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..12)
                .map(|i| {
                    let command = commands[(i * 7 + round) % commands.len()];
                    let (state, name) = (&state, &name);
                    scope.spawn(move || {
                        let mut args = command.to_vec();
                        args.insert(2, name);
                        (args.join(" "), banger(state, &args))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client"))
                .collect()
        });
        for (command, out) in &outcomes {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success()
                    || stderr.contains(&format!("VM {name} is"))
                    || stderr.contains(&format!("VM {name}: "))
                    || stderr.contains(&format!("no VM named {name}")),
                "{command}: {stderr}"
            );
        }
        let exists = |f: &Fixture| {
            let listed: Value = serde_json::from_str(&f.ok(&["vm", "ls", "--json"])).expect("json");
            listed
                .as_array()
                .expect("array")
                .iter()
                .any(|vm| vm["name"] == name.as_str())
        };
        let before = exists(&f);
        if before {
            let vm = f.wait_for(&name, "settled", settled);
            let live = f.vmms();
            match vm["state"].as_str() {
                Some("running") => assert_eq!(live.len(), 1, "{vm}"),
                _ => assert!(live.is_empty(), "{live:?} {vm}"),
            }
            f.ok(&["vm", "rm", &name, "--force"]);
        }
        // No record comes back after its removal, not even across a restart.
        f.daemon.take().expect("daemon").stop();
        f.start_daemon();
        assert!(!exists(&f), "{name} was resurrected");
        assert!(f.vmms().is_empty());
    }
}

/// A vms record in the previous release's shape (v1: `state`, no phase).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct VmRecordV1(Value);

impl banger::store::records::Record for VmRecordV1 {
    const TABLE: &'static str = "vms";
    fn key(&self) -> String {
        self.0["id"].as_str().unwrap_or_default().to_string()
    }
}

#[test]
fn a_store_from_the_previous_release_is_migrated_and_its_running_vm_adopted() {
    use banger::host::{HostOps, LocalHost};
    use banger::vmm::firecracker::Firecracker;
    use banger::vmm::process::{ProcessHandle, read_stat};
    use banger::vmm::{BootFiles, LaunchSpec, VmPaths, Vmm};
    use std::sync::Arc;

    let test = "a_store_from_the_previous_release_is_migrated_and_its_running_vm_adopted";
    let Some(firecracker) = firecracker_fixture(test) else {
        return;
    };
    let tmp = state_dir();
    let dir = tmp.path();
    let state = dir.join("state");
    let _reaper = ProcessReaper(state.clone());
    let kernel = dir.join("halt.elf");
    halt_kernel(&kernel);
    let id = "upgr4d3vm0";
    let vm_dir = state.join("vms").join(id);
    std::fs::create_dir_all(&vm_dir).expect("vm dir");
    let rootfs = vm_dir.join("rootfs.ext4");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("rootfs");

    // Started as the previous release starts a VMM: its own session, the
    // console appended to its stdout (no lock), configured over the API.
    let backend = Firecracker {
        binary: firecracker.clone(),
        jail: None,
    };
    let spec = LaunchSpec {
        id: id.into(),
        paths: VmPaths {
            dir: vm_dir.clone(),
        },
        boot: BootFiles {
            vmlinux: kernel.clone(),
            bzimage: None,
            initrd: None,
            args: backend.default_boot_args().into(),
        },
        rootfs: rootfs.clone(),
        vcpus: 1,
        memory_mib: 128,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pid, process) = runtime.block_on(async {
        let host: Arc<dyn HostOps> = Arc::new(LocalHost);
        let prepared = backend.prepare(&host, &spec).await.expect("prepare");
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.paths.console_log())
            .expect("console");
        let pid = host.spawn_vmm(&prepared.command, console).expect("spawn") as i32;
        let handle = ProcessHandle::open(pid).expect("pidfd");
        backend.configure(&spec, &handle).await.expect("configure");
        let start_time = read_stat(pid).expect("stat").expect("alive").start_time;
        let process = serde_json::json!({
            "pid": pid,
            "start_time": start_time,
            "api_socket": prepared.api_socket,
            "agent": prepared.agent,
            "accel": null,
        });
        (pid, process)
    });

    let now = jiff::Timestamp::now().to_string();
    let mut v1 = banger::store::Schema::production();
    v1.migrations.clear();
    for table in &mut v1.tables {
        table.version = 1;
    }
    let store = banger::store::open(&state, v1)
        .expect("a store as the last release wrote it")
        .store;
    let halt: banger::store::records::KernelRecord = serde_json::from_value(serde_json::json!({
        "name": "halt",
        "vmlinux": kernel,
        "created_at": now,
    }))
    .expect("kernel record");
    store.put(&halt).expect("put kernel");
    store
        .put(&VmRecordV1(serde_json::json!({
            "id": id,
            "name": "legacy",
            "state": "running",
            "vmm": "firecracker",
            "vcpus": 1,
            "memory_mib": 128,
            "kernel": "halt",
            "rootfs": rootfs,
            "created_at": now,
            "started_at": now,
            "restart_policy": {"mode": "on-failure", "delay_ms": 1000, "max_delay_ms": 60000},
            "restart_count": 0,
            "restart_history": {"step": 0, "recent": []},
            "next_restart_at": null,
            "last_exit": null,
            "process": process,
            "error": null,
        })))
        .expect("put v1 vm");
    drop(store);

    let config = dir.join("bangerd.toml");
    std::fs::write(
        &config,
        format!("[firecracker]\nbinary = \"{}\"\n", firecracker.display()),
    )
    .expect("config");
    let mut daemon = Daemon::ready(Daemon::spawn_with(
        &state,
        &["--user", "--config", config.to_str().expect("utf-8")],
    ));
    daemon
        .wait_for_line_from(&["re-adopted running VM", "vm=legacy"], 0)
        .expect("adopted");
    let backups = std::fs::read_dir(&state)
        .expect("state dir")
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("banger.redb.bak-")
            })
        })
        .count();
    assert_eq!(backups, 1, "the v1 store is kept beside the migrated one");
    let vm: Value = serde_json::from_str(&String::from_utf8_lossy(
        &banger(&state, &["vm", "inspect", "legacy", "--json"]).stdout,
    ))
    .expect("inspect");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(
        vm["pid"].as_i64(),
        Some(pid as i64),
        "adopted, not restarted"
    );
    let stop = banger(&state, &["vm", "stop", "legacy", "--timeout", "0.2"]);
    assert!(stop.status.success(), "{stop:?}");
    assert!(!pid_alive(pid as i64));
}

#[test]
fn a_readopted_vmm_that_does_not_answer_is_degraded_never_killed() {
    let test = "a_readopted_vmm_that_does_not_answer_is_degraded_never_killed";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    f.create("frozen", &["--start"]);
    let pid = f.pid("frozen");
    let mut daemon = f.daemon.take().expect("daemon");
    sigkill(daemon.pid().as_raw() as i64);
    daemon.wait_exit();
    // A VMM that cannot answer its API while the next daemon looks at it.
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
    f.start_daemon();
    f.daemon()
        .wait_for_line_from(&["the VM is degraded", "vm=frozen"], 0)
        .expect("shown degraded");
    let vm = f.vm("frozen");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(
        vm["pid"].as_i64(),
        Some(pid),
        "never killed for not answering"
    );
    assert!(vm["degraded"].is_string(), "{vm}");
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).expect("SIGCONT");
    let vm = f.wait_for("frozen", "answering again", |vm| vm["degraded"].is_null());
    assert_eq!(vm["pid"].as_i64(), Some(pid));
    assert!(pid_alive(pid));
}
