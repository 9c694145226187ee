//! `vm exec` under pressure, on real QEMU guests through the CLI: output
//! nobody reads, a stdin flood, 100 MB each way, signals from the CLI, a
//! CLI that dies, and a VM that still runs the previous release's agent
//! (protocol 1). Memory is read from /proc: the daemon's peak RSS (VmHWM,
//! reset through clear_refs) and the guest agent's, PID 1's, from inside.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// Every process's command line, in the guest.
const PROCESSES: &str = "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; true";

/// Daemon log lines a flood may cause: a flood is not logged per frame.
const LOG_BOUND: usize = 50;

/// What a flood may add to the daemon's resident memory.
const DAEMON_BOUND_KIB: u64 = 16 * 1024;
/// What the guest agent may hold at its peak, whatever the flood.
const AGENT_BOUND_KIB: u64 = 24 * 1024;

fn agent_kib(f: &Fixture, field: &str) -> u64 {
    status_kib(&f.exec_ok(&["cat", "/proc/1/status"]), field)
}

fn daemon_pid(f: &Fixture) -> Pid {
    f.daemon.as_ref().expect("daemon").pid()
}

/// `banger vm exec guest -- argv` with the stdio given, not waited for.
fn spawn_exec(f: &Fixture, argv: &[&str], stdin: Stdio, stdout: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_banger"))
        .arg("--socket")
        .arg(socket_path(&f.state()))
        .args(["vm", "exec", "guest", "--"])
        .args(argv)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn banger vm exec")
}

