//! A store that cannot write (a full disk, or writes failed on purpose) on
//! real firecracker VMs (halt kernel): the daemon answers every command at
//! once, misreports no VMM, and works again without a restart once writes
//! succeed. Skips (with the reason) without the fixture or root.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::halt::*;
use common::*;
use serde_json::Value;

/// How long a command may take while the store cannot write.
const ANSWER_BOUND: Duration = Duration::from_secs(2);

/// Runs `banger args`, asserting it answers within [`ANSWER_BOUND`].
fn timed(f: &Fixture, args: &[&str]) -> std::process::Output {
    let started = Instant::now();
    let out = f.run(args);
    let took = started.elapsed();
    assert!(took < ANSWER_BOUND, "banger {args:?} took {took:?}");
    out
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A command refused because the store cannot write, naming why.
fn assert_refused(f: &Fixture, args: &[&str]) -> String {
    let out = timed(f, args);
    let err = stderr(&out);
    assert!(!out.status.success(), "banger {args:?} succeeded");
    assert!(err.contains("store unavailable since"), "{args:?}: {err}");
    err
}

fn json_ok(out: &std::process::Output, what: &str) -> Value {
    assert!(out.status.success(), "{what}: {}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("--json output")
}

/// Until `attempt` answers true, or `within` passes; answers how long it took.
fn within(within: Duration, what: &str, mut attempt: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !attempt() {
        assert!(started.elapsed() < within, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// The live VMMs are the ones the records name, and nothing else.
fn assert_records_match_vmms(f: &Fixture) {
    let listed = json_ok(&f.run(&["vm", "ls", "--json"]), "vm ls");
    let mut named: Vec<i32> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|vm| vm["pid"].as_i64().map(|p| p as i32))
        .collect();
    named.sort();
    let mut live = f.vmms();
    live.sort();
    assert_eq!(named, live, "records vs live VMMs: {listed}");
}

#[test]
fn a_full_disk_is_survived_in_place_and_everything_works_once_space_returns() {
    let test = "a_full_disk_is_survived_in_place_and_everything_works_once_space_returns";
    let Some(mut f) = Fixture::on_tmpfs(test, "64m", &[]) else {
        return;
    };
    f.create("steady", &[]);
    f.ok(&["vm", "start", "steady"]);
    let steady_pid = f.pid("steady");
    f.create("churn", &[]);
    let daemon = f.daemon().pid();

    let filler = f.state().join("filler");
    fill_disk(&filler);
    // Stop and start until the store has to grow and cannot.
    let mut refused = None;
    for round in 0..500 {
        let args: &[&str] = if round % 2 == 0 {
            &["vm", "start", "churn"]
        } else {
            &["vm", "stop", "churn", "--timeout", "0.1"]
        };
        let out = timed(&f, args);
        let err = stderr(&out);
        if err.contains("store unavailable since") {
            refused = Some(err);
            break;
        }
        assert!(out.status.success(), "{args:?}: {err}");
    }
    let refused = refused.expect("a full disk never refused a store write");
    assert!(refused.contains("no space left on"), "{refused}");
    assert!(refused.contains("bytes free"), "{refused}");

    // While full: reads answer from memory, marked; changes are refused.
    let listed = timed(&f, &["vm", "ls", "--json"]);
    let vms = json_ok(&listed, "vm ls while full");
    assert_eq!(vms.as_array().map(Vec::len), Some(2), "{vms}");
    let warned = timed(&f, &["vm", "ls"]);
    assert!(
        stderr(&warned).contains("shown from the daemon's memory"),
        "{}",
        stderr(&warned)
    );
    let steady = json_ok(
        &timed(&f, &["vm", "inspect", "steady", "--json"]),
        "inspect",
    );
    assert_eq!(
        steady["state"], "running",
        "a running VM stays running: {steady}"
    );
    assert_eq!(steady["pid"].as_i64(), Some(steady_pid));
    let status = json_ok(&timed(&f, &["daemon", "status", "--json"]), "status");
    let unavailable = status["store"]["unavailable"].as_str().unwrap_or_default();
    assert!(unavailable.contains("no space left"), "{status}");
    assert_refused(&f, &["vm", "stop", "steady", "--timeout", "0.1"]);
    assert_refused(&f, &["vm", "start", "churn"]);
    let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
    assert_refused(
        &f,
        &[
            "vm",
            "create",
            "late",
            "--kernel",
            "halt",
            "--rootfs",
            &rootfs,
            "--vmm",
            "firecracker",
        ],
    );
    assert!(
        !json_ok(&timed(&f, &["vm", "ls", "--json"]), "vm ls")
            .to_string()
            .contains("\"late\""),
        "a refused create is not listed"
    );
    assert_records_match_vmms(&f);

    // Space returns: within 5 s everything works, without a restart.
    std::fs::remove_file(&filler).expect("free the space");
    let took = within(Duration::from_secs(5), "a working start", || {
        let out = f.run(&["vm", "start", "churn"]);
        out.status.success() || stderr(&out).contains("is running")
    });
    eprintln!("the store wrote again {took:?} after the space came back");
    assert_eq!(f.vm("churn")["state"], "running");
    let status = f.json(&["daemon", "status", "--json"]);
    assert!(status["store"]["unavailable"].is_null(), "{status}");
    let plain = f.run(&["vm", "ls"]);
    assert!(stderr(&plain).is_empty(), "{}", stderr(&plain));
    assert_eq!(
        f.pid("steady"),
        steady_pid,
        "the steady VM's VMM is the same"
    );
    assert_records_match_vmms(&f);
    assert_eq!(f.daemon().pid(), daemon, "no daemon restart");
    f.create("late", &[]);
    f.ok(&["vm", "stop", "steady", "--timeout", "0.1"]);
    f.ok(&["vm", "stop", "churn", "--timeout", "0.1"]);
    assert!(
        f.vmms().is_empty(),
        "no VMM after the stops: {:?}",
        f.vmms()
    );
    assert_records_match_vmms(&f);
}

/// `daemon status` says the store writes.
fn writable(f: &Fixture) -> bool {
    f.json(&["daemon", "status", "--json"])["store"]["unavailable"].is_null()
}

/// The next `n` store writes of the fixture's daemon fail.
fn fail_writes(file: &Path, n: u32) {
    // Renamed into place: the daemon never reads a half-written count.
    let next = file.with_extension("next");
    std::fs::write(&next, n.to_string()).expect("fault file");
    std::fs::rename(&next, file).expect("fault file in place");
}

#[test]
fn failed_writes_answer_every_command_once_and_the_vm_ends_as_the_store_says() {
    let test = "failed_writes_answer_every_command_once_and_the_vm_ends_as_the_store_says";
    let Some(mut f) = Fixture::new(test) else {
        return;
    };
    let faults = f.tmp.path().join("store-faults");
    fail_writes(&faults, 0);
    let env = [("BANGER_FAULT_STORE_FAIL", faults.to_str().expect("utf-8"))];
    f.start_daemon_with(&env);
    f.create("web", &[]);
    f.ok(&["vm", "start", "web"]);
    let pid = f.pid("web");

    // A refused write of a command: nothing changes, the client hears so.
    // Five: the refusal, then recovery's first attempts (about 1.5 s).
    fail_writes(&faults, 5);
    let err = assert_refused(&f, &["vm", "stop", "web", "--timeout", "0.1"]);
    assert!(err.contains("nothing was changed"), "{err}");
    let vm = json_ok(&timed(&f, &["vm", "inspect", "web", "--json"]), "inspect");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["pid"].as_i64(), Some(pid));
    assert_refused(&f, &["vm", "start", "web"]);
    // Recovery takes the other failures, then writes.
    within(Duration::from_secs(10), "the store writing again", || {
        writable(&f)
    });
    assert_eq!(std::fs::read_to_string(&faults).expect("faults"), "0");
    assert_eq!(f.pid("web"), pid);

    // A stop recorded before the failure is carried out after it: the
    // stop's kill and the exit's record are refused, held, then written.
    let stopping = std::process::Command::new(env!("CARGO_BIN_EXE_banger"))
        .args(["vm", "stop", "web", "--timeout", "1"])
        .env("BANGER_SOCKET", socket_path(&f.state()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("banger vm stop");
    f.wait_for("web", "stopping", |vm| vm["state"] == "stopping");
    fail_writes(&faults, 2);
    let answered = output_within_timeout(stopping).expect("the stop answers");
    let err = stderr(&answered);
    assert!(
        answered.status.success() || err.contains("store unavailable since"),
        "{err}"
    );
    let stopped = f.wait_for("web", "stopped", |vm| vm["state"] == "stopped");
    assert!(stopped["pid"].is_null(), "{stopped}");
    within(Duration::from_secs(10), "the store writing again", || {
        writable(&f)
    });
    assert!(f.vmms().is_empty(), "VMMs left: {:?}", f.vmms());
    // What the store holds is what was shown: a new daemon reads it.
    f.start_daemon_with(&env);
    assert_eq!(f.vm("web")["state"], "stopped");
    f.ok(&["vm", "start", "web"]);
    assert_records_match_vmms(&f);
    f.ok(&["vm", "rm", "web", "--force"]);
}

#[test]
fn a_disk_that_fills_during_a_clone_an_import_or_a_backup_leaves_nothing_half_done() {
    let test = "a_disk_that_fills_during_a_clone_an_import_or_a_backup_leaves_nothing_half_done";
    let Some(mut f) = Fixture::on_tmpfs(test, "48m", &[]) else {
        return;
    };
    let filler_in_state = f.state().join("filler");
    let fill = format!("disk-cloning:1:{}", filler_in_state.display());
    f.start_daemon_with(&[("BANGER_FAULT_FILL", &fill)]);
    let free_after = |f: &Fixture| {
        std::fs::remove_file(f.state().join("filler")).ok();
        within(Duration::from_secs(5), "the store writing again", || {
            writable(f)
        });
        assert_records_match_vmms(f);
    };

    // A root disk of two extents: the disk fills after the first.
    let sparse = f.tmp.path().join("sparse.img");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(&sparse).expect("sparse");
        file.set_len(8 << 20).expect("size");
        file.write_all_at(&[1u8; 64 << 10], 0)
            .expect("first extent");
        file.write_all_at(&[2u8; 4 << 20], 4 << 20)
            .expect("second extent");
    }
    let sparse = sparse.to_str().expect("utf-8");
    let out = f.run(&[
        "vm",
        "create",
        "filled",
        "--kernel",
        "halt",
        "--rootfs",
        sparse,
        "--vmm",
        "firecracker",
    ]);
    let err = stderr(&out);
    assert!(!out.status.success(), "the clone fitted");
    assert!(err.to_lowercase().contains("no space"), "{err}");
    free_after(&f);
    assert_eq!(vm_files_left(&f.state()), 0, "a partial clone is left");
    assert!(!f.ok(&["vm", "ls"]).contains("filled"));
    f.create("filled", &[]);
    f.ok(&["vm", "rm", "filled"]);

    // An image import into a full disk.
    let layer = {
        let mut layer = oci_layer();
        layer.finish()
    };
    let layout = common::oci::layout(
        f.tmp.path(),
        "layout",
        &[layer],
        common::oci::Compression::Gzip,
    );
    fill_disk(&filler_in_state);
    let out = timed_ok_or(
        &f,
        &[
            "image",
            "import",
            layout.to_str().expect("utf-8"),
            "--name",
            "small",
        ],
    );
    assert!(
        !out.status.success(),
        "an import into a full disk succeeded"
    );
    let err = stderr(&out);
    assert!(err.to_lowercase().contains("space"), "{err}");
    free_after(&f);
    let images = f.json(&["image", "ls", "--json"]);
    assert_eq!(images.as_array().map(Vec::len), Some(0), "{images}");
    assert_eq!(
        entries(&f.state().join("images")).len(),
        0,
        "image files left"
    );
    f.ok(&[
        "image",
        "import",
        layout.to_str().expect("utf-8"),
        "--name",
        "small",
    ]);

    // A backup into a full disk.
    fill_disk(&filler_in_state);
    let out = timed_ok_or(&f, &["daemon", "backup", "full.redb"]);
    assert!(!out.status.success(), "a backup into a full disk succeeded");
    assert!(
        stderr(&out).to_lowercase().contains("space"),
        "{}",
        stderr(&out)
    );
    free_after(&f);
    assert_eq!(
        entries(&f.state().join("backups")).len(),
        0,
        "backup files left"
    );
    f.ok(&["daemon", "backup", "full.redb"]);
}

/// Runs a command that may take a moment (an import), bounded.
fn timed_ok_or(f: &Fixture, args: &[&str]) -> std::process::Output {
    let started = Instant::now();
    let out = f.run(args);
    assert!(started.elapsed() < EVENT_TIMEOUT, "banger {args:?} hung");
    out
}

/// A layer with a few MiB of incompressible-enough data.
fn oci_layer() -> common::oci::Layer {
    let mut layer = common::oci::Layer::default();
    let data: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    layer.dir("bin", 0o755).file("bin/data", 0o644, &data);
    layer
}
