//! VMs from images: a real qemu guest boots from an imported busybox
//! image (its files, modes and owners seen through `vm exec`, its disk
//! grown by `--disk`); clones share the image's extents on a reflink
//! filesystem and keep its holes elsewhere; an image a VM holds cannot be
//! removed, and a prune frees what no VM holds; a daemon killed during a
//! clone leaves nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::guest::*;
use common::oci::*;
use common::*;
use serde_json::Value;

/// A busybox image with files of several modes and owners, as an OCI
/// layout under `dir`.
fn busybox_layout(dir: &Path) -> PathBuf {
    let run = serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/" });
    busybox_layout_running(dir, "busybox-layout", run)
}

/// As [`busybox_layout`], named `name`, running `run` (the config's
/// Env, Cmd, WorkingDir, User).
fn busybox_layout_running(dir: &Path, name: &str, run: Value) -> PathBuf {
    let mut base = busybox_tree();
    for mount in ["proc", "sys", "dev", "run", "tmp", "root", "etc"] {
        base.dir(mount, 0o755);
    }
    base.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    let mut data = Layer::default();
    data.add(Spec {
        owner: (1000, 100),
        ..spec("srv", tar::EntryType::Directory, 0o750)
    });
    data.add(Spec {
        owner: (1000, 100),
        data: b"from the image\n",
        ..spec("srv/hello.txt", tar::EntryType::Regular, 0o640)
    });
    data.add(Spec {
        data: b"#!/bin/sh\necho tool\n",
        ..spec("bin/tool", tar::EntryType::Regular, 0o4755)
    });
    layout_running(
        dir,
        name,
        &[base.finish(), data.finish()],
        Compression::Gzip,
        run,
    )
}

/// A guest fixture with the Debian kernel imported, unless `test` must
/// skip (it needs `tools` as well as busybox).
fn image_guest(test: &str, tools: &[&str]) -> Option<Fixture> {
    let guest = guest_fixtures(test)?;
    if !tools_installed(test, &[&["busybox"], tools].concat()) {
        return None;
    }
    let f = Fixture::new(&guest);
    import_kernel(&f, &guest.kernel_deb);
    Some(f)
}

/// `vm create NAME --image NAME --run-image-cmd --restart RESTART`,
/// started on qemu.
fn create_running<'a>(name: &'a str, restart: &'a str) -> [&'a str; 14] {
    [
        "vm",
        "create",
        name,
        "--image",
        name,
        "--run-image-cmd",
        "--restart",
        restart,
        "--vmm",
        "qemu",
        "--memory",
        "256M",
        "--start",
        "--json",
    ]
}

fn json_of(out: &std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json output")
}

