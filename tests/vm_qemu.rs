//! Real guests end to end: Debian's cloud kernel imported from its package,
//! a busybox root disk, banger-agent as PID 1, on QEMU (TCG here). One VM
//! goes through boot, exec (output, exit status, stdin), a daemon SIGKILL
//! and restart (adopted, not rebooted), a VMM SIGKILL (restarted), and a
//! clean stop. Firecracker guest boots skip where KVM cannot boot a stock
//! kernel. Skips, with the reason, where a fixture is missing.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::guest::*;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn a_debian_guest_on_qemu_boots_runs_commands_survives_restarts_and_stops_cleanly() {
    let test = "a_debian_guest_on_qemu_boots_runs_commands_survives_restarts_and_stops_cleanly";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let mut f = Fixture::new(&guest);
    let version = import_kernel(&f, &guest.kernel_deb);

    let created = Instant::now();
    let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
    let vm = f.json(&[
        "vm", "create", "guest", "--kernel", "debian", "--rootfs", &rootfs, "--vmm", "qemu",
        "--memory", "256M", "--start", "--json",
    ]);
    assert_eq!(vm["state"], "running", "{vm}");
    if tcg_only() {
        assert_eq!(vm["accel"], "tcg", "{vm}");
    }
    // The agent's hello is the event this waits on (no fixed sleeps).
    let ping = f.json(&["vm", "ping", "guest", "--wait", "60", "--json"]);
    eprintln!(
        "figure: create to agent ready {:.2} s; guest boot clock at ready {} ms; {}",
        created.elapsed().as_secs_f64(),
        ping["boot"]["ready_ms"],
        ping
    );
    assert_eq!(ping["kernel"], version.as_str());
    assert_eq!(ping["hostname"], "guest");

    assert_eq!(f.exec_ok(&["uname", "-r"]).trim(), version);
    let seven = f.exec(&["sh", "-c", "echo out; echo err >&2; exit 7"], b"");
    assert_eq!(seven.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&seven.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&seven.stderr), "err\n");
    let echoed = f.exec(&["cat"], b"hi\n");
    assert!(echoed.status.success());
    assert_eq!(String::from_utf8_lossy(&echoed.stdout), "hi\n");
    let missing = f.exec(&["no-such-program"], b"");
    assert_eq!(missing.status.code(), Some(125), "banger's own failure");

    // Daemon SIGKILL and restart: the VM is adopted, not rebooted.
    let pid = f.pid();
    let before = f.uptime();
    let daemon = f.daemon.take().expect("daemon");
    kill(daemon.pid(), Signal::SIGKILL).expect("SIGKILL bangerd");
    let _ = daemon.wait_output();
    f.start_daemon();
    f.json(&["vm", "ping", "guest", "--wait", "30", "--json"]);
    assert_eq!(f.pid(), pid, "the same qemu process is adopted");
    let after = f.uptime();
    assert!(
        after > before,
        "uptime went from {before} to {after}: rebooted?"
    );

    // The VMM SIGKILLed: the VM is restarted and its agent answers again.
    let mark = f.log_mark();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL qemu");
    f.wait_for_log(
        &["agent ready"],
        mark,
        "the restarted guest's agent comes up",
    );
    let restarted = f.json(&["vm", "inspect", "guest", "--json"]);
    assert_eq!(restarted["state"], "running");
    assert_ne!(restarted["pid"].as_i64(), Some(pid));
    assert_eq!(restarted["last_exit"]["kind"], "crash");
    assert_eq!(f.exec_ok(&["echo", "back"]).trim(), "back");

    // A graceful stop: the agent powers the guest off; the exit is clean.
    let stopping = Instant::now();
    f.ok(&["vm", "stop", "guest"]);
    let stopped = f.json(&["vm", "inspect", "guest", "--json"]);
    eprintln!(
        "figure: vm stop took {:.2} s",
        stopping.elapsed().as_secs_f64()
    );
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["last_exit"]["kind"], "clean", "{stopped}");
    let refused = f.exec(&["true"], b"");
    assert_eq!(refused.status.code(), Some(125));
    f.ok(&["vm", "rm", "guest"]);
}

