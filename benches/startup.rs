//! Daemon start-up with many VMs, on the release `bangerd` as users run
//! it: start to `daemon ready` with 1,000 stopped VMs (their directories
//! in place), and the same with 1,000 stray directories under `vms/` that
//! no ledger claims, interleaved; plus the reconciliation itself (load the
//! ledgers, look for unclaimed VMMs, sweep) as the daemon logs it.
//! Prints medians with min and max and writes them to
//! `target/bench-results/startup.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VMS: usize = 1_000;
const STRAYS: usize = 1_000;
const RUNS: usize = 5;

/// A state directory with the seeded store and every VM's directory,
/// plus `strays` directories no record claims.
fn prepare(seed: &Path, dir: &Path, strays: usize) -> anyhow::Result<PathBuf> {
    let state = dir.join("state");
    std::fs::create_dir_all(state.join("vms"))?;
    std::fs::copy(seed.join("banger.redb"), state.join("banger.redb"))?;
    for i in 0..VMS {
        let vm = state.join("vms").join(format!("vm-{i}"));
        std::fs::create_dir_all(&vm)?;
        std::fs::write(vm.join("console.log"), b"")?;
    }
    for i in 0..strays {
        let stray = state.join("vms").join(format!("stray{i:05}"));
        std::fs::create_dir_all(&stray)?;
        std::fs::write(stray.join("rootfs.ext4"), b"left by a crash")?;
    }
    Ok(state)
}

/// Start to ready, and the reconciliation's own figure from its log line.
fn start(state: &Path) -> (Duration, f64) {
    let started = Instant::now();
    let mut daemon = common::Daemon::ready(common::Daemon::spawn(state));
    let ready = started.elapsed();
    let line = daemon
        .wait_for_line_from(&["VM ledgers reconciled"], 0)
        .expect("reconciliation logged")
        .1;
    let ms = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("ms="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(f64::NAN);
    daemon.stop();
    (ready, ms)
}

fn spread(mut samples: Vec<f64>) -> String {
    samples.sort_by(f64::total_cmp);
    format!(
        "median {:.1} ms (min {:.1}, max {:.1})",
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1]
    )
}

fn main() -> anyhow::Result<()> {
    let seed = common::state_dir();
    common::seed_store(seed.path(), VMS);
    let (mut clean, mut dirty) = (Vec::new(), Vec::new());
    let (mut clean_sweep, mut dirty_sweep) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        for (strays, ready, sweep) in [
            (0, &mut clean, &mut clean_sweep),
            (STRAYS, &mut dirty, &mut dirty_sweep),
        ] {
            let dir = common::state_dir();
            let state = prepare(seed.path(), dir.path(), strays)?;
            let (took, ms) = start(&state);
            ready.push(took.as_secs_f64() * 1000.0);
            sweep.push(ms);
            let left = std::fs::read_dir(state.join("vms"))?.count();
            anyhow::ensure!(left == VMS, "{left} entries left under vms/");
        }
    }
    let mut report = String::new();
    writeln!(
        report,
        "daemon start to ready, {VMS} VMs: {}",
        spread(clean)
    )?;
    writeln!(
        report,
        "daemon start to ready, {VMS} VMs and {STRAYS} strays under vms/: {}",
        spread(dirty)
    )?;
    writeln!(
        report,
        "reconciliation (ledgers, VMM scan, sweep), {VMS} VMs: {}",
        spread(clean_sweep)
    )?;
    writeln!(
        report,
        "reconciliation, {VMS} VMs and {STRAYS} strays removed: {}",
        spread(dirty_sweep)
    )?;
    writeln!(report, "({RUNS} runs of each, interleaved; release build)")?;
    print!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("startup.txt"), &report)?;
    Ok(())
}
