//! VM benchmarks on the real firecracker binary and the halt kernel:
//! - start overhead, on a real ext4 root disk: `banger vm start` through
//!   the CLI and `vm.start` through the RPC, against the bare cost of
//!   spawning firecracker with the same kernel, boot image and disk and
//!   making the same API calls (banger's own launch code called directly,
//!   no daemon), interleaved;
//! - scale: 100 VMs created and started concurrently, the daemon's memory
//!   per VM, and `vm.list` latency with 100 and 1,000 VMs;
//! - crash detection: SIGKILL of a VMM to the daemon recording the exit, and
//!   how late a restart fires after its scheduled time;
//! - re-adoption: a new daemon adopting 100 running VMs;
//! - the cost of one `vm::machine::step` per event.
//!
//! Prints the figures and writes them to `target/bench-results/vm.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;

use banger::rpc::client::Client;
use banger::rpc::protocol::WithOpId;
use banger::rpc::vm::VmsResult;
use banger::vmm::firecracker::Firecracker;
use banger::vmm::host::{HostOps, LocalHost};
use banger::vmm::{self, BootFiles, LaunchSpec, VmPaths, Vmm};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const START_SAMPLES: usize = 40;
const SCALE: usize = 100;
const RECORDS: usize = 1_000;
const CRASHES: usize = 20;

fn median(samples: &[Duration]) -> Duration {
    common::percentile(samples, 0.5)
}

/// Median, min and max of a run.
fn spread(samples: &[Duration]) -> String {
    let (min, max) = (
        samples.iter().min().copied().unwrap_or_default(),
        samples.iter().max().copied().unwrap_or_default(),
    );
    format!(
        "median {:?} (min {min:?}, max {max:?}, n={})",
        median(samples),
        samples.len()
    )
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The timestamp that starts a daemon log line.
fn logged_at(line: &str) -> jiff::Timestamp {
    line.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"))
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..].split_whitespace().next()
}

