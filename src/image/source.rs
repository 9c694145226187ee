//! Where an import's image comes from, and what it holds: an OCI image
//! layout directory, an OCI archive (a tar of a layout) or a
//! docker-archive tarball (`docker save`). Each is read through a
//! [`Source`], which opens a name inside it: a directory's files through
//! the opener the caller's authority gave (never by path as the daemon),
//! an archive's members as ranges of the one file the caller opened,
//! indexed from its headers and read with positioned reads (nothing is
//! extracted). Index, manifest and config are small, size-bounded and
//! checked against their digests before they are parsed; a multi-arch
//! index resolves to linux/amd64. Blocking.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::layer::Limits;
use super::{MAX_HEADER_BYTES, Metered, Rearm, Section};
use crate::caller::{Fd, Watch};

/// Opens a name inside a directory (with the caller's authority).
pub type Opener = Box<dyn Fn(&str) -> io::Result<Fd> + Send + Sync>;

/// An image the caller named, every operation on it in view of a watch
/// (it may sit on a filesystem that stops answering).
pub struct Source {
    held: Held,
    /// As the caller named it.
    path: Arc<Path>,
    watch: Watch,
    limits: Limits,
}

enum Held {
    Dir(Opener),
    /// A tar file, and where each member's bytes lie in it.
    Archive {
        file: Fd,
        members: HashMap<String, (u64, u64)>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0} is missing from the image")]
    Missing(String),
    #[error("cannot read {name}")]
    Read {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{name} holds more than {cap} {setting}")]
    TooLarge {
        name: String,
        cap: u64,
        setting: &'static str,
    },
    #[error("{name} does not match its digest: expected {expected}, found {found}")]
    Digest {
        name: String,
        expected: String,
        found: String,
    },
    #[error("{name} is not valid: {reason}")]
    Invalid { name: String, reason: String },
    #[error(
        "the image is neither an OCI layout (oci-layout, index.json) nor a docker archive (manifest.json)"
    )]
    UnknownFormat,
    #[error("the index has no linux/amd64 image (it has {0})")]
    NoPlatform(String),
    #[error("the image uses {0}, which banger does not take (sha256 only)")]
    Algorithm(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    OciLayout,
    OciArchive,
    DockerArchive,
}

/// A layer blob as the image names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Its name inside the source.
    pub member: String,
    /// `sha256:<hex>` of the blob, when the image states it (OCI); a
    /// docker archive's are found by hashing.
    pub digest: Option<String>,
    pub size: Option<u64>,
    pub media_type: String,
}

/// What a source holds, its metadata checked.
#[derive(Debug)]
pub struct Resolved {
    pub format: Format,
    pub manifest_digest: Option<String>,
    /// `sha256:<hex>` of the config: the image's identity.
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfiguration,
    /// Bottom first, as the manifest lists them.
    pub layers: Vec<LayerBlob>,
    /// The name the image gives itself (a ref name annotation, a repo tag).
    pub ref_name: Option<String>,
}

impl Source {
    /// A layout directory at `path`, its files opened by `open`.
    pub fn dir(open: Opener, path: &Path, watch: Watch, limits: Limits) -> Source {
        Source {
            held: Held::Dir(open),
            path: Arc::from(path),
            watch,
            limits,
        }
    }

    /// The archive `file` at `path`: its members, from its headers alone
    /// (at most `image.max_entries` of them).
    pub fn archive(
        file: Fd,
        path: &Path,
        watch: Watch,
        limits: Limits,
    ) -> Result<Source, SourceError> {
        let read_err = |source| SourceError::Read {
            name: "the archive".into(),
            source,
        };
        let path: Arc<Path> = Arc::from(path);
        let mut members = HashMap::new();
        let (mut seen, mut name_bytes) = (0u64, 0u64);
        {
            let header_room = Cell::new(MAX_HEADER_BYTES);
            let reader = Metered {
                inner: watch.reader(path.clone(), io::BufReader::new(&*file)),
                left: &header_room,
            };
            let mut archive = tar::Archive::new(reader);
            for entry in archive.entries_with_seek().map_err(read_err)? {
                let entry = entry.map_err(|source| match header_room.get() {
                    0 => SourceError::TooLarge {
                        name: "one archive member's header".into(),
                        cap: MAX_HEADER_BYTES,
                        setting: "bytes (a fixed bound)",
                    },
                    _ => read_err(source),
                })?;
                let _rearm = Rearm(&header_room);
                seen += 1;
                if seen > limits.max_entries {
                    return Err(SourceError::TooLarge {
                        name: "the archive".into(),
                        cap: limits.max_entries,
                        setting: "members; image.max_entries",
                    });
                }
                if entry.header().entry_type().is_file() {
                    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                    // Their names are held: bounded as metadata is.
                    name_bytes += name.len() as u64;
                    if name_bytes > limits.max_metadata_bytes {
                        return Err(SourceError::TooLarge {
                            name: "the archive's member names".into(),
                            cap: limits.max_metadata_bytes,
                            setting: "bytes; image.max_metadata_kib",
                        });
                    }
                    let name = name.trim_start_matches("./").to_string();
                    members.insert(name, (entry.raw_file_position(), entry.size()));
                }
            }
        }
        Ok(Source {
            held: Held::Archive { file, members },
            path,
            watch,
            limits,
        })
    }

