//! `image import` against its oracle: every ext4 it writes passes
//! `e2fsck -fn`, and its tree (mounted read-only) matches what `umoci
//! unpack` makes of the same layout, entry by entry. The layers are built
//! here, byte by byte, so the test controls every whiteout, hardlink,
//! device, xattr and malicious name; umoci reads them independently.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use common::oci::*;
use common::*;

const TOOLS: &[&str] = &["umoci", "skopeo", "e2fsck", "debugfs", "mount", "umount"];

// ---- the daemon ----

/// Imports `source` as `name`: the image's ext4, checked by e2fsck.
fn import(state: &Path, source: &Path, name: &str) -> PathBuf {
    let out = banger(
        state,
        &[
            "image",
            "import",
            &source.to_string_lossy(),
            "--name",
            name,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "import {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let disk = PathBuf::from(record["disk"].as_str().expect("disk"));
    assert_fsck_clean(&disk, name);
    disk
}

/// An import that must fail: its error.
fn refused_import(state: &Path, source: &Path, name: &str) -> String {
    let out = banger(
        state,
        &["image", "import", &source.to_string_lossy(), "--name", name],
    );
    assert!(!out.status.success(), "import {name} was not refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---- trees, as the kernel shows them ----

#[derive(Debug, PartialEq)]
struct Node {
    kind: &'static str,
    mode: u32,
    owner: (u32, u32),
    size: Option<u64>,
    sha256: Option<String>,
    target: Option<PathBuf>,
    device: Option<u64>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    nodes: BTreeMap<String, Node>,
    hardlinks: BTreeSet<Vec<String>>,
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 64 * 1024];
    let len = rustix::fs::llistxattr(path, &mut names[..]).expect("listxattr");
    names[..len]
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let name = String::from_utf8_lossy(name).into_owned();
            let mut value = vec![0u8; 64 * 1024];
            let len = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..]).expect("getxattr");
            value.truncate(len);
            (name, value)
        })
        .collect()
}

fn snapshot(root: &Path) -> Snapshot {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        let name = format!("/{}", path.strip_prefix(root).expect("inside").display());
        if name == "/lost+found" {
            continue;
        }
        let file_type = meta.file_type();
        use std::os::unix::fs::FileTypeExt as _;
        let kind = if file_type.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read dir") {
                pending.push(entry.expect("entry").path());
            }
            "dir"
        } else if file_type.is_file() {
            "file"
        } else if file_type.is_symlink() {
            "symlink"
        } else if file_type.is_char_device() {
            "char"
        } else if file_type.is_block_device() {
            "block"
        } else if file_type.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        if kind != "dir" && meta.nlink() > 1 {
            inodes.entry(meta.ino()).or_default().push(name.clone());
        }
        let node = Node {
            kind,
            mode: meta.mode() & 0o7777,
            owner: (meta.uid(), meta.gid()),
            size: (kind == "file").then_some(meta.len()),
            sha256: (kind == "file")
                .then(|| format!("{:x}", Sha256::digest(std::fs::read(&path).expect("read")))),
            target: (kind == "symlink").then(|| std::fs::read_link(&path).expect("readlink")),
            device: matches!(kind, "char" | "block").then(|| meta.rdev()),
            xattrs: xattrs(&path),
        };
        nodes.insert(name, node);
    }
    let hardlinks = inodes
        .into_values()
        .map(|mut group| {
            group.sort();
            group
        })
        .collect();
    Snapshot { nodes, hardlinks }
}

/// An ext4 mounted read-only (no journal replay), unmounted on drop.
struct Mounted(tempfile::TempDir);