fn millis(d: jiff::SignedDuration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The bare cost of one start: banger's launch code with no daemon around
/// it, spawning firecracker and making the same API calls.
fn bare_start(
    runtime: &tokio::runtime::Runtime,
    firecracker: &Path,
    (kernel, initrd): (&Path, &Path),
    rootfs: &Path,
    dir: &Path,
    i: usize,
) -> Duration {
    let host: Arc<dyn HostOps> = Arc::new(LocalHost);
    runtime.block_on(async {
        let vm_dir = dir.join(format!("bare{i}"));
        std::fs::create_dir_all(&vm_dir).expect("mkdir");
        let backend = Firecracker {
            binary: firecracker.to_path_buf(),
            jail: None,
        };
        let spec = LaunchSpec {
            nic: None,
            id: format!("bare{i}"),
            paths: VmPaths { dir: vm_dir },
            boot: BootFiles {
                vmlinux: kernel.to_path_buf(),
                bzimage: None,
                initrd: Some(initrd.to_path_buf()),
                args: backend.default_boot_args().into(),
            },
            rootfs: rootfs.to_path_buf(),
            vcpus: 1,
            memory_mib: 128,
        };
        let start = Instant::now();
        let console = vmm::lock_console(&spec.paths.console_log()).expect("console");
        let (process, _) = vmm::spawn(&host, &backend, &spec, console)
            .await
            .expect("bare spawn");
        backend
            .configure(&spec, &process)
            .await
            .expect("bare configure");
        let elapsed = start.elapsed();
        process.signal(rustix::process::Signal::KILL).expect("kill");
        process.exited().await;
        elapsed
    })
}

const STEP_EVENTS: u32 = 100_000;

/// The cost of one `step()`: a VM started, crashed and restarted over and
/// over (the events a supervised VM sees most), per event.
fn step_cost() -> (Duration, Duration, Duration) {
    use banger::vm::machine::{Event, Exit, Vm, step};
    let process = banger::vm::record::VmmProcess {
        pid: 4242,
        start_time: 1,
        api_socket: PathBuf::from("/run/banger/vms/x/firecracker.sock"),
        agent: None,
        accel: None,
    };
    let mut runs: Vec<Duration> = (0..5)
        .map(|_| {
            let mut vm = Vm::new(common::vm_record(0));
            let mut now = jiff::Timestamp::now();
            let started = Instant::now();
            for i in 0..STEP_EVENTS {
                let event = match i % 5 {
                    0 => Event::Start {
                        request: u64::from(i),
                    },
                    1 => Event::Spawned(process.clone()),
                    2 => Event::Ready,
                    3 => Event::Exited(Exit::default()),
                    _ => {
                        now += jiff::SignedDuration::from_secs(3600);
                        Event::Timer
                    }
                };
                if let Ok((next, effects)) = step(&vm, event, now) {
                    std::hint::black_box(effects);
                    vm = next;
                }
            }
            started.elapsed() / STEP_EVENTS
        })
        .collect();
    runs.sort();
    (runs[0], runs[2], runs[4])
}

fn main() -> anyhow::Result<()> {
    let Some(firecracker) = common::firecracker_fixture("benches/vm") else {
        println!("vm benchmarks skipped: the firecracker fixture or KVM is missing (see above)");
        return Ok(());
    };
    let tmp = common::state_dir();
    let dir = tmp.path().to_path_buf();
    let state = dir.join("state");
    let _reaper = common::ProcessReaper(dir.clone());
    let kernel = dir.join("halt.elf");
    common::halt_kernel(&kernel);
    // A real ext4 root disk, as users give, and the daemon's agent in the
    // boot image: every start pays what a real start pays.
    let Some(agent) = std::env::var_os("BANGER_TEST_AGENT").map(PathBuf::from) else {
        println!(
            "vm benchmarks skipped: BANGER_TEST_AGENT is not set (scripts/bench.sh builds it)"
        );
        return Ok(());
    };
    let rootfs = dir.join("rootfs.ext4");
    let made = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4"])
        .arg(&rootfs)
        .arg("16M")
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(made.success(), "mke2fs failed");
    let config = dir.join("bangerd.toml");
    std::fs::write(
        &config,
        format!(
            // The bare launches have no network: neither have these VMs
            // (benches/network.rs measures networking).
            "[agent]\nbinary = \"{}\"\n[firecracker]\nbinary = \"{}\"\n[restart]\ndelay_secs = 0.1\nmax_delay_secs = 0.1\n[network]\nenabled = false\n",
            agent.display(),
            firecracker.display()
        ),
    )?;
    let mut report = String::new();

    // Start overhead: bare and banger samples interleaved, so both meet the
    // same machine conditions.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut bare = Vec::new();
    let spawn = |state: &Path| {
        common::Daemon::ready(common::Daemon::spawn_with(
            state,
            &["--user", "--config", config.to_str().expect("utf-8")],
        ))
    };
    let mut daemon = spawn(&state);
    let mut conn = common::Conn::open(&state);
    let ok = |answer: Value| -> Value {
        assert!(answer["result"].is_object(), "{answer}");
        answer
    };
    ok(conn.call(
        1,
        "kernel.import",
        json!({"name": "halt", "vmlinux": kernel}),
    ));
    ok(conn.call(
        2,
        "vm.create",
        json!({"name": "timed", "kernel": "halt", "rootfs": rootfs, "memory": 128, "vmm": "firecracker"}),
    ));
    // The first start builds the kernel's boot image; the bare launch
    // boots the same one.
    ok(conn.call(4, "vm.start", json!({"name": "timed"})));
    ok(conn.call(5, "vm.kill", json!({"name": "timed"})));
    let kernels = ok(conn.call(6, "kernel.list", json!({})));
    let boot_image = PathBuf::from(
        kernels["result"]["kernels"][0]["boot_image"]["path"]
            .as_str()
            .expect("the kernel's boot image"),
    );
    let (mut through_rpc, mut through_cli) = (Vec::new(), Vec::new());
    for i in 0..START_SAMPLES as u64 {
        bare.push(bare_start(
            &runtime,
            &firecracker,
            (&kernel, &boot_image),
            &rootfs,
            &dir.join("bare"),
            i as usize,
        ));
        let start = Instant::now();
        ok(conn.call(10 + i, "vm.start", json!({"name": "timed"})));
        through_rpc.push(start.elapsed());
        ok(conn.call(1000 + i, "vm.kill", json!({"name": "timed"})));
        let start = Instant::now();
        let out = common::banger(&state, &["vm", "start", "timed"]);
        through_cli.push(start.elapsed());
        anyhow::ensure!(out.status.success(), "banger vm start failed");
        ok(conn.call(2000 + i, "vm.kill", json!({"name": "timed"})));
    }
    let bare_median = median(&bare);
    writeln!(
        report,
        "start, bare firecracker + API calls (same kernel, boot image, ext4 disk; no network on either side): {}",
        spread(&bare)
    )?;
    for (path, samples) in [
        ("vm.start through the RPC", &through_rpc),
        ("banger vm start through the CLI", &through_cli),
    ] {
        writeln!(
            report,
            "start, {path}: {}; {:.2}x the bare median (target at most 1.1x, 1.25x on this machine)",
            spread(samples),
            median(samples).as_secs_f64() / bare_median.as_secs_f64()
        )?;
    }
    ok(conn.call(3, "vm.remove", json!({"name": "timed", "force": true})));

    // Scale: 100 VMs at once.
    let daemon_pid = daemon.pid().as_raw();
    let rss_before = rss_kib(daemon_pid);
    let started = Instant::now();
    let threads: Vec<_> = (0..SCALE)
        .map(|i| {
            let (state, rootfs) = (state.clone(), rootfs.clone());
            std::thread::spawn(move || {
                let mut conn = common::Conn::open(&state);
                let answer = conn.call(1, "vm.create", json!({"name": format!("s{i:04}"), "kernel": "halt", "rootfs": rootfs, "memory": 128, "vmm": "firecracker", "start": true}));
                assert_eq!(answer["result"]["vm"]["state"], "running", "{answer}");
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("create thread panicked"))?;
    }
    let wall = started.elapsed();
    let rss_after = rss_kib(daemon_pid);
    writeln!(
        report,
        "{SCALE} VMs created and started concurrently: {wall:?} wall, all running"
    )?;
    writeln!(
        report,
        "daemon RSS: {rss_before} KiB before, {rss_after} KiB after: {} KiB per VM (target < 200)",
        rss_after.saturating_sub(rss_before) / SCALE as u64
    )?;
    // Listing as `banger vm ls --json` does it: banger's own client, the
    // VMs passed through as the daemon wrote them.
    let list = |state: &Path, n: usize| -> Vec<Duration> {
        let mut client = Client::connect(&common::socket_path(state)).expect("connect");
        (0..50)
            .map(|_| {
                let start = Instant::now();
                let raw = client
                    .call_raw("vm.list", json!({}), |_| {})
                    .expect("vm.list");
                let elapsed = start.elapsed();
                let listed: WithOpId<VmsResult> = serde_json::from_str(raw.get()).expect("vms");
                assert_eq!(listed.result.vms.len(), n);
                elapsed
            })
            .collect()
    };
    let at_100 = list(&state, SCALE);
    writeln!(
        report,
        "vm.list with {SCALE} VMs: p50 {:?}",
        median(&at_100)
    )?;

    // Crash detection and restart timing, on the running VMs.
    let mut detection = Vec::new();
    let mut lateness = Vec::new();
    for i in 0..CRASHES {
        let name = format!("s{i:04}");
        let vm = conn.call(7000 + i as u64, "vm.get", json!({"name": name}));
        let pid = vm["result"]["vm"]["pid"].as_i64().expect("pid") as i32;
        let mark = daemon.mark();
        let killed_at = jiff::Timestamp::now();
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        let vm_field = format!("vm={name}");
        let (_, exited) = daemon
            .wait_for_line_from(&["VMM exited", &vm_field], mark)
            .expect("exit logged");
        detection.push(millis(logged_at(&exited).duration_since(killed_at)));
        let scheduled: jiff::Timestamp = field(&exited, "next_restart_at")
            .expect("scheduled")
            .parse()?;
        let (_, restarted) = daemon
            .wait_for_line_from(&["restarting after backoff", &vm_field], mark)
            .expect("restart logged");
        lateness.push(millis(logged_at(&restarted).duration_since(scheduled)));
        daemon
            .wait_for_line_from(&["VM running", &vm_field], mark)
            .expect("running again");
        // The VM's actor answers once the running record is durable: only
        // then does a daemon kill leave a record that says running.
        let vm = conn.call(8000 + i as u64, "vm.get", json!({"name": name}));
        assert_eq!(vm["result"]["vm"]["state"], "running", "{vm}");
    }
    detection.sort_by(f64::total_cmp);
    lateness.sort_by(f64::total_cmp);
    writeln!(
        report,
        "crash detection (SIGKILL to exit recorded): p50 {:.2} ms, max {:.2} ms (target p50 < 20 ms)",
        detection[CRASHES / 2],
        detection[CRASHES - 1]
    )?;
    writeln!(
        report,
        "restart lateness after its scheduled time: p50 {:.2} ms, max {:.2} ms (target < 50 ms)",
        lateness[CRASHES / 2],
        lateness[CRASHES - 1]
    )?;

    // Re-adoption of 100 running VMs by a new daemon.
    kill(daemon.pid(), Signal::SIGKILL)?;
    drop(daemon.wait_output());
    let started = Instant::now();
    let mut daemon = spawn(&state);
    for i in 0..SCALE {
        let vm_field = format!("vm=s{i:04}");
        daemon
            .wait_for_line_from(&["re-adopted running VM", &vm_field], 0)
            .expect("adopted");
    }
    writeln!(
        report,
        "re-adoption of {SCALE} running VMs: {:?} from daemon spawn (target < 1 s)",
        started.elapsed()
    )?;

    // 1,000 VM records (the rest created, not started).
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (state, rootfs) = (state.clone(), rootfs.clone());
            std::thread::spawn(move || {
                let mut conn = common::Conn::open(&state);
                for i in (SCALE + t..RECORDS).step_by(4) {
                    let answer = conn.call(i as u64, "vm.create", json!({"name": format!("s{i:04}"), "kernel": "halt", "rootfs": rootfs, "memory": 128, "vmm": "firecracker"}));
                    assert!(answer["result"].is_object(), "{answer}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("create thread panicked"))?;
    }
    let at_1000 = list(&state, RECORDS);
    writeln!(
        report,
        "vm.list with {RECORDS} VMs: p50 {:?} (target < 10 ms)",
        median(&at_1000)
    )?;
    drop(daemon);

    let (low, mid, high) = step_cost();
    writeln!(
        report,
        "vm::machine::step per event: median {mid:?} (min {low:?}, max {high:?}; 5 runs of {STEP_EVENTS} events: start, spawned, ready, exited, timer)"
    )?;

    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("vm.txt"), &report)?;
    Ok(())
}
