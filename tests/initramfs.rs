//! The agent arrives by initramfs: a Firecracker VM's disk is never written
//! by the host and its VMM boots banger's image; real QEMU guests reach the
//! agent from a package import's modules and from a user's own initrd of
//! modules; an agent upgrade reaches each VM at its next start while
//! running VMs keep theirs.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::guest::{Fixture as GuestFixture, guest_fixtures, import_kernel};
use common::halt::Fixture;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// One GET on Firecracker's API socket, through banger's own client.
fn firecracker_get(socket: &Path, path: &str) -> Value {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(banger::vmm::firecracker::ApiClient::new(socket).get(path))
        .expect("the VMM's API answers")
}

/// Whether a process named `debugfs` appears while `watch` is set: /proc is
/// sampled every millisecond (a watch, not a wait).
fn watch_for_debugfs(watching: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut seen = false;
        while watching.load(Ordering::Acquire) {
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                if std::fs::read_to_string(entry.path().join("comm"))
                    .is_ok_and(|comm| comm.trim() == "debugfs")
                {
                    seen = true;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        seen
    })
}

#[test]
fn a_firecracker_vm_boots_banger_initramfs_and_nothing_but_the_guest_writes_its_disk() {
    let test = "a_firecracker_vm_boots_banger_initramfs_and_nothing_but_the_guest_writes_its_disk";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    let ext4 = f.tmp.path().join("root.ext4");
    let made = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4"])
        .arg(&ext4)
        .arg("16M")
        .status()
        .expect("run mke2fs");
    assert!(made.success(), "mke2fs");
    f.rootfs = ext4;
    let inspect = |f: &Fixture| -> Value {
        serde_json::from_str(&f.ok(&["kernel", "inspect", "halt", "--json"])).expect("json")
    };
    let kernel = inspect(&f);
    assert!(
        kernel["note"]
            .as_str()
            .is_some_and(|n| n.contains("cannot tell")),
        "a vmlinux alone is noted: {kernel}"
    );
    let vm = f.create("disk", &[]);
    let id = vm["id"].as_str().expect("id").to_string();
    let disk = f.state().join("vms").join(&id).join("rootfs.ext4");
    let before = std::fs::read(&disk).expect("the VM's disk");

    let watching = Arc::new(AtomicBool::new(true));
    let watcher = watch_for_debugfs(watching.clone());
    f.ok(&["vm", "start", "disk"]);
    watching.store(false, Ordering::Release);
    assert!(
        !watcher.join().expect("watcher"),
        "no debugfs runs during vm start"
    );

    let config = firecracker_get(
        &f.state().join("vms").join(&id).join("firecracker.sock"),
        "/vm/config",
    );
    let initrd = config["boot-source"]["initrd_path"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kernel = inspect(&f);
    let image = &kernel["boot_image"];
    assert_eq!(
        Some(initrd.as_str()),
        image["path"].as_str(),
        "the VMM boots the kernel's boot image: {config}"
    );
    let agent = std::fs::read(f.tmp.path().join("stub-agent")).expect("agent");
    assert_eq!(image["agent_sha256"], sha256_hex(&agent), "{kernel}");
    // A kernel without an initrd boots banger's archive alone.
    let mut unpacked = Vec::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(&initrd).expect("boot image"))
        .read_to_end(&mut unpacked)
        .expect("gunzip the boot image");
    assert!(
        unpacked.windows(agent.len()).any(|w| w == agent),
        "the agent is in the boot image"
    );

    f.ok(&["vm", "stop", "disk", "--timeout", "0.2"]);
    f.ok(&["vm", "start", "disk"]);
    f.ok(&["vm", "stop", "disk", "--timeout", "0.2"]);
    assert!(
        std::fs::read(&disk).expect("the VM's disk") == before,
        "the root disk is byte-identical after two starts and stops"
    );
    f.ok(&["vm", "rm", "disk"]);
}

fn boot(f: &GuestFixture, name: &str, kernel: &str) {
    let rootfs = f.rootfs.to_str().expect("utf-8");
    f.json(&[
        "vm", "create", name, "--kernel", kernel, "--rootfs", rootfs, "--vmm", "qemu", "--memory",
        "256M", "--start", "--json",
    ]);
    f.json(&["vm", "ping", name, "--wait", "120", "--json"]);
}

fn exec_on(f: &GuestFixture, name: &str, argv: &[&str]) -> String {
    let mut args = vec!["vm", "exec", name, "--"];
    args.extend_from_slice(argv);
    f.ok(&args)
}