impl Mounted {
    fn new(disk: &Path) -> Mounted {
        let dir = tempfile::tempdir().expect("mount point");
        run_ok(
            "mount",
            &[
                "-o",
                "ro,loop,noload",
                &disk.to_string_lossy(),
                &dir.path().to_string_lossy(),
            ],
        );
        Mounted(dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

fn ext4_tree(disk: &Path) -> Snapshot {
    let mounted = Mounted::new(disk);
    snapshot(mounted.0.path())
}

fn umoci_tree(layout: &Path, work: &Path) -> Snapshot {
    let bundle = work.join(format!(
        "bundle-{}",
        layout.file_name().expect("name").to_string_lossy()
    ));
    run_ok(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:test", layout.display()),
            &bundle.to_string_lossy(),
        ],
    );
    let tree = snapshot(&bundle.join("rootfs"));
    let _ = std::fs::remove_dir_all(&bundle);
    tree
}

fn assert_same(ours: &Snapshot, oracle: &Snapshot, what: &str) {
    for (path, node) in &oracle.nodes {
        assert_eq!(ours.nodes.get(path), Some(node), "{what}: {path}");
    }
    let extra: Vec<_> = ours
        .nodes
        .keys()
        .filter(|p| !oracle.nodes.contains_key(*p))
        .collect();
    assert!(extra.is_empty(), "{what}: not in the oracle: {extra:?}");
    assert_eq!(ours.hardlinks, oracle.hardlinks, "{what}: hardlink groups");
}

// ---- the images ----

/// Three layers: whiteouts, an opaque directory, hardlinks (also across
/// layers), a file that becomes a directory and a file again, devices, a
/// FIFO, xattrs (with `security.capability`), setuid, setgid and sticky.
fn three_layers() -> Vec<Vec<u8>> {
    // A v2 file capability: cap_net_bind_service, permitted and effective.
    let capability: &[u8] = &[0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut bottom = Layer::default();
    bottom
        .dir("./", 0o755)
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("data", 0o750)
        .dir("opaque", 0o755)
        .dir("swap", 0o755)
        .dir("dev", 0o755)
        .dir("tmp", 0o1777)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("bin/tool", 0o4755, b"#!/bin/sh\necho tool\n")
        .add(Spec {
            owner: (1000, 1000),
            data: b"owned by 1000\n",
            ..spec("data/owned", tar::EntryType::Regular, 0o640)
        })
        .add(Spec {
            xattrs: &[("security.capability", capability), ("user.note", b"hello")],
            data: b"capable\n",
            ..spec("data/capable", tar::EntryType::Regular, 0o755)
        })
        .file("data/hard1", 0o644, b"one inode\n")
        .hardlink("data/hard2", "data/hard1")
        .file("opaque/old1", 0o644, b"old\n")
        .file("opaque/old2", 0o644, b"old\n")
        .file("swap/thing", 0o644, b"a file first\n")
        .file("gone", 0o644, b"whited out later\n")
        .add(Spec {
            device: (1, 3),
            ..spec("dev/null", tar::EntryType::Char, 0o666)
        })
        .add(Spec {
            device: (8, 0),
            ..spec("dev/sda", tar::EntryType::Block, 0o660)
        })
        .add(spec("dev/pipe", tar::EntryType::Fifo, 0o600))
        .symlink("link", "etc/passwd")
        .symlink("bin/sh", "/bin/tool");
    let mut middle = Layer::default();
    middle
        .file(".wh.gone", 0o644, b"")
        .dir("opaque", 0o755)
        .file("opaque/.wh..wh..opq", 0o644, b"")
        .file("opaque/new", 0o644, b"new\n")
        .dir("swap/thing", 0o700)
        .file("swap/thing/inner", 0o644, b"a directory now\n")
        .hardlink("data/hard3", "data/hard1")
        .add(Spec {
            owner: (0, 50),
            data: b"setgid\n",
            ..spec("etc/setgid", tar::EntryType::Regular, 0o2755)
        });
    let mut top = Layer::default();
    top.file("swap/thing", 0o600, b"and a file again\n").file(
        "etc/passwd",
        0o600,
        b"root:x:0:0::/:/bin/sh\n",
    );
    vec![bottom.finish(), middle.finish(), top.finish()]
}

#[test]
fn a_three_layer_image_matches_umoci_and_its_zstd_and_archive_twins() {
    if !tools_installed("a_three_layer_image_matches_umoci", TOOLS) {
        return;
    }
    let work = state_dir();
    let layers = three_layers();
    let gzip = layout(work.path(), "gzip", &layers, Compression::Gzip);
    let zstd = layout(work.path(), "zstd", &layers, Compression::Zstd);
    let oracle = umoci_tree(&gzip, work.path());
    assert_eq!(oracle.nodes["/swap/thing"].kind, "file", "umoci's view");

    let state = state_dir();
    let daemon = image_daemon(state.path(), "", &[]);
    let disk = import(state.path(), &gzip, "three");
    let ours = ext4_tree(&disk);
    assert_same(&ours, &oracle, "gzip layout");
    assert_eq!(ours.nodes["/data/capable"].xattrs.len(), 2);
    assert_eq!(ours.nodes["/bin/tool"].mode, 0o4755);
    assert!(ours.hardlinks.contains(&vec![
        "/data/hard1".to_string(),
        "/data/hard2".to_string(),
        "/data/hard3".to_string()
    ]));

    // The same image as skopeo writes it: an OCI archive and a
    // docker-archive (uncompressed layers).
    for (transport, name) in [
        ("oci-archive", "ociarchive"),
        ("docker-archive", "dockerarchive"),
    ] {
        let archive = work.path().join(format!("{name}.tar"));
        run_ok(
            "skopeo",
            &[
                "copy",
                "--quiet",
                &format!("oci:{}:test", gzip.display()),
                &format!("{transport}:{}:{name}:test", archive.display()),
            ],
        );
        let disk = import(state.path(), &archive, name);
        assert_same(&ext4_tree(&disk), &oracle, transport);
    }
    assert!(daemon.stop().success());

    // umoci cannot read zstd layers: the zstd twin (same diff_ids) is
    // compared with the gzip image, imported by a daemon of its own so
    // nothing is shared.
    let state = state_dir();
    let daemon = image_daemon(state.path(), "", &[]);
    let disk = import(state.path(), &zstd, "three");
    assert_same(&ext4_tree(&disk), &ours, "zstd twin");
    assert!(daemon.stop().success());
}

#[test]
fn a_busybox_tree_and_twenty_thousand_files_in_one_directory_match_umoci() {
    if !tools_installed(
        "a_busybox_tree_and_twenty_thousand_files",
        &[TOOLS, &["busybox"]].concat(),
    ) {
        return;
    }
    let mut tree = busybox_tree();
    let mut many = Layer::default();
    many.dir("many", 0o755);
    for i in 0..20_000 {
        many.file(
            &format!("many/file-{i:05}"),
            0o644,
            format!("{i}\n").as_bytes(),
        );
    }
    let work = state_dir();
    let gzip = layout(
        work.path(),
        "big",
        &[tree.finish(), many.finish()],
        Compression::Gzip,
    );
    let oracle = umoci_tree(&gzip, work.path());
    let state = state_dir();
    let daemon = image_daemon(state.path(), "", &[]);
    let disk = import(state.path(), &gzip, "big");
    let ours = ext4_tree(&disk);
    assert_eq!(ours.nodes.len(), oracle.nodes.len());
    assert_same(&ours, &oracle, "busybox and 20,000 files");
    // The large directory is hash-indexed, for lookups in the guest.
    let htree = run_ok("debugfs", &["-R", "htree /many", &disk.to_string_lossy()]);
    assert!(htree.contains("Root node dump"), "{htree}");
    assert!(daemon.stop().success());
}

/// Each of containerd's breakout cases, umoci's `.` symlink, `../` and
/// absolute names: refused (naming the entry) or contained in the image;
/// a sentinel directory outside the state directory stays as it was.
#[test]
fn a_malicious_corpus_is_refused_or_contained_and_touches_nothing_outside() {
    if !tools_installed("a_malicious_corpus", TOOLS) {
        return;
    }
    let sentinel = tempfile::tempdir().expect("sentinel");
    std::fs::write(sentinel.path().join("keep"), "untouched\n").expect("sentinel file");
    let outside = sentinel.path().to_string_lossy().into_owned();
    let outside_file = format!("{outside}/keep");
    let before = fingerprint(&sentinel.path().join("keep"));
    let work = state_dir();
    let state = state_dir();
    let daemon = image_daemon(state.path(), "", &[]);

    // (name, layers, Ok(paths the image holds, as files) or Err(words of the refusal))
    type Case = (
        &'static str,
        Vec<Vec<u8>>,
        Result<Vec<String>, Vec<&'static str>>,
    );
    let one = |build: &dyn Fn(&mut Layer)| {
        let mut layer = Layer::default();
        build(&mut layer);
        vec![layer.finish()]
    };
    let cases: Vec<Case> = vec![
        (
            "symlink-absolute",
            one(&|l| {
                l.dir("etc", 0o755).symlink("localetc", &outside).file(
                    "localetc/emptied",
                    0o644,
                    b"x",
                );
            }),
            Ok(vec![format!("{outside}/emptied")]),
        ),
        (
            "symlink-up-and-out",
            one(&|l| {
                l.dir("etc", 0o755)
                    .symlink("localetc", &format!("../../../../../..{outside}"))
                    .file("localetc/emptied", 0o644, b"x");
            }),
            Ok(vec![format!("{outside}/emptied")]),
        ),
        (
            "symlink-parent-directory",
            one(&|l| {
                l.dir("etc", 0o755).symlink("etc/localetc", "../etc").file(
                    "etc/localetc/x",
                    0o644,
                    b"x",
                );
            }),
            Ok(vec!["/etc/x".into()]),
        ),
        (
            "hardlink-relative",
            one(&|l| {
                l.hardlink("localpasswd", &format!("../../../../..{outside_file}"));
            }),
            Err(vec!["localpasswd"]),
        ),
        (
            "hardlink-absolute",
            one(&|l| {
                l.hardlink("localpasswd", &outside_file);
            }),
            Err(vec!["localpasswd"]),
        ),
        (
            "hardlink-symlink-chmod",
            one(&|l| {
                l.symlink("tmp/also-exists-outside-root", &outside_file)
                    .hardlink("tmp/perm400-link", "tmp/also-exists-outside-root");
            }),
            Ok(vec![]),
        ),
        (
            "directory-override-symlink",
            one(&|l| {
                l.symlink("localetc", &outside).dir("localetc", 0o755).file(
                    "localetc/x",
                    0o644,
                    b"x",
                );
            }),
            Ok(vec!["/localetc/x".into()]),
        ),
        (
            "whiteout-root",
            vec![
                Layer::default().dir("etc", 0o755).finish(),
                Layer::default().file(".wh..", 0o644, b"").finish(),
            ],
            Err(vec![".wh.."]),
        ),
        (
            "whiteout-root-parent",
            vec![
                Layer::default().dir("etc", 0o755).finish(),
                Layer::default().file("../.wh.etc", 0o644, b"").finish(),
            ],
            Err(vec!["../.wh.etc"]),
        ),
        (
            "whiteout-symlink-path",
            vec![
                Layer::default()
                    .dir("etc", 0o755)
                    .file("etc/passwd", 0o644, b"p")
                    .file("etc/whitedout", 0o644, b"w")
                    .symlink("localetc", &outside)
                    .finish(),
                Layer::default()
                    .file("localetc/.wh.keep", 0o644, b"")
                    .finish(),
            ],
            Ok(vec!["/etc/passwd".into()]),
        ),
        (
            "whiteout-dead-symlink-parent",
            vec![
                Layer::default()
                    .dir("etc", 0o755)
                    .file("etc/passwd", 0o644, b"p")
                    .symlink("deadetc", &format!("{outside}/dne"))
                    .finish(),
                Layer::default()
                    .file("deadetc/.wh.etc", 0o644, b"")
                    .finish(),
            ],
            Ok(vec!["/etc/passwd".into()]),
        ),
        (
            "umoci-symlink-dot",
            one(&|l| {
                l.symlink(".", &outside).file("x", 0o644, b"x");
            }),
            Err(vec!["."]),
        ),
        (
            "dot-dot-name",
            one(&|l| {
                l.file("../escape", 0o644, b"x");
            }),
            Err(vec!["../escape"]),
        ),
        (
            "absolute-name",
            one(&|l| {
                l.file(&format!("{outside}/absolute"), 0o644, b"x");
            }),
            Ok(vec![format!("{outside}/absolute")]),
        ),
    ];
    for (name, layers, expected) in cases {
        let source = layout(work.path(), name, &layers, Compression::Gzip);
        match expected {
            Ok(files) => {
                let disk = import(state.path(), &source, name);
                let mounted = Mounted::new(&disk);
                for file in files {
                    let inside = mounted.0.path().join(file.trim_start_matches('/'));
                    assert!(
                        std::fs::symlink_metadata(&inside).is_ok_and(|m| m.is_file()),
                        "{name}: {file} is not a file inside the image"
                    );
                }
            }
            Err(words) => {
                let error = refused_import(state.path(), &source, name);
                for word in words {
                    assert!(error.contains(word), "{name}: {error}");
                }
            }
        }
    }
    assert!(daemon.stop().success());
    let left: Vec<_> = std::fs::read_dir(sentinel.path())
        .expect("sentinel")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["keep"], "the sentinel directory changed");
    assert_eq!(fingerprint(&sentinel.path().join("keep")), before);
}

/// A sparse-file claim over the cap, a tar bomb, a million-entry tar and a
/// blob whose digest lies: each fails with the cap or both digests in the
/// message, and nothing is left in the state directory.
#[test]
fn bombs_and_lying_blobs_fail_naming_the_cap_and_leave_nothing() {
    if !tools_installed("bombs_and_lying_blobs", TOOLS) {
        return;
    }
    let work = state_dir();
    let state = state_dir();
    let daemon = image_daemon(
        state.path(),
        "max_unpacked_mib = 16\nmax_entries = 10000\n",
        &[],
    );

    // A GNU sparse entry claiming 1 TiB with no data.
    let mut sparse = Layer::default();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_path("sparse").expect("path");
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header.set_size(0);
    let gnu = header.as_gnu_mut().expect("gnu");
    gnu.set_real_size(1 << 40);
    gnu.sparse[0].set_offset(1 << 40);
    gnu.sparse[0].set_length(0);
    header.set_cksum();
    sparse.append(&header, b"");
    let sparse = layout(work.path(), "sparse", &[sparse.finish()], Compression::Gzip);
    let error = refused_import(state.path(), &sparse, "sparse");
    assert!(error.contains("image.max_unpacked_mib"), "{error}");

    // 64 MiB of zeros, a few kilobytes compressed.
    let zeros = vec![0u8; 64 << 20];
    let bomb = Layer::default().file("bomb", 0o644, &zeros).finish();
    drop(zeros);
    let bomb = layout(work.path(), "bomb", &[bomb], Compression::Gzip);
    let error = refused_import(state.path(), &bomb, "bomb");
    assert!(error.contains("image.max_unpacked_mib"), "{error}");

    // A million empty files.
    let mut million = Layer::default();
    for i in 0..1_000_000 {
        million.file(&format!("f{i}"), 0o644, b"");
    }
    let million = layout(
        work.path(),
        "million",
        &[million.finish()],
        Compression::Gzip,
    );
    let error = refused_import(state.path(), &million, "million");
    assert!(error.contains("image.max_entries"), "{error}");

    // A layer blob whose bytes are not its digest's.
    let lying = layout(
        work.path(),
        "lying",
        &[Layer::default().file("x", 0o644, b"x").finish()],
        Compression::Gzip,
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lying.join("index.json")).expect("index"))
            .expect("index json");
    let manifest_digest = index["manifests"][0]["digest"].as_str().expect("digest");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            lying
                .join("blobs/sha256")
                .join(manifest_digest.trim_start_matches("sha256:")),
        )
        .expect("manifest"),
    )
    .expect("manifest json");
    let layer_digest = manifest["layers"][0]["digest"].as_str().expect("layer");
    let blob = lying
        .join("blobs/sha256")
        .join(layer_digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).expect("blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let actual = digest(&bytes);
    std::fs::write(&blob, bytes).expect("blob");
    let error = refused_import(state.path(), &lying, "lying");
    assert!(
        error.contains(layer_digest) && error.contains(&actual),
        "both digests: {error}"
    );

    let ls = banger(state.path(), &["image", "ls", "--json"]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "[]");
    for dir in ["images", "blobs/sha256"] {
        let left = entries(&state.path().join(dir));
        assert!(left.is_empty(), "{dir}: {left:?}");
    }
    assert!(daemon.stop().success());
}

