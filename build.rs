//! Stamps the git commit and the build date into the binaries' versions.

use std::process::Command;

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
}