#[test]
fn a_poweroff_inside_the_guest_is_a_clean_stop_and_a_reboot_starts_it_again() {
    let test = "a_poweroff_inside_the_guest_is_a_clean_stop_and_a_reboot_starts_it_again";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let mut f = Fixture::new(&guest);
    import_kernel(&f, &guest.kernel_deb);
    let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
    f.json(&[
        "vm", "create", "guest", "--kernel", "debian", "--rootfs", &rootfs, "--vmm", "qemu",
        "--memory", "256M", "--start", "--json",
    ]);
    f.json(&["vm", "ping", "guest", "--wait", "60", "--json"]);
    let pid = f.pid();

    // busybox `reboot` signals PID 1, which announces the reboot.
    let mark = f.log_mark();
    let _ = f.exec(&["reboot"], b"");
    f.wait_for_log(
        &["agent ready"],
        mark,
        "the rebooted guest's agent comes up",
    );
    let rebooted = f.json(&["vm", "inspect", "guest", "--json"]);
    assert_eq!(rebooted["last_exit"]["kind"], "reboot", "{rebooted}");
    assert_ne!(rebooted["pid"].as_i64(), Some(pid));

    // busybox `poweroff`: announced, so the exit is clean and it stays down.
    let mark = f.log_mark();
    let _ = f.exec(&["poweroff"], b"");
    f.wait_for_log(&["VMM exited"], mark, "the guest powers off");
    let off = f.json(&["vm", "inspect", "guest", "--json"]);
    assert_eq!(off["state"], "stopped", "{off}");
    assert_eq!(off["last_exit"]["kind"], "clean", "{off}");

    // Ctrl-Alt-Del through QEMU (the stop's fallback when the agent does
    // not answer) is a poweroff request to PID 1.
    f.ok(&["vm", "start", "guest"]);
    f.json(&["vm", "ping", "guest", "--wait", "60", "--json"]);
    let id = f.json(&["vm", "inspect", "guest", "--json"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mark = f.log_mark();
    ctrl_alt_del(&f.state().join("vms").join(id).join("qmp.sock"));
    f.wait_for_log(&["VMM exited"], mark, "the guest powers off");
    let off = f.json(&["vm", "inspect", "guest", "--json"]);
    assert_eq!(off["last_exit"]["kind"], "clean", "{off}");
}

/// Presses Ctrl-Alt-Del through a QEMU's QMP socket.
fn ctrl_alt_del(qmp: &Path) {
    use std::io::{BufRead, BufReader};
    let stream = std::os::unix::net::UnixStream::connect(qmp).expect("connect QMP");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    for command in [
        r#"{"execute":"qmp_capabilities"}"#,
        r#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ctrl"},{"type":"qcode","data":"alt"},{"type":"qcode","data":"delete"}]}}"#,
    ] {
        writeln!(writer, "{command}").expect("send");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("answer");
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "QMP {command}: {line}");
        }
    }
}

