//! One layer blob into flatten's entries: gzip, zstd or plain (told by
//! their magic bytes), parsed as tar headers with the `tar` crate (never
//! its `unpack`: nothing is created from a layer's names). Each regular
//! file's bytes go to the layer's spool, an unnamed file of the daemon's,
//! so a layer is inflated once; the ext4 writer reads them back from
//! there. The uncompressed stream is hashed on the way, so it can be held
//! against the config's diff_id. Bounds (entries, bytes, name length) are
//! checked before anything of an entry is read, and shared by all layers
//! of one import.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::flatten::{DataRef, Entry, EntryKind, Layer, Meta};

/// The bounds of one import, configurable (`image.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_entries: u64,
    pub max_unpacked_bytes: u64,
    pub max_path_bytes: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_entries: 1_000_000,
        max_unpacked_bytes: 64 << 30,
        max_path_bytes: 4096,
    };
}

/// What all layers of one import have used of its [`Limits`], and whether
/// it was cancelled.
#[derive(Debug, Default)]
pub struct Budget {
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    /// Compressed bytes read, for progress.
    pub read: AtomicU64,
    pub cancelled: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer}: cannot read it")]
    Read {
        layer: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: cannot write its spool")]
    Spool {
        layer: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}, entry {entry:?}: {reason}")]
    Entry {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error(
        "layer {layer}: the image holds more than {cap} {what}, the most allowed ({setting}); nothing was kept"
    )]
    TooLarge {
        layer: String,
        what: &'static str,
        cap: u64,
        setting: &'static str,
    },
    #[error("the import was cancelled")]
    Cancelled,
}

/// A layer read: its entries, the spool holding its files' bytes, and the
/// sha256 of its uncompressed stream (`sha256:<hex>`).
pub struct ReadLayer {
    pub layer: Layer,
    pub spool: File,
    pub diff_id: String,
}

