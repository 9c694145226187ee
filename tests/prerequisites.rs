//! Every host program the daemon, the tests and the benchmarks run by name
//! is in `scripts/prerequisites.sh`'s list, with the package that provides
//! it, so a new machine installs it before the suite needs it. (The agent's
//! programs run in the guest and are not the host's concern.)

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_program_run_by_name_is_installed_by_the_prerequisites() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script =
        std::fs::read_to_string(root.join("scripts/prerequisites.sh")).expect("prerequisites.sh");
    let listed: Vec<&str> = script
        .lines()
        .filter_map(|line| line.trim().strip_prefix('"'))
        .filter_map(|entry| entry.split_whitespace().next())
        .collect();
    assert!(
        listed.contains(&"cpio"),
        "the list was not parsed: {listed:?}"
    );

    let mut files = Vec::new();
    for dir in ["src", "tests", "benches"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut unlisted = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read source");
        for rest in text.split("Command::new(\"").skip(1) {
            let program = rest.split('"').next().unwrap_or_default();
            let name = program.rsplit('/').next().unwrap_or(program);
            if !listed.contains(&name) {
                unlisted.push(format!("{} runs {program}", file.display()));
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "add these programs and their packages to scripts/prerequisites.sh: {unlisted:#?}"
    );
}
