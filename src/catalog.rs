//! The kernel catalog: its record type, and its file work: importing a kernel copies its files
//! under `<state-dir>/kernels/<name>/`, hashing them on the way, so a VM
//! never depends on a file the user may move or change. Blocking: callers
//! run it on a blocking thread.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guest::disk::AGENT_HINT;
use crate::kernel::{GUEST_MODULES, KernelError, UnpackLimit, bzimage, deb, initramfs, modules};
use crate::store::Record;

/// A kernel in the catalog (table `kernels`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub name: String,
    pub vmlinux: PathBuf,
    #[serde(default)]
    pub vmlinux_sha256: Option<String>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub initrd_sha256: Option<String>,
    /// The compressed kernel (QEMU boots it), from a package import.
    #[serde(default)]
    pub bzimage: Option<PathBuf>,
    #[serde(default)]
    pub bzimage_sha256: Option<String>,
    /// `uname -r`, for kernels imported from a package.
    #[serde(default)]
    pub version: Option<String>,
    /// The package's file name, for kernels imported from one.
    #[serde(default)]
    pub package: Option<String>,
    /// Modules in the initramfs, in load order.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Kernel command line; banger's default when absent.
    #[serde(default)]
    pub cmdline: Option<String>,
    pub created_at: Timestamp,
}

