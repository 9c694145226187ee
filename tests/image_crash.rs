//! A daemon killed in the middle of `image import` (after the blobs are
//! stored; after the ext4 is in place but before its record) leaves
//! nothing behind once it starts again, and the same import then
//! succeeds. The layout is built with umoci, as users build them.

mod common;

use std::path::Path;

use common::*;

/// A one-layer OCI layout (`LAYOUT:crash`) with a few hundred files.
fn layout(dir: &Path) -> std::path::PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:crash", layout.display());
    run_ok("umoci", &["init", "--layout", &layout.to_string_lossy()]);
    run_ok("umoci", &["new", "--image", &image]);
    run_ok(
        "umoci",
        &["unpack", "--image", &image, &bundle.to_string_lossy()],
    );
    let etc = bundle.join("rootfs/etc");
    std::fs::create_dir_all(&etc).expect("etc");
    for i in 0..300 {
        std::fs::write(etc.join(format!("file-{i}")), format!("{i}\n")).expect("file");
    }
    run_ok(
        "umoci",
        &["repack", "--image", &image, &bundle.to_string_lossy()],
    );
    layout
}

#[test]
fn a_daemon_killed_during_an_import_leaves_nothing_and_the_import_then_succeeds() {
    if !tools_installed("a_daemon_killed_during_an_import", &["umoci", "e2fsck"]) {
        return;
    }
    let work = state_dir();
    let layout = layout(work.path());
    for boundary in ["image-blobs-stored:1", "image-staged:1"] {
        let tmp = state_dir();
        let state = tmp.path();
        let mut daemon = image_daemon(state, "", &[("BANGER_FAULT_KILL", boundary)]);
        let out = banger(state, &["image", "import", &layout.to_string_lossy()]);
        assert!(
            !out.status.success(),
            "{boundary}: the import outlived its daemon"
        );
        assert!(
            daemon
                .wait_for_line("fault injection: killing the daemon")
                .is_some(),
            "{boundary} was never reached"
        );
        daemon.wait_exit();
        let left = entries(&state.join("blobs/sha256"));
        assert!(
            !left.is_empty() || boundary.starts_with("image-staged"),
            "{boundary}: {left:?}"
        );

        let daemon = image_daemon(state, "", &[]);
        assert_eq!(
            entries(&state.join("images")),
            Vec::<String>::new(),
            "{boundary}"
        );
        assert_eq!(
            entries(&state.join("blobs/sha256")),
            Vec::<String>::new(),
            "{boundary}"
        );
        let out = banger(
            state,
            &["image", "import", &layout.to_string_lossy(), "--json"],
        );
        assert!(
            out.status.success(),
            "{boundary}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let image: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(image["name"], "crash");
        let disk = image["disk"].as_str().expect("disk");
        assert_fsck_clean(Path::new(disk), boundary);
        assert_eq!(entries(&state.join("images")).len(), 1);
        assert!(daemon.stop().success());
    }
}
