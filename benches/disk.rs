//! VM disks from images, as users make them: the release `bangerd` and
//! `banger vm create --image` through the CLI.
//!
//! 1. The per-VM clone of a 4 GiB image holding 1 GB (an image of sixteen
//!    64 MiB files of random bytes, imported with 3 GiB of headroom): on a
//!    loop-mounted XFS state dir (reflinks) against `cp --reflink=always`
//!    of the same file, and on ext4 (sparse copies) against `cp
//!    --sparse=always` then `sync` (banger syncs the clone before it
//!    answers), rounds interleaved.
//! 2. `vm create --image busybox --start` to the agent's first answer on
//!    qemu/TCG, against `vm create --rootfs` of a copy of the same disk,
//!    interleaved.
//!
//! Prints medians with min and max and writes them to
//! `target/bench-results/disk.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::oci::{Compression, Layer, layout};
use serde_json::Value;

const CLONE_ROUNDS: usize = 7;
const BOOT_ROUNDS: usize = 5;

fn cli(state: &Path, args: &[&str]) -> anyhow::Result<Value> {
    let out = common::banger(state, args);
    anyhow::ensure!(
        out.status.success(),
        "banger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-fixtures")
}

/// An OCI layout of one layer holding 1 GiB of random bytes, made once.
fn gigabyte_layout() -> anyhow::Result<PathBuf> {
    let dir = fixtures().join("disk");
    let layout_dir = dir.join("gigabyte");
    if layout_dir.join("index.json").is_file() {
        return Ok(layout_dir);
    }
    std::fs::create_dir_all(&dir)?;
    let mut layer = Layer::default();
    layer.dir("data", 0o755);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut chunk = vec![0u8; 64 << 20];
    for i in 0..16 {
        // xorshift: incompressible, and quick to make.
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        layer.file(&format!("data/blob-{i:02}"), 0o644, &chunk);
    }
    let staging = dir.join("gigabyte.tmp");
    let _ = std::fs::remove_dir_all(&staging);
    let made = layout(&dir, "gigabyte.tmp", &[layer.finish()], Compression::Zstd);
    std::fs::rename(made, &layout_dir)?;
    Ok(layout_dir)
}

/// A daemon without networking on `state`, whose images get `headroom`
/// MiB of holes, with the halt kernel imported (clone VMs never boot).
fn clone_daemon(state: &Path, headroom_mib: u64) -> anyhow::Result<common::Daemon> {
    let daemon = common::image_daemon(state, &format!("headroom_mib = {headroom_mib}\n"), &[]);
    let halt = state.join("halt.elf");
    common::halt_kernel(&halt);
    cli(
        state,
        &[
            "kernel",
            "import",
            "halt",
            "--vmlinux",
            &halt.to_string_lossy(),
        ],
    )?;
    Ok(daemon)
}

/// One `vm create --image`, timed; the VM is removed after, untimed.
fn banger_clone(state: &Path, round: usize) -> anyhow::Result<f64> {
    let name = format!("clone-{round}");
    let started = Instant::now();
    cli(
        state,
        &["vm", "create", &name, "--image", "big", "--vmm", "qemu"],
    )?;
    let took = started.elapsed().as_secs_f64();
    cli(state, &["vm", "rm", &name])?;
    Ok(took)
}

/// One `cp` of the image's disk beside it, timed with `then` (a sync);
/// removed after, untimed.
fn cp_clone(disk: &Path, mode: &str, sync: bool) -> anyhow::Result<f64> {
    let copy = disk.with_extension("cp");
    let started = Instant::now();
    let (disk, copied) = (disk.to_string_lossy(), copy.to_string_lossy());
    common::run_ok("cp", &[mode, &disk, &copied]);
    if sync {
        common::run_ok("sync", &["-f", &copied]);
    }
    let took = started.elapsed().as_secs_f64();
    std::fs::remove_file(&copy)?;
    Ok(took)
}

