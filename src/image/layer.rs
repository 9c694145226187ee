//! One layer blob into flatten's entries: gzip, zstd or plain (told by
//! their magic bytes), parsed as tar headers with the `tar` crate (never
//! its `unpack`: nothing is created from a layer's names). Each regular
//! file's bytes go to the layer's spool, an unnamed file of the daemon's,
//! so a layer is inflated once; the ext4 writer reads them back from
//! there. The uncompressed stream is hashed on the way, so it can be held
//! against the config's diff_id. Bounds (entries, bytes, name length) are
//! checked before anything of an entry is read, and shared by all layers
//! of one import.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::flatten::{DataRef, Entry, EntryKind, Layer, Meta};
use super::{MAX_HEADER_BYTES, Metered, Rearm};

/// The bounds of one import, configurable (`image.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_entries: u64,
    pub max_unpacked_bytes: u64,
    pub max_path_bytes: usize,
    /// Nodes the flatten makes or walks (`flatten::Bounds`).
    pub max_nodes: u64,
    /// Bytes the entries, the flatten and the ext4 build hold, by
    /// estimate.
    pub max_memory_bytes: u64,
    /// The most an index, manifest or config may hold, and an archive's
    /// members (`image.max_metadata_kib`; members by `max_entries`).
    pub max_metadata_bytes: u64,
    /// Layers of one image.
    pub max_layers: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_entries: 1_000_000,
        max_unpacked_bytes: 64 << 30,
        max_path_bytes: 4096,
        max_nodes: 1_000_000,
        max_memory_bytes: 2 << 30,
        max_metadata_bytes: 4 << 20,
        max_layers: 256,
    };
}

/// The longest symlink or hardlink target, as Linux's (PATH_MAX less
/// its terminator).
pub const MAX_LINK_TARGET: usize = 4095;

/// The most extended attributes one entry may carry.
pub const MAX_XATTRS: usize = 64;

/// What an entry holds beyond its path and link target, by estimate.
const ENTRY_BYTES: u64 = 2 * std::mem::size_of::<Entry>() as u64 + 64;

