//! `daemon.status` round trips against a real bangerd over its socket: on
//! one connection, and on 100 concurrent connections; plus the daemon's
//! resident memory after load. With BANGER_BENCH_BASELINE_BANGERD, the
//! same against that build too, in alternating rounds. Prints the figures and writes them to
//! `target/bench-results/rpc.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

const SEQUENTIAL: usize = 2_000;
const CONNECTIONS: usize = 100;
const PER_CONNECTION: usize = 200;

fn rss_kib(pid: i32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

fn timed_status(conn: &mut common::Conn, id: u64) -> Duration {
    timed(conn, id, "daemon.status")
}

fn timed(conn: &mut common::Conn, id: u64, method: &str) -> Duration {
    let start = Instant::now();
    let answer = conn.call(id, method, json!({}));
    let elapsed = start.elapsed();
    assert!(answer["result"].is_object(), "{answer}");
    elapsed
}

/// One round of every measurement against the daemon on `dir`.
#[derive(Default)]
struct Samples {
    sequential: Vec<Duration>,
    methods: Vec<Duration>,
    concurrent: Vec<Duration>,
}

fn measure(dir: &std::path::Path, into: &mut Samples) -> anyhow::Result<()> {
    let mut conn = common::Conn::open(dir);
    for id in 0..200 {
        timed_status(&mut conn, id); // warm-up
    }
    into.sequential
        .extend((0..SEQUENTIAL as u64).map(|id| timed_status(&mut conn, id)));
    // The same round trip without the store: what the socket, parsing and
    // dispatch cost alone.
    into.methods
        .extend((0..SEQUENTIAL as u64).map(|id| timed(&mut conn, id, "daemon.methods")));
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let dir = dir.to_path_buf();
            std::thread::spawn(move || {
                let mut conn = common::Conn::open(&dir);
                (0..PER_CONNECTION as u64)
                    .map(|id| timed_status(&mut conn, id))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for thread in threads {
        into.concurrent.extend(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))?,
        );
    }
    Ok(())
}

/// Rounds of measurements, alternating between the daemons compared.
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    // BANGER_BENCH_BASELINE_BANGERD: another build to compare against, in
    // the same run, interleaved (an earlier commit's release bangerd).
    let mut builds = vec![("this build".to_string(), PathBuf::from(common::BANGERD))];
    if let Some(baseline) = std::env::var_os("BANGER_BENCH_BASELINE_BANGERD") {
        builds.push(("baseline".to_string(), PathBuf::from(baseline)));
    }
    let dirs: Vec<tempfile::TempDir> = builds.iter().map(|_| common::state_dir()).collect();
    let daemons: Vec<common::Daemon> = builds
        .iter()
        .zip(&dirs)
        .map(|((_, binary), dir)| {
            common::Daemon::ready(common::Daemon::spawn_binary(
                binary,
                dir.path(),
                &["--user"],
                &[],
            ))
        })
        .collect();
    let mut report = String::new();
    let mut samples: Vec<Samples> = builds.iter().map(|_| Samples::default()).collect();
    for _ in 0..ROUNDS {
        for (dir, into) in dirs.iter().zip(samples.iter_mut()) {
            measure(dir.path(), into)?;
        }
    }
    for (((name, binary), daemon), samples) in builds.iter().zip(&daemons).zip(&samples) {
        let pid = daemon.pid().as_raw();
        writeln!(report, "{name} ({}):", binary.display())?;
        report.push_str(&common::summary(
            "  daemon.status, 1 connection",
            &samples.sequential,
        ));
        report.push_str(&common::summary(
            "  daemon.methods (no store access), 1 connection",
            &samples.methods,
        ));
        report.push_str(&common::summary(
            "  daemon.status, 100 concurrent connections",
            &samples.concurrent,
        ));
        writeln!(report, "  RSS after load: {} KiB", rss_kib(pid)?)?;
    }
    if let [this, baseline] = &samples[..] {
        let ratio = |a: &[Duration], b: &[Duration]| {
            common::percentile(a, 0.5).as_secs_f64() / common::percentile(b, 0.5).as_secs_f64()
        };
        writeln!(
            report,
            "this build / baseline, medians: status {:.2}x, methods {:.2}x, status at 100 connections {:.2}x",
            ratio(&this.sequential, &baseline.sequential),
            ratio(&this.methods, &baseline.methods),
            ratio(&this.concurrent, &baseline.concurrent)
        )?;
    }

    print!("{report}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("rpc.txt"), &report)?;
    for daemon in daemons {
        assert!(daemon.stop().success());
    }
    Ok(())
}