/// A symlink whose target is longer than a tar header holds (a PAX
/// `linkpath` record).
fn long_symlink(layer: &mut Layer, path: &str, target: &str) {
    let pax = pax_record("linkpath", target.as_bytes());
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_size(pax.len() as u64);
    header.set_cksum();
    layer.append(&header, &pax);
    layer.add(spec(path, tar::EntryType::Symlink, 0o777));
}

/// The largest resident set `pid` reaches while `during` runs, in MiB
/// (the kernel's peak, reset first).
fn peak_rss_mib(pid: i32, during: impl FnOnce()) -> u64 {
    reset_peak_rss(pid);
    during();
    process_kib(pid, "VmHWM") >> 10
}

#[test]
fn hostile_trees_are_refused_while_they_build_within_the_memory_bound() {
    let work = state_dir();
    let state = state_dir();
    let max_memory_mib = 256;
    let daemon = image_daemon(
        state.path(),
        &format!("max_memory_mib = {max_memory_mib}\n"),
        &[],
    );
    let pid = daemon.pid().as_raw();
    let chain = |depth: usize| vec!["a"; depth].join("/");

    // 1,000 entries under unique 1,000-deep paths of missing parents: a
    // million implied directories from a 30 KB blob.
    let mut implied = Layer::default();
    for i in 0..1_000 {
        implied.file(&format!("d{i}/{}/f", chain(999)), 0o644, b"");
    }
    let implied = layout(
        work.path(),
        "implied",
        &[implied.finish()],
        Compression::Gzip,
    );

    // A symlink 20,000 components long with a file through it, and an
    // upper layer that makes its chain's top opaque (once a stack
    // overflow in the prune).
    let mut lower = Layer::default();
    long_symlink(&mut lower, "s", &chain(20_000));
    lower.file("s/f", 0o644, b"");
    let mut upper = Layer::default();
    upper.file("a/.wh..wh..opq", 0o644, b"");
    let deep = layout(
        work.path(),
        "deep",
        &[lower.finish(), upper.finish()],
        Compression::Gzip,
    );

    // A million nodes through short paths: 500 links of 2,000 components
    // each, a file reached through every one.
    let mut links = Layer::default();
    for i in 0..500 {
        long_symlink(
            &mut links,
            &format!("l{i}"),
            &format!("t{i}/{}", chain(2_000)),
        );
        links.file(&format!("l{i}/f"), 0o644, b"");
    }
    let links = layout(work.path(), "links", &[links.finish()], Compression::Gzip);

    let peak = peak_rss_mib(pid, || {
        let error = refused_import(state.path(), &implied, "implied");
        assert!(error.contains("image.max_memory_mib"), "{error}");
        let error = refused_import(state.path(), &deep, "deep");
        assert!(error.contains("4095"), "{error}");
        // Whichever bound it meets first (here the memory's: a million
        // directories take more than 256 MiB).
        let error = refused_import(state.path(), &links, "links");
        assert!(
            error.contains("image.max_nodes") || error.contains("image.max_memory_mib"),
            "{error}"
        );
        // Two at once: one builds at a time, within the same bound.
        std::thread::scope(|scope| {
            let both = [&implied, &implied]
                .map(|source| scope.spawn(|| refused_import(state.path(), source, "twice")));
            for refused in both {
                let error = refused.join().expect("import");
                assert!(error.contains("image.max_memory_mib"), "{error}");
            }
        });
    });
    eprintln!("the daemon's peak RSS: {peak} MiB (bound {max_memory_mib} MiB + 64)");
    assert!(peak <= max_memory_mib + 64, "{peak} MiB");
    banger(state.path(), &["daemon", "status"])
        .status
        .success()
        .then_some(())
        .expect("the daemon answers");
    for dir in ["images", "blobs/sha256"] {
        let left: Vec<_> = std::fs::read_dir(state.path().join(dir))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{dir} holds {left:?}");
    }
    drop(daemon);
}