const GZIP: [u8; 2] = [0x1f, 0x8b];
const ZSTD: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Reads the layer `name` (index `index` in the import's list) from
/// `blob` into entries and `spool`.
pub fn read_layer(
    name: &str,
    index: usize,
    blob: impl Read,
    spool: File,
    limits: Limits,
    budget: &Budget,
) -> Result<ReadLayer, LayerError> {
    let read_err = |source| LayerError::Read {
        layer: name.to_string(),
        source,
    };
    let mut blob = BufReader::with_capacity(
        1 << 20,
        Counted {
            inner: blob,
            budget,
        },
    );
    let magic = io::BufRead::fill_buf(&mut blob).map_err(read_err)?;
    let plain: Box<dyn Read + '_> = if magic.starts_with(&GZIP) {
        Box::new(flate2::bufread::MultiGzDecoder::new(blob))
    } else if magic.starts_with(&ZSTD) {
        Box::new(zstd::stream::read::Decoder::with_buffer(blob).map_err(read_err)?)
    } else {
        Box::new(blob)
    };
    let mut hashed = Hashed {
        inner: plain,
        hash: Sha256::new(),
    };
    let mut spool = BufWriter::with_capacity(1 << 20, spool);
    let mut spooled = 0u64;
    let mut entries = Vec::new();
    let mut archive = tar::Archive::new(&mut hashed);
    for entry in archive.entries().map_err(read_err)? {
        if budget.cancelled.load(Ordering::Relaxed) {
            return Err(LayerError::Cancelled);
        }
        let mut entry = entry.map_err(read_err)?;
        if budget.entries.fetch_add(1, Ordering::Relaxed) >= limits.max_entries {
            return Err(LayerError::TooLarge {
                layer: name.to_string(),
                what: "entries",
                cap: limits.max_entries,
                setting: "image.max_entries",
            });
        }
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let refuse = |reason: String| LayerError::Entry {
            layer: name.to_string(),
            entry: shown.clone(),
            reason,
        };
        if raw_path.len() > limits.max_path_bytes {
            return Err(refuse(format!(
                "its name is longer than {} bytes (image.max_path_bytes)",
                limits.max_path_bytes
            )));
        }
        let path = String::from_utf8(raw_path).map_err(|_| {
            refuse("its name is not UTF-8, which banger's ext4 writer needs".into())
        })?;
        let meta = entry_meta(&mut entry).map_err(&refuse)?;
        let kind = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                let used = budget.bytes.fetch_add(size, Ordering::Relaxed) + size;
                if used > limits.max_unpacked_bytes {
                    return Err(LayerError::TooLarge {
                        layer: name.to_string(),
                        what: "bytes of files",
                        cap: limits.max_unpacked_bytes,
                        setting: "image.max_unpacked_mib",
                    });
                }
                let copied = io::copy(&mut entry, &mut spool).map_err(|source| {
                    // Either end may fail; the layer's read names both.
                    LayerError::Spool {
                        layer: name.to_string(),
                        source,
                    }
                })?;
                if copied != size {
                    return Err(refuse(format!("it holds {copied} bytes, not {size}")));
                }
                let data = DataRef {
                    layer: index,
                    offset: spooled,
                };
                spooled += size;
                EntryKind::File { size, data }
            }
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink(link_of(&entry).map_err(&refuse)?),
            tar::EntryType::Link => EntryKind::Hardlink(link_of(&entry).map_err(&refuse)?),
            tar::EntryType::Char => {
                let (major, minor) = device_of(entry.header());
                EntryKind::Char { major, minor }
            }
            tar::EntryType::Block => {
                let (major, minor) = device_of(entry.header());
                EntryKind::Block { major, minor }
            }
            tar::EntryType::Fifo => EntryKind::Fifo,
            // Global PAX headers carry nothing banger keeps.
            tar::EntryType::XGlobalHeader => continue,
            other => return Err(refuse(format!("its type {other:?} is not supported"))),
        };
        entries.push(Entry { path, kind, meta });
    }
    // Whatever follows the archive's end belongs to its digest too.
    io::copy(&mut hashed, &mut io::sink()).map_err(read_err)?;
    let spool = spool
        .into_inner()
        .map_err(|e| LayerError::Spool {
            layer: name.to_string(),
            source: e.into_error(),
        })
        .and_then(|mut f| {
            f.flush().map_err(|source| LayerError::Spool {
                layer: name.to_string(),
                source,
            })?;
            Ok(f)
        })?;
    Ok(ReadLayer {
        layer: Layer {
            name: name.to_string(),
            entries,
        },
        spool,
        diff_id: format!("sha256:{:x}", hashed.hash.finalize()),
    })
}

fn link_of<R: Read>(entry: &tar::Entry<R>) -> Result<String, String> {
    let target = entry.link_name_bytes().ok_or("it names no link target")?;
    String::from_utf8(target.into_owned()).map_err(|_| "its link target is not UTF-8".into())
}

fn device_of(header: &tar::Header) -> (u32, u32) {
    let major = header.device_major().ok().flatten().unwrap_or(0);
    let minor = header.device_minor().ok().flatten().unwrap_or(0);
    (major, minor)
}

/// Mode, owner, mtime and xattrs, PAX records overriding the header's.
fn entry_meta<R: Read>(entry: &mut tar::Entry<R>) -> Result<Meta, String> {
    let header = entry.header();
    let mut meta = Meta {
        mode: (header.mode().map_err(|e| e.to_string())? & 0o7777) as u16,
        uid: header.uid().map_err(|e| e.to_string())? as u32,
        gid: header.gid().map_err(|e| e.to_string())? as u32,
        mtime: (header.mtime().map_err(|e| e.to_string())? as i64, 0),
        xattrs: Vec::new(),
    };
    if let Some(extensions) = entry.pax_extensions().map_err(|e| e.to_string())? {
        for extension in extensions {
            let extension = extension.map_err(|e| e.to_string())?;
            let key = extension.key().map_err(|_| "a PAX key is not UTF-8")?;
            let number = || {
                extension
                    .value()
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
                    .ok_or(format!("its PAX {key} is not a number"))
            };
            match key {
                "uid" => meta.uid = number()?,
                "gid" => meta.gid = number()?,
                "mtime" => {
                    if let Some(mtime) = extension.value().ok().and_then(pax_time) {
                        meta.mtime = mtime;
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        meta.xattrs
                            .push((name.to_string(), extension.value_bytes().to_vec()));
                    }
                }
            }
        }
    }
    Ok(meta)
}

