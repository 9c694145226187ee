//! Real-guest benchmarks on QEMU (TCG where KVM cannot boot a stock
//! kernel): Debian's cloud kernel imported from its package, a busybox root
//! disk, banger-agent as PID 1.
//! - create-to-agent-ready, split into VMM start (host time until the guest
//!   kernel's clock starts), kernel (to the agent's stage 1), stage 1 (the
//!   initramfs) and stage 2 (the root disk, until the agent serves),
//!   interleaved with a direct QEMU launch of the same kernel, boot image
//!   and disk to the same point (the agent's answer to a hello);
//! - `banger vm exec -- true`, p50 over 100 runs of the CLI (start,
//!   connect, hello, exec, exit frame), and the agent ping round trip;
//!   interleaved with the same on a VM that runs the previous release's
//!   agent (protocol 1, no flow control), when scripts/bench.sh built it;
//! - `vm exec -- cat /dev/zero | head -c 1G` throughput through the CLI,
//!   interleaved with the raw channel: a second virtio-serial port
//!   hot-plugged into the same VM over QMP, written by a plain `cat` in the
//!   guest and read by this program, without banger's framing; and the
//!   daemon's and the agent's peak RSS during that flood and a stdin flood.
//!
//! Prints the figures and writes them to `target/bench-results/guest.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::unistd::Pid;

use serde_json::{Value, json};

const BOOTS: usize = 5;
const EXECS: usize = 100;
/// Bytes per throughput run, and runs of each kind.
const FLOOD_BYTES: u64 = 1 << 30;
const FLOOD_RUNS: usize = 3;
/// The name the hot-plugged raw port has in the guest.
const RAW_PORT: &str = "org.banger.bench";

