//! Network benchmarks, on the release build and the CLI, real
//! firecracker halt-kernel VMs on real ext4 disks, inside a network
//! namespace of the daemon's own (nothing leaves it):
//! - attach (the tap made and raised on the bridge, the VM's nftables
//!   element) as the bridge fills: VMs created and started one after
//!   another up to 500; each attach's time is the daemon's own log line;
//! - 100 VMs created and started (`banger vm create --start`) with
//!   networking against the same `--no-network`, rounds interleaved;
//! - reconciliation of 1,000 stray taps in banger's interface group and
//!   1,000 stray nftables elements by `banger network reconcile`, against
//!   the bare limit (`ip link delete group` of 1,000 taps: one request),
//!   interleaved.
//!
//! Prints the figures and writes them to `target/bench-results/network.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const FILL: usize = 500;
const SCALE: usize = 100;
const STRAYS: usize = 1_000;
const ROUNDS: usize = 3;
const GROUP: u32 = 2894;
const BARE_GROUP: u32 = 4000;

fn spread(samples: &[Duration]) -> String {
    let (min, max) = (
        samples.iter().min().copied().unwrap_or_default(),
        samples.iter().max().copied().unwrap_or_default(),
    );
    format!(
        "median {:?} (min {min:?}, max {max:?}, n={})",
        common::percentile(samples, 0.5),
        samples.len()
    )
}

/// Runs `program args` inside the daemon's network namespace, feeding
/// `input` to its stdin.
fn in_netns(pid: i32, program: &str, args: &[&str], input: &str) {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("nsenter");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    assert!(child.wait().expect("wait").success(), "{program} {args:?}");
}

/// `count` taps in `group`, and (for banger's group) an nftables element
/// for each, that no record claims.
fn strays(pid: i32, count: usize, group: u32, round: usize) {
    let mut links = String::new();
    let mut elements = String::new();
    for i in 0..count {
        let name = format!("bs{round}x{i:05}");
        let _ = writeln!(links, "tuntap add dev {name} mode tap");
        let _ = writeln!(links, "link set dev {name} group {group}");
        let _ = writeln!(
            elements,
            "add element bridge banger guests {{ \"{name}\" . 02:00:00:00:{:02x}:{:02x} . 10.99.{}.{} }}",
            i / 250,
            i % 250,
            i / 250,
            i % 250 + 1
        );
    }
    in_netns(pid, "ip", &["-batch", "-"], &links);
    if group == GROUP {
        in_netns(pid, "nft", &["-f", "-"], &elements);
    }
}

