//! VMs on the real firecracker binary (v1.12.1) booting the halt kernel:
//! lifecycle, crash restarts with backoff, crash loops, stop winning over a
//! pending restart, re-adoption after a daemon SIGKILL, and refusal of bad
//! requests. Skips (with the reason) where the fixture or KVM is missing.

mod common;

use std::path::Path;

use common::halt::*;
use common::*;
use nix::sys::signal::{Signal, kill};
use serde_json::Value;

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

#[test]
fn a_jail_on_another_filesystem_holds_the_vms_own_disk_not_a_copy() {
    let test = "a_jail_on_another_filesystem_holds_the_vms_own_disk_not_a_copy";
    let Some(f) = Fixture::jailed_on_tmpfs(test) else {
        return;
    };
    let vm = f.create("web", &["--start"]);
    let id = vm["id"].as_str().expect("id").to_string();
    let disk = f.state().join("vms").join(&id).join("rootfs.ext4");
    let jailed = f
        .tmp
        .path()
        .join("jail/firecracker")
        .join(&id)
        .join("root/rootfs.ext4");
    // The jail's disk is the VM's own inode, through a bind mount.
    use std::os::unix::fs::MetadataExt;
    let (own, seen) = (
        std::fs::metadata(&disk).expect("disk"),
        std::fs::metadata(&jailed).expect("jailed disk"),
    );
    assert_eq!(
        (own.dev(), own.ino()),
        (seen.dev(), seen.ino()),
        "a copy in the jail"
    );
    // A guest's write, made through the VMM's own descriptor of its disk
    // (stock guests do not boot on this machine's KVM).
    let written = b"written by the guest";
    let write_through_vmm = |pid: i64, at: u64| {
        use std::os::unix::fs::FileExt;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds");
        let fd = fds
            .filter_map(Result::ok)
            .find(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|target| target.ends_with("rootfs.ext4"))
            })
            .expect("the VMM holds its root disk open");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(fd.path())
            .expect("open the VMM's descriptor");
        file.write_all_at(written, at).expect("write");
        file.sync_all().expect("sync");
    };
    let read_disk = |at: u64| {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; written.len()];
        let file = std::fs::File::open(&disk).expect("disk");
        file.read_exact_at(&mut buf, at).expect("read");
        buf
    };
    write_through_vmm(f.pid("web"), 4096);
    f.ok(&["vm", "stop", "web", "--timeout", "0.1"]);
    assert_eq!(
        read_disk(4096),
        written,
        "the guest's write is on the VM's disk"
    );
    f.ok(&["vm", "start", "web"]);
    assert_eq!(read_disk(4096), written, "the next start keeps the disk");
    write_through_vmm(f.pid("web"), 8192);
    f.ok(&["vm", "rm", "web", "--force"]);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let jail_base = f.tmp.path().join("jail/firecracker");
    assert!(
        !mountinfo.contains(jail_base.to_str().expect("utf-8")),
        "a mount is left under the jail base: {mountinfo}"
    );
    assert_eq!(entries(&jail_base).len(), 0, "the chroot is removed");
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
            .delete::<banger::vm::record::VmRecord>(&id)
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
