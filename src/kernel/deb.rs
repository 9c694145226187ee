//! A Debian kernel package (`linux-image-*.deb`): an ar archive whose
//! `data.tar.*` holds `boot/vmlinuz-<version>` and `lib/modules/<version>/`.
//! Read in one pass. Which modules a VM needs is known only once every
//! module's dependencies are (a dependency may come first in the archive),
//! so each `.ko` is set aside in a spool file the caller gives, not kept in
//! memory: about 100 MB for a Debian cloud kernel, of which a VM needs 1.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path};

use super::modules::{self, Module};
use super::{Capped, KernelError, UnpackLimit};

/// What a kernel package holds that a VM needs.
pub struct KernelPackage<S> {
    /// `uname -r` of the kernel, from `boot/vmlinuz-<version>`.
    pub version: String,
    pub bzimage: Vec<u8>,
    /// Every module in the package, by name.
    pub modules: HashMap<String, Module>,
    /// Names of the modules built into the kernel.
    pub builtin: HashSet<String>,
    spool: S,
    spooled: HashMap<String, Spooled>,
}

/// Where a module's uncompressed `.ko` lies in the spool.
#[derive(Clone, Copy)]
struct Spooled {
    at: u64,
    len: usize,
}

impl<S: Read + Seek> KernelPackage<S> {
    /// A module's uncompressed `.ko`.
    pub fn ko(&mut self, name: &str) -> Result<Vec<u8>, KernelError> {
        let Some(Spooled { at, len }) = self.spooled.get(name).copied() else {
            return Err(KernelError::Module {
                module: name.to_string(),
                reason: "not in the package".into(),
            });
        };
        let mut ko = vec![0; len];
        self.spool
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.spool.read_exact(&mut ko))
            .map_err(KernelError::Spool)?;
        Ok(ko)
    }
}

fn not_a_package(reason: impl Into<String>) -> KernelError {
    KernelError::NotAPackage(reason.into())
}

/// Reads a kernel package, setting its modules aside in `spool`.
/// Every decompressed stream is capped by `limit`.
pub fn read<S: Write>(
    deb: impl Read,
    spool: S,
    limit: UnpackLimit,
) -> Result<KernelPackage<S>, KernelError> {
    let mut archive = ar::Archive::new(deb);
    while let Some(member) = archive.next_entry() {
        let member = member.map_err(|e| not_a_package(format!("not a .deb (ar) archive: {e}")))?;
        let name = String::from_utf8_lossy(member.header().identifier()).into_owned();
        let data: Box<dyn Read + '_> = match name.as_str() {
            "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(member)),
            "data.tar.zst" => Box::new(zstd::stream::read::Decoder::new(member)?),
            "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(member)),
            "data.tar" => Box::new(member),
            _ => continue,
        };
        return read_data(Capped::new(data, limit), spool, limit);
    }
    Err(not_a_package("no data.tar member; not a .deb archive"))
}

/// A tar path, relative and free of `..`, as a string without `./`.
fn clean(path: &Path) -> Result<String, KernelError> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(not_a_package(format!(
                    "unsafe path {} in the archive",
                    path.display()
                )));
            }
        }
    }
    Ok(parts.join("/"))
}

/// `lib/modules/<version>/<rest>`, also under `usr/`.
fn under_modules(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("usr/").unwrap_or(path);
    rest.strip_prefix("lib/modules/")?.split_once('/')
}

