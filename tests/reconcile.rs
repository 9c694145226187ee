//! Every host resource in a ledger: an interrupted `vm create` or kernel
//! import leaves nothing that no record claims; strays under `vms/`,
//! `kernels/` and the jail base are removed at start-up, each logged;
//! `kernel rm` racing `vm create` never leaves a VM without its kernel; a
//! VM record that does not decode is quarantined, not fatal, and `vm
//! forget` removes it with its files. Real firecracker VMs (halt kernel).

mod common;

use std::path::{Path, PathBuf};

use common::halt::*;
use common::*;
use serde_json::Value;

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn vm_names(f: &Fixture) -> Vec<String> {
    let listed: Value = serde_json::from_str(&f.ok(&["vm", "ls", "--json"])).expect("json");
    listed
        .as_array()
        .expect("array")
        .iter()
        .map(|vm| vm["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn an_interrupted_create_leaves_nothing_and_its_name_can_be_taken_again() {
    let test = "an_interrupted_create_leaves_nothing_and_its_name_can_be_taken_again";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    // Before the record, after the record (the clone not begun), and with
    // the disk copied but the VM not yet created.
    for boundary in ["persist:1", "provision:1", "disk-cloned:1"] {
        kill_daemon_during(&mut f, boundary, |f| {
            drop(f.run(&[
                "vm",
                "create",
                "web",
                "--kernel",
                "halt",
                "--rootfs",
                f.rootfs.to_str().expect("utf-8"),
                "--vmm",
                "firecracker",
            ]))
        });
        assert!(
            f.wait_for_gone("web"),
            "{boundary}: the half-made VM is gone"
        );
        assert_eq!(
            names(&f.state().join("vms")),
            Vec::<String>::new(),
            "{boundary}"
        );
        f.create("web", &[]);
        f.ok(&["vm", "rm", "web"]);
    }
}

#[test]
fn an_interrupted_kernel_import_leaves_nothing_and_can_be_run_again() {
    let test = "an_interrupted_kernel_import_leaves_nothing_and_can_be_run_again";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    // A Debian package (as `kernel import-deb`) when the fixture has one,
    // else a plain vmlinux import: the same staging and renaming.
    let deb = std::env::var_os("BANGER_TEST_KERNEL_DEB").map(PathBuf::from);
    let halt = f.tmp.path().join("halt.elf");
    let import = |f: &Fixture| -> std::process::Output {
        match &deb {
            Some(deb) => f.run(&["kernel", "import-deb", "k2", deb.to_str().expect("utf-8")]),
            None => f.run(&[
                "kernel",
                "import",
                "k2",
                "--vmlinux",
                halt.to_str().expect("utf-8"),
            ]),
        }
    };
    // Staged but not renamed; renamed but not recorded.
    for boundary in ["kernel-filled:1", "kernel-staged:1"] {
        kill_daemon_during(&mut f, boundary, |f| drop(import(f)));
        assert_eq!(
            names(&f.state().join("kernels")),
            ["halt"],
            "{boundary}: nothing but the recorded kernel"
        );
        let again = import(&f);
        assert!(again.status.success(), "{boundary}: {again:?}");
        f.ok(&["kernel", "rm", "k2"]);
    }
}

#[test]
fn strays_under_the_state_directory_are_removed_at_start_up() {
    let test = "strays_under_the_state_directory_are_removed_at_start_up";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    f.create("kept", &[]);
    f.daemon.take().expect("daemon").stop();
    let state = f.state();
    let strays = [
        state.join("vms/strayvm000"),
        state.join("kernels/stray"),
        state.join("kernels/.k2-Ab3dEf"),
        state.join("jail/firecracker/strayjail0/root"),
    ];
    for stray in &strays {
        std::fs::create_dir_all(stray).expect("stray dir");
        std::fs::write(stray.join("file"), b"left behind").expect("stray file");
    }
    f.start_daemon();
    for stray in &strays[..3] {
        assert!(!stray.exists(), "{} is swept", stray.display());
        f.daemon()
            .wait_for_line_from(
                &[
                    "removed what no record claims",
                    &stray.display().to_string(),
                ],
                0,
            )
            .expect("logged");
    }
    assert!(!state.join("jail/firecracker/strayjail0").exists());
    assert_eq!(vm_names(&f), ["kept"]);
    assert_eq!(names(&state.join("kernels")), ["halt"]);
    f.ok(&["vm", "start", "kept"]);
}

#[test]
fn kernel_rm_racing_vm_create_never_leaves_a_vm_without_its_kernel() {
    let test = "kernel_rm_racing_vm_create_never_leaves_a_vm_without_its_kernel";
    let Some(f) = Fixture::new(test) else {
        return;
    };
    let halt = f.tmp.path().join("halt.elf");
    let (mut created, mut removed) = (0, 0);
    for round in 0..20 {
        let kernel = format!("k{round}");
        let vm = format!("r{round}");
        f.ok(&[
            "kernel",
            "import",
            &kernel,
            "--vmlinux",
            halt.to_str().expect("utf-8"),
        ]);
        let state = f.state();
        let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
        let (create, rm) = std::thread::scope(|scope| {
            let create = scope.spawn(|| {
                banger(
                    &state,
                    &[
                        "vm",
                        "create",
                        &vm,
                        "--kernel",
                        &kernel,
                        "--rootfs",
                        &rootfs,
                        "--vmm",
                        "firecracker",
                    ],
                )
            });
            let rm = scope.spawn(|| banger(&state, &["kernel", "rm", &kernel]));
            (create.join().expect("create"), rm.join().expect("rm"))
        });
        let (create_err, rm_err) = (
            String::from_utf8_lossy(&create.stderr).into_owned(),
            String::from_utf8_lossy(&rm.stderr).into_owned(),
        );
        match (create.status.success(), rm.status.success()) {
            (true, false) => {
                assert!(rm_err.contains(&format!("used by VM {vm}")), "{rm_err}");
                created += 1;
                f.ok(&["vm", "rm", &vm]);
                f.ok(&["kernel", "rm", &kernel]);
            }
            (false, true) => {
                assert!(
                    create_err.contains(&format!("no kernel named {kernel}")),
                    "{create_err}"
                );
                removed += 1;
            }
            other => panic!("round {round}: create and rm both {other:?}: {create_err} {rm_err}"),
        }
        assert!(vm_names(&f).is_empty());
    }
    eprintln!("kernel rm vs vm create: create won {created}, rm won {removed}");
}

/// Any record in the vms table under a chosen key (here: one that does not
/// decode as a VM).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct RawVm(Value);

impl banger::store::Record for RawVm {
    const TABLE: &'static str = "vms";
    fn key(&self) -> String {
        self.0["id"].as_str().unwrap_or_default().to_string()
    }
}

#[test]
fn a_vm_record_that_does_not_decode_is_quarantined_until_forgotten() {
    let test = "a_vm_record_that_does_not_decode_is_quarantined_until_forgotten";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    f.create("good", &["--start"]);
    let bad = f.create("bad", &["--start"]);
    let bad_id = bad["id"].as_str().expect("id").to_string();
    let bad_pid = bad["pid"].as_i64().expect("pid");
    let halt = f.tmp.path().join("halt.elf");
    f.ok(&[
        "kernel",
        "import",
        "spare",
        "--vmlinux",
        halt.to_str().expect("utf-8"),
    ]);
    f.daemon.take().expect("daemon").stop();
    {
        let opened = banger::store::open(&f.state(), banger::store::Schema::production())
            .expect("open the store with the daemon stopped");
        opened
            .store
            .put(&RawVm(serde_json::json!({"id": bad_id, "name": 17})))
            .expect("write a corrupt record");
    }
    f.start_daemon();
    assert_eq!(vm_names(&f), ["good"], "the good VM is supervised");
    assert_eq!(f.vm("good")["state"], "running");
    let status: Value =
        serde_json::from_str(&f.ok(&["daemon", "status", "--json"])).expect("status json");
    let quarantined = status["quarantined"].as_array().expect("quarantined");
    assert_eq!(quarantined.len(), 1, "{status}");
    assert_eq!(quarantined[0]["table"], "vms");
    assert_eq!(quarantined[0]["key"], bad_id.as_str());
    let dir = f.state().join("vms").join(&bad_id);
    assert!(dir.join("rootfs.ext4").exists(), "its disk is left alone");
    assert!(pid_alive(bad_pid), "its VMM is left alone");
    // It may use any kernel: none goes while it is quarantined.
    let refused = f.run(&["kernel", "rm", "spare"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("quarantined"),
        "{refused:?}"
    );

    let refused = f.run(&["vm", "forget", "nosuchid00"]);
    assert!(!refused.status.success());
    f.ok(&["vm", "forget", &bad_id]);
    assert!(!dir.exists(), "forget removes what the record owned");
    assert!(!pid_alive(bad_pid), "and its VMM");
    f.ok(&["kernel", "rm", "spare"]);
    let status: Value =
        serde_json::from_str(&f.ok(&["daemon", "status", "--json"])).expect("status json");
    assert_eq!(status["quarantined"], serde_json::json!([]));
    f.daemon.take().expect("daemon").stop();
    f.start_daemon();
    assert_eq!(vm_names(&f), ["good"], "nothing comes back");
}