/// One `vm exec -- true`, timed.
fn round_trip(f: &Fixture) -> Duration {
    let started = Instant::now();
    f.exec_ok(&["true"]);
    started.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Round trips of other execs while a flood runs, until `until`.
fn round_trips_until(f: &Fixture, until: Instant) -> Vec<Duration> {
    let mut samples = Vec::new();
    while Instant::now() < until || samples.is_empty() {
        samples.push(round_trip(f));
    }
    samples
}

fn boot(f: &Fixture, guest: &Guest) {
    import_kernel(f, &guest.kernel_deb);
    let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
    let vm = f.json(&[
        "vm", "create", "guest", "--kernel", "debian", "--rootfs", &rootfs, "--vmm", "qemu",
        "--memory", "256M", "--start", "--json",
    ]);
    assert_eq!(vm["state"], "running", "{vm}");
    f.json(&["vm", "ping", "guest", "--wait", "60", "--json"]);
}

/// The VM's qemu pid and restart count: unchanged if it was not restarted.
fn incarnation(f: &Fixture) -> (i64, i64) {
    let vm = f.json(&["vm", "inspect", "guest", "--json"]);
    (
        vm["pid"].as_i64().expect("pid"),
        vm["restart_count"].as_i64().expect("restart count"),
    )
}

#[test]
fn unread_output_and_a_stdin_flood_hold_only_their_own_session() {
    let test = "unread_output_and_a_stdin_flood_hold_only_their_own_session";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let mut f = Fixture::new(&guest);
    boot(&f, &guest);
    let before = incarnation(&f);
    let log_mark = f.log_mark();
    let usual = median((0..5).map(|_| round_trip(&f)).collect());
    f.exec_ok(&["sh", "-c", "echo 5 > /proc/1/clear_refs"]);
    let pid = daemon_pid(&f);

    // Output into a pipe nobody reads, for 30 s.
    let baseline = reset_peak_rss(pid);
    let mut unread = spawn_exec(&f, &["cat", "/dev/zero"], Stdio::null(), Stdio::piped());
    let during = round_trips_until(&f, Instant::now() + Duration::from_secs(30));
    let peak = process_kib(pid, "VmHWM");
    let during_p50 = median(during.clone());
    let during_max = during.iter().max().copied().unwrap_or_default();
    eprintln!(
        "figure: unread output 30 s: daemon RSS {baseline} KiB, peak {peak} KiB; exec round trip p50 {usual:?} before, {during_p50:?} during (max {during_max:?}, {} calls)",
        during.len()
    );
    assert!(
        peak <= baseline + DAEMON_BOUND_KIB,
        "daemon peak {peak} KiB over baseline {baseline} KiB + 16 MiB"
    );
    assert!(
        during_p50 <= usual * 3 + Duration::from_millis(250),
        "exec round trip {during_p50:?} while output is unread, {usual:?} before"
    );
    unread.kill().expect("kill the CLI");
    let _ = unread.wait();
    // Its process is hung up: no cat is left in the guest.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while f
        .exec_ok(&["sh", "-c", PROCESSES])
        .contains("cat /dev/zero")
    {
        assert!(Instant::now() < deadline, "the process outlived its CLI");
    }
    let after_kill = process_kib(pid, "VmRSS");
    assert!(
        after_kill <= baseline + DAEMON_BOUND_KIB,
        "daemon kept {after_kill} KiB after the client went (baseline {baseline})"
    );

    // A stdin flood into a process that never reads it.
    let baseline = reset_peak_rss(pid);
    let mut flood = spawn_exec(&f, &["sleep", "20"], Stdio::piped(), Stdio::null());
    let mut input = flood.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let chunk = b"y\n".repeat(32 * 1024);
        let mut written = 0u64;
        while input.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        written
    });
    let started = Instant::now();
    let during = round_trips_until(&f, started + Duration::from_secs(15));
    let status = flood.wait().expect("wait for the flooded exec");
    let accepted = writer.join().expect("writer");
    let peak = process_kib(pid, "VmHWM");
    eprintln!(
        "figure: stdin flood: daemon RSS {baseline} KiB, peak {peak} KiB; {accepted} bytes taken from the writer; exec round trip p50 {:?} during; sleep 20 took {:?}",
        median(during.clone()),
        started.elapsed()
    );
    assert!(status.success(), "the flooded exec ended {status:?}");
    assert!(
        peak <= baseline + DAEMON_BOUND_KIB,
        "daemon peak {peak} KiB over baseline {baseline} KiB + 16 MiB"
    );
    assert!(
        median(during) <= usual * 3 + Duration::from_millis(250),
        "exec round trip while stdin floods"
    );
    assert_eq!(incarnation(&f), before, "the guest was restarted");
    let logged = f.log_mark() - log_mark;
    eprintln!("figure: {logged} daemon log lines during both floods");
    assert!(logged <= LOG_BOUND, "the daemon logged {logged} lines");
    let agent_peak = agent_kib(&f, "VmHWM");
    eprintln!("figure: guest agent peak RSS over both floods {agent_peak} KiB");
    assert!(
        agent_peak <= AGENT_BOUND_KIB,
        "the agent peaked at {agent_peak} KiB"
    );
}

