//! A Debian kernel package (`linux-image-*.deb`): an ar archive whose
//! `data.tar.*` holds `boot/vmlinuz-<version>` and `lib/modules/<version>/`.
//! Read in one pass, in memory; nothing is written from it but what the
//! catalog makes of it.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Component, Path};

use super::KernelError;
use super::modules::{self, Module};

/// What a kernel package holds that a VM needs.
pub struct KernelPackage {
    /// `uname -r` of the kernel, from `boot/vmlinuz-<version>`.
    pub version: String,
    pub bzimage: Vec<u8>,
    /// Every module in the package, by name.
    pub modules: HashMap<String, Module>,
    /// Names of the modules built into the kernel.
    pub builtin: HashSet<String>,
}

fn not_a_package(what: &str, reason: impl Into<String>) -> KernelError {
    KernelError::NotAPackage {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// Reads a kernel package; `what` names it in errors.
pub fn read(deb: impl Read, what: &str) -> Result<KernelPackage, KernelError> {
    let mut archive = ar::Archive::new(deb);
    while let Some(member) = archive.next_entry() {
        let member =
            member.map_err(|e| not_a_package(what, format!("not a .deb (ar) archive: {e}")))?;
        let name = String::from_utf8_lossy(member.header().identifier()).into_owned();
        let data: Box<dyn Read + '_> = match name.as_str() {
            "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(member)),
            "data.tar.zst" => Box::new(zstd::stream::read::Decoder::new(member)?),
            "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(member)),
            "data.tar" => Box::new(member),
            _ => continue,
        };
        return read_data(data, what);
    }
    Err(not_a_package(
        what,
        "no data.tar member; not a .deb archive",
    ))
}

/// A tar path, relative and free of `..`, as a string without `./`.
fn clean(path: &Path, what: &str) -> Result<String, KernelError> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(not_a_package(
                    what,
                    format!("unsafe path {} in the archive", path.display()),
                ));
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

fn read_data(data: impl Read, what: &str) -> Result<KernelPackage, KernelError> {
    let mut tar = tar::Archive::new(data);
    let mut kernel: Option<(String, Vec<u8>)> = None;
    let mut modules = HashMap::new();
    let mut builtin = HashMap::new();
    let entries = tar
        .entries()
        .map_err(|e| not_a_package(what, format!("unreadable data archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| not_a_package(what, format!("unreadable data archive: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = clean(&entry.path()?, what)?;
        if let Some(version) = path.strip_prefix("boot/vmlinuz-") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            kernel = Some((version.to_string(), bytes));
        } else if let Some((version, rest)) = under_modules(&path) {
            if rest == "modules.builtin" {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                builtin.insert(version.to_string(), modules::builtin(&text));
            } else if modules::name_of_path(rest).is_some() {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                let module = modules::parse(&path, modules::decompress(&path, bytes)?)?;
                modules.insert(module.name.clone(), module);
            }
        }
    }
    let Some((version, bzimage)) = kernel else {
        return Err(not_a_package(what, "no boot/vmlinuz-* in it"));
    };
    let builtin = builtin.remove(&version).ok_or_else(|| {
        not_a_package(
            what,
            format!("no lib/modules/{version}/modules.builtin in it"),
        )
    })?;
    Ok(KernelPackage {
        version,
        bzimage,
        modules,
        builtin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let package = read(&deb[..], "k.deb").expect("read");
        assert_eq!(package.version, "6.1.0-9-cloud-amd64");
        assert_eq!(package.bzimage, b"bz");
        assert!(package.builtin.contains("ext4"));

        let evil = deb_with(tar_with(&[("../../etc/passwd", b"x")]));
        let error = read(&evil[..], "evil.deb").err().expect("refused");
        assert!(error.to_string().contains("unsafe path"), "{error}");
        let garbage = read(&b"not an archive at all"[..], "garbage.deb")
            .err()
            .expect("refused");
        assert!(garbage.to_string().contains("garbage.deb"), "{garbage}");
        let empty = deb_with(tar_with(&[]));
        let error = read(&empty[..], "empty.deb").err().expect("no kernel");
        assert!(error.to_string().contains("vmlinuz"), "{error}");
    }
}
