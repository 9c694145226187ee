//! The rules of the house that the compiler does not check: the VM
//! lifecycle (`src/vm/`) is sans-IO. No file under it uses actix, tokio,
//! the filesystem, processes, sockets or a clock; time and the world come
//! in as events, and effects go out to the actor that carries them out.
//! And the wire (`src/rpc/`) never sees the store: it asks the domains,
//! which map the store's records and errors to their own.

use std::path::{Path, PathBuf};

/// What a pure module may not name, and why.
const NOT_PURE: &[(&str, &str)] = &[
    ("actix", "an actor framework"),
    ("tokio", "an async runtime"),
    ("std::fs", "the filesystem"),
    ("std::process", "processes"),
    ("std::net::TcpStream", "a socket"),
    ("std::net::TcpListener", "a socket"),
    ("std::net::UdpSocket", "a socket"),
    ("std::os::unix::net", "a socket"),
    ("Instant::now", "a clock"),
    ("SystemTime::now", "a clock"),
    ("Timestamp::now", "a clock"),
];

/// What the wire may not name, and why.
const NOT_WIRE: &[(&str, &str)] = &[
    ("store::", "the store or its actor, by any path"),
    ("StoreActor", "the store's actor"),
    ("StoreError", "the store's errors"),
    ("StoreHealth", "the store's health"),
    ("Undecodable", "the store's quarantine"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each use of a forbidden name in the code (comments aside) of the files
/// under `dir`: file, line and what it reaches.
fn violations(dir: &Path, forbidden: &[(&str, &str)]) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read source");
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for (name, what) in forbidden {
                if code.contains(name) {
                    found.push(format!(
                        "{}:{}: {name} ({what})",
                        file.display(),
                        number + 1
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn the_vm_lifecycle_does_no_io_and_reads_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found = violations(&root.join("src/vm"), NOT_PURE);
    assert!(
        found.is_empty(),
        "src/vm/ is sans-IO; move these to the actor that carries out its effects:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_wire_never_sees_the_store() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found = violations(&root.join("src/rpc"), NOT_WIRE);
    assert!(
        found.is_empty(),
        "src/rpc/ asks the domains, never the store; map these in the actors:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_finds_what_it_looks_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bad.rs"),
        "// std::fs in a comment is fine\nuse std::fs::File;\nfn f() { let _ = std::time::Instant::now(); }\n",
    )
    .expect("write");
    let found = violations(dir.path(), NOT_PURE);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].ends_with("bad.rs:2: std::fs (the filesystem)"),
        "{found:?}"
    );
    assert!(found[1].contains("bad.rs:3: Instant::now"), "{found:?}");
    std::fs::write(
        dir.path().join("wire.rs"),
        "use crate::actors::{store::Get, vm::VmManager};\n",
    )
    .expect("write");
    let found = violations(dir.path(), NOT_WIRE);
    assert!(
        found.contains(&format!(
            "{}:1: store:: (the store or its actor, by any path)",
            dir.path().join("wire.rs").display()
        )),
        "{found:?}"
    );
}