/// The digest of the agent running as the guest's PID 1 (its binary was
/// the initramfs's `/init`, deleted since; the kernel keeps it readable).
fn running_agent(f: &GuestFixture, name: &str) -> String {
    exec_on(f, name, &["sha256sum", "/proc/1/exe"])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A plain initramfs of the package's guest modules and their
/// `modules.dep`, as an initramfs generator makes one: no banger in it.
fn users_initrd(deb: &Path, dir: &Path) -> PathBuf {
    let extracted = dir.join("extracted");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(&extracted)
        .status()
        .expect("dpkg-deb");
    assert!(status.success(), "dpkg-deb -x");
    let modules = extracted.join("lib/modules");
    let release = std::fs::read_dir(&modules)
        .expect("lib/modules")
        .flatten()
        .next()
        .expect("a release")
        .file_name();
    let tree = modules.join(&release);
    let root = dir.join("initrd-root");
    let mut stack = vec![tree.clone()];
    let mut copied = 0;
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).expect("read the tree").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().replace('-', "_");
            let wanted = name
                .strip_suffix(".ko")
                .is_some_and(|stem| banger::kernel::GUEST_MODULES.contains(&stem));
            if wanted {
                let target = root
                    .join("lib/modules")
                    .join(&release)
                    .join(path.strip_prefix(&tree).expect("inside the tree"));
                std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
                std::fs::copy(&path, &target).expect("copy a module");
                copied += 1;
            }
        }
    }
    assert!(copied > 5, "the package's guest modules: {copied}");
    let depmod = Command::new("depmod")
        .arg("-b")
        .arg(&root)
        .arg(&release)
        .status()
        .expect("depmod");
    assert!(depmod.success(), "depmod");
    let image = dir.join("user-initrd.img");
    let packed = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            root.display(),
            image.display()
        ))
        .status()
        .expect("cpio");
    assert!(packed.success(), "cpio | gzip");
    image
}

#[test]
fn guests_reach_the_agent_from_a_package_import_and_from_a_users_own_initrd() {
    let test = "guests_reach_the_agent_from_a_package_import_and_from_a_users_own_initrd";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let f = GuestFixture::new(&guest);
    import_kernel(&f, &guest.kernel_deb);
    boot(&f, "guest", "debian");
    let agent = sha256_hex(&std::fs::read(&guest.agent).expect("agent"));
    assert_eq!(running_agent(&f, "guest"), agent, "{}", f.console());
    assert_eq!(
        exec_on(
            &f,
            "guest",
            &["sh", "-c", "test -e /sbin/banger-agent || echo absent"]
        ),
        "absent\n",
        "nothing of banger on the guest's disk"
    );

    let initrd = users_initrd(&guest.kernel_deb, f.tmp.path());
    let vmlinux = f.state().join("kernels/debian/vmlinux");
    f.ok(&[
        "kernel",
        "import",
        "mine",
        "--vmlinux",
        vmlinux.to_str().expect("utf-8"),
        "--initrd",
        initrd.to_str().expect("utf-8"),
    ]);
    boot(&f, "mine", "mine");
    assert_eq!(running_agent(&f, "mine"), agent);
    let modules = exec_on(&f, "mine", &["cat", "/proc/modules"]);
    for module in ["virtio_blk", "virtio_console"] {
        assert!(
            modules.contains(module),
            "{module} came from the user's initrd: {modules}"
        );
    }
    for name in ["guest", "mine"] {
        f.ok(&["vm", "stop", name]);
    }
}

#[test]
fn an_agent_upgrade_reaches_each_vm_at_its_next_start_and_running_vms_keep_theirs() {
    let test = "an_agent_upgrade_reaches_each_vm_at_its_next_start_and_running_vms_keep_theirs";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (dir.path().join("old-agent"), dir.path().join("new-agent"));
    let binary = std::fs::read(&guest.agent).expect("agent");
    std::fs::write(&old, &binary).expect("old agent");
    // The same program with other bytes: an ELF ignores what follows it.
    let mut upgraded = binary.clone();
    upgraded.extend_from_slice(b"\0an upgrade\0");
    std::fs::write(&new, &upgraded).expect("new agent");
    std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let (old_sha, new_sha) = (sha256_hex(&binary), sha256_hex(&upgraded));

    let mut f = GuestFixture::with_agent(&old);
    import_kernel(&f, &guest.kernel_deb);
    boot(&f, "guest", "debian");
    assert_eq!(running_agent(&f, "guest"), old_sha);
    let first = f.json(&["kernel", "inspect", "debian", "--json"])["boot_image"].clone();
    assert_eq!(first["agent_sha256"], old_sha.as_str(), "{first}");

    f.set_agent(&new);
    let daemon = f.daemon.take().expect("daemon");
    assert!(daemon.stop().success(), "bangerd stops cleanly");
    f.start_daemon();
    f.json(&["vm", "ping", "guest", "--wait", "30", "--json"]);
    boot(&f, "other", "debian");
    assert_eq!(
        running_agent(&f, "other"),
        new_sha,
        "a new start boots the new agent"
    );
    assert_eq!(
        running_agent(&f, "guest"),
        old_sha,
        "a running VM keeps its agent"
    );
    let second = f.json(&["kernel", "inspect", "debian", "--json"])["boot_image"].clone();
    assert_eq!(second["agent_sha256"], new_sha.as_str(), "{second}");
    let old_image = PathBuf::from(first["path"].as_str().expect("path"));
    assert!(!old_image.exists(), "the old boot image is gone");

    f.ok(&["vm", "stop", "guest"]);
    f.ok(&["vm", "start", "guest"]);
    f.json(&["vm", "ping", "guest", "--wait", "120", "--json"]);
    assert_eq!(
        running_agent(&f, "guest"),
        new_sha,
        "its next start brings the upgrade"
    );
    for name in ["guest", "other"] {
        f.ok(&["vm", "stop", name]);
    }
}
