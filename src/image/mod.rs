//! Images: OCI image layouts and archives written straight into ext4.
//!
//! An import reads its source with the caller's authority
//! ([`source`]), copies each layer blob into `<state-dir>/blobs/sha256/`
//! (size-bounded, stored only once its digest matches), inflates each
//! layer once into a spool while parsing its tar headers ([`layer`]),
//! resolves the layers into one tree in memory ([`flatten`]), and writes
//! that tree into `<state-dir>/images/<config-hex>.ext4` ([`ext4`]). No
//! file of the image is ever created on the host, so no layer name can
//! reach outside the image. One ext4 per image digest (the config's
//! sha256): a second name for the same image shares it.

pub mod ext4;
pub mod flatten;
pub mod import;
pub mod layer;
pub mod source;

use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::store::Record;
pub use source::Format;

/// An image in the catalog (table `images`, v2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// `sha256:<hex>` of the image config: the image's identity.
    pub digest: String,
    #[serde(default)]
    pub manifest_digest: Option<String>,
    pub format: Format,
    /// The image's ext4, shared read-only by every name of the digest.
    pub disk: PathBuf,
    /// Its apparent size.
    pub disk_bytes: u64,
    /// Bottom first.
    pub layers: Vec<LayerRecord>,
    pub config: RunConfig,
    /// The image's own creation time, as its config states it.
    #[serde(default)]
    pub created: Option<String>,
    pub imported_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The stored blob's digest.
    pub digest: String,
    /// Its uncompressed digest, as the config lists it.
    pub diff_id: String,
    pub size: u64,
    pub media_type: String,
}

/// What the image's config says to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

impl RunConfig {
    /// What the agent runs: Entrypoint then Cmd, with the rest as given.
    pub fn main_request(&self) -> banger_agent::protocol::MainRequest {
        banger_agent::protocol::MainRequest {
            argv: self.entrypoint.iter().chain(&self.cmd).cloned().collect(),
            env: self.env.clone(),
            cwd: self.working_dir.clone(),
            user: self.user.clone(),
        }
    }
}

impl Record for ImageRecord {
    const TABLE: &'static str = "images";
    fn key(&self) -> String {
        self.name.clone()
    }
}

/// images v1 -> v2: v1 was created empty and no release wrote a record
/// into it, so any record found there is refused by name.
pub fn images_v2_from_v1(_: serde_json::Value) -> Result<serde_json::Value, String> {
    Err("images v1 held no records in any release; this one was not written by banger".into())
}

/// `<state-dir>/blobs/sha256/<hex>`.
pub fn blob_path(blobs: &std::path::Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| blobs.join("sha256").join(hex))
}

/// Image names: what users type, and what registries call images
/// (`busybox`, `debian:bookworm`, `library/alpine:3.20`).
pub fn validate_image_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'_' | b'-' | b':' | b'/')
        })
        && !name.starts_with("sha256:");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an image name: 1 to 128 of a-z, 0-9, '.', '_', '-', ':', '/', starting with a letter or digit, not a digest"
        ))
    }
}

/// Why no one image answers to a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lookup {
    #[error("no image named {0}; `banger image ls` lists them and `banger image import` adds one")]
    NotFound(String),
    #[error("{0} is the prefix of more than one image's digest; give more of it")]
    Ambiguous(String),
}

/// The image `wanted` names: by name, else by digest or a unique prefix of
/// one (at least 4 hex digits, with or without `sha256:`).
pub fn find<'a>(images: &'a [ImageRecord], wanted: &str) -> Result<&'a ImageRecord, Lookup> {
    if let Some(found) = images.iter().find(|i| i.name == wanted) {
        return Ok(found);
    }
    let hex = wanted.strip_prefix("sha256:").unwrap_or(wanted);
    let mut matching: Vec<&ImageRecord> = if hex.len() >= 4 {
        images
            .iter()
            .filter(|i| i.digest.trim_start_matches("sha256:").starts_with(hex))
            .collect()
    } else {
        Vec::new()
    };
    matching.sort_by(|a, b| a.digest.cmp(&b.digest));
    matching.dedup_by(|a, b| a.digest == b.digest);
    match matching[..] {
        [one] => Ok(one),
        [] => Err(Lookup::NotFound(wanted.to_string())),
        _ => Err(Lookup::Ambiguous(wanted.to_string())),
    }
}

