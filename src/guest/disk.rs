//! Putting banger-agent into a VM's root disk: `debugfs` writes it into the
//! ext4 image in place, so no mount (and no root) is needed, and the VM's
//! own clone is the only file touched.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the agent lives in every guest.
pub const AGENT_PATH: &str = "/sbin/banger-agent";

/// What to do about a missing agent binary.
pub const AGENT_HINT: &str =
    "build it with scripts/build-agent.sh or set agent.binary in the daemon's configuration";

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("banger-agent is not at {0}; {hint}", hint = AGENT_HINT)]
    NoAgent(PathBuf),
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run debugfs (install e2fsprogs) on {disk}")]
    Debugfs {
        disk: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("debugfs could not write {AGENT_PATH} into {disk}: {output}")]
    NotWritten { disk: PathBuf, output: String },
}

/// Whether `disk` holds an ext4 (or ext2/3) filesystem: the superblock's
/// magic at byte 1080.
pub fn is_ext4(disk: &Path) -> Result<bool, InjectError> {
    let io_err = |source| InjectError::Io {
        path: disk.to_path_buf(),
        source,
    };
    let mut file = File::open(disk).map_err(io_err)?;
    let mut magic = [0u8; 2];
    file.seek(SeekFrom::Start(1080)).map_err(io_err)?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == [0x53, 0xef]),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

/// The debugfs script that (re)places the agent: errors of `mkdir` (the
/// directory exists) and `rm` (no earlier agent) are expected and ignored.
fn script(agent: &Path) -> String {
    format!(
        "mkdir /sbin\nrm {AGENT_PATH}\nwrite {} {AGENT_PATH}\nsif {AGENT_PATH} mode 0100755\nsif {AGENT_PATH} uid 0\nsif {AGENT_PATH} gid 0\nstat {AGENT_PATH}\n",
        agent.display()
    )
}

/// Writes the agent binary into the ext4 image `disk` at [`AGENT_PATH`],
/// replacing an older copy. Blocking.
pub fn inject_agent(disk: &Path, agent: &Path) -> Result<(), InjectError> {
    let size = std::fs::metadata(agent)
        .map_err(|_| InjectError::NoAgent(agent.to_path_buf()))?
        .len();
    let debugfs_err = |source| InjectError::Debugfs {
        disk: disk.to_path_buf(),
        source,
    };
    let mut child = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg("-")
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(debugfs_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script(agent).as_bytes())
            .map_err(debugfs_err)?;
    }
    let output = child.wait_with_output().map_err(debugfs_err)?;
    // debugfs exits 0 whatever its commands did; the final `stat` shows
    // whether the file is there with the right size.
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !stdout.contains(&format!("Size: {size}")) {
        return Err(InjectError::NotWritten {
            disk: disk.to_path_buf(),
            output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mke2fs(path: &Path) -> bool {
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4"])
            .arg(path)
            .arg("8M")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    #[test]
    fn the_agent_lands_executable_in_an_ext4_image_and_is_replaced_on_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("rootfs.ext4");
        if !mke2fs(&disk) {
            eprintln!("skipped: mke2fs (e2fsprogs) is not installed");
            return;
        }
        assert!(is_ext4(&disk).expect("read"));
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"#!/bin/sh\necho first\n").expect("write");
        inject_agent(&disk, &agent).expect("inject");
        std::fs::write(&agent, b"#!/bin/sh\necho the second, longer\n").expect("write");
        inject_agent(&disk, &agent).expect("inject again");
        let dump = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {AGENT_PATH}"))
            .arg(&disk)
            .output()
            .expect("debugfs");
        assert_eq!(dump.stdout, b"#!/bin/sh\necho the second, longer\n");
        let stat = Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {AGENT_PATH}"))
            .arg(&disk)
            .output()
            .expect("debugfs");
        assert!(String::from_utf8_lossy(&stat.stdout).contains("Mode:  0755"));
    }

    #[test]
    fn a_disk_that_is_not_ext4_is_recognised_and_a_missing_agent_says_how_to_build_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("plain");
        std::fs::write(&disk, vec![0u8; 4096]).expect("write");
        assert!(!is_ext4(&disk).expect("read"));
        let error = inject_agent(&disk, &dir.path().join("missing")).expect_err("no agent");
        assert!(error.to_string().contains("scripts/build-agent.sh"));
    }
}
