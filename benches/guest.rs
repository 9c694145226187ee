//! Real-guest benchmarks on QEMU (TCG where KVM cannot boot a stock
//! kernel): Debian's cloud kernel imported from its package, a busybox root
//! disk, banger-agent as PID 1.
//! - create-to-agent-ready, split into VMM start (host time until the guest
//!   kernel's clock starts), kernel (to the agent's stage 1), stage 1 (the
//!   initramfs) and stage 2 (the root disk, until the agent serves);
//! - `vm exec -- true` round trip through the daemon, p50 over 100 calls
//!   (connect, hello, exec, exit frame), and the agent ping round trip.
//!
//! Prints the figures and writes them to `target/bench-results/guest.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use banger::rpc::client::Client;
use banger::rpc::stream;
use serde_json::{Value, json};

const BOOTS: usize = 3;
const EXECS: usize = 100;

fn cli(state: &std::path::Path, args: &[&str]) -> Value {
    let out = common::banger(state, args);
    assert!(
        out.status.success(),
        "banger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// One `vm.exec` of `true` on a fresh connection, to its exit frame.
fn exec_true(socket: &std::path::Path) -> Duration {
    let started = Instant::now();
    let client = Client::connect(socket).expect("connect");
    let (_, mut frames, _writer) = client
        .stream("vm.exec", json!({"name": "bench", "argv": ["true"]}))
        .expect("vm.exec");
    loop {
        match stream::read_frame(&mut frames).expect("frame") {
            Some(frame) if frame.kind == stream::EXIT => return started.elapsed(),
            Some(frame) if frame.kind == stream::ERROR => {
                panic!("exec failed: {}", String::from_utf8_lossy(&frame.payload))
            }
            Some(_) => {}
            None => panic!("the exec stream ended without an exit"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_file())
    };
    let (Some(deb), Some(agent)) = (var("BANGER_TEST_KERNEL_DEB"), var("BANGER_TEST_AGENT")) else {
        println!(
            "guest benchmarks skipped: BANGER_TEST_KERNEL_DEB and BANGER_TEST_AGENT are not set (scripts/bench.sh sets them)"
        );
        return Ok(());
    };
    let tmp = common::state_dir();
    let dir = tmp.path();
    let state = dir.join("state");
    let _reaper = common::ProcessReaper(state.clone());
    let config = dir.join("bangerd.toml");
    std::fs::write(
        &config,
        format!("[agent]\nbinary = \"{}\"\n", agent.display()),
    )?;
    let daemon = common::Daemon::ready(common::Daemon::spawn_with(
        &state,
        &["--user", "--config", config.to_str().unwrap_or_default()],
    ));
    let mut report = String::new();

    let imported = Instant::now();
    cli(
        &state,
        &[
            "kernel",
            "import-deb",
            "debian",
            deb.to_str().unwrap_or_default(),
            "--json",
        ],
    );
    writeln!(
        report,
        "kernel import-deb (extract, decompress, modules, initramfs): {:.2} s",
        imported.elapsed().as_secs_f64()
    )?;
    let rootfs = dir.join("busybox.ext4");
    let built = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/busybox-rootfs.sh"
    ))
    .arg(&rootfs)
    .output()?;
    anyhow::ensure!(built.status.success(), "busybox root disk failed");
    let rootfs = rootfs.to_str().unwrap_or_default().to_string();

    for boot in 0..BOOTS {
        let name = format!("boot{boot}");
        let created = Instant::now();
        let vm = cli(
            &state,
            &[
                "vm", "create", &name, "--kernel", "debian", "--rootfs", &rootfs, "--vmm", "qemu",
                "--memory", "256M", "--start", "--json",
            ],
        );
        let running = created.elapsed();
        let ping = cli(&state, &["vm", "ping", &name, "--wait", "120", "--json"]);
        let ready = created.elapsed();
        let ms = |key: &str| ping["boot"][key].as_f64();
        let (stage1, stage2, serving) = (
            ms("stage1_ms").unwrap_or(0.0),
            ms("stage2_ms").unwrap_or(0.0),
            ms("ready_ms").unwrap_or(0.0),
        );
        let host_ms = ready.as_secs_f64() * 1000.0;
        writeln!(
            report,
            "boot {boot} ({} on {}): create to agent ready {:.2} s = VMM start and firmware {:.0} ms + kernel {:.0} ms + stage 1 {:.0} ms + stage 2 {:.0} ms (create to running {:.0} ms; the split reads the guest's boot clock)",
            vm["accel"].as_str().unwrap_or("?"),
            vm["vmm"].as_str().unwrap_or("?"),
            ready.as_secs_f64(),
            host_ms - serving,
            stage1,
            stage2 - stage1,
            serving - stage2,
            running.as_secs_f64() * 1000.0,
        )?;
        if boot + 1 < BOOTS {
            cli(&state, &["vm", "rm", &name, "--force"]);
        } else {
            let stopping = Instant::now();
            common::banger(&state, &["vm", "stop", &name]);
            writeln!(
                report,
                "vm stop (agent poweroff to a clean exit): {:.2} s",
                stopping.elapsed().as_secs_f64()
            )?;
            cli(&state, &["vm", "rm", &name]);
        }
    }

    cli(
        &state,
        &[
            "vm", "create", "bench", "--kernel", "debian", "--rootfs", &rootfs, "--vmm", "qemu",
            "--memory", "256M", "--start", "--json",
        ],
    );
    cli(&state, &["vm", "ping", "bench", "--wait", "120", "--json"]);
    let socket = common::socket_path(&state);
    let execs: Vec<Duration> = (0..EXECS).map(|_| exec_true(&socket)).collect();
    write!(
        report,
        "{}",
        common::summary(
            &format!("vm exec -- true round trip ({EXECS} calls, fresh connection each)"),
            &execs
        )
    )?;
    let pings: Vec<Duration> = (0..EXECS)
        .map(|_| {
            let ping = cli(&state, &["vm", "ping", "bench", "--json"]);
            Duration::from_secs_f64(ping["round_trip_ms"].as_f64().unwrap_or(0.0) / 1000.0)
        })
        .collect();
    write!(
        report,
        "{}",
        common::summary("agent ping round trip, daemon to guest and back", &pings)
    )?;
    cli(&state, &["vm", "rm", "bench", "--force"]);
    drop(daemon);

    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("guest.txt"), &report)?;
    Ok(())
}
