//! Initramfs archives, gzip-compressed newc cpio, deterministic (the same
//! inputs give the same bytes). A VM boots with its kernel's archive (a
//! package import's modules, or a user's own initrd) followed by banger's:
//! the kernel unpacks concatenated archives in order, later entries
//! replacing earlier ones, so banger's `/init` is the one that runs.

use std::io::{self, Write};

use cpio::newc::{Builder, ModeFileType, trailer};
use flate2::write::GzEncoder;

/// The module files of a package import, one a line, in load order, where
/// the agent reads them (archive entries have no leading `/`).
fn module_list() -> &'static str {
    banger_agent::init::MODULE_LIST.trim_start_matches('/')
}

/// The modules PID 1 wants by name (found through a user initrd's
/// `modules.dep`); its presence tells the agent it is in stage 1.
fn stage1_marker() -> &'static str {
    banger_agent::init::STAGE1_MARKER.trim_start_matches('/')
}

/// What stage 1 needs whatever came before: the directories it mounts on
/// and switches from.
const DIRECTORIES: &[&str] = &[
    "dev",
    "etc",
    "etc/banger",
    "lib",
    "lib/modules",
    "newroot",
    "proc",
    "sys",
];

/// One archive being written.
struct Archive<W: Write> {
    gz: GzEncoder<W>,
    ino: u32,
}

impl<W: Write> Archive<W> {
    fn new(out: W) -> Self {
        Archive {
            gz: GzEncoder::new(out, flate2::Compression::default()),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, kind: ModeFileType) -> Builder {
        self.ino += 1;
        Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .nlink(1)
            .set_mode_file_type(kind)
    }

    fn directories(&mut self) -> io::Result<()> {
        for dir in DIRECTORIES {
            let entry = self.entry(dir, 0o755, ModeFileType::Directory).nlink(2);
            entry.write(&mut self.gz, 0).finish()?;
        }
        Ok(())
    }

    fn file(&mut self, name: &str, mode: u32, bytes: &[u8]) -> io::Result<()> {
        let size = u32::try_from(bytes.len())
            .map_err(|_| io::Error::other(format!("{name} is over 4 GiB")))?;
        let entry = self.entry(name, mode, ModeFileType::Regular);
        let mut writer = entry.write(&mut self.gz, size);
        writer.write_all(bytes)?;
        writer.finish().map(drop)
    }

    fn finish(mut self) -> io::Result<()> {
        trailer(&mut self.gz)?;
        self.gz.finish()?.flush()
    }
}

/// banger's archive: `agent` as `/init`, the console the kernel opens for
/// PID 1 before devtmpfs, and the stage-1 marker naming `wanted`.
pub fn write_agent(out: impl Write, agent: &[u8], wanted: &[&str]) -> io::Result<()> {
    let mut archive = Archive::new(out);
    archive.directories()?;
    let console = archive
        .entry("dev/console", 0o600, ModeFileType::Char)
        .rdev_major(5)
        .rdev_minor(1);
    console.write(&mut archive.gz, 0).finish()?;
    archive.file("init", 0o755, agent)?;
    let mut names = wanted.join("\n");
    names.push('\n');
    archive.file(stage1_marker(), 0o644, names.as_bytes())?;
    archive.finish()
}

/// A package import's archive: the modules `(name, .ko bytes)` and their
/// load order in the module list; no agent (that comes at boot).
pub fn write_modules(out: impl Write, modules: &[(String, Vec<u8>)]) -> io::Result<()> {
    let mut archive = Archive::new(out);
    archive.directories()?;
    let mut list = String::new();
    for (name, bytes) in modules {
        let file_name = format!("{name}.ko");
        archive.file(&format!("lib/modules/{file_name}"), 0o644, bytes)?;
        list.push_str(&file_name);
        list.push('\n');
    }
    archive.file(module_list(), 0o644, list.as_bytes())?;
    archive.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Every entry of concatenated archives, in order.
    fn entries(mut archives: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut found = Vec::new();
        while !archives.is_empty() {
            let mut gz = flate2::bufread::GzDecoder::new(archives);
            let mut bytes = Vec::new();
            gz.read_to_end(&mut bytes).expect("gunzip");
            archives = gz.into_inner();
            let mut rest = &bytes[..];
            loop {
                let mut reader = cpio::NewcReader::new(rest).expect("entry");
                if reader.entry().is_trailer() {
                    break;
                }
                let (name, mode) = (reader.entry().name().to_string(), reader.entry().mode());
                let mut content = Vec::new();
                reader.read_to_end(&mut content).expect("read");
                found.push((name, mode, content));
                rest = reader.finish().expect("next");
            }
        }
        found
    }

    #[test]
    fn the_modules_then_the_agent_make_one_tree_with_banger_init() {
        let modules = vec![
            ("virtio_ring".to_string(), b"ring".to_vec()),
            ("virtio_blk".to_string(), b"blk".to_vec()),
        ];
        let mut boot = Vec::new();
        write_modules(&mut boot, &modules).expect("modules");
        write_agent(&mut boot, b"agent", &["virtio_blk", "vsock"]).expect("agent");
        let found = entries(&boot);
        let get = |name: &str| found.iter().rfind(|(n, _, _)| n == name).expect(name);
        assert_eq!(get("init").2, b"agent");
        assert_eq!(get("init").1 & 0o777, 0o755);
        assert_eq!(get("lib/modules/virtio_blk.ko").2, b"blk");
        assert_eq!(get(module_list()).2, b"virtio_ring.ko\nvirtio_blk.ko\n");
        assert_eq!(get(stage1_marker()).2, b"virtio_blk\nvsock\n");
        assert_eq!(
            get("dev/console").1 & 0o170000,
            0o020000,
            "a character device"
        );
        let mut again = Vec::new();
        write_modules(&mut again, &modules).expect("modules");
        write_agent(&mut again, b"agent", &["virtio_blk", "vsock"]).expect("agent");
        assert_eq!(boot, again, "deterministic");
    }
}