/// KVM here cannot boot a stock kernel (no /dev/kvm, or nested PVM).
fn tcg_only() -> bool {
    !Path::new("/dev/kvm").exists() || Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn a_debian_guest_on_firecracker_answers_its_agent() {
    let test = "a_debian_guest_on_firecracker_answers_its_agent";
    if tcg_only() {
        skip(
            test,
            "KVM here cannot boot a stock guest kernel (no /dev/kvm, or nested PVM: /sys/module/kvm_pvm)",
        );
        return;
    }
    let Some(firecracker) = firecracker_fixture(test) else {
        return;
    };
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let f = Fixture::new(&guest);
    std::fs::write(
        f.tmp.path().join("bangerd.toml"),
        format!(
            "[agent]\nbinary = \"{}\"\n[firecracker]\nbinary = \"{}\"\n",
            guest.agent.display(),
            firecracker.display()
        ),
    )
    .expect("write config");
    let mut f = f;
    let daemon = f.daemon.take().expect("daemon");
    drop(daemon);
    f.start_daemon();
    let version = import_kernel(&f, &guest.kernel_deb);
    let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
    f.json(&[
        "vm",
        "create",
        "guest",
        "--kernel",
        "debian",
        "--rootfs",
        &rootfs,
        "--vmm",
        "firecracker",
        "--memory",
        "256M",
        "--start",
        "--json",
    ]);
    let ping = f.json(&["vm", "ping", "guest", "--wait", "60", "--json"]);
    assert_eq!(ping["kernel"], version.as_str());
    assert_eq!(f.exec_ok(&["uname", "-r"]).trim(), version);
    f.ok(&["vm", "stop", "guest"]);
    let stopped = f.json(&["vm", "inspect", "guest", "--json"]);
    assert_eq!(stopped["last_exit"]["kind"], "clean", "{stopped}");
}

/// The live qemu processes of this fixture. The daemon's own command line
/// names the state directory too, and so does a child it forked that has
/// not exec'd yet (an `nft` of a detach that runs after `vm kill`
/// answered): only processes running qemu count.
fn qemus(f: &Fixture) -> Vec<i32> {
    let mut pids = f.reaper.pids();
    pids.retain(|&pid| {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
            exe.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("qemu-system"))
        })
    });
    pids
}

#[test]
fn a_daemon_killed_at_random_moments_of_a_qemu_start_leaves_one_vmm_or_none() {
    let test = "a_daemon_killed_at_random_moments_of_a_qemu_start_leaves_one_vmm_or_none";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let mut f = Fixture::new(&guest);
    import_kernel(&f, &guest.kernel_deb);
    let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
    f.json(&[
        "vm", "create", "guest", "--kernel", "debian", "--rootfs", &rootfs, "--vmm", "qemu",
        "--memory", "256M", "--json",
    ]);
    // Delays spread over a start's first 400 ms, from a seed printed for
    // a rerun.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("random kill delays from seed {seed}");
    for round in 0..4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = std::time::Duration::from_millis(seed % 400);
        let mut start = Command::new(env!("CARGO_BIN_EXE_banger"))
            .arg("--socket")
            .arg(socket_path(&f.state()))
            .args(["vm", "start", "guest"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vm start");
        // The one deliberate sleep: where in the start the daemon dies.
        std::thread::sleep(delay);
        let mut daemon = f.daemon.take().expect("daemon");
        kill(daemon.pid(), Signal::SIGKILL).expect("SIGKILL bangerd");
        daemon.wait_exit();
        let _ = start.wait();
        f.start_daemon();
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let vm = loop {
            let vm = f.json(&["vm", "inspect", "guest", "--json"]);
            if !matches!(vm["state"].as_str(), Some("starting" | "stopping")) {
                break vm;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: never settled: {vm}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let live = qemus(&f);
        eprintln!(
            "round {round}: killed after {delay:?}: {} {live:?}",
            vm["state"]
        );
        match vm["state"].as_str() {
            Some("running") => {
                assert_eq!(
                    live,
                    [vm["pid"].as_i64().expect("pid") as i32],
                    "round {round} ({delay:?}): {vm}"
                );
                f.json(&["vm", "ping", "guest", "--wait", "60", "--json"]);
            }
            _ => assert!(live.is_empty(), "round {round} ({delay:?}): {live:?} {vm}"),
        }
        f.ok(&["vm", "kill", "guest"]);
        let left: Vec<String> = qemus(&f)
            .into_iter()
            .map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                format!(
                    "{pid}: {stat} {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                )
            })
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: no qemu after a kill, found {left:?}"
        );
    }
    f.ok(&["vm", "rm", "guest"]);
}
