//! Stamps the git commit and the build date into the binaries' versions,
//! and checks the command-line definitions, which it includes as they are
//! (`src/cli/args/` names no type of the crate).

use std::process::Command;

use clap::CommandFactory;

#[path = "src/cli/args/mod.rs"]
#[allow(dead_code, unused_imports)]
mod args;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let date = jiff::Timestamp::now().strftime("%Y-%m-%d").to_string();
    println!("cargo:rustc-env=BANGER_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=BANGER_BUILD_DATE={date}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-changed=src/cli/args");
    // What clap would otherwise find only when a command line is parsed;
    // asserted in builds with debug assertions (dev and test, so CI).
    args::Cli::command().debug_assert();
    args::DaemonArgs::command().debug_assert();
}