#[test]
fn a_qemu_guest_boots_from_a_busybox_image_on_a_grown_disk_that_holds_the_image() {
    let test = "a_qemu_guest_boots_from_a_busybox_image_on_a_grown_disk_that_holds_the_image";
    let Some(f) = image_guest(test, &["resize2fs"]) else {
        return;
    };
    let layout = busybox_layout(f.tmp.path());
    let image = f.json(&[
        "image",
        "import",
        layout.to_str().expect("utf-8"),
        "--name",
        "busybox",
        "--json",
    ]);
    let digest = image["digest"].as_str().expect("digest").to_string();
    // No --kernel: the catalog's only kernel.
    let vm = f.json(&[
        "vm", "create", "box", "--image", "busybox", "--disk", "1G", "--vmm", "qemu", "--memory",
        "256M", "--start", "--json",
    ]);
    assert_eq!(vm["kernel"], "debian", "{vm}");
    assert_eq!(vm["image"]["name"], "busybox", "{vm}");
    assert_eq!(vm["image"]["digest"], digest.as_str(), "{vm}");
    f.json(&["vm", "ping", "box", "--wait", "60", "--json"]);
    let exec = |args: &[&str]| {
        let mut argv = vec!["vm", "exec", "box", "--"];
        argv.extend_from_slice(args);
        f.ok(&argv)
    };
    assert_eq!(
        exec(&[
            "stat",
            "-c",
            "%a %u:%g %n",
            "/srv",
            "/srv/hello.txt",
            "/bin/tool"
        ]),
        "750 1000:100 /srv\n640 1000:100 /srv/hello.txt\n4755 0:0 /bin/tool\n"
    );
    assert_eq!(exec(&["cat", "/srv/hello.txt"]), "from the image\n");
    // The root filesystem is the size asked, give or take its metadata.
    let df = exec(&["df", "-k", "/"]);
    let kib: u64 = df
        .lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df: {df}"));
    assert!((900 << 10..=1 << 20).contains(&kib), "{kib} KiB: {df}");
    let shown = f.ok(&["vm", "inspect", "box"]);
    assert!(
        shown.contains(&format!("busybox ({digest})")),
        "vm inspect shows the image: {shown}"
    );

    // Held: refused, naming the VM; after the VM goes, a prune frees the
    // image's disk and its blobs.
    let refused = f.run(&["image", "rm", "busybox"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("VM box"),
        "{stderr}"
    );
    f.ok(&["vm", "kill", "box"]);
    f.ok(&["vm", "rm", "box"]);
    let pruned = f.json(&["image", "prune", "--json"]);
    assert_eq!(pruned["images"][0]["name"], "busybox", "{pruned}");
    assert!(
        pruned["freed_bytes"].as_u64().expect("freed") > 1 << 20,
        "{pruned}"
    );
    assert_eq!(entries(&f.state().join("images")), Vec::<String>::new());
    assert_eq!(
        entries(&f.state().join("blobs/sha256")),
        Vec::<String>::new()
    );
    assert_eq!(f.json(&["image", "ls", "--json"]), Value::Array(vec![]));
}

#[test]
fn the_image_s_command_runs_as_the_vm_s_main_process_and_its_exit_is_the_vm_s() {
    let test = "the_image_s_command_runs_as_the_vm_s_main_process_and_its_exit_is_the_vm_s";
    let Some(f) = image_guest(test, &[]) else {
        return;
    };
    // Env, WorkingDir and User reach the process; it exits 3.
    let run = serde_json::json!({
        "Env": ["PATH=/bin", "GREETING=hi"],
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo $GREETING from $(pwd) as $(id -u):$(id -g); exit 3"],
        "WorkingDir": "/srv",
        "User": "1000:100",
    });
    let layout = busybox_layout_running(f.tmp.path(), "job-layout", run);
    f.json(&[
        "image",
        "import",
        layout.to_str().expect("utf-8"),
        "--name",
        "job",
        "--json",
    ]);
    f.json(&create_running("job", "on-failure"));
    // Its exit stops the VM with its code; on-failure starts it again.
    let deadline = std::time::Instant::now() + 2 * EVENT_TIMEOUT;
    let vm = loop {
        let vm = f.json(&["vm", "inspect", "job", "--json"]);
        if vm["restart_count"].as_u64() >= Some(1) && !vm["last_exit"].is_null() {
            break vm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the main process never ended the VM: {vm}\n{}",
            f.console()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(vm["last_exit"]["code"], 3, "{vm}");
    assert_eq!(vm["main"][0], "/bin/sh", "{vm}");
    assert_eq!(vm["last_exit"]["kind"], "crash", "{vm}");
    let listed = f.ok(&["vm", "ls"]);
    let row = listed
        .lines()
        .find(|line| line.starts_with("job "))
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(
        row.split_whitespace().nth(3),
        Some("3"),
        "vm ls shows the exit code: {listed}"
    );
    let logs = f.ok(&["vm", "logs", "job"]);
    assert!(
        logs.contains("hi from /srv as 1000:100"),
        "vm logs has the main process's output: {logs}"
    );
    f.ok(&["vm", "kill", "job"]);
    f.ok(&["vm", "rm", "job"]);
}

#[test]
fn a_poweroff_ends_a_running_main_process_cleanly_and_one_that_cannot_start_exits_127() {
    let test = "a_poweroff_ends_a_running_main_process_cleanly_and_one_that_cannot_start_exits_127";
    let Some(mut f) = image_guest(test, &[]) else {
        return;
    };
    for (name, cmd) in [("serve", "/bin/sleep"), ("broken", "/bin/no-such-program")] {
        let run = serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": [cmd, "1000"] });
        let layout = busybox_layout_running(f.tmp.path(), &format!("{name}-layout"), run);
        let layout = layout.to_str().expect("utf-8");
        f.json(&["image", "import", layout, "--name", name, "--json"]);
    }

    // A poweroff inside the guest ends the main process too: the VM's exit
    // is the poweroff's (clean), so on-failure leaves it down.
    let mark = f.log_mark();
    f.json(&create_running("serve", "on-failure"));
    f.wait_for_log(&["main process running"], mark, "the main process starts");
    let mark = f.log_mark();
    let _ = f.run(&["vm", "exec", "serve", "--", "poweroff"]);
    f.wait_for_log(&["VMM exited"], mark, "the guest powers off");
    let off = f.json(&["vm", "inspect", "serve", "--json"]);
    assert_eq!(off["state"], "stopped", "{off}");
    assert_eq!(off["last_exit"]["kind"], "clean", "{off}");
    assert_eq!(off["restart_count"], 0, "{off}");
    f.ok(&["vm", "rm", "serve"]);

    // A command the image does not have: the VM stops as if it had exited
    // 127, and its log says why.
    let mark = f.log_mark();
    f.json(&create_running("broken", "no"));
    f.wait_for_log(&["VMM exited"], mark, "the guest powers off");
    let broken = f.json(&["vm", "inspect", "broken", "--json"]);
    assert_eq!(broken["last_exit"]["kind"], "crash", "{broken}");
    assert_eq!(broken["last_exit"]["code"], 127, "{broken}");
    let logs = f.ok(&["vm", "logs", "broken"]);
    assert!(
        logs.contains("main process cannot start"),
        "vm logs says why: {logs}"
    );
    f.ok(&["vm", "rm", "broken"]);
}

/// A daemon without networking whose images carry `headroom_mib` of
/// holes, with the halt kernel imported (VMs are created, not booted).
fn clone_daemon(work: &Path, state: &Path, env: &[(&str, &str)]) -> Daemon {
    let daemon = image_daemon(state, "headroom_mib = 256\n", env);
    let halt = work.join("halt.elf");
    if !halt.exists() {
        halt_kernel(&halt);
    }
    if !state.join("kernels/halt").exists() {
        let out = import_vmlinux(state, "halt", &halt);
        assert!(out.status.success(), "kernel import: {out:?}");
    }
    daemon
}

fn import_vmlinux(state: &Path, name: &str, vmlinux: &Path) -> std::process::Output {
    banger(
        state,
        &[
            "kernel",
            "import",
            name,
            "--vmlinux",
            vmlinux.to_str().expect("utf-8"),
        ],
    )
}

/// Whether `test` may mount a filesystem of its own (root, with busybox,
/// mount, umount and `tools`); else it skips, saying why.
fn may_mount(test: &str, tools: &[&str]) -> bool {
    if !tools_installed(test, &[&["busybox", "mount", "umount"], tools].concat()) {
        return false;
    }
    let root = nix::unistd::geteuid().is_root();
    if !root {
        skip(test, "mounting a filesystem needs root");
    }
    root
}

/// A work directory and a state directory in it, unless `test` must skip.
fn clone_world(test: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    if !tools_installed(test, &["busybox"]) {
        return None;
    }
    let work = state_dir();
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    Some((work, state))
}

/// Imports the busybox layout into `state` as `busybox`: its record.
fn import_busybox(work: &Path, state: &Path) -> Value {
    let layout = work.join("busybox-layout");
    let layout = if layout.exists() {
        layout
    } else {
        busybox_layout(work)
    };
    json_of(
        &banger(
            state,
            &[
                "image",
                "import",
                layout.to_str().expect("utf-8"),
                "--name",
                "busybox",
                "--json",
            ],
        ),
        "image import",
    )
}

fn create(state: &Path, name: &str) -> Value {
    json_of(
        &banger(
            state,
            &[
                "vm", "create", name, "--image", "busybox", "--vmm", "qemu", "--json",
            ],
        ),
        "vm create",
    )
}

/// Twenty clones on `state`: their disks, and the free bytes of the
/// filesystem before and after.
fn twenty_clones(state: &Path) -> (Vec<PathBuf>, u64, u64) {
    let free = || nix::sys::statvfs::statvfs(state).map(|s| s.blocks_free() * s.fragment_size());
    let before = free().expect("statvfs");
    let disks: Vec<PathBuf> = (0..20)
        .map(|i| {
            let vm = create(state, &format!("clone-{i}"));
            PathBuf::from(vm["rootfs"].as_str().expect("rootfs"))
        })
        .collect();
    (disks, before, free().expect("statvfs"))
}

#[test]
fn twenty_clones_share_the_image_s_extents_on_xfs_and_keep_its_holes_on_ext4() {
    let test = "twenty_clones_share_the_image_s_extents_on_xfs_and_keep_its_holes_on_ext4";
    if !may_mount(test, &["mkfs.xfs", "filefrag"]) {
        return;
    }
    let work = state_dir();

    // ext4 (the test's own directory): sparse copies.
    let ext4 = work.path().join("on-ext4");
    std::fs::create_dir_all(&ext4).expect("state");
    let daemon = clone_daemon(work.path(), &ext4, &[]);
    let image = import_busybox(work.path(), &ext4);
    let image_disk = PathBuf::from(image["disk"].as_str().expect("disk"));
    let apparent = image["disk_bytes"].as_u64().expect("disk_bytes");
    assert!(
        allocated(&image_disk) * 4 < apparent,
        "the image has holes to keep"
    );
    let (disks, before, after) = twenty_clones(&ext4);
    for disk in &disks {
        assert_eq!(std::fs::metadata(disk).expect("stat").len(), apparent);
        assert!(
            allocated(disk) <= allocated(&image_disk) + (1 << 20),
            "{}: {} allocated of {apparent}, the image {}",
            disk.display(),
            allocated(disk),
            allocated(&image_disk)
        );
        assert_fsck_clean(disk, "a sparse clone");
    }
    let used = before.saturating_sub(after);
    eprintln!(
        "ext4: 20 clones took {used} bytes; the image {} allocated of {apparent}",
        allocated(&image_disk)
    );
    assert!(
        used < 21 * allocated(&image_disk) + (64 << 20),
        "20 sparse clones took {used} bytes"
    );
    drop(daemon);

    // XFS with reflinks: the clones share the image's extents.
    let xfs = LoopXfs::mount(work.path(), 4 << 30);
    let on_xfs = xfs.0.join("state");
    std::fs::create_dir_all(&on_xfs).expect("state");
    let daemon = clone_daemon(work.path(), &on_xfs, &[]);
    let image = import_busybox(work.path(), &on_xfs);
    let image_disk = PathBuf::from(image["disk"].as_str().expect("disk"));
    let (disks, before, after) = twenty_clones(&on_xfs);
    let used = before.saturating_sub(after);
    eprintln!(
        "xfs: 20 clones took {used} bytes; the image {} allocated of {}",
        allocated(&image_disk),
        image["disk_bytes"]
    );
    assert!(
        used < allocated(&image_disk) + (16 << 20),
        "20 reflinked clones took {used} bytes, the image holds {}",
        allocated(&image_disk)
    );
    for disk in &disks {
        let frag = run_ok("filefrag", &["-v", disk.to_str().expect("utf-8")]);
        assert!(frag.contains("shared"), "{}: {frag}", disk.display());
    }
    assert_fsck_clean(&disks[0], "a reflinked clone");
    drop(daemon);
}

#[test]
fn vm_create_from_an_image_refuses_bad_input_naming_the_field() {
    let test = "vm_create_from_an_image_refuses_bad_input_naming_the_field";
    let Some((work, state)) = clone_world(test) else {
        return;
    };
    let _daemon = clone_daemon(work.path(), &state, &[]);
    import_busybox(work.path(), &state);
    let refused = |args: &[&str], needle: &str| {
        let out = banger(&state, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    };
    refused(
        &["vm", "create", "a", "--image", "nosuch"],
        "no image named nosuch",
    );
    refused(
        &["vm", "create", "a", "--image", "busybox", "--disk", "1M"],
        "disk",
    );
    refused(
        &["vm", "create", "a", "--image", "busybox", "--disk", "5Q"],
        "disk",
    );
    refused(&["vm", "create", "a"], "--rootfs");
    // Two kernels and no default: the create names them.
    let halt = work.path().join("halt.elf");
    let out = import_vmlinux(&state, "halt2", &halt);
    assert!(out.status.success(), "second kernel: {out:?}");
    refused(
        &["vm", "create", "a", "--image", "busybox", "--vmm", "qemu"],
        "halt, halt2",
    );
    refused(
        &[
            "vm",
            "create",
            "a",
            "--rootfs",
            "/nonexistent",
            "--run-image-cmd",
        ],
        "run_image_cmd: needs image",
    );
    // Nothing of the refused creates is left.
    assert_eq!(entries(&state.join("vms")), Vec::<String>::new());
    let out = banger(&state, &["vm", "ls", "--json"]);
    assert_eq!(json_of(&out, "vm ls"), Value::Array(vec![]));

    // A held image: refused, then forced; the VM keeps its own disk.
    let vm = json_of(
        &banger(
            &state,
            &[
                "vm", "create", "held", "--image", "busybox", "--kernel", "halt", "--vmm", "qemu",
                "--json",
            ],
        ),
        "vm create",
    );
    refused(&["image", "rm", "busybox"], "VM held");
    let removed = json_of(
        &banger(&state, &["image", "rm", "busybox", "--force", "--json"]),
        "image rm --force",
    );
    assert_eq!(removed["held_by"], serde_json::json!(["held"]), "{removed}");
    assert!(
        removed["freed_bytes"].as_u64().expect("freed") > 0,
        "{removed}"
    );
    assert_eq!(entries(&state.join("images")), Vec::<String>::new());
    let disk = PathBuf::from(vm["rootfs"].as_str().expect("rootfs"));
    assert_fsck_clean(&disk, "the disk of a VM whose image was removed");
    let inspected = json_of(
        &banger(&state, &["vm", "inspect", "held", "--json"]),
        "inspect",
    );
    assert_eq!(inspected["image"]["name"], "busybox", "{inspected}");
}

#[test]
fn a_daemon_killed_during_a_clone_leaves_nothing_and_the_create_then_succeeds() {
    let test = "a_daemon_killed_during_a_clone_leaves_nothing_and_the_create_then_succeeds";
    let Some((work, state)) = clone_world(test) else {
        return;
    };
    drop(clone_daemon(work.path(), &state, &[]));
    // Killed in the middle of the copy (the state dir is ext4 here, so the
    // clone is a sparse copy, extent by extent), and after it.
    for boundary in ["disk-cloning:1", "disk-cloned:1"] {
        let mut daemon = clone_daemon(work.path(), &state, &[("BANGER_FAULT_KILL", boundary)]);
        if !state.join("images").exists() || entries(&state.join("images")).is_empty() {
            import_busybox(work.path(), &state);
        }
        let out = banger(
            &state,
            &["vm", "create", "web", "--image", "busybox", "--vmm", "qemu"],
        );
        assert!(!out.status.success(), "{boundary}: the daemon died");
        daemon.wait_exit();
        let daemon = clone_daemon(work.path(), &state, &[]);
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while !entries(&state.join("vms")).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{boundary}: left {:?}",
                entries(&state.join("vms"))
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let listed = json_of(&banger(&state, &["vm", "ls", "--json"]), "vm ls");
        assert_eq!(listed, Value::Array(vec![]), "{boundary}");
        let vm = create(&state, "web");
        assert_fsck_clean(
            Path::new(vm["rootfs"].as_str().expect("rootfs")),
            "the clone after a kill",
        );
        let removed = banger(&state, &["vm", "rm", "web"]);
        assert!(removed.status.success(), "vm rm: {removed:?}");
        drop(daemon);
    }
}

#[test]
fn a_clone_that_does_not_fit_is_refused_naming_the_sizes_and_leaves_nothing() {
    let test = "a_clone_that_does_not_fit_is_refused_naming_the_sizes_and_leaves_nothing";
    if !may_mount(test, &[]) {
        return;
    }
    let work = state_dir();
    let state = work.path().join("small");
    let _tmpfs = Mounted::tmpfs(&state, "40m");
    let _daemon = clone_daemon(work.path(), &state, &[]);
    import_busybox(work.path(), &state);
    // Each sparse clone takes the image's data (about 2 MiB): the tmpfs
    // runs out within a few, and the one that does not fit is refused
    // before it copies anything.
    let mut made = 0;
    let refused = loop {
        let out = banger(
            &state,
            &[
                "vm",
                "create",
                &format!("v{made}"),
                "--image",
                "busybox",
                "--vmm",
                "qemu",
            ],
        );
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        made += 1;
        assert!(made < 30, "40 MiB took {made} clones");
    };
    assert!(
        refused.contains("bytes free") && refused.contains("image prune"),
        "{refused}"
    );
    assert_eq!(entries(&state.join("vms")).len(), made, "{refused}");
}

#[test]
fn image_rm_of_a_name_removes_that_name_and_of_a_digest_every_name_of_it() {
    let test = "image_rm_of_a_name_removes_that_name_and_of_a_digest_every_name_of_it";
    let Some((work, state)) = clone_world(test) else {
        return;
    };
    let _daemon = clone_daemon(work.path(), &state, &[]);
    let image = import_busybox(work.path(), &state);
    let digest = image["digest"].as_str().expect("digest");
    let layout = work.path().join("busybox-layout");
    let import_as = |name: &str| {
        json_of(
            &banger(
                &state,
                &[
                    "image",
                    "import",
                    layout.to_str().expect("utf-8"),
                    "--name",
                    name,
                    "--json",
                ],
            ),
            "image import",
        )
    };
    import_as("busybox:two");
    let names = || {
        let listed = json_of(&banger(&state, &["image", "ls", "--json"]), "image ls");
        let mut names: Vec<String> = listed
            .as_array()
            .expect("a list")
            .iter()
            .map(|i| i["name"].as_str().expect("name").to_string())
            .collect();
        names.sort();
        names
    };
    create(&state, "held");

    // A name goes alone; the other name keeps the disk, so the VM's hold
    // does not stop it.
    let removed = json_of(
        &banger(&state, &["image", "rm", "busybox", "--json"]),
        "image rm busybox",
    );
    assert_eq!(removed["images"].as_array().map(Vec::len), Some(1));
    assert_eq!(removed["freed_bytes"], 0, "{removed}");
    assert_eq!(names(), ["busybox:two"]);

    // A digest names the image: every name of it goes, so the VM holding
    // it refuses until it is removed.
    import_as("busybox");
    let prefix = &digest["sha256:".len().."sha256:".len() + 12];
    let out = banger(&state, &["image", "rm", prefix]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("held"),
        "image rm {prefix} while held: {stderr}"
    );
    assert_eq!(names(), ["busybox", "busybox:two"]);
    assert!(banger(&state, &["vm", "rm", "held"]).status.success());
    let removed = json_of(
        &banger(&state, &["image", "rm", prefix, "--json"]),
        "image rm by digest",
    );
    assert_eq!(removed["images"].as_array().map(Vec::len), Some(2));
    assert!(removed["freed_bytes"].as_u64().expect("freed") > 0);
    assert_eq!(names(), Vec::<String>::new());
    assert_eq!(entries(&state.join("images")), Vec::<String>::new());
}

#[test]
fn a_rootfs_from_another_filesystem_mounted_since_its_last_check_is_copied_checked_and_grown() {
    let test =
        "a_rootfs_from_another_filesystem_mounted_since_its_last_check_is_copied_checked_and_grown";
    if !may_mount(test, &["mke2fs", "debugfs"]) {
        return;
    }
    let work = state_dir();
    // The state dir on a tmpfs of its own: the kernel copies nothing
    // across filesystems (copy_file_range answers EXDEV).
    let state = work.path().join("state");
    let _tmpfs = Mounted::tmpfs(&state, "512m");
    let _daemon = clone_daemon(work.path(), &state, &[]);
    // A hand-made rootfs: made, its last check well before its mount, as
    // when files are put in later; resize2fs alone refuses it.
    let rootfs = work.path().join("hand-made.ext4");
    std::fs::File::create(&rootfs)
        .and_then(|f| f.set_len(64 << 20))
        .expect("rootfs file");
    let path = rootfs.to_str().expect("utf-8");
    run_ok("mke2fs", &["-q", "-t", "ext4", path]);
    run_ok("debugfs", &["-w", "-R", "ssv lastcheck 1", path]);
    let at = work.path().join("mnt");
    std::fs::create_dir_all(&at).expect("mount point");
    run_ok("mount", &["-o", "loop", path, at.to_str().expect("utf-8")]);
    let mounted = Mounted(at.clone());
    std::fs::write(at.join("kept"), "kept\n").expect("write into the rootfs");
    drop(mounted);

    let vm = json_of(
        &banger(
            &state,
            &[
                "vm", "create", "grown", "--rootfs", path, "--disk", "256M", "--vmm", "qemu",
                "--json",
            ],
        ),
        "vm create --rootfs --disk",
    );
    let disk = PathBuf::from(vm["rootfs"].as_str().expect("rootfs"));
    assert_fsck_clean(&disk, "a grown hand-made rootfs");
    let disk = disk.to_str().expect("utf-8");
    let stats = run_ok("debugfs", &["-R", "stats", disk]);
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };
    assert_eq!(field("Block count:") * field("Block size:"), 256 << 20);
    assert_eq!(run_ok("debugfs", &["-R", "cat /kept", disk]), "kept\n");
}

#[test]
fn image_rm_winning_a_race_with_vm_create_fails_the_create_as_no_image() {
    let test = "image_rm_winning_a_race_with_vm_create_fails_the_create_as_no_image";
    let Some((work, state)) = clone_world(test) else {
        return;
    };
    // Removed after the create found the image, and after it opened its
    // disk: either way the create says the image is gone.
    for boundary in ["image-found", "image-opened"] {
        let go = work.path().join(format!("go-{boundary}"));
        let pause = format!("{boundary}:1:{}", go.display());
        let mut daemon = clone_daemon(work.path(), &state, &[("BANGER_FAULT_PAUSE", &pause)]);
        import_busybox(work.path(), &state);
        let create = Command::new(BANGER)
            .arg("--socket")
            .arg(socket_path(&state))
            .args([
                "vm", "create", "racer", "--image", "busybox", "--vmm", "qemu",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("banger vm create");
        daemon
            .wait_for_line("fault injection: paused")
            .expect("the create reaches the pause");
        let removed = banger(&state, &["image", "rm", "busybox"]);
        assert!(removed.status.success(), "image rm: {removed:?}");
        std::fs::write(&go, "").expect("release the create");
        let out = output_within_timeout(create).expect("the create answers");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{boundary}: the create succeeded");
        assert!(err.contains("no image named busybox"), "{boundary}: {err}");
        let listed = json_of(&banger(&state, &["vm", "ls", "--json"]), "vm ls");
        assert_eq!(listed, Value::Array(vec![]), "{boundary}");
        assert_eq!(entries(&state.join("vms")).len(), 0, "{boundary}");
        drop(daemon);
    }
}