fn clones(report: &mut String) -> anyhow::Result<()> {
    let layout = gigabyte_layout()?;
    let work = tempfile::tempdir_in(fixtures())?;
    let xfs = common::LoopXfs::mount(work.path(), 16 << 30);
    let mut disks = Vec::new();
    let mut daemons = Vec::new();
    for state in [xfs.0.join("state"), work.path().join("ext4-state")] {
        std::fs::create_dir_all(&state)?;
        daemons.push(clone_daemon(&state, 3072)?);
        let image = cli(
            &state,
            &[
                "image",
                "import",
                &layout.to_string_lossy(),
                "--name",
                "big",
                "--json",
            ],
        )?;
        let disk = PathBuf::from(image["disk"].as_str().unwrap_or_default());
        let apparent = image["disk_bytes"].as_u64().unwrap_or_default();
        let allocated = common::allocated(&disk);
        eprintln!(
            "{}: image disk {:.2} GiB apparent, {:.2} GiB data",
            state.display(),
            apparent as f64 / f64::from(1 << 30),
            allocated as f64 / f64::from(1 << 30)
        );
        disks.push((state, disk, apparent, allocated));
    }
    let (mut reflink, mut reflink_cp, mut sparse, mut sparse_cp) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..CLONE_ROUNDS {
        reflink.push(banger_clone(&disks[0].0, round)?);
        reflink_cp.push(cp_clone(&disks[0].1, "--reflink=always", false)?);
        sparse.push(banger_clone(&disks[1].0, round)?);
        sparse_cp.push(cp_clone(&disks[1].1, "--sparse=always", true)?);
        eprintln!(
            "round {round}: xfs banger {:.3} s, cp --reflink {:.3} s; ext4 banger {:.3} s, cp --sparse + sync {:.3} s",
            reflink[round], reflink_cp[round], sparse[round], sparse_cp[round]
        );
    }
    drop(daemons);
    let (apparent, allocated) = (disks[1].2, disks[1].3);
    writeln!(
        report,
        "per-VM disk clone of a {:.1} GiB image holding {:.2} GiB, {CLONE_ROUNDS} rounds interleaved:",
        apparent as f64 / f64::from(1 << 30),
        allocated as f64 / f64::from(1 << 30)
    )?;
    let (m, s) = common::spread(reflink);
    writeln!(
        report,
        "  XFS: banger vm create --image (release, CLI): {s} (target < 0.050 s: {})",
        if m < 0.050 { "met" } else { "missed" }
    )?;
    writeln!(
        report,
        "  XFS: cp --reflink=always:                     {}",
        common::spread(reflink_cp).1
    )?;
    let (m, s) = common::spread(sparse);
    writeln!(
        report,
        "  ext4: banger vm create --image (release, CLI): {s} (target <= 1.5 s: {})",
        if m <= 1.5 { "met" } else { "missed" }
    )?;
    writeln!(
        report,
        "  ext4: cp --sparse=always + sync:               {}",
        common::spread(sparse_cp).1
    )?;
    Ok(())
}

/// Create, start and wait for the agent's first answer: the seconds it
/// took; then the VM goes, untimed.
fn create_to_ready(state: &Path, name: &str, disk: &[&str]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut args = vec!["vm", "create", name, "--vmm", "qemu", "--memory", "256M"];
    args.extend_from_slice(disk);
    args.extend_from_slice(&["--start", "--json"]);
    cli(state, &args)?;
    cli(state, &["vm", "ping", name, "--wait", "120", "--json"])?;
    let took = started.elapsed().as_secs_f64();
    cli(state, &["vm", "kill", name])?;
    cli(state, &["vm", "rm", name])?;
    Ok(took)
}

fn boots(report: &mut String) -> anyhow::Result<()> {
    let Some(guest) = common::guest::guest_fixtures("disk bench: create to agent ready") else {
        writeln!(report, "create to agent ready: skipped (no guest fixtures)")?;
        return Ok(());
    };
    let f = common::guest::Fixture::new(&guest);
    common::guest::import_kernel(&f, &guest.kernel_deb);
    let work = tempfile::tempdir_in(fixtures())?;
    let mut base = common::oci::busybox_tree();
    for dir in ["proc", "sys", "dev", "run", "tmp", "root", "etc"] {
        base.dir(dir, 0o755);
    }
    let layout = layout(work.path(), "busybox", &[base.finish()], Compression::Gzip);
    let image = cli(
        &f.state(),
        &[
            "image",
            "import",
            &layout.to_string_lossy(),
            "--name",
            "busybox",
            "--json",
        ],
    )?;
    // The same disk, as a user's file.
    let rootfs = work.path().join("busybox.ext4");
    common::run_ok(
        "cp",
        &[
            "--sparse=always",
            image["disk"].as_str().unwrap_or_default(),
            &rootfs.to_string_lossy(),
        ],
    );
    let rootfs = rootfs.to_string_lossy().into_owned();
    let (mut from_image, mut from_rootfs) = (Vec::new(), Vec::new());
    for round in 0..BOOT_ROUNDS {
        from_image.push(create_to_ready(&f.state(), "img", &["--image", "busybox"])?);
        from_rootfs.push(create_to_ready(&f.state(), "file", &["--rootfs", &rootfs])?);
        eprintln!(
            "round {round}: --image {:.2} s, --rootfs {:.2} s",
            from_image[round], from_rootfs[round]
        );
    }
    let (image_m, image_s) = common::spread(from_image);
    let (rootfs_m, rootfs_s) = common::spread(from_rootfs);
    writeln!(
        report,
        "vm create --start to the agent's first answer on qemu/TCG (busybox image, {:.0} MiB disk), {BOOT_ROUNDS} rounds interleaved:",
        image["disk_bytes"].as_f64().unwrap_or_default() / f64::from(1 << 20)
    )?;
    writeln!(report, "  --image busybox:          {image_s}")?;
    writeln!(report, "  --rootfs (the same disk): {rootfs_s}")?;
    writeln!(report, "  --image / --rootfs {:.2}x", image_m / rootfs_m)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    std::fs::create_dir_all(fixtures())?;
    let mut report = String::new();
    clones(&mut report)?;
    boots(&mut report)?;
    print!("{report}");
    std::io::stdout().flush()?;
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&results)?;
    std::fs::write(results.join("disk.txt"), report)?;
    Ok(())
}
