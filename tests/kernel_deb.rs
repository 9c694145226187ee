//! `banger kernel import-deb` on Debian's real cloud kernel package: the
//! record (version, module order, sha256s of the files), the initramfs's
//! contents, and a bad package refused with nothing left behind.

mod common;

use std::io::Read;
use std::path::PathBuf;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn sha256(path: &str) -> String {
    format!(
        "{:x}",
        Sha256::digest(std::fs::read(path).expect("read catalog file"))
    )
}

/// Names in a gzip-compressed newc cpio.
fn cpio_names(path: &str) -> Vec<String> {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open"))
        .read_to_end(&mut bytes)
        .expect("gunzip");
    let mut names = Vec::new();
    let mut rest = &bytes[..];
    loop {
        let mut entry = cpio::NewcReader::new(rest).expect("cpio entry");
        if entry.entry().is_trailer() {
            return names;
        }
        names.push(entry.entry().name().to_string());
        std::io::copy(&mut entry, &mut std::io::sink()).expect("skip");
        rest = entry.finish().expect("next entry");
    }
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
    // Any executable serves as the agent for an import.
    std::fs::write(&config, "[agent]\nbinary = \"/bin/true\"\n").expect("config");
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
    let names = cpio_names(kernel["initrd"].as_str().expect("initrd"));
    for needed in [
        "init",
        "etc/banger/initramfs",
        "dev/console",
        "lib/modules/virtio_blk.ko",
    ] {
        assert!(
            names.iter().any(|n| n == needed),
            "{needed} missing from {names:?}"
        );
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
}