fn main() -> anyhow::Result<()> {
    let Some(firecracker) = common::firecracker_fixture("benches/network") else {
        println!("network benchmarks skipped: the firecracker fixture or KVM is missing");
        return Ok(());
    };
    if !nix::unistd::geteuid().is_root() {
        println!("network benchmarks skipped: they need root");
        return Ok(());
    }
    let Some(agent) = std::env::var_os("BANGER_TEST_AGENT").map(PathBuf::from) else {
        println!(
            "network benchmarks skipped: BANGER_TEST_AGENT is not set (scripts/bench.sh builds it)"
        );
        return Ok(());
    };
    let tmp = common::state_dir();
    let dir = tmp.path().to_path_buf();
    let state = dir.join("state");
    let _reaper = common::ProcessReaper(dir.clone());
    let kernel = dir.join("halt.elf");
    common::halt_kernel(&kernel);
    let rootfs = dir.join("rootfs.ext4");
    let made = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4"])
        .arg(&rootfs)
        .arg("16M")
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(made.success(), "mke2fs failed");
    let config = dir.join("bangerd.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nbinary = \"{}\"\n[firecracker]\nbinary = \"{}\"\n[network]\ndns = \"192.0.2.53\"\n",
            agent.display(),
            firecracker.display()
        ),
    )?;
    let mut daemon = common::Daemon::ready(common::Daemon::spawn_with(
        &state,
        &["--user", "--config", config.to_str().expect("utf-8")],
    ));
    let pid = daemon.pid().as_raw();
    let mut conn = common::Conn::open(&state);
    let ok = |answer: Value| -> Value {
        assert!(answer["result"].is_object(), "{answer}");
        answer
    };
    ok(conn.call(
        0,
        "kernel.import",
        json!({"name": "halt", "vmlinux": kernel}),
    ));
    // A /16: room for every VM of the fill.
    ok(conn.call(
        1,
        "network.create",
        json!({"name": "fill", "subnet": "10.200.0.0/16"}),
    ));
    let mut report = String::new();
    let rootfs = rootfs.to_str().expect("utf-8 path").to_string();
    // Through the CLI, as users create VMs.
    let create = |name: &str, network: &[&str]| {
        let mut args = vec![
            "vm",
            "create",
            name,
            "--kernel",
            "halt",
            "--rootfs",
            &rootfs,
            "--memory",
            "128",
            "--vmm",
            "firecracker",
            "--start",
        ];
        args.extend(network);
        let out = common::banger(&state, &args);
        assert!(out.status.success(), "vm create {name}: {out:?}");
    };

    // 100 VMs with networking and without, interleaved rounds.
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for networked in [true, false] {
            let started = Instant::now();
            for i in 0..SCALE {
                let network: &[&str] = if networked {
                    &["--network", "fill"]
                } else {
                    &["--no-network"]
                };
                create(&format!("r{round}{networked}{i}"), network);
            }
            let took = started.elapsed();
            if networked { &mut with } else { &mut without }.push(took);
            for i in 0..SCALE {
                let name = format!("r{round}{networked}{i}");
                ok(conn.call(9, "vm.remove", json!({"name": name, "force": true})));
            }
        }
    }
    let _ = writeln!(
        report,
        "{SCALE} halt-kernel firecracker VMs created and started, one after another through the CLI:\n  with networking    {}\n  without networking {}",
        spread(&with),
        spread(&without)
    );

    // Attach as the bridge fills, from the daemon's own measure.
    let mut attach = Vec::new();
    for i in 0..FILL {
        create(&format!("f{i:03}"), &["--network", "fill"]);
        let line = daemon
            .wait_for_line("VM attached")
            .expect("the daemon logs each attach");
        let us: u64 = line
            .split("us=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("us= field");
        attach.push(Duration::from_micros(us));
    }
    let _ = writeln!(
        report,
        "attach (tap + nftables element), as the bridge fills:"
    );
    for (from, to) in [(0, 10), (90, 110), (FILL - 20, FILL)] {
        let window = &attach[from..to];
        let _ = writeln!(
            report,
            "  VMs {:>3}..{:<3} p50 {:?}  p99 {:?}  max {:?}",
            from + 1,
            to,
            common::percentile(window, 0.5),
            common::percentile(window, 0.99),
            window.iter().max().copied().unwrap_or_default()
        );
    }
    let _ = writeln!(
        report,
        "  all {FILL}: p50 {:?}  p99 {:?}",
        common::percentile(&attach, 0.5),
        common::percentile(&attach, 0.99)
    );

    // Reconciliation of strays against the bare group delete, interleaved.
    let (mut reconcile, mut bare) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        strays(pid, STRAYS, GROUP, round);
        let started = Instant::now();
        let out = common::banger(&state, &["network", "reconcile", "--json"]);
        reconcile.push(started.elapsed());
        anyhow::ensure!(out.status.success(), "reconcile failed: {out:?}");
        let report: Value = serde_json::from_slice(&out.stdout)?;
        anyhow::ensure!(
            report["removed_links"].as_array().map(Vec::len) == Some(STRAYS),
            "reconcile removed {report}"
        );
        strays(pid, STRAYS, BARE_GROUP, round);
        let started = Instant::now();
        in_netns(
            pid,
            "ip",
            &["link", "delete", "group", &BARE_GROUP.to_string()],
            "",
        );
        bare.push(started.elapsed());
    }
    let _ = writeln!(
        report,
        "reconciliation of {STRAYS} stray taps and {STRAYS} stray nftables elements ({FILL} VMs attached):\n  banger network reconcile  {}\n  ip link delete group      {} (the bare limit: the links alone)",
        spread(&reconcile),
        spread(&bare)
    );

    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("network.txt"), &report)?;
    Ok(())
}
