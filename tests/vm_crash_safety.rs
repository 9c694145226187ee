//! Crash safety of the VM lifecycle on real firecracker VMs (halt
//! kernel): the daemon killed at every effect boundary of start, stop,
//! restart, rm and an automatic restart; a stop across a daemon restart; a
//! restart whose VMM binary is missing for a while; storms of concurrent
//! commands; the upgrade from the previous release's store; a re-adopted
//! VMM that does not answer. Skips (with the reason) without the fixture.

mod common;

use common::halt::*;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

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

impl banger::store::Record for VmRecordV1 {
    const TABLE: &'static str = "vms";
    fn key(&self) -> String {
        self.0["id"].as_str().unwrap_or_default().to_string()
    }
}

#[test]
fn a_store_from_the_previous_release_is_migrated_and_its_running_vm_adopted() {
    use banger::vmm::firecracker::Firecracker;
    use banger::vmm::host::{HostOps, LocalHost};
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
        nic: None,
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
    let halt: banger::catalog::KernelRecord = serde_json::from_value(serde_json::json!({
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
        format!(
            "[agent]\nbinary = \"{}\"\n[firecracker]\nbinary = \"{}\"\n",
            stub_agent(dir).display(),
            firecracker.display()
        ),
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

#[test]
fn a_launch_the_daemon_did_not_see_end_is_adopted_when_its_guest_runs() {
    let test = "a_launch_the_daemon_did_not_see_end_is_adopted_when_its_guest_runs";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    f.create("late", &[]);
    // Killed just before the `running` record: the store says launching,
    // with the pid; the VMM is configured and its guest runs.
    f.daemon.take().expect("daemon").stop();
    f.start_daemon_with(&[("BANGER_FAULT_KILL", "persist:3")]);
    drop(f.run(&["vm", "start", "late"]));
    let daemon = f.daemon();
    daemon
        .wait_for_line("fault injection: killing the daemon")
        .expect("killed before the running record");
    daemon.wait_exit();
    f.daemon = None;
    let live = f.vmms();
    assert_eq!(live.len(), 1, "{live:?}");
    f.start_daemon();
    let vm = f.wait_for("late", "settled", settled);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(
        vm["pid"].as_i64(),
        Some(i64::from(live[0])),
        "adopted, not relaunched"
    );
}

/// A launch in the background, its client's answer not waited for (the
/// daemon dies under it).
fn start_in_background(f: &Fixture, name: &str) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new(BANGER)
            .arg("--socket")
            .arg(socket_path(&f.state()))
            .args(["vm", "start", name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("banger vm start"),
    )
}

/// Waits for a stopped process (state T) of the fixture whose command line
/// or name says `what`; answers its pid.
fn stopped_process(f: &Fixture, what: &str) -> i32 {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let found = f.vmms().into_iter().find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(") ")
                .next()
                .and_then(|rest| rest.chars().next());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            state == Some('T')
                && (String::from_utf8_lossy(&cmdline).contains(what) || comm.trim_end() == what)
        });
        if let Some(pid) = found {
            return pid;
        }
        assert!(std::time::Instant::now() < deadline, "no stopped {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn sigkill_daemon(f: &mut Fixture) {
    let daemon = f.daemon.take().expect("daemon");
    kill(daemon.pid(), Signal::SIGKILL).expect("SIGKILL the daemon");
    drop(daemon);
}

#[test]
fn a_daemon_killed_between_fork_and_exec_leaves_no_vmm_behind() {
    let test = "a_daemon_killed_between_fork_and_exec_leaves_no_vmm_behind";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    f.create("web", &[]);
    f.start_daemon_with(&[("BANGER_FAULT_STOP_CHILD", "1")]);
    let _client = start_in_background(&f, "web");
    // The child is a copy of the daemon: it holds the daemon's lock.
    let child = stopped_process(&f, "banger-spawn");
    sigkill_daemon(&mut f);
    // The next daemon takes the lock from it, and no VMM appears later.
    f.start_daemon();
    assert!(
        !pid_alive(child.into()),
        "the child outlived the next daemon's start"
    );
    check_one_vmm_or_none(&f, "web", "killed between fork and exec");
}

#[test]
fn a_jailer_stopped_before_its_pivot_is_recognised_after_a_daemon_kill() {
    let test = "a_jailer_stopped_before_its_pivot_is_recognised_after_a_daemon_kill";
    let Some(mut f) = Fixture::with_jailer(test, true) else {
        return;
    };
    f.create("web", &[]);
    // The real jailer, run by a wrapper that stops first (no fault point
    // inside a real binary): its argv is the jailer's.
    let config = f.tmp.path().join("bangerd.toml");
    let real = std::fs::read_to_string(&config).expect("config");
    let jailer = std::env::var("BANGER_TEST_JAILER").expect("jailer");
    let wrapper = f.tmp.path().join("stopping-jailer");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nkill -STOP $$\nexec {jailer} \"$@\"\n"),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let wrapped = real.replace(
        &format!("\"{jailer}\""),
        &format!("\"{}\"", wrapper.display()),
    );
    assert_ne!(wrapped, real, "the config names the jailer");
    std::fs::write(&config, &wrapped).expect("config");
    // Killed right after the spawn, before the machine heard of it: the
    // stopped jailer is recorded nowhere.
    f.start_daemon_with(&[("BANGER_FAULT_KILL", "spawned:1")]);
    let _client = start_in_background(&f, "web");
    f.daemon()
        .wait_for_line("fault injection: killing the daemon")
        .expect("the spawn is reached");
    f.daemon().wait_exit();
    f.daemon = None;
    let stopped = stopped_process(&f, "stopping-jailer");
    std::fs::write(&config, &real).expect("config");
    f.start_daemon();
    // Let it go: if the sweep missed it, it would exec a VMM nobody claims.
    let _ = kill(nix::unistd::Pid::from_raw(stopped), Signal::SIGCONT);
    assert!(
        !pid_alive(stopped.into()),
        "the stopped jailer outlived the sweep"
    );
    check_one_vmm_or_none(&f, "web", "a jailer stopped before its pivot");
}