fn cli(state: &std::path::Path, args: &[&str]) -> Value {
    let out = common::banger(state, args);
    assert!(
        out.status.success(),
        "banger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// One `banger vm exec NAME -- true`, as a user runs it: the CLI starts,
/// connects, says hello, execs and reads to the exit frame.
fn exec_true(state: &Path, vm: &str) -> Duration {
    let started = Instant::now();
    let out = banger_cli(state)
        .args(["vm", "exec", vm, "--", "true"])
        .output()
        .expect("run banger vm exec");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "vm exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn write_config(config: &Path, agent: &Path) -> std::io::Result<()> {
    std::fs::write(
        config,
        // The direct launches have no network: neither have banger's VMs
        // here (benches/network.rs measures networking).
        format!(
            "[agent]\nbinary = \"{}\"\n[network]\nenabled = false\n",
            agent.display()
        ),
    )
}

/// Restarts the daemon (its VMs keep running) with another agent to inject.
fn restart_with_agent(
    daemon: common::Daemon,
    state: &Path,
    config: &Path,
    agent: &Path,
) -> anyhow::Result<common::Daemon> {
    write_config(config, agent)?;
    anyhow::ensure!(daemon.stop().success(), "bangerd did not stop cleanly");
    Ok(common::Daemon::ready(common::Daemon::spawn_with(
        state,
        &["--user", "--config", config.to_str().unwrap_or_default()],
    )))
}

/// One QMP command on a fresh connection (banger holds none open).
fn qmp(socket: &Path, command: Value) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(socket)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?; // the greeting
    for message in [json!({"execute": "qmp_capabilities"}), command] {
        writeln!(writer, "{message}")?;
        loop {
            line.clear();
            anyhow::ensure!(reader.read_line(&mut line)? > 0, "QMP closed");
            let answer: Value = serde_json::from_str(&line)?;
            if let Some(error) = answer.get("error") {
                anyhow::bail!("QMP refused {message}: {error}");
            }
            if answer.get("return").is_some() {
                break;
            }
        }
    }
    Ok(Value::Null)
}

/// A direct QEMU launch of what a banger VM boots (banger's command line,
/// the same kernel, boot image and disk, no daemon), timed to the point
/// `vm ping --wait` reaches: the agent's answer to a hello on its port.
fn direct_boot(
    kernel: &Value,
    rootfs: &Path,
    accel: banger::vm::record::Accel,
    dir: &Path,
) -> anyhow::Result<Duration> {
    use banger::vmm::{BootFiles, LaunchSpec, VmPaths, Vmm, qemu::Qemu};
    use banger_agent::protocol::{self, Frame, FrameKind, PROTOCOL_VERSION, Request};
    let file = |key: &str| kernel[key].as_str().map(PathBuf::from);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let qemu = Qemu {
        binary: PathBuf::from("qemu-system-x86_64"),
        accel,
    };
    let spec = LaunchSpec {
        nic: None,
        id: "direct".into(),
        paths: VmPaths {
            dir: dir.to_path_buf(),
        },
        boot: BootFiles {
            vmlinux: file("vmlinux").context("vmlinux")?,
            bzimage: file("bzimage"),
            initrd: kernel["boot_image"]["path"].as_str().map(PathBuf::from),
            args: format!("{} banger.hostname=direct", qemu.default_boot_args()),
        },
        rootfs: rootfs.to_path_buf(),
        vcpus: 1,
        memory_mib: 256,
    };
    let (program, args) = qemu.command(&spec);
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = started + common::EVENT_TIMEOUT;
    // QEMU makes the socket within milliseconds; tried every millisecond.
    let mut stream = loop {
        match UnixStream::connect(dir.join("agent.sock")) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => anyhow::bail!("no agent socket: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    stream.set_read_timeout(Some(common::EVENT_TIMEOUT))?;
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
    };
    protocol::write_frame(&mut stream, &Frame::json(FrameKind::Request, 1, &hello))?;
    loop {
        let frame = protocol::read_frame(&mut stream)?.context("the agent closed")?;
        if frame.kind == FrameKind::Response {
            break;
        }
    }
    let elapsed = started.elapsed();
    child.kill()?;
    child.wait()?;
    Ok(elapsed)
}

fn banger_cli(state: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_banger"));
    command.arg("--socket").arg(common::socket_path(state));
    command
}

/// `vm exec -- cat /dev/zero | head -c FLOOD_BYTES`, as a user types it.
fn exec_flood(state: &Path) -> anyhow::Result<Duration> {
    let cli = banger_cli(state);
    let line = format!(
        "{} --socket {} vm exec bench -- cat /dev/zero | head -c {FLOOD_BYTES} > /dev/null",
        cli.get_program().to_string_lossy(),
        common::socket_path(state).display()
    );
    let started = Instant::now();
    let status = Command::new("sh").args(["-c", &line]).status()?;
    anyhow::ensure!(status.success(), "the exec pipeline failed: {status}");
    Ok(started.elapsed())
}

/// The raw port: a plain program in the guest writes `writer` to it, this
/// reads it.
fn raw_flood(state: &Path, raw: &Path, writer: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut stream = UnixStream::connect(raw)?;
    let mut writer = banger_cli(state)
        .args(["vm", "exec", "bench", "--", "sh", "-c"])
        .arg(writer)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut read = 0u64;
    while read < FLOOD_BYTES {
        let n = stream.read(&mut buffer)?;
        anyhow::ensure!(n > 0, "the raw port closed after {read} bytes");
        read += n as u64;
    }
    let elapsed = started.elapsed();
    drop(stream);
    // The CLI gone, the daemon hangs the writer up.
    writer.kill()?;
    writer.wait()?;
    Ok(elapsed)
}

fn throughput(elapsed: &[Duration]) -> String {
    let mut rates: Vec<f64> = elapsed
        .iter()
        .map(|e| FLOOD_BYTES as f64 / e.as_secs_f64() / 1e6)
        .collect();
    rates.sort_by(f64::total_cmp);
    format!(
        "median {:.1} MB/s (min {:.1}, max {:.1}, n={})",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1],
        rates.len()
    )
}

/// Throughput against the raw channel, and memory during floods.
fn floods(state: &Path, dir: &Path, daemon: Pid, report: &mut String) -> anyhow::Result<()> {
    let vm = cli(state, &["vm", "inspect", "bench", "--json"]);
    let id = vm["id"].as_str().unwrap_or_default();
    let qmp_socket = state.join("vms").join(id).join("qmp.sock");
    let raw = dir.join("raw.sock");
    qmp(
        &qmp_socket,
        json!({"execute": "chardev-add", "arguments": {"id": "bench", "backend": {"type": "socket",
            "data": {"addr": {"type": "unix", "data": {"path": raw}}, "server": true, "wait": false}}}}),
    )?;
    qmp(
        &qmp_socket,
        json!({"execute": "device_add", "arguments": {"driver": "virtserialport",
            "bus": "agentbus.0", "chardev": "bench", "name": RAW_PORT}}),
    )?;
    let find = format!(
        "for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = {RAW_PORT} ] && basename $p; done; true"
    );
    let mut port = String::new();
    let deadline = Instant::now() + common::EVENT_TIMEOUT;
    while port.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the hot-plugged port never appeared"
        );
        let out = banger_cli(state)
            .args(["vm", "exec", "bench", "--", "sh", "-c", &find])
            .output()?;
        port = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    common::banger(
        state,
        &[
            "vm",
            "exec",
            "bench",
            "--",
            "sh",
            "-c",
            "echo 5 > /proc/1/clear_refs",
        ],
    );
    let direct = format!("cat /dev/zero > /dev/{port}");
    // What exec's process pays too: its output goes through a pipe.
    let piped = format!("cat /dev/zero | cat > /dev/{port}");
    let (mut exec, mut bare, mut behind_pipe) = (Vec::new(), Vec::new(), Vec::new());
    let mut daemon_peak = 0u64;
    for _ in 0..FLOOD_RUNS {
        let baseline = common::reset_peak_rss(daemon);
        exec.push(exec_flood(state)?);
        daemon_peak =
            daemon_peak.max(common::process_kib(daemon, "VmHWM").saturating_sub(baseline));
        bare.push(raw_flood(state, &raw, &direct)?);
        behind_pipe.push(raw_flood(state, &raw, &piped)?);
    }
    let ratio = |a: &[Duration], b: &[Duration]| {
        let median = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort();
            v[v.len() / 2].as_secs_f64()
        };
        median(b) / median(a)
    };
    writeln!(
        report,
        "vm exec -- cat /dev/zero | head -c 1G: {}",
        throughput(&exec)
    )?;
    writeln!(
        report,
        "raw virtio-serial port (cat in the guest, no framing), interleaved: {}",
        throughput(&bare)
    )?;
    writeln!(
        report,
        "raw port behind one pipe in the guest (cat | cat > port), interleaved: {}",
        throughput(&behind_pipe)
    )?;
    writeln!(
        report,
        "exec throughput / raw channel: {:.2}x; / raw behind a pipe: {:.2}x (medians)",
        ratio(&exec, &bare),
        ratio(&exec, &behind_pipe)
    )?;
    writeln!(
        report,
        "daemon peak RSS during the output flood: +{daemon_peak} KiB over its RSS before"
    )?;

    // A stdin flood into a process that never reads.
    let baseline = common::reset_peak_rss(daemon);
    let mut flood = banger_cli(state)
        .args(["vm", "exec", "bench", "--", "sleep", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let mut input = flood.stdin.take().context("stdin")?;
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'y'; 64 * 1024];
        while input.write_all(&chunk).is_ok() {}
    });
    flood.wait()?;
    let _ = writer.join();
    writeln!(
        report,
        "daemon peak RSS during a 10 s stdin flood: +{} KiB over its RSS before",
        common::process_kib(daemon, "VmHWM").saturating_sub(baseline)
    )?;
    let out = banger_cli(state)
        .args(["vm", "exec", "bench", "--", "cat", "/proc/1/status"])
        .output()?;
    writeln!(
        report,
        "guest agent (PID 1) peak RSS over both floods: {} KiB",
        common::status_kib(&String::from_utf8_lossy(&out.stdout), "VmHWM")
    )?;
    Ok(())
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
    write_config(&config, &agent)?;
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

    let direct_disk = dir.join("direct.ext4");
    let mut direct = Vec::new();
    let mut through_banger = Vec::new();
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
        through_banger.push(ready);
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
        // The direct launch as banger's: the same accelerator, a fresh copy
        // of the disk (banger clones one per VM), and no VM beside it.
        let accel = match vm["accel"].as_str() {
            Some("kvm") => banger::vm::record::Accel::Kvm,
            _ => banger::vm::record::Accel::Tcg,
        };
        std::fs::copy(&rootfs, &direct_disk)?;
        let kernel = cli(&state, &["kernel", "inspect", "debian", "--json"]);
        direct.push(direct_boot(
            &kernel,
            &direct_disk,
            accel,
            &dir.join("direct"),
        )?);
    }

    let seconds = |samples: &[Duration]| {
        let mut s: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
        s.sort_by(f64::total_cmp);
        (s[s.len() / 2], s[0], s[s.len() - 1])
    };
    let ((b, b_min, b_max), (d, d_min, d_max)) = (seconds(&through_banger), seconds(&direct));
    writeln!(
        report,
        "create to agent ready, interleaved, no network on either side: banger median {b:.2} s (min {b_min:.2}, max {b_max:.2}); direct qemu, same kernel, boot image, accelerator and fresh disk, to the agent's hello: median {d:.2} s (min {d_min:.2}, max {d_max:.2}); {:.2}x",
        b / d
    )?;
    cli(
        &state,
        &[
            "vm", "create", "bench", "--kernel", "debian", "--rootfs", &rootfs, "--vmm", "qemu",
            "--memory", "256M", "--start", "--json",
        ],
    );
    cli(&state, &["vm", "ping", "bench", "--wait", "120", "--json"]);
    // The previous release's agent on a second VM, as that release booted
    // it: in the initramfs for stage 1 and on the root disk for stage 2.
    let previous = var("BANGER_TEST_PREVIOUS_AGENT");
    let mut daemon = daemon;
    if let Some(previous) = &previous {
        daemon = restart_with_agent(daemon, &state, &config, previous)?;
        let copy = dir.join("previous.ext4");
        std::fs::copy(&rootfs, &copy)?;
        common::install_previous_agent(&copy, previous);
        cli(
            &state,
            &[
                "vm",
                "create",
                "previous",
                "--kernel",
                "debian",
                "--rootfs",
                copy.to_str().unwrap_or_default(),
                "--vmm",
                "qemu",
                "--memory",
                "256M",
                "--start",
                "--json",
            ],
        );
        cli(
            &state,
            &["vm", "ping", "previous", "--wait", "120", "--json"],
        );
        daemon = restart_with_agent(daemon, &state, &config, &agent)?;
        // The restarted daemon reconnects to both agents.
        cli(
            &state,
            &["vm", "ping", "previous", "--wait", "30", "--json"],
        );
        cli(&state, &["vm", "ping", "bench", "--wait", "30", "--json"]);
        let shown = cli(&state, &["vm", "inspect", "previous", "--json"]);
        anyhow::ensure!(shown["agent"]["protocol"] == 1, "previous VM: {shown}");
    }
    let (mut current, mut older) = (Vec::new(), Vec::new());
    for _ in 0..EXECS {
        current.push(exec_true(&state, "bench"));
        if previous.is_some() {
            older.push(exec_true(&state, "previous"));
        }
    }
    write!(
        report,
        "{}",
        common::summary(
            &format!("banger vm exec -- true, protocol 2 ({EXECS} runs of the CLI)"),
            &current
        )
    )?;
    if previous.is_some() {
        write!(
            report,
            "{}",
            common::summary(
                "banger vm exec -- true, protocol 1 (the previous release's agent), interleaved",
                &older
            )
        )?;
        cli(&state, &["vm", "rm", "previous", "--force"]);
    } else {
        writeln!(
            report,
            "protocol-1 round trip skipped: BANGER_TEST_PREVIOUS_AGENT is not set (scripts/bench.sh builds it)"
        )?;
    }
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
    floods(&state, dir, daemon.pid(), &mut report)?;
    cli(&state, &["vm", "rm", "bench", "--force"]);
    drop(daemon);

    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("guest.txt"), &report)?;
    Ok(())
}
