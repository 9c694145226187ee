//! `daemon.status` round trips against a real bangerd over its socket: on
//! one connection, and on 100 concurrent connections; plus the daemon's
//! resident memory at idle. Prints the figures and writes them to
//! `target/bench-results/rpc.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;

const SEQUENTIAL: usize = 5_000;
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

fn main() -> anyhow::Result<()> {
    let tmp = common::state_dir();
    let dir = tmp.path().to_path_buf();
    let daemon = common::Daemon::start(&dir);
    let pid = daemon.pid().as_raw();
    let mut report = String::new();
    writeln!(report, "idle RSS after start: {} KiB", rss_kib(pid)?)?;

    let mut conn = common::Conn::open(&dir);
    for id in 0..200 {
        timed_status(&mut conn, id); // warm-up
    }
    let sequential: Vec<Duration> = (0..SEQUENTIAL as u64)
        .map(|id| timed_status(&mut conn, id))
        .collect();
    report.push_str(&common::summary("daemon.status, 1 connection", &sequential));
    // The same round trip without the store: what the socket, parsing and
    // dispatch cost alone.
    let methods: Vec<Duration> = (0..SEQUENTIAL as u64)
        .map(|id| timed(&mut conn, id, "daemon.methods"))
        .collect();
    report.push_str(&common::summary(
        "daemon.methods (no store access), 1 connection",
        &methods,
    ));

    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut conn = common::Conn::open(&dir);
                (0..PER_CONNECTION as u64)
                    .map(|id| timed_status(&mut conn, id))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut concurrent = Vec::new();
    for thread in threads {
        concurrent.extend(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))?,
        );
    }
    report.push_str(&common::summary(
        "daemon.status, 100 concurrent connections",
        &concurrent,
    ));
    writeln!(report, "idle RSS after load: {} KiB", rss_kib(pid)?)?;

    print!("{report}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("rpc.txt"), &report)?;
    assert!(daemon.stop().success());
    Ok(())
}
