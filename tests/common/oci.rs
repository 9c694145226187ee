//! OCI image layouts built byte by byte: tar layers entry by entry (so a
//! test controls every whiteout, hardlink, device, xattr and malicious
//! name) and the blobs, manifest and index around them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

pub struct Spec<'a> {
    pub path: &'a [u8],
    pub kind: tar::EntryType,
    pub mode: u32,
    pub owner: (u64, u64),
    pub link: Option<&'a [u8]>,
    pub device: (u32, u32),
    pub xattrs: &'a [(&'a str, &'a [u8])],
    pub data: &'a [u8],
}

pub fn spec(path: &str, kind: tar::EntryType, mode: u32) -> Spec<'_> {
    Spec {
        path: path.as_bytes(),
        kind,
        mode,
        owner: (0, 0),
        link: None,
        device: (0, 0),
        xattrs: &[],
        data: &[],
    }
}

/// A PAX record: its length counts itself.
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

#[derive(Default)]
pub struct Layer(pub Vec<u8>);

impl Layer {
    pub fn add(&mut self, spec: Spec<'_>) -> &mut Layer {
        let mut pax = Vec::new();
        for (key, value) in spec.xattrs {
            pax.extend(pax_record(&format!("SCHILY.xattr.{key}"), value));
        }
        if spec.path.len() > 99 {
            pax.extend(pax_record("path", spec.path));
        }
        if !pax.is_empty() {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::XHeader);
            header.set_size(pax.len() as u64);
            header.set_cksum();
            self.append(&header, &pax);
        }
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(spec.kind);
        header.set_mode(spec.mode);
        header.set_uid(spec.owner.0);
        header.set_gid(spec.owner.1);
        header.set_mtime(1_700_000_000);
        header.set_size(spec.data.len() as u64);
        // Raw names: the malicious corpus needs `..` and absolute ones,
        // which tar's own setters refuse.
        let name = &mut header.as_old_mut().name;
        let shown = &spec.path[..spec.path.len().min(99)];
        name[..shown.len()].copy_from_slice(shown);
        if let Some(link) = spec.link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        }
        if matches!(spec.kind, tar::EntryType::Char | tar::EntryType::Block) {
            header.set_device_major(spec.device.0).expect("major");
            header.set_device_minor(spec.device.1).expect("minor");
        }
        header.set_cksum();
        self.append(&header, spec.data);
        self
    }

    pub fn append(&mut self, header: &tar::Header, data: &[u8]) {
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Layer {
        self.add(spec(path, tar::EntryType::Directory, mode))
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Layer {
        self.add(Spec {
            data,
            ..spec(path, tar::EntryType::Regular, mode)
        })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Layer {
        self.add(Spec {
            link: Some(target.as_bytes()),
            ..spec(path, tar::EntryType::Symlink, 0o777)
        })
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Layer {
        self.add(Spec {
            link: Some(target.as_bytes()),
            ..spec(path, tar::EntryType::Link, 0o644)
        })
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let mut tar = std::mem::take(&mut self.0);
        tar.resize(tar.len() + 1024, 0);
        tar
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Compression {
    Gzip,
    Zstd,
}

pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

pub fn put_blob(layout: &Path, bytes: &[u8]) -> serde_json::Value {
    let digest = digest(bytes);
    let hex = digest.trim_start_matches("sha256:");
    std::fs::write(layout.join("blobs/sha256").join(hex), bytes).expect("blob");
    serde_json::json!({ "digest": digest, "size": bytes.len() })
}

/// An OCI layout holding one image (`LAYOUT:test`), layers bottom first,
/// that runs `/bin/sh`.
pub fn layout(dir: &Path, name: &str, layers: &[Vec<u8>], compression: Compression) -> PathBuf {
    let run = serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/" });
    layout_running(dir, name, layers, compression, run)
}

/// As [`layout`], with `run` as the image config's `config` (Env, Cmd,
/// Entrypoint, WorkingDir, User).
pub fn layout_running(
    dir: &Path,
    name: &str,
    layers: &[Vec<u8>],
    compression: Compression,
    run: serde_json::Value,
) -> PathBuf {
    let layout = dir.join(name);
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("layout");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(digest(tar));
        let (blob, media_type) = match compression {
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).expect("gzip");
                (
                    gz.finish().expect("gzip"),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Compression::Zstd => (
                zstd::encode_all(&tar[..], 1).expect("zstd"),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let mut descriptor = put_blob(&layout, &blob);
        descriptor["mediaType"] = media_type.into();
        descriptors.push(descriptor);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let mut config = put_blob(&layout, config.to_string().as_bytes());
    config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": descriptors,
    });
    let mut manifest = put_blob(&layout, manifest.to_string().as_bytes());
    manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    manifest["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "test" });
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [manifest] });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index");
    layout
}

/// A layer of `bin/busybox` (this host's static busybox) and a symlink
/// per applet.
pub fn busybox_tree() -> Layer {
    let busybox_path = crate::common::run_ok("sh", &["-c", "command -v busybox"]);
    let busybox = std::fs::read(busybox_path.trim()).expect("busybox");
    let applets = crate::common::run_ok(busybox_path.trim(), &["--list"]);
    let mut tree = Layer::default();
    tree.dir("bin", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in applets.lines().filter(|a| *a != "busybox") {
        tree.symlink(&format!("bin/{applet}"), "busybox");
    }
    tree
}