/// Hashes what comes through `vm exec` and what the guest says it sent.
fn hash(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[test]
fn a_hundred_megabytes_each_way_arrive_intact_and_signals_reach_the_process() {
    let test = "a_hundred_megabytes_each_way_arrive_intact_and_signals_reach_the_process";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let f = Fixture::new(&guest);
    boot(&f, &guest);
    let pid = daemon_pid(&f);
    const SIZE: usize = 100_000_000;

    // Host to guest: the guest hashes its stdin.
    let mut data = vec![0u8; SIZE];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in data.chunks_mut(8) {
        // xorshift: incompressible enough, and no file needed.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let expected = hash(&data);
    let baseline = reset_peak_rss(pid);
    let started = Instant::now();
    let mut sink = spawn_exec(&f, &["sha256sum"], Stdio::piped(), Stdio::piped());
    let mut input = sink.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        input.write_all(&data).expect("write 100 MB");
    });
    let out = sink.wait_with_output().expect("sha256sum");
    feeder.join().expect("feeder");
    let up = started.elapsed();
    let peak_up = process_kib(pid, "VmHWM");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(expected.as_str()),
        "what the guest read differs"
    );

    // Guest to host: the guest hashes what it writes, on stderr.
    let baseline_down = reset_peak_rss(pid);
    let started = Instant::now();
    let script = format!(
        "mkfifo /tmp/copy && (sha256sum < /tmp/copy >&2 &) && head -c {SIZE} /dev/urandom | tee /tmp/copy"
    );
    let out = f.exec(&["sh", "-c", &script], b"");
    let down = started.elapsed();
    let peak_down = process_kib(pid, "VmHWM");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), SIZE);
    let sent = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        sent.split_whitespace().next(),
        Some(hash(&out.stdout).as_str()),
        "what the host read differs"
    );
    eprintln!(
        "figure: 100 MB host to guest in {:.1} s (daemon peak +{} KiB), guest to host in {:.1} s (peak +{} KiB)",
        up.as_secs_f64(),
        peak_up.saturating_sub(baseline),
        down.as_secs_f64(),
        peak_down.saturating_sub(baseline_down)
    );
    assert!(peak_up <= baseline + DAEMON_BOUND_KIB);
    assert!(peak_down <= baseline_down + DAEMON_BOUND_KIB);

    // A process that outlives its stdin costs the daemon no CPU meanwhile.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
        let fields: Vec<u64> = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.split(" ").map(|f| f.parse().unwrap_or(0)).collect())
            .unwrap_or_default();
        // utime and stime, in clock ticks (100 a second).
        fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)
    };
    let before = cpu();
    let slept = f.exec(&["sleep", "3"], b"");
    assert!(slept.status.success());
    let ticks = cpu() - before;
    eprintln!("figure: daemon CPU during a 3 s exec with stdin closed: {ticks} ticks");
    assert!(ticks < 50, "the daemon used {ticks} ticks of CPU in 3 s");

    // SIGINT to the CLI reaches the guest process, which traps it.
    let script = "trap 'echo caught; exit 130' INT; echo ready; while :; do sleep 1; done";
    let mut trapped = spawn_exec(&f, &["sh", "-c", script], Stdio::null(), Stdio::piped());
    let mut lines = BufReader::new(trapped.stdout.take().expect("stdout"));
    let mut line = String::new();
    lines.read_line(&mut line).expect("ready");
    assert_eq!(line, "ready\n");
    kill(Pid::from_raw(trapped.id() as i32), Signal::SIGINT).expect("SIGINT the CLI");
    let mut rest = String::new();
    lines.read_to_string(&mut rest).expect("the rest");
    let status = trapped.wait().expect("wait");
    assert_eq!(rest, "caught\n");
    assert_eq!(
        status.code(),
        Some(130),
        "banger exits with the process's 130"
    );

    // A CLI killed outright: the process is hung up and ends.
    let script = "trap 'echo hup > /tmp/hup; exit 129' HUP; echo ready; while :; do sleep 1; done";
    let mut orphan = spawn_exec(&f, &["sh", "-c", script], Stdio::null(), Stdio::piped());
    let mut lines = BufReader::new(orphan.stdout.take().expect("stdout"));
    let mut line = String::new();
    lines.read_line(&mut line).expect("ready");
    orphan.kill().expect("SIGKILL the CLI");
    let _ = orphan.wait();
    // The hang-up lands within the daemon's 2 s grace; wait on the marker.
    let marker = f.exec_ok(&[
        "sh",
        "-c",
        "for i in $(seq 50); do [ -f /tmp/hup ] && break; sleep 0.1; done; cat /tmp/hup",
    ]);
    assert_eq!(marker, "hup\n");

    // A quiet exec hears heartbeats; a daemon that stops answering ends it
    // within three of them (the fixture beats every 0.5 s), with 125.
    let mut quiet = spawn_exec(
        &f,
        &["sh", "-c", "echo ready; sleep 600"],
        Stdio::null(),
        Stdio::piped(),
    );
    let mut lines = BufReader::new(quiet.stdout.take().expect("stdout"));
    let mut line = String::new();
    lines.read_line(&mut line).expect("ready");
    let daemon = daemon_pid(&f);
    kill(daemon, Signal::SIGSTOP).expect("SIGSTOP bangerd");
    let ended = output_within_timeout(quiet);
    kill(daemon, Signal::SIGCONT).expect("SIGCONT bangerd");
    let out = ended.expect("vm exec never gave up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("did not answer"), "{stderr}");
    assert_eq!(f.exec_ok(&["echo", "after"]), "after\n");
}