fn read_data<S: Write>(
    data: impl Read,
    mut spool: S,
    limit: UnpackLimit,
) -> Result<KernelPackage<S>, KernelError> {
    let unreadable = |e: std::io::Error| not_a_package(format!("unreadable data archive: {e}"));
    let mut tar = tar::Archive::new(data);
    let mut kernel: Option<(String, Vec<u8>)> = None;
    // By version: only the kernel's own tree counts, whatever else ships.
    let mut modules: HashMap<String, HashMap<String, (Module, Spooled)>> = HashMap::new();
    let mut builtin = HashMap::new();
    let mut spooled_bytes = 0u64;
    for entry in tar.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        // Every name is checked, though only regular files are read.
        let path = clean(&entry.path().map_err(unreadable)?)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        if let Some(version) = path.strip_prefix("boot/vmlinuz-") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            kernel = Some((version.to_string(), bytes));
        } else if let Some((version, rest)) = under_modules(&path) {
            if rest == "modules.builtin" {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                builtin.insert(version.to_string(), modules::builtin(&text));
            } else if banger_agent::init::module_name(rest).is_some() {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                let ko = modules::decompress(&path, bytes, limit)?;
                let module = modules::parse(&path, &ko)?;
                spool.write_all(&ko).map_err(KernelError::Spool)?;
                let span = Spooled {
                    at: spooled_bytes,
                    len: ko.len(),
                };
                spooled_bytes += ko.len() as u64;
                modules
                    .entry(version.to_string())
                    .or_default()
                    .insert(module.name.clone(), (module, span));
            }
        }
    }
    let Some((version, bzimage)) = kernel else {
        return Err(not_a_package("no boot/vmlinuz-* in it"));
    };
    let builtin = builtin
        .remove(&version)
        .ok_or_else(|| not_a_package(format!("no lib/modules/{version}/modules.builtin in it")))?;
    spool.flush().map_err(KernelError::Spool)?;
    let (modules, spooled) = modules
        .remove(&version)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, (module, span))| ((name.clone(), module), (name, span)))
        .unzip();
    Ok(KernelPackage {
        version,
        bzimage,
        modules,
        builtin,
        spool,
        spooled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::modules::tests::ko;
    use std::io::Cursor;

    fn tar_with(paths: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, bytes) in paths {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // Written raw: tar's own setter refuses `..`, which is the point.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *bytes).expect("append");
        }
        builder.into_inner().expect("tar")
    }

    fn read_fresh(deb: &[u8]) -> Result<KernelPackage<Cursor<Vec<u8>>>, KernelError> {
        read(deb, Cursor::new(Vec::new()), UnpackLimit::DEFAULT)
    }

    fn deb_with(data: Vec<u8>) -> Vec<u8> {
        let mut deb = ar::Builder::new(Vec::new());
        for (name, bytes) in [("debian-binary", b"2.0\n".to_vec()), ("data.tar", data)] {
            let header = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
            deb.append(&header, &bytes[..]).expect("ar");
        }
        deb.into_inner().expect("ar")
    }

    #[test]
    fn the_kernel_and_builtin_list_are_found_and_escaping_paths_refused() {
        let deb = deb_with(tar_with(&[
            ("./boot/vmlinuz-6.1.0-9-cloud-amd64", b"bz"),
            (
                "./lib/modules/6.1.0-9-cloud-amd64/modules.builtin",
                b"kernel/fs/ext4/ext4.ko\n",
            ),
        ]));
        let package = read_fresh(&deb[..]).expect("read");
        assert_eq!(package.version, "6.1.0-9-cloud-amd64");
        assert_eq!(package.bzimage, b"bz");
        assert!(package.builtin.contains("ext4"));

        for evil in ["../../etc/passwd", "/etc/passwd", "./lib/../../x"] {
            let deb = deb_with(tar_with(&[(evil, b"x")]));
            let error = read_fresh(&deb[..]).err().expect(evil);
            assert!(error.to_string().contains("unsafe path"), "{evil}: {error}");
        }
        let garbage = read_fresh(&b"not an archive at all"[..])
            .err()
            .expect("refused");
        assert!(garbage.to_string().contains("not a .deb"), "{garbage}");
        let empty = deb_with(tar_with(&[]));
        let error = read_fresh(&empty[..]).err().expect("no kernel");
        assert!(error.to_string().contains("vmlinuz"), "{error}");
        let no_builtin = deb_with(tar_with(&[("boot/vmlinuz-6.1", b"bz")]));
        let error = read_fresh(&no_builtin[..])
            .err()
            .expect("no modules.builtin");
        assert!(
            error
                .to_string()
                .contains("lib/modules/6.1/modules.builtin"),
            "{error}"
        );
    }

    #[test]
    fn a_package_whose_modules_chain_past_the_depth_bound_is_refused() {
        // virtio_blk, a guest module, depends on m0, which depends on m1,
        // ... on m9999: a package chooses how deep the walk goes.
        let depth = 10_000;
        let names: Vec<String> = (0..depth).map(|i| format!("m{i}")).collect();
        let kos: Vec<(String, Vec<u8>)> = (0..depth)
            .map(|i| {
                let depends: Vec<&str> = names.get(i + 1).map(String::as_str).into_iter().collect();
                (
                    format!("lib/modules/6.1/kernel/m{i}.ko"),
                    ko(&names[i], &depends),
                )
            })
            .chain(std::iter::once((
                "lib/modules/6.1/kernel/virtio_blk.ko".to_string(),
                ko("virtio_blk", &["m0"]),
            )))
            .collect();
        let mut files: Vec<(&str, &[u8])> = vec![
            ("boot/vmlinuz-6.1", b"bz"),
            ("lib/modules/6.1/modules.builtin", b""),
        ];
        files.extend(
            kos.iter()
                .map(|(path, bytes)| (path.as_str(), bytes.as_slice())),
        );
        let package = read_fresh(&deb_with(tar_with(&files))[..]).expect("read");
        let refused = modules::load_order(&["virtio_blk"], &package.modules, &package.builtin)
            .expect_err("too deep");
        assert!(refused.to_string().contains("modules deep"), "{refused}");
    }

    #[test]
    fn modules_under_usr_lib_are_read_back_uncompressed_and_other_versions_ignored() {
        let ring = ko("virtio_ring", &[]);
        let mut blk_xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        blk_xz
            .write_all(&ko("virtio_blk", &["virtio_ring"]))
            .expect("xz");
        let blk_xz = blk_xz.finish().expect("xz");
        let deb = deb_with(tar_with(&[
            ("usr/lib/modules/6.12-cloud/modules.builtin", b""),
            ("usr/lib/modules/6.12-cloud/kernel/virtio-ring.ko", &ring),
            (
                "usr/lib/modules/6.12-cloud/kernel/virtio_blk.ko.xz",
                &blk_xz,
            ),
            ("boot/vmlinuz-6.12-cloud", b"bz"),
        ]));
        let mut package = read_fresh(&deb[..]).expect("read");
        assert_eq!(package.modules["virtio_blk"].depends, ["virtio_ring"]);
        assert_eq!(
            package.ko("virtio_blk").expect("blk"),
            ko("virtio_blk", &["virtio_ring"])
        );
        assert_eq!(package.ko("virtio_ring").expect("ring"), ring);
        assert!(package.ko("virtio_net").is_err());

        let broken = deb_with(tar_with(&[(
            "lib/modules/6.12-cloud/kernel/virtio_blk.ko",
            b"not elf",
        )]));
        let error = read_fresh(&broken[..]).err().expect("bad module");
        assert!(error.to_string().contains("virtio_blk.ko"), "{error}");
        let other = deb_with(tar_with(&[
            ("boot/vmlinuz-6.12-cloud", b"bz"),
            ("lib/modules/6.12-cloud/modules.builtin", b""),
            ("lib/modules/6.1-other/modules.builtin", b""),
        ]));
        let package = read_fresh(&other[..]).expect("read");
        assert_eq!(package.version, "6.12-cloud");
        assert!(package.modules.is_empty());
    }
}