/// What `image rm wanted` removes: a name removes that name, a digest (or
/// a unique prefix of one) every name of the image.
pub struct Removal {
    pub records: Vec<ImageRecord>,
    pub digest: String,
    /// No name of the image is left afterwards, so the VMs holding its
    /// digest would lose it.
    pub last: bool,
}

pub fn removal(images: &[ImageRecord], wanted: &str) -> Result<Removal, Lookup> {
    let found = find(images, wanted)?;
    let names = images.iter().filter(|i| i.digest == found.digest);
    let records: Vec<ImageRecord> = if found.name == wanted {
        vec![found.clone()]
    } else {
        names.clone().cloned().collect()
    };
    Ok(Removal {
        last: names.count() == records.len(),
        digest: found.digest.clone(),
        records,
    })
}

/// A range of a file read with positioned reads, so one descriptor serves
/// many readers (an archive's members, a spool's files).
pub struct Section<'a> {
    file: &'a std::fs::File,
    offset: u64,
    left: u64,
}

impl<'a> Section<'a> {
    pub fn new(file: &'a std::fs::File, offset: u64, len: u64) -> Section<'a> {
        Section {
            file,
            offset,
            left: len,
        }
    }
}

impl std::io::Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = std::os::unix::fs::FileExt::read_at(self.file, &mut buf[..want], self.offset)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file ended inside the range",
            ));
        }
        self.offset += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// The most the tar reader may take into memory for one entry's headers
/// (its GNU long name and link, its PAX records): it reads them whole.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Reads at most `left` bytes (`u64::MAX`: no bound), then fails.
pub(crate) struct Metered<'a, R> {
    pub inner: R,
    pub left: &'a std::cell::Cell<u64>,
}

impl<R: std::io::Read> std::io::Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left.get();
        if left == 0 {
            return Err(std::io::Error::other(format!(
                "an entry's headers hold more than {MAX_HEADER_BYTES} bytes"
            )));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if left != u64::MAX {
            self.left.set(left - n as u64);
        }
        Ok(n)
    }
}

/// Puts the bound on headers back when an entry is done with.
pub(crate) struct Rearm<'a>(pub &'a std::cell::Cell<u64>);

impl Drop for Rearm<'_> {
    fn drop(&mut self) {
        self.0.set(MAX_HEADER_BYTES);
    }
}

impl<R: std::io::Seek> std::io::Seek for Metered<'_, R> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_are_what_registries_call_images() {
        for good in ["busybox", "debian:bookworm", "library/alpine:3.20", "a"] {
            assert!(validate_image_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Busybox", "-x", "a b", "sha256:abc", &"a".repeat(129)] {
            assert!(validate_image_name(bad).is_err(), "{bad}");
        }
    }

    fn image(name: &str, digest: &str) -> ImageRecord {
        ImageRecord {
            name: name.to_string(),
            digest: format!("sha256:{digest}"),
            manifest_digest: None,
            format: Format::OciLayout,
            disk: PathBuf::from(format!("/s/images/{digest}.ext4")),
            disk_bytes: 1 << 20,
            layers: Vec::new(),
            config: RunConfig::default(),
            created: None,
            imported_at: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn rm_by_name_removes_the_name_and_by_digest_every_name_of_it() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let images = [image("web", &a), image("web:v1", &a), image("db", &b)];
        let names = |r: &Removal| r.records.iter().map(|i| i.name.clone()).collect::<Vec<_>>();

        let by_name = removal(&images, "web").expect("web");
        assert_eq!(names(&by_name), ["web"]);
        assert!(!by_name.last, "web:v1 still names the image");

        let by_digest = removal(&images, "aaaa").expect("prefix");
        assert_eq!(names(&by_digest), ["web", "web:v1"]);
        assert_eq!(by_digest.digest, format!("sha256:{a}"));
        assert!(by_digest.last);

        let only = removal(&images, "db").expect("db");
        assert_eq!(names(&only), ["db"]);
        assert!(only.last);
        assert_eq!(
            removal(&images, "cccc").err(),
            Some(Lookup::NotFound("cccc".to_string()))
        );
    }

    #[test]
    fn blob_paths_take_sha256_digests_only() {
        let hex = "a".repeat(64);
        let blobs = std::path::Path::new("/s/blobs");
        assert_eq!(
            blob_path(blobs, &format!("sha256:{hex}")),
            Some(blobs.join("sha256").join(&hex))
        );
        assert_eq!(blob_path(blobs, "sha256:../../etc"), None);
        assert_eq!(blob_path(blobs, &format!("sha512:{hex}")), None);
    }
}