#[test]
fn an_image_s_metadata_layers_and_archive_members_are_bounded_naming_the_key() {
    let work = state_dir();
    let state = state_dir();
    let _daemon = image_daemon(
        state.path(),
        "max_metadata_kib = 64\nmax_layers = 8\nmax_entries = 100\n",
        &[],
    );
    let one = Layer::default().file("f", 0o644, b"x").finish();

    // A config of 128 KiB (its Env), past max_metadata_kib.
    let env: Vec<String> = (0..2_000)
        .map(|i| format!("V{i}={}", "x".repeat(60)))
        .collect();
    let bloated = layout_running(
        work.path(),
        "bloated",
        std::slice::from_ref(&one),
        Compression::Gzip,
        serde_json::json!({ "Env": env }),
    );
    let error = refused_import(state.path(), &bloated, "bloated");
    assert!(error.contains("image.max_metadata_kib"), "{error}");

    // Nine layers, past max_layers.
    let many = layout(
        work.path(),
        "many",
        &vec![one.clone(); 9],
        Compression::Gzip,
    );
    let error = refused_import(state.path(), &many, "many");
    assert!(error.contains("image.max_layers"), "{error}");

    // An archive of 200 members, past max_entries, refused while indexed.
    let mut members = Layer::default();
    for i in 0..200 {
        members.file(&format!("junk{i}"), 0o644, b"");
    }
    let archive = work.path().join("members.tar");
    std::fs::write(&archive, members.finish()).expect("archive");
    let error = refused_import(state.path(), &archive, "members");
    assert!(error.contains("image.max_entries"), "{error}");
}
