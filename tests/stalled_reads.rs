//! A caller's file that stops answering fails its request: a root disk,
//! a kernel, an initrd, a kernel package, an image layout and an image
//! archive on a FUSE filesystem
//! whose reads never return (`common/hung_fs.py`). Each request fails
//! within `[caller] io_stall_secs`, naming the file, leaves nothing behind
//! and frees its name; the daemon goes on serving.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::halt::Fixture;
use common::halt::vm_files_left;
use common::{BANGER, EVENT_TIMEOUT, output_within_timeout, skip, socket_path};

/// The stall bound the daemon is given.
const STALL_SECS: u64 = 2;

/// The hung filesystem: its server, killed (which fails every read still
/// waiting on it) and unmounted when the test ends.
struct HungFs {
    server: Child,
    mountpoint: PathBuf,
}

impl HungFs {
    fn mount(at: &Path) -> HungFs {
        std::fs::create_dir_all(at).expect("mount point");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/hung_fs.py");
        let mut server = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(at)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run hung_fs.py");
        let stdout = server.stdout.take().expect("stdout");
        let fs = HungFs {
            server,
            mountpoint: at.to_path_buf(),
        };
        let (said, heard) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let _ = said.send(line);
            }
        });
        match heard.recv_timeout(EVENT_TIMEOUT) {
            Ok(Ok(line)) if line == "mounted" => fs,
            other => panic!("hung_fs.py did not mount: {other:?}"),
        }
    }
}

impl Drop for HungFs {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Runs banger; it must fail within the deadline, its error naming `path`
/// and the setting that bounds it.
fn fails_naming(f: &Fixture, args: &[&str], path: &Path) {
    let started = Instant::now();
    let child = Command::new(BANGER)
        .arg("--socket")
        .arg(socket_path(&f.state()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run banger");
    let out = output_within_timeout(child)
        .unwrap_or_else(|| panic!("banger {args:?} still hangs after {EVENT_TIMEOUT:?}"));
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("banger {args:?} failed after {took:?}: {stderr}");
    assert!(!out.status.success(), "banger {args:?} succeeded");
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("io_stall_secs"),
        "banger {args:?}: {stderr}"
    );
    assert!(
        took >= Duration::from_secs(STALL_SECS),
        "banger {args:?} failed after {took:?}, before the bound: {stderr}"
    );
}

#[test]
fn a_caller_file_whose_reads_never_return_fails_its_request_and_frees_its_name() {
    let test = "a_caller_file_whose_reads_never_return_fails_its_request_and_frees_its_name";
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        skip(test, "mounting a FUSE filesystem needs root and /dev/fuse");
        return;
    }
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    let config = f.tmp.path().join("bangerd.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!("[caller]\nio_stall_secs = {STALL_SECS}\n"));
    std::fs::write(&config, text).expect("config");
    f.start_daemon();
    let hung = HungFs::mount(&f.tmp.path().join("hung"));
    let at = |name: &str| hung.mountpoint.join(name);
    let arg = |path: &Path| path.to_str().expect("utf-8").to_string();

    // A root disk: the VM's copy is undone and the name is free.
    let disk = at("disk");
    fails_naming(
        &f,
        &[
            "vm",
            "create",
            "stalled",
            "--kernel",
            "halt",
            "--rootfs",
            &arg(&disk),
        ],
        &disk,
    );
    assert!(!f.ok(&["vm", "ls"]).contains("stalled"));
    assert_eq!(vm_files_left(&f.state()), 0, "the VM's files are removed");
    f.create("stalled", &[]);

    // A kernel, its initrd, a kernel package: nothing enters the catalog
    // and the name is free.
    let (vmlinux, halt) = (at("vmlinux"), f.tmp.path().join("halt.elf"));
    fails_naming(
        &f,
        &["kernel", "import", "hung", "--vmlinux", &arg(&vmlinux)],
        &vmlinux,
    );
    let initrd = at("initrd");
    fails_naming(
        &f,
        &[
            "kernel",
            "import",
            "hung",
            "--vmlinux",
            &arg(&halt),
            "--initrd",
            &arg(&initrd),
        ],
        &initrd,
    );
    let package = at("kernel.deb");
    fails_naming(
        &f,
        &["kernel", "import-deb", "hung", &arg(&package)],
        &package,
    );
    assert!(!f.ok(&["kernel", "ls"]).contains("hung"));
    f.ok(&["kernel", "import", "hung", "--vmlinux", &arg(&halt)]);

    // An image layout, read through the directory the caller opened, and
    // an archive, read while its members are indexed.
    let layout = at("layout");
    fails_naming(
        &f,
        &["image", "import", &arg(&layout), "--name", "hung"],
        &layout,
    );
    let archive = at("archive.tar");
    fails_naming(
        &f,
        &["image", "import", &arg(&archive), "--name", "hung"],
        &archive,
    );
    assert!(!f.ok(&["image", "ls"]).contains("hung"));

    // A request refused after it opened a hung file: closing that file
    // waits on the filesystem too, and neither the request nor the
    // daemon waits with it.
    let closing = at("closing");
    let missing = f.tmp.path().join("no-initrd");
    let out = f.run(&[
        "kernel",
        "import",
        "closing",
        "--vmlinux",
        &arg(&closing),
        "--initrd",
        &arg(&missing),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no-initrd"),
        "{stderr}"
    );

    // Threads wait on the hung filesystem; other files still open.
    f.ok(&["daemon", "status"]);
    f.create("after", &[]);
    drop(hung);
}
