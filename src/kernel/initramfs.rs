//! The initramfs: a gzip-compressed newc cpio whose `/init` is
//! banger-agent, with the modules a VM needs and their load order in
//! `/etc/banger/initramfs` (the agent's stage-1 marker). Deterministic:
//! the same inputs give the same bytes.

use std::io::{self, Write};

use cpio::newc::{Builder, ModeFileType, trailer};

/// The file the agent reads in stage 1: module files, one per line, in
/// load order.
pub const MODULE_LIST: &str = "etc/banger/initramfs";

const DIRECTORIES: &[&str] = &[
    "dev",
    "etc",
    "etc/banger",
    "lib",
    "lib/modules",
    "newroot",
    "proc",
    "run",
    "sbin",
    "sys",
    "tmp",
];

/// Writes the initramfs for `agent` and the modules `(name, .ko bytes)`,
/// in load order.
pub fn write(out: impl Write, agent: &[u8], modules: &[(String, Vec<u8>)]) -> io::Result<()> {
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut ino = 1u32;
    let mut entry = |name: &str, mode: u32, kind: ModeFileType| {
        ino += 1;
        Builder::new(name)
            .ino(ino)
            .mode(mode)
            .nlink(1)
            .set_mode_file_type(kind)
    };
    for dir in DIRECTORIES {
        entry(dir, 0o755, ModeFileType::Directory)
            .nlink(2)
            .write(&mut gz, 0)
            .finish()?;
    }
    // The kernel opens /dev/console for PID 1's stdio before devtmpfs.
    entry("dev/console", 0o600, ModeFileType::Char)
        .rdev_major(5)
        .rdev_minor(1)
        .write(&mut gz, 0)
        .finish()?;
    let mut file = |name: &str, mode: u32, bytes: &[u8]| -> io::Result<()> {
        let size = u32::try_from(bytes.len())
            .map_err(|_| io::Error::other(format!("{name} is over 4 GiB")))?;
        let mut writer = entry(name, mode, ModeFileType::Regular).write(&mut gz, size);
        writer.write_all(bytes)?;
        writer.finish().map(drop)
    };
    file("init", 0o755, agent)?;
    let mut list = String::new();
    for (name, bytes) in modules {
        let file_name = format!("{name}.ko");
        file(&format!("lib/modules/{file_name}"), 0o644, bytes)?;
        list.push_str(&file_name);
        list.push('\n');
    }
    file(MODULE_LIST, 0o644, list.as_bytes())?;
    trailer(&mut gz)?;
    gz.finish()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn entries(archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(archive)
            .read_to_end(&mut bytes)
            .expect("gunzip");
        let mut rest = &bytes[..];
        let mut found = Vec::new();
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
        found
    }

    #[test]
    fn the_archive_holds_init_the_modules_in_order_and_a_console() {
        let modules = vec![
            ("virtio_ring".to_string(), b"ring".to_vec()),
            ("virtio_blk".to_string(), b"blk".to_vec()),
        ];
        let mut archive = Vec::new();
        write(&mut archive, b"agent", &modules).expect("write");
        let found = entries(&archive);
        let get = |name: &str| found.iter().find(|(n, _, _)| n == name).expect(name);
        assert_eq!(get("init").2, b"agent");
        assert_eq!(get("init").1 & 0o777, 0o755);
        assert_eq!(get("lib/modules/virtio_blk.ko").2, b"blk");
        assert_eq!(get(MODULE_LIST).2, b"virtio_ring.ko\nvirtio_blk.ko\n");
        assert_eq!(
            get("dev/console").1 & 0o170000,
            0o020000,
            "a character device"
        );
        let mut again = Vec::new();
        write(&mut again, b"agent", &modules).expect("write");
        assert_eq!(archive, again, "deterministic");
    }
}