    /// What bounds the reads of this source.
    pub fn watch(&self) -> &Watch {
        &self.watch
    }

    /// `name`'s bytes and length.
    pub fn open(&self, name: &str) -> Result<(Box<dyn Read + Send + '_>, u64), SourceError> {
        match &self.held {
            Held::Dir(open) => {
                let named: Arc<Path> = Arc::from(self.path.join(name));
                let file =
                    self.watch.during(&named, || open(name)).map_err(|source| {
                        match source.kind() {
                            io::ErrorKind::NotFound => SourceError::Missing(name.to_string()),
                            _ => SourceError::Read {
                                name: name.to_string(),
                                source,
                            },
                        }
                    })?;
                let len = self
                    .watch
                    .during(&named, || file.metadata())
                    .map_err(|source| SourceError::Read {
                        name: name.to_string(),
                        source,
                    })?
                    .len();
                Ok((Box::new(self.watch.reader(named, file)), len))
            }
            Held::Archive { file, members } => {
                let &(offset, len) = members
                    .get(name)
                    .ok_or_else(|| SourceError::Missing(name.to_string()))?;
                let member = Section::new(file, offset, len);
                Ok((Box::new(self.watch.reader(self.path.clone(), member)), len))
            }
        }
    }

    fn exists(&self, name: &str) -> bool {
        match &self.held {
            // Only an absent file is absent: one that cannot be opened
            // (a link out of the layout, no permission) is reported by
            // the read that follows, with its reason.
            Held::Dir(dir) => {
                let named: Arc<Path> = Arc::from(self.path.join(name));
                !matches!(self.watch.during(&named, || dir(name)), Err(e) if e.kind() == io::ErrorKind::NotFound)
            }
            Held::Archive { members, .. } => members.contains_key(name),
        }
    }

    /// A small file, whole.
    fn read_small(&self, name: &str) -> Result<Vec<u8>, SourceError> {
        let (reader, _) = self.open(name)?;
        let mut bytes = Vec::new();
        let cap = self.limits.max_metadata_bytes;
        reader
            .take(cap + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| SourceError::Read {
                name: name.to_string(),
                source,
            })?;
        if bytes.len() as u64 > cap {
            return Err(SourceError::TooLarge {
                name: name.to_string(),
                cap,
                setting: "bytes; image.max_metadata_kib",
            });
        }
        Ok(bytes)
    }

    /// A small blob of a layout, checked against its descriptor.
    fn read_blob(&self, descriptor: &Descriptor) -> Result<(String, Vec<u8>), SourceError> {
        let (digest, member) = blob_member(descriptor)?;
        let bytes = self.read_small(&member)?;
        let found = sha256(&bytes);
        if found != digest {
            return Err(SourceError::Digest {
                name: member,
                expected: digest,
                found,
            });
        }
        Ok((digest, bytes))
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A descriptor's digest and its path in a layout.
fn blob_member(descriptor: &Descriptor) -> Result<(String, String), SourceError> {
    let digest = descriptor.digest();
    if digest.algorithm().as_ref() != "sha256" {
        return Err(SourceError::Algorithm(digest.algorithm().to_string()));
    }
    let hex = digest.digest();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SourceError::Invalid {
            name: digest.to_string(),
            reason: "not a sha256 digest".into(),
        });
    }
    Ok((format!("sha256:{hex}"), format!("blobs/sha256/{hex}")))
}

