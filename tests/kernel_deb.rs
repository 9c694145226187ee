//! `banger kernel import-deb` on Debian's real cloud kernel package: the
//! record (version, module order, sha256s of the files), the initramfs's
//! contents as `cpio` lists them, the load order checked against each
//! module's own `.modinfo`, a bad package refused with nothing left behind,
//! and `kernel rm` taking the files away.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn sha256(path: &str) -> String {
    format!(
        "{:x}",
        Sha256::digest(std::fs::read(path).expect("read catalog file"))
    )
}

/// The entries of a gzip-compressed newc cpio, by name.
fn cpio_entries(path: &str) -> Vec<(String, Vec<u8>)> {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open"))
        .read_to_end(&mut bytes)
        .expect("gunzip");
    let mut entries = Vec::new();
    let mut rest = &bytes[..];
    loop {
        let mut entry = cpio::NewcReader::new(rest).expect("cpio entry");
        if entry.entry().is_trailer() {
            return entries;
        }
        let name = entry.entry().name().to_string();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).expect("read entry");
        entries.push((name, content));
        rest = entry.finish().expect("next entry");
    }
}

/// `cpio -tv` of the gunzipped archive: the real tool must read it too.
fn cpio_listing(path: &str) -> String {
    let mut archive = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open"))
        .read_to_end(&mut archive)
        .expect("gunzip");
    let mut cpio = Command::new("cpio")
        .args(["-tv", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cpio");
    let mut stdin = cpio.stdin.take().expect("cpio stdin");
    let feeder = std::thread::spawn(move || stdin.write_all(&archive));
    let out = cpio.wait_with_output().expect("cpio");
    feeder.join().expect("feeder").expect("feed cpio");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package's `modules.builtin`, read with dpkg's own tools.
fn builtin_list(deb: &Path, version: &str) -> String {
    let mut tarfile = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .expect("dpkg-deb");
    let out = Command::new("tar")
        .args(["-xO", "--wildcards"])
        .arg(format!("*lib/modules/{version}/modules.builtin"))
        .stdin(tarfile.stdout.take().expect("dpkg-deb stdout"))
        .output()
        .expect("tar");
    assert!(
        tarfile.wait().expect("dpkg-deb").success(),
        "dpkg-deb failed"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_debian_kernel_package_becomes_a_bootable_catalog_entry() {
    let test = "a_debian_kernel_package_becomes_a_bootable_catalog_entry";
    let Some(deb) = std::env::var_os("BANGER_TEST_KERNEL_DEB").map(PathBuf::from) else {
        skip(
            test,
            "BANGER_TEST_KERNEL_DEB is not set (scripts/test.sh downloads the Debian cloud kernel)",
        );
        return;
    };
    let tmp = state_dir();
    let state = tmp.path().join("state");
    let config = tmp.path().join("bangerd.toml");
    // An import needs no agent: it joins the initramfs at boot.
    std::fs::write(&config, "[agent]\nbinary = \"/nonexistent\"\n").expect("config");
    let _daemon = Daemon::ready(Daemon::spawn_with(
        &state,
        &["--user", "--config", config.to_str().expect("utf-8")],
    ));

    let out = banger(
        &state,
        &[
            "kernel",
            "import-deb",
            "debian",
            deb.to_str().expect("utf-8"),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("building the initramfs"), "{progress}");
    let kernel: Value = serde_json::from_slice(&out.stdout).expect("json");
    let version = kernel["version"].as_str().expect("version");
    assert!(version.ends_with("-cloud-amd64"), "{version}");
    let modules: Vec<&str> = kernel["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for needed in [
        "virtio_blk",
        "virtio_console",
        "virtio_net",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            modules.contains(&needed),
            "{needed} missing from {modules:?}"
        );
    }
    let at = |name: &str| modules.iter().position(|m| *m == name).expect(name);
    assert!(at("failover") < at("net_failover") && at("net_failover") < at("virtio_net"));
    assert!(at("vsock") < at("vmw_vsock_virtio_transport_common"));
    for (file, hash) in [
        ("vmlinux", "vmlinux_sha256"),
        ("bzimage", "bzimage_sha256"),
        ("initrd", "initrd_sha256"),
    ] {
        let path = kernel[file].as_str().expect(file);
        assert_eq!(kernel[hash].as_str(), Some(sha256(path).as_str()), "{file}");
    }
    let vmlinux = std::fs::read(kernel["vmlinux"].as_str().expect("vmlinux")).expect("read");
    assert!(vmlinux.starts_with(b"\x7fELF"));
    let initrd = kernel["initrd"].as_str().expect("initrd");
    let listing = cpio_listing(initrd);
    for needed in ["etc/banger/initramfs", "lib/modules/virtio_blk.ko"] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {needed}"))),
            "{needed} missing from {listing}"
        );
    }
    assert!(
        !listing.lines().any(|l| l.ends_with(" init")),
        "the agent is not part of the kernel's archive: {listing}"
    );

    // The load order, checked against each module's own dependencies: a
    // dependency comes earlier, or the kernel has it built in.
    let entries = cpio_entries(initrd);
    let file = |name: &str| {
        &entries
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .1
    };
    let list = String::from_utf8(file("etc/banger/initramfs").clone()).expect("utf-8");
    let files: Vec<&str> = list.lines().collect();
    let expected: Vec<String> = modules.iter().map(|m| format!("{m}.ko")).collect();
    assert_eq!(files, expected, "the list follows the record's order");
    let builtin = builtin_list(&deb, version);
    for (i, module) in modules.iter().enumerate() {
        let path = format!("lib/modules/{module}.ko");
        let parsed = banger::kernel::modules::parse(&path, file(&path)).expect("a module");
        assert_eq!(parsed.name, *module);
        for dependency in &parsed.depends {
            match modules.iter().position(|m| m == dependency) {
                Some(at) => assert!(at < i, "{dependency} loads after {module}"),
                None => assert!(
                    builtin
                        .lines()
                        .any(|l| l.ends_with(&format!("/{dependency}.ko"))),
                    "{module} needs {dependency}, neither loaded nor built in"
                ),
            }
        }
    }
    let listed = String::from_utf8_lossy(&banger(&state, &["kernel", "ls"]).stdout).into_owned();
    assert!(listed.contains(version), "{listed}");

    // A file that is not a package: refused, naming it; nothing is left.
    let garbage = tmp.path().join("garbage.deb");
    std::fs::write(&garbage, b"this is not an ar archive").expect("write");
    let out = banger(
        &state,
        &[
            "kernel",
            "import-deb",
            "bad",
            garbage.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("garbage.deb"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kernels: Value =
        serde_json::from_slice(&banger(&state, &["kernel", "ls", "--json"]).stdout).expect("json");
    assert_eq!(kernels.as_array().map(Vec::len), Some(1));
    let leftovers: Vec<_> = std::fs::read_dir(state.join("kernels"))
        .expect("kernels dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, ["debian"], "staging left behind: {leftovers:?}");

    let removed = banger(&state, &["kernel", "rm", "debian"]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(!state.join("kernels/debian").exists(), "files removed");
}

/// A `.deb` whose data archive is small but unpacks to `size` bytes.
fn bomb_package(path: &Path, size: usize) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(
        &mut header,
        "boot/vmlinuz-6.1.0-bomb",
        std::io::repeat(0).take(size as u64),
    )
    .expect("tar entry");
    let tar = tar.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).expect("gzip");
    let data = gz.finish().expect("gzip");
    let mut deb = ar::Builder::new(std::fs::File::create(path).expect("create .deb"));
    for (name, bytes) in [("debian-binary", b"2.0\n".to_vec()), ("data.tar.gz", data)] {
        let header = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
        deb.append(&header, &bytes[..]).expect("ar member");
    }
}

#[test]
fn a_package_that_unpacks_past_the_cap_is_refused_and_leaves_nothing() {
    let tmp = state_dir();
    let state = tmp.path().join("state");
    let config = tmp.path().join("bangerd.toml");
    std::fs::write(
        &config,
        "[agent]\nbinary = \"/bin/true\"\n[kernel]\nmax_unpacked_mib = 1\n",
    )
    .expect("config");
    let deb = tmp.path().join("bomb.deb");
    // 8 MiB of zeros that gzip to a few KiB.
    bomb_package(&deb, 8 << 20);
    assert!(std::fs::metadata(&deb).expect("deb").len() < 64 << 10);
    let _daemon = Daemon::ready(Daemon::spawn_with(
        &state,
        &["--user", "--config", config.to_str().expect("utf-8")],
    ));
    let out = banger(
        &state,
        &["kernel", "import-deb", "bomb", deb.to_str().expect("utf-8")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("past 1 MiB (kernel.max_unpacked_mib)"),
        "{stderr}"
    );
    let left = std::fs::read_dir(state.join("kernels"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "nothing left in the catalog or its staging");
    let listed = banger(&state, &["kernel", "ls", "--json"]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");
}