/// A PAX time, `seconds[.fraction]`.
fn pax_time(value: &str) -> Option<(i64, u32)> {
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    Some((secs, nanos))
}

/// Counts the compressed bytes read, for progress.
struct Counted<'a, R> {
    inner: R,
    budget: &'a Budget,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct Hashed<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().expect("tar")
    }

    fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o4755);
        h.set_uid(7);
        h.set_gid(8);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).expect("append");
    }

    fn read(bytes: &[u8], limits: Limits) -> Result<(ReadLayer, Vec<u8>), LayerError> {
        let spool = tempfile::tempfile().expect("spool");
        let budget = Budget::default();
        let mut read = read_layer("sha256:l", 0, bytes, spool, limits, &budget)?;
        let mut data = Vec::new();
        read.spool.rewind().expect("rewind");
        read.spool.read_to_end(&mut data).expect("read spool");
        Ok((read, data))
    }

    #[test]
    fn gzip_zstd_and_plain_layers_give_the_same_entries_and_diff_id() {
        let plain = tar_of(|b| {
            add_file(b, "bin/sh", b"#!");
            add_file(b, "etc/motd", b"hello");
        });
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let zst = zstd::encode_all(&plain[..], 1).expect("zstd");
        let (a, data) = read(&plain, Limits::DEFAULT).expect("plain");
        for other in [gz, zst] {
            let (b, other_data) = read(&other, Limits::DEFAULT).expect("compressed");
            assert_eq!(a.layer.entries, b.layer.entries);
            assert_eq!(a.diff_id, b.diff_id);
            assert_eq!(data, other_data);
        }
        assert_eq!(data, b"#!hello");
        assert_eq!(
            a.diff_id,
            format!("sha256:{:x}", Sha256::digest(&plain)),
            "the digest of the uncompressed stream"
        );
        let motd = &a.layer.entries[1];
        assert_eq!(motd.meta.mode, 0o4755);
        assert_eq!((motd.meta.uid, motd.meta.gid), (7, 8));
        assert_eq!(
            motd.kind,
            EntryKind::File {
                size: 5,
                data: DataRef {
                    layer: 0,
                    offset: 2
                }
            }
        );
    }

    #[test]
    fn pax_owners_times_and_xattrs_are_kept() {
        let plain = tar_of(|b| {
            b.append_pax_extensions([
                ("uid", &b"100000"[..]),
                ("mtime", b"1700000000.25"),
                ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
            ])
            .expect("pax");
            add_file(b, "bin/ping", b"x");
        });
        let (read, _) = read(&plain, Limits::DEFAULT).expect("read");
        let meta = &read.layer.entries[0].meta;
        assert_eq!(meta.uid, 100_000);
        assert_eq!(meta.mtime, (1_700_000_000, 250_000_000));
        assert_eq!(
            meta.xattrs,
            vec![(
                "security.capability".to_string(),
                b"\x01\x00\x00\x02".to_vec()
            )]
        );
    }

    #[test]
    fn bounds_refuse_before_reading_data() {
        let plain = tar_of(|b| {
            add_file(b, "a", b"12345");
            add_file(b, "b", b"12345");
        });
        let few = Limits {
            max_entries: 1,
            ..Limits::DEFAULT
        };
        let refused = read(&plain, few).err().expect("entries");
        assert!(
            refused.to_string().contains("image.max_entries"),
            "{refused}"
        );
        let small = Limits {
            max_unpacked_bytes: 8,
            ..Limits::DEFAULT
        };
        let refused = read(&plain, small).err().expect("bytes");
        assert!(
            refused.to_string().contains("image.max_unpacked_mib"),
            "{refused}"
        );
        let short = Limits {
            max_path_bytes: 0,
            ..Limits::DEFAULT
        };
        let refused = read(&plain, short).err().expect("path");
        assert!(
            refused.to_string().contains("image.max_path_bytes"),
            "{refused}"
        );
    }
}