/// The agent of the last release that spoke protocol 1
/// (scripts/previous-agent.sh), or why it is missing.
fn previous_agent(test: &str) -> Option<PathBuf> {
    let agent = std::env::var_os("BANGER_TEST_PREVIOUS_AGENT")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    if agent.is_none() {
        skip(
            test,
            "BANGER_TEST_PREVIOUS_AGENT is not set (scripts/test.sh builds it from the history with scripts/previous-agent.sh)",
        );
    }
    agent
}

fn agent_of(f: &Fixture) -> serde_json::Value {
    f.json(&["vm", "inspect", "guest", "--json"])["agent"].clone()
}

#[test]
fn a_vm_running_the_previous_agent_keeps_working_across_a_daemon_upgrade() {
    let test = "a_vm_running_the_previous_agent_keeps_working_across_a_daemon_upgrade";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let Some(previous) = previous_agent(test) else {
        return;
    };
    let mut f = Fixture::with_agent(&previous);
    install_previous_agent(&f.rootfs, &previous);
    boot(&f, &guest);
    let agent = agent_of(&f);
    assert_eq!(agent["protocol"], 1, "{agent}");
    let note = agent["note"].as_str().unwrap_or_default();
    assert!(note.contains("next start"), "{agent}");
    let shown = f.ok(&["vm", "inspect", "guest"]);
    assert!(shown.contains("protocol 1"), "{shown}");

    // The upgrade: the daemon restarts (it adopts the running VM) and
    // boots the current agent from the next start on.
    f.set_agent(&guest.agent);
    let daemon = f.daemon.take().expect("daemon");
    assert!(daemon.stop().success());
    f.start_daemon();
    f.json(&["vm", "ping", "guest", "--wait", "30", "--json"]);
    assert_eq!(agent_of(&f)["protocol"], 1);
    assert_eq!(f.exec_ok(&["echo", "still here"]), "still here\n");
    let echoed = f.exec(&["cat"], b"through a v1 agent\n");
    assert_eq!(
        String::from_utf8_lossy(&echoed.stdout),
        "through a v1 agent\n"
    );
    let seven = f.exec(&["sh", "-c", "exit 7"], b"");
    assert_eq!(seven.status.code(), Some(7));
    // A signal kills, the one signal a version-1 agent knows.
    let mut sleeper = spawn_exec(&f, &["sleep", "600"], Stdio::null(), Stdio::piped());
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !f.exec_ok(&["sh", "-c", PROCESSES]).contains("sleep 600") {
        assert!(Instant::now() < deadline, "sleep 600 never started");
    }
    kill(Pid::from_raw(sleeper.id() as i32), Signal::SIGINT).expect("SIGINT");
    let status = sleeper.wait().expect("wait");
    assert_eq!(status.code(), Some(128 + 9), "SIGKILL on a version-1 agent");

    f.ok(&["vm", "stop", "guest"]);
    let stopped = f.json(&["vm", "inspect", "guest", "--json"]);
    assert_eq!(stopped["last_exit"]["kind"], "clean", "{stopped}");

    // Its next start brings the current agent.
    f.ok(&["vm", "start", "guest"]);
    f.json(&["vm", "ping", "guest", "--wait", "60", "--json"]);
    let agent = agent_of(&f);
    assert_eq!(agent["protocol"], 2, "{agent}");
    assert!(agent.get("note").is_none(), "{agent}");
    f.ok(&["vm", "stop", "guest"]);
}
