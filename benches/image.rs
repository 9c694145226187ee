//! Image import to a ready ext4, as users run it: the release `bangerd`
//! and `banger image import` of an OCI layout on local disk, against the
//! usual pipeline (`umoci unpack` of the same layout, then `mke2fs -t
//! ext4 -d` of the unpacked tree), and against the bare limit, a
//! single-core `gzip -dc` of the same layers; interleaved, one round of
//! each after another. The image: a Debian bookworm root filesystem
//! (debootstrap, made once and cached), a busybox tree, and one directory
//! of 20,000 files: three gzip layers built with umoci. Prints medians
//! with min and max and writes them to `target/bench-results/image.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const ROUNDS: usize = 3;
const TAG: &str = "bench";

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-fixtures")
}

/// Debian bookworm, minbase, made once.
fn bookworm() -> anyhow::Result<PathBuf> {
    let root = fixtures().join("bookworm");
    if !root.join("etc/debian_version").is_file() {
        let staging = fixtures().join("bookworm.tmp");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(fixtures())?;
        eprintln!("debootstrap bookworm (once)...");
        run(
            "debootstrap",
            &[
                "--variant=minbase",
                "bookworm",
                &staging.to_string_lossy(),
                "http://deb.debian.org/debian",
            ],
        )?;
        std::fs::rename(&staging, &root)?;
    }
    Ok(root)
}

/// Writes one layer's changes into the bundle's rootfs.
type LayerBuilder<'a> = dyn Fn(&Path) -> anyhow::Result<()> + 'a;

/// The three-layer layout, made once with umoci.
fn layout() -> anyhow::Result<PathBuf> {
    let layout = fixtures().join("image-layout");
    if layout.join("index.json").is_file() {
        return Ok(layout);
    }
    let bookworm = bookworm()?;
    let work = tempfile::tempdir_in(fixtures())?;
    let staging = work.path().join("layout");
    let bundle = work.path().join("bundle");
    let image = format!("{}:{TAG}", staging.display());
    run("umoci", &["init", "--layout", &staging.to_string_lossy()])?;
    run("umoci", &["new", "--image", &image])?;
    let rootfs = bundle.join("rootfs");
    let layers: [&LayerBuilder<'_>; 3] = [
        &|rootfs| {
            run(
                "cp",
                &[
                    "-a",
                    &format!("{}/.", bookworm.display()),
                    &rootfs.to_string_lossy(),
                ],
            )
        },
        &|rootfs| {
            let bin = rootfs.join("opt/busybox/bin");
            std::fs::create_dir_all(&bin)?;
            let busybox = Command::new("sh")
                .args(["-c", "command -v busybox"])
                .output()?;
            let busybox = String::from_utf8(busybox.stdout)?.trim().to_string();
            std::fs::copy(&busybox, bin.join("busybox"))?;
            let applets = Command::new(&busybox).arg("--list").output()?;
            for applet in String::from_utf8(applets.stdout)?.lines() {
                let link = bin.join(applet);
                if !link.exists() {
                    std::os::unix::fs::symlink("busybox", link)?;
                }
            }
            Ok(())
        },
        &|rootfs| {
            let many = rootfs.join("many");
            std::fs::create_dir_all(&many)?;
            for i in 0..20_000 {
                std::fs::write(many.join(format!("file-{i:05}")), format!("{i}\n"))?;
            }
            Ok(())
        },
    ];
    for add in layers {
        let _ = std::fs::remove_dir_all(&bundle);
        run(
            "umoci",
            &["unpack", "--image", &image, &bundle.to_string_lossy()],
        )?;
        add(&rootfs)?;
        run(
            "umoci",
            &["repack", "--image", &image, &bundle.to_string_lossy()],
        )?;
    }
    std::fs::rename(&staging, &layout)?;
    Ok(layout)
}