/// What all layers of one import have used of its [`Limits`], and whether
/// it was cancelled.
#[derive(Debug, Default)]
pub struct Budget {
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    /// Bytes the entries read so far hold, by estimate.
    pub memory: AtomicU64,
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

/// The largest zstd window a layer may use: 16 MiB.
const ZSTD_WINDOW_LOG: u32 = 24;

/// What reading one layer holds besides its entries: its buffers (the
/// blob's, the spool's, a PAX record's) and a zstd window.
pub const LAYER_READ_BYTES: u64 = (3 << 20) + (1 << ZSTD_WINDOW_LOG);

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
        let mut decoder = zstd::stream::read::Decoder::with_buffer(blob).map_err(read_err)?;
        // A frame may ask for a window of up to 128 MiB; layers need far
        // less (zstd's default levels use at most 8 MiB).
        decoder.window_log_max(ZSTD_WINDOW_LOG).map_err(read_err)?;
        Box::new(decoder)
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
    let header_room = Cell::new(MAX_HEADER_BYTES);
    let mut archive = tar::Archive::new(Metered {
        inner: &mut hashed,
        left: &header_room,
    });
    for entry in archive.entries().map_err(read_err)? {
        if budget.cancelled.load(Ordering::Relaxed) {
            return Err(LayerError::Cancelled);
        }
        let mut entry = entry.map_err(|source| match header_room.get() {
            0 => LayerError::TooLarge {
                layer: name.to_string(),
                what: "bytes of headers for one entry",
                cap: MAX_HEADER_BYTES,
                setting: "a fixed bound",
            },
            _ => read_err(source),
        })?;
        // Headers, PAX records included, are read within the bound; a
        // file's data is bounded by the other limits and read with it
        // lifted. It holds again from the end of this entry to the next.
        let _rearm = Rearm(&header_room);
        // Global PAX headers carry nothing banger keeps; their data is
        // skipped within the bound.
        if entry.header().entry_type() == tar::EntryType::XGlobalHeader {
            continue;
        }
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
                header_room.set(u64::MAX);
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
            other => return Err(refuse(format!("its type {other:?} is not supported"))),
        };
        // Data a non-file entry carries is counted and skipped.
        if !matches!(kind, EntryKind::File { .. }) && entry.size() > 0 {
            let size = entry.size();
            if budget.bytes.fetch_add(size, Ordering::Relaxed) + size > limits.max_unpacked_bytes {
                return Err(LayerError::TooLarge {
                    layer: name.to_string(),
                    what: "bytes of files",
                    cap: limits.max_unpacked_bytes,
                    setting: "image.max_unpacked_mib",
                });
            }
            header_room.set(u64::MAX);
            io::copy(&mut entry, &mut io::sink()).map_err(read_err)?;
        }
        let held = ENTRY_BYTES
            + path.len() as u64
            + match &kind {
                EntryKind::Symlink(target) | EntryKind::Hardlink(target) => target.len() as u64,
                _ => 0,
            }
            + super::flatten::xattr_bytes(&meta);
        if budget.memory.fetch_add(held, Ordering::Relaxed) + held > limits.max_memory_bytes {
            return Err(LayerError::TooLarge {
                layer: name.to_string(),
                what: "bytes of memory to hold its entries",
                cap: limits.max_memory_bytes,
                setting: "image.max_memory_mib",
            });
        }
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
    if target.len() > MAX_LINK_TARGET {
        return Err(format!(
            "its link target is {} bytes long, more than the {MAX_LINK_TARGET} Linux allows",
            target.len()
        ));
    }
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
        mtime: (
            i64::try_from(header.mtime().map_err(|e| e.to_string())?).unwrap_or(i64::MAX),
            0,
        ),
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
                        if meta.xattrs.len() == MAX_XATTRS {
                            return Err(format!(
                                "it has more than {MAX_XATTRS} extended attributes"
                            ));
                        }
                        meta.xattrs
                            .push((name.to_string(), extension.value_bytes().to_vec()));
                    }
                }
            }
        }
    }
    // ext4 holds 1901 to 2446 (34 bits of seconds from 1970 less 2^31).
    meta.mtime.0 = meta.mtime.0.clamp(EXT4_TIME.0, EXT4_TIME.1);
    meta.mtime.1 = meta.mtime.1.min(999_999_999);
    Ok(meta)
}

/// The seconds an ext4 inode's time can hold.
const EXT4_TIME: (i64, i64) = (-(1 << 31), (1 << 34) - (1 << 31) - 1);

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
        let tight = Limits {
            max_memory_bytes: ENTRY_BYTES,
            ..Limits::DEFAULT
        };
        let refused = read(&plain, tight).err().expect("memory");
        assert!(
            refused.to_string().contains("image.max_memory_mib"),
            "{refused}"
        );
    }

    #[test]
    fn an_entry_s_headers_are_bounded_before_they_are_read_whole() {
        let long = tar_of(|b| {
            let mut header = tar::Header::new_gnu();
            header.set_size(0);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // A GNU long name of 2 MiB: the tar reader would hold it all.
            b.append_data(&mut header, "x/".repeat(1 << 20), &b""[..])
                .expect("append");
        });
        let refused = read(&long, Limits::DEFAULT).err().expect("too long");
        assert!(
            refused.to_string().contains("bytes of headers"),
            "{refused}"
        );
    }

    #[test]
    fn a_link_target_longer_than_linux_allows_is_refused_at_its_header() {
        let long = tar_of(|b| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            b.append_link(&mut header, "s", "a/".repeat(2_048))
                .expect("append");
        });
        let refused = read(&long, Limits::DEFAULT).err().expect("too long");
        assert!(refused.to_string().contains("4095"), "{refused}");
    }
}