impl Record for KernelRecord {
    const TABLE: &'static str = "kernels";
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("a kernel named {0} already exists; remove it first or pick another name")]
    Exists(String),
    #[error("banger-agent is not at {0}; {hint}", hint = AGENT_HINT)]
    NoAgent(PathBuf),
    #[error("cannot import {package}")]
    Package {
        package: PathBuf,
        #[source]
        source: KernelError,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an import leaves in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedKernel {
    pub vmlinux: PathBuf,
    pub vmlinux_sha256: String,
    pub initrd: Option<PathBuf>,
    pub initrd_sha256: Option<String>,
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> CatalogError + 'p {
    move |source| CatalogError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The given file, checked: absolute, a regular file, and (for the kernel)
/// an ELF image, which Firecracker needs.
fn check_source(field: &'static str, path: &Path, elf: bool) -> Result<(), CatalogError> {
    let invalid = |reason: String| CatalogError::Invalid { field, reason };
    if !path.is_absolute() {
        return Err(invalid(format!(
            "{} is not an absolute path",
            path.display()
        )));
    }
    let mut file = File::open(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(invalid(format!("{} is not a regular file", path.display())));
    }
    if elf {
        let mut magic = [0u8; 4];
        if file.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
            return Err(invalid(format!(
                "{} is not an uncompressed ELF kernel (vmlinux); Firecracker cannot boot a bzImage",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Copies `from` to `to`, returning the content's sha256 in hex.
fn copy_hashed(from: &Path, to: &Path) -> Result<String, CatalogError> {
    let mut source = File::open(from).map_err(io_err("open", from))?;
    let mut dest = File::create(to).map_err(io_err("create", to))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = source.read(&mut buffer).map_err(io_err("read", from))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        dest.write_all(&buffer[..n]).map_err(io_err("write", to))?;
    }
    dest.sync_all().map_err(io_err("sync", to))?;
    Ok(format!("{:x}", hasher.finalize()))
}

pub fn kernel_dir(kernels_dir: &Path, name: &str) -> PathBuf {
    kernels_dir.join(name)
}

/// What importing a kernel package leaves in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedPackage {
    pub version: String,
    pub vmlinux: PathBuf,
    pub vmlinux_sha256: String,
    pub bzimage: PathBuf,
    pub bzimage_sha256: String,
    pub initrd: PathBuf,
    pub initrd_sha256: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
}

/// Writes `bytes` to `path` (synced), answering their sha256.
fn write_hashed(path: &Path, bytes: &[u8]) -> Result<String, CatalogError> {
    let mut file = File::create(path).map_err(io_err("create", path))?;
    file.write_all(bytes).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("sync", path))?;
    Ok(format!("{:x}", Sha256::digest(bytes)))
}

/// Imports a Debian kernel package into `<kernels_dir>/<name>/`: the
/// bzImage (QEMU), the vmlinux inside it (Firecracker), and an initramfs of
/// the guest modules with `agent` as `/init`. All or nothing; `progress`
/// hears each phase.
pub fn import_package(
    kernels_dir: &Path,
    name: &str,
    package: &Path,
    agent: &Path,
    limit: UnpackLimit,
    progress: impl Fn(&str, u64),
) -> Result<ImportedPackage, CatalogError> {
    check_source("path", package, false)?;
    let agent_bytes = fs::read(agent).map_err(|_| CatalogError::NoAgent(agent.to_path_buf()))?;
    let failed = |source: KernelError| CatalogError::Package {
        package: package.to_path_buf(),
        source,
    };
    progress("reading the package", 1);
    let file = File::open(package).map_err(io_err("open", package))?;
    fs::create_dir_all(kernels_dir).map_err(io_err("create", kernels_dir))?;
    // Unlinked, so nothing is left whatever happens.
    let spool = tempfile::tempfile_in(kernels_dir)
        .map_err(io_err("create a spool file in", kernels_dir))?;
    let mut contents = deb::read(io::BufReader::new(file), spool, limit).map_err(failed)?;
    progress("decompressing vmlinux", 2);
    let vmlinux = bzimage::vmlinux(&contents.bzimage, limit).map_err(failed)?;
    let order =
        modules::load_order(GUEST_MODULES, &contents.modules, &contents.builtin).map_err(failed)?;
    let mut chosen = Vec::with_capacity(order.len());
    for module in &order {
        chosen.push((module.clone(), contents.ko(module).map_err(failed)?));
    }
    progress("building the initramfs", 3);
    let mut initrd = Vec::new();
    initramfs::write(&mut initrd, &agent_bytes, &chosen)
        .map_err(|e| failed(KernelError::Initramfs(e)))?;

    progress("writing the catalog entry", 4);
    let (target, (vmlinux_sha256, bzimage_sha256, initrd_sha256)) =
        new_entry(kernels_dir, name, |staging| {
            Ok((
                write_hashed(&staging.join("vmlinux"), &vmlinux)?,
                write_hashed(&staging.join("bzImage"), &contents.bzimage)?,
                write_hashed(&staging.join("initrd.img"), &initrd)?,
            ))
        })?;
    Ok(ImportedPackage {
        version: contents.version,
        vmlinux: target.join("vmlinux"),
        vmlinux_sha256,
        bzimage: target.join("bzImage"),
        bzimage_sha256,
        initrd: target.join("initrd.img"),
        initrd_sha256,
        modules: order,
    })
}

/// Makes the catalog entry `<kernels_dir>/<name>/` all or nothing: `fill`
/// writes its files into a staging directory beside it, which is renamed
/// into place. Answers the entry's path and what `fill` answered.
fn new_entry<T>(
    kernels_dir: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> Result<T, CatalogError>,
) -> Result<(PathBuf, T), CatalogError> {
    let target = kernel_dir(kernels_dir, name);
    if target.exists() {
        return Err(CatalogError::Exists(name.to_string()));
    }
    fs::create_dir_all(kernels_dir).map_err(io_err("create", kernels_dir))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}-"))
        .tempdir_in(kernels_dir)
        .map_err(io_err("create a staging directory in", kernels_dir))?;
    let filled = fill(staging.path())?;
    crate::fault::boundary("kernel-filled");
    let staged = staging.keep();
    fs::rename(&staged, &target).map_err(|e| {
        let _ = fs::remove_dir_all(&staged);
        match e.kind() {
            io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => {
                CatalogError::Exists(name.to_string())
            }
            _ => io_err("move into place", &target)(e),
        }
    })?;
    Ok((target, filled))
}

/// Imports a kernel into `<kernels_dir>/<name>/`; all or nothing.
pub fn import_kernel(
    kernels_dir: &Path,
    name: &str,
    vmlinux: &Path,
    initrd: Option<&Path>,
) -> Result<ImportedKernel, CatalogError> {
    check_source("vmlinux", vmlinux, true)?;
    if let Some(initrd) = initrd {
        check_source("initrd", initrd, false)?;
    }
    let (target, (vmlinux_sha256, initrd_sha256)) = new_entry(kernels_dir, name, |staging| {
        let vmlinux_sha256 = copy_hashed(vmlinux, &staging.join("vmlinux"))?;
        let initrd_sha256 = initrd
            .map(|initrd| copy_hashed(initrd, &staging.join("initrd")))
            .transpose()?;
        Ok((vmlinux_sha256, initrd_sha256))
    })?;
    Ok(ImportedKernel {
        vmlinux: target.join("vmlinux"),
        vmlinux_sha256,
        initrd: initrd_sha256.as_ref().map(|_| target.join("initrd")),
        initrd_sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_copy_and_hash_and_refuse_a_second_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vmlinux = dir.path().join("vmlinux");
        std::fs::write(&vmlinux, b"\x7fELF rest").expect("write");
        let kernels = dir.path().join("kernels");
        let imported = import_kernel(&kernels, "k1", &vmlinux, None).expect("import");
        assert_eq!(
            std::fs::read(&imported.vmlinux).expect("read"),
            b"\x7fELF rest"
        );
        assert_eq!(imported.vmlinux_sha256.len(), 64);
        assert!(matches!(
            import_kernel(&kernels, "k1", &vmlinux, None),
            Err(CatalogError::Exists(_))
        ));
    }

    #[test]
    fn a_non_elf_kernel_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bz = dir.path().join("bzImage");
        std::fs::write(&bz, b"MZ....").expect("write");
        let err = import_kernel(&dir.path().join("k"), "k1", &bz, None).expect_err("not ELF");
        assert!(err.to_string().starts_with("invalid vmlinux: "), "{err}");
        let err = import_kernel(&dir.path().join("k"), "k1", Path::new("relative"), None)
            .expect_err("relative");
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn a_package_import_needs_the_agent_and_a_real_package_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernels = dir.path().join("kernels");
        let garbage = dir.path().join("garbage.deb");
        std::fs::write(&garbage, b"not an ar archive").expect("write");
        let agent = dir.path().join("banger-agent");
        let no_agent = import_package(
            &kernels,
            "k",
            &garbage,
            &agent,
            UnpackLimit::DEFAULT,
            |_, _| {},
        )
        .expect_err("no agent");
        assert!(matches!(no_agent, CatalogError::NoAgent(_)), "{no_agent}");
        assert!(
            no_agent.to_string().contains("scripts/build-agent.sh"),
            "{no_agent}"
        );

        std::fs::write(&agent, b"#!/bin/sh\n").expect("agent");
        let phases = std::cell::RefCell::new(Vec::new());
        let error = import_package(
            &kernels,
            "k",
            &garbage,
            &agent,
            UnpackLimit::DEFAULT,
            |phase, _| phases.borrow_mut().push(phase.to_string()),
        )
        .expect_err("garbage");
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot import {}", garbage.display())),
            "{error}"
        );
        assert_eq!(*phases.borrow(), ["reading the package"]);
        let left = std::fs::read_dir(&kernels).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "nothing left in the catalog");

        let missing = import_package(
            &kernels,
            "k",
            &dir.path().join("gone.deb"),
            &agent,
            UnpackLimit::DEFAULT,
            |_, _| {},
        )
        .expect_err("missing");
        assert!(
            missing.to_string().starts_with("invalid path: "),
            "{missing}"
        );
    }
}