/// The layer blobs the manifest names (gzip), for the inflate limit.
fn layer_blobs(layout: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no manifest"))?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(manifest))?)?;
    Ok(manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(blob))
        .collect())
}

/// `banger image import` to a ready ext4, on a fresh daemon and state
/// directory (the daemon's start is not timed).
fn banger_import(layout: &Path) -> anyhow::Result<f64> {
    let dir = common::state_dir();
    std::fs::write(
        dir.path().join("bangerd.toml"),
        "[network]\nenabled = false\n",
    )?;
    let config = dir.path().join("bangerd.toml");
    let daemon = common::Daemon::ready(common::Daemon::spawn_with(
        dir.path(),
        &["--config", &config.to_string_lossy()],
    ));
    let started = Instant::now();
    let out = common::banger(
        dir.path(),
        &[
            "image",
            "import",
            &layout.to_string_lossy(),
            "--name",
            "bench",
        ],
    );
    let took = started.elapsed().as_secs_f64();
    daemon.stop();
    anyhow::ensure!(
        out.status.success(),
        "banger image import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// `umoci unpack` then `mke2fs -t ext4 -d` of the tree, sized as the
/// tree plus the same headroom banger gives.
fn peer(layout: &Path) -> anyhow::Result<f64> {
    let work = tempfile::tempdir_in(fixtures())?;
    let bundle = work.path().join("bundle");
    let disk = work.path().join("disk.ext4");
    let started = Instant::now();
    run(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:{TAG}", layout.display()),
            &bundle.to_string_lossy(),
        ],
    )?;
    let du = Command::new("du")
        .args(["-sm", &bundle.join("rootfs").to_string_lossy()])
        .output()?;
    let used: u64 = String::from_utf8(du.stdout)?
        .split_whitespace()
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(1024);
    let size = format!("{}M", used + used / 4 + 128);
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            &bundle.join("rootfs").to_string_lossy(),
            &disk.to_string_lossy(),
            &size,
        ],
    )?;
    Ok(started.elapsed().as_secs_f64())
}

/// Single-core gzip inflate of every layer, one after another.
fn inflate(blobs: &[PathBuf]) -> anyhow::Result<f64> {
    let started = Instant::now();
    for blob in blobs {
        let status = Command::new("sh")
            .args(["-c", "gzip -dc < \"$1\" > /dev/null", "sh"])
            .arg(blob)
            .status()?;
        anyhow::ensure!(status.success(), "gzip -dc {}", blob.display());
    }
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let layout = layout()?;
    let blobs = layer_blobs(&layout)?;
    let (mut ours, mut theirs, mut limit) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        ours.push(banger_import(&layout)?);
        theirs.push(peer(&layout)?);
        limit.push(inflate(&blobs)?);
        eprintln!(
            "round {round}: banger {:.2} s, umoci + mke2fs {:.2} s, gzip -dc {:.2} s",
            ours[round], theirs[round], limit[round]
        );
    }
    let (ours_m, ours_s) = common::spread(ours);
    let (theirs_m, theirs_s) = common::spread(theirs);
    let (limit_m, limit_s) = common::spread(limit);
    let mut report = String::new();
    writeln!(
        report,
        "image import of a 3-layer gzip OCI layout (Debian bookworm minbase, busybox, 20,000 files in one directory), {ROUNDS} rounds interleaved:"
    )?;
    writeln!(report, "  banger image import (release, CLI): {ours_s}")?;
    writeln!(report, "  umoci unpack + mke2fs -t ext4 -d:  {theirs_s}")?;
    writeln!(report, "  gzip -dc of the layers (1 core):   {limit_s}")?;
    writeln!(
        report,
        "  banger / peer {:.2}x (target <= 0.25x); banger / inflate {:.2}x (target <= 1.5x)",
        ours_m / theirs_m,
        ours_m / limit_m
    )?;
    print!("{report}");
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&results)?;
    std::fs::write(results.join("image.txt"), report)?;
    Ok(())
}