/// What the source holds. `archive` says whether a layout came as a tar.
pub fn resolve(source: &Source, archive: bool) -> Result<Resolved, SourceError> {
    if source.exists("index.json") {
        resolve_layout(source, archive)
    } else if source.exists("manifest.json") {
        resolve_docker(source)
    } else {
        Err(SourceError::UnknownFormat)
    }
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn invalid(name: &str) -> impl Fn(oci_spec::OciSpecError) -> SourceError + '_ {
    move |e| SourceError::Invalid {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

fn resolve_layout(source: &Source, archive: bool) -> Result<Resolved, SourceError> {
    let index = source.read_small("index.json")?;
    let mut index = ImageIndex::from_reader(&index[..]).map_err(invalid("index.json"))?;
    let mut ref_name = None;
    // Nested indexes, as registries and `skopeo` write them, a few deep.
    for _ in 0..4 {
        let chosen = choose_manifest(index.manifests())?.clone();
        if let Some(name) = chosen.annotations().as_ref().and_then(|a| a.get(REF_NAME)) {
            ref_name.get_or_insert(name.clone());
        }
        let (digest, bytes) = source.read_blob(&chosen)?;
        let media = chosen.media_type().to_string();
        if media.contains("index") || media.contains("manifest.list") {
            index = ImageIndex::from_reader(&bytes[..]).map_err(invalid(&digest))?;
            continue;
        }
        let manifest = ImageManifest::from_reader(&bytes[..]).map_err(invalid(&digest))?;
        let (config_digest, config_bytes) = source.read_blob(manifest.config())?;
        let config =
            ImageConfiguration::from_reader(&config_bytes[..]).map_err(invalid(&config_digest))?;
        let layers = manifest
            .layers()
            .iter()
            .map(|layer| {
                let (digest, member) = blob_member(layer)?;
                Ok(LayerBlob {
                    member,
                    digest: Some(digest),
                    size: Some(layer.size()),
                    media_type: layer.media_type().to_string(),
                })
            })
            .collect::<Result<Vec<_>, SourceError>>()?;
        return checked(
            source.limits.max_layers,
            Resolved {
                format: if archive {
                    Format::OciArchive
                } else {
                    Format::OciLayout
                },
                manifest_digest: Some(digest),
                config_digest,
                config_bytes,
                config,
                layers,
                ref_name,
            },
        );
    }
    Err(SourceError::Invalid {
        name: "index.json".into(),
        reason: "indexes nest more than 4 deep".into(),
    })
}

/// The index's linux/amd64 manifest, or its only one when none says.
fn choose_manifest(manifests: &[Descriptor]) -> Result<&Descriptor, SourceError> {
    let amd64 = manifests.iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
    });
    if let Some(found) = amd64 {
        return Ok(found);
    }
    match manifests {
        [only] if only.platform().is_none() => Ok(only),
        _ => Err(SourceError::NoPlatform(
            manifests
                .iter()
                .map(|m| match m.platform() {
                    Some(p) => format!("{}/{}", p.os(), p.architecture()),
                    None => "one without a platform".into(),
                })
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn resolve_docker(source: &Source) -> Result<Resolved, SourceError> {
    let bytes = source.read_small("manifest.json")?;
    let manifests: Vec<DockerManifest> =
        serde_json::from_slice(&bytes).map_err(|e| SourceError::Invalid {
            name: "manifest.json".into(),
            reason: e.to_string(),
        })?;
    let manifest = match &manifests[..] {
        [one] => one,
        [] => return Err(SourceError::Missing("an image in manifest.json".into())),
        _ => {
            return Err(SourceError::Invalid {
                name: "manifest.json".into(),
                reason: format!(
                    "it holds {} images; banger imports archives of one",
                    manifests.len()
                ),
            });
        }
    };
    let config_bytes = source.read_small(&manifest.config)?;
    let config_digest = sha256(&config_bytes);
    let config =
        ImageConfiguration::from_reader(&config_bytes[..]).map_err(invalid(&manifest.config))?;
    let layers = manifest
        .layers
        .iter()
        .map(|member| LayerBlob {
            member: member.clone(),
            digest: None,
            size: None,
            media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
        })
        .collect();
    checked(
        source.limits.max_layers,
        Resolved {
            format: Format::DockerArchive,
            manifest_digest: None,
            config_digest,
            config_bytes,
            config,
            layers,
            ref_name: manifest
                .repo_tags
                .as_ref()
                .and_then(|tags| tags.first().cloned()),
        },
    )
}

/// One diff_id per layer: each layer's uncompressed digest is held
/// against it; at most `max_layers` of them.
fn checked(max_layers: usize, resolved: Resolved) -> Result<Resolved, SourceError> {
    if resolved.layers.len() > max_layers {
        return Err(SourceError::TooLarge {
            name: "the image".into(),
            cap: max_layers as u64,
            setting: "layers; image.max_layers",
        });
    }
    let diff_ids = resolved.config.rootfs().diff_ids().len();
    if diff_ids != resolved.layers.len() {
        return Err(SourceError::Invalid {
            name: resolved.config_digest,
            reason: format!(
                "it names {diff_ids} diff_ids for {} layers",
                resolved.layers.len()
            ),
        });
    }
    for layer in &resolved.layers {
        if !layer.media_type.contains("tar") {
            return Err(SourceError::Invalid {
                name: layer.member.clone(),
                reason: format!("its media type {} is not a layer", layer.media_type),
            });
        }
    }
    Ok(resolved)
}
