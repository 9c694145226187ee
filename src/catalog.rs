//! The kernel catalog: its record type, and its file work: importing a kernel copies its files
//! under `<state-dir>/kernels/<name>/`, hashing them on the way, so a VM
//! never depends on a file the user may move or change. Blocking: callers
//! run it on a blocking thread.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::caller::{CallerFile, Watch};
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
    /// What banger could not tell, or found missing, about a kernel that
    /// boots with banger's archive alone (imported without an initrd).
    #[serde(default)]
    pub note: Option<String>,
    /// The initramfs VMs boot with (the kernel's initrd, then banger's
    /// agent), for the agent it was built with.
    #[serde(default)]
    pub boot_image: Option<BootImage>,
    pub created_at: Timestamp,
}

/// A kernel's boot image: `<kernel dir>/boot-<agent>.img`, a ledger entry
/// of the kernel (it goes with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootImage {
    pub path: PathBuf,
    pub agent_sha256: String,
}

/// What to do about a missing agent binary.
pub const AGENT_HINT: &str =
    "build it with scripts/build-agent.sh or set agent.binary in the daemon's configuration";

/// The banger-agent a daemon boots its VMs with, read once, so all the
/// boot images of one daemon's life hold the same agent.
#[derive(Debug)]
pub struct Agent {
    pub sha256: String,
    /// banger's archive around it.
    archive: Vec<u8>,
}

impl Agent {
    pub fn load(path: &Path) -> Result<Agent, CatalogError> {
        let bytes = fs::read(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CatalogError::NoAgent(path.to_path_buf()),
            _ => io_err("read the agent", path)(e),
        })?;
        let mut archive = Vec::new();
        initramfs::write_agent(&mut archive, &bytes, GUEST_MODULES)
            .map_err(io_err("build the agent's archive from", path))?;
        Ok(Agent {
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            archive,
        })
    }
}

/// Builds, once per agent, the boot image of `kernel`: its initrd (checked
/// against the digest taken at import) followed by the agent's archive,
/// written beside and renamed into place. Other boot images of the kernel
/// are removed (a booted VM holds its own in memory). The caller runs one
/// build at a time.
pub fn boot_image(kernel: &KernelRecord, agent: &Agent) -> Result<BootImage, CatalogError> {
    let dir = kernel
        .vmlinux
        .parent()
        .ok_or_else(|| CatalogError::Invalid {
            field: "kernel",
            reason: format!("{} has no directory", kernel.vmlinux.display()),
        })?;
    let name = format!("boot-{}.img", &agent.sha256[..16]);
    let path = dir.join(&name);
    if !path.exists() {
        let mut staged = tempfile::Builder::new()
            .prefix(".boot-")
            .tempfile_in(dir)
            .map_err(io_err("create a boot image in", dir))?;
        if let Some(initrd) = &kernel.initrd {
            let mut source = File::open(initrd).map_err(io_err("open", initrd))?;
            let sha256 = copy_hashed_into(&mut source, initrd, staged.as_file_mut())?;
            if let Some(expected) = &kernel.initrd_sha256
                && *expected != sha256
            {
                return Err(CatalogError::Changed {
                    path: initrd.clone(),
                    expected: expected.clone(),
                    found: sha256,
                });
            }
        }
        let file = staged.as_file_mut();
        // Readable as the kernel's other files are: a jailed VMM opens it
        // as the jail's user.
        file.write_all(&agent.archive)
            .and_then(|()| file.set_permissions(fs::Permissions::from_mode(0o644)))
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &path))?;
        staged
            .persist(&path)
            .map_err(|e| io_err("move into place", &path)(e.error))?;
    }
    // Builds are one at a time (the catalog's), so a staged file here is a
    // crashed build's.
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let other = entry.file_name().to_string_lossy().into_owned();
        let stale = other.starts_with("boot-") && other.ends_with(".img") && other != name;
        if stale || other.starts_with(".boot-") {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(BootImage {
        path,
        agent_sha256: agent.sha256.clone(),
    })
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
    #[error(
        "{path} changed since it was imported (sha256 {expected}, now {found}); import the kernel again"
    )]
    Changed {
        path: PathBuf,
        expected: String,
        found: String,
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
    pub note: Option<String>,
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> CatalogError + 'p {
    move |source| CatalogError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A kernel must be an ELF image, which Firecracker needs; read at offset
/// 0 of the caller's descriptor (its position stays).
fn check_elf(vmlinux: &CallerFile, watch: &Watch) -> Result<(), CatalogError> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    let named: Arc<Path> = Arc::from(vmlinux.path.as_path());
    watch
        .during(&named, || vmlinux.file.read_exact_at(&mut magic, 0))
        .or_else(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => Ok(()),
            _ => Err(io_err("read", &vmlinux.path)(e)),
        })?;
    if &magic != b"\x7fELF" {
        return Err(CatalogError::Invalid {
            field: "vmlinux",
            reason: format!(
                "{} is not an uncompressed ELF kernel (vmlinux); Firecracker cannot boot a bzImage",
                vmlinux.path.display()
            ),
        });
    }
    Ok(())
}

/// Copies what the caller opened (as much as it held when opened) to `to`,
/// returning the content's sha256 in hex.
fn copy_hashed(from: &CallerFile, to: &Path, watch: &Watch) -> Result<String, CatalogError> {
    let mut dest = File::create(to).map_err(io_err("create", to))?;
    let mut source = watch.reader(Arc::from(from.path.as_path()), (&*from.file).take(from.len));
    let sha256 = copy_hashed_into(&mut source, &from.path, &mut dest)?;
    dest.sync_all().map_err(io_err("sync", to))?;
    Ok(sha256)
}

/// Appends all of `source` (`name` in messages) to `dest`, returning the
/// content's sha256 in hex.
fn copy_hashed_into(
    source: &mut impl Read,
    name: &Path,
    dest: &mut File,
) -> Result<String, CatalogError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = source.read(&mut buffer).map_err(io_err("read", name))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        dest.write_all(&buffer[..n])
            .map_err(io_err("write a copy of", name))?;
    }
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
/// the guest modules (the agent joins it at boot). All or nothing;
/// `progress` hears each phase; the package is read in view of `watch`.
pub fn import_package(
    kernels_dir: &Path,
    name: &str,
    package: &CallerFile,
    limit: UnpackLimit,
    watch: &Watch,
    progress: impl Fn(&str, u64),
) -> Result<ImportedPackage, CatalogError> {
    let failed = |source: KernelError| CatalogError::Package {
        package: package.path.clone(),
        source,
    };
    progress("reading the package", 1);
    let file = watch.reader(
        Arc::from(package.path.as_path()),
        (&*package.file).take(package.len),
    );
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
    initramfs::write_modules(&mut initrd, &chosen)
        .map_err(|e| failed(KernelError::Initramfs(e)))?;

    progress("writing the catalog entry", 4);
    let (target, (vmlinux_sha256, bzimage_sha256, initrd_sha256)) =
        new_entry(kernels_dir, name, |staging| {
            Ok((
                write_hashed(&staging.join("vmlinux"), &vmlinux)?,
                write_hashed(&staging.join("bzImage"), &contents.bzimage)?,
                write_hashed(&staging.join("modules.img"), &initrd)?,
            ))
        })?;
    Ok(ImportedPackage {
        version: contents.version,
        vmlinux: target.join("vmlinux"),
        vmlinux_sha256,
        bzimage: target.join("bzImage"),
        bzimage_sha256,
        initrd: target.join("modules.img"),
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

/// Functions a kernel has only if what needs them is built in: with no
/// initrd of its own it boots from banger's archive, which has no modules.
const BUILT_IN_NEEDS: &[(&str, &str)] = &[
    ("virtblk_probe", "virtio block (virtio_blk)"),
    ("ext4_fill_super", "ext4"),
    ("virtio_pci_probe", "virtio PCI (virtio_pci)"),
];

/// Why a kernel booting from banger's archive alone may not find its root
/// disk: what its symbol table lacks, or that it has none; None when all
/// is built in. `vmlinux` is the ELF, in memory or read as needed
/// (`object::ReadCache`: only its headers and symbol table).
pub fn agent_only_note<'a>(vmlinux: impl object::ReadRef<'a>) -> Option<String> {
    use object::{Object, ObjectSymbol};
    const BOOTS_ALONE: &str = "it boots with only banger's agent in its initramfs; import it with --initrd carrying its modules if they are modules";
    let mut found = [false; BUILT_IN_NEEDS.len()];
    let mut any = false;
    if let Ok(elf) = object::File::parse(vmlinux) {
        for symbol in elf.symbols() {
            any = true;
            let name = symbol.name().unwrap_or_default();
            for (i, (wanted, _)) in BUILT_IN_NEEDS.iter().enumerate() {
                found[i] |= name == *wanted;
            }
        }
    }
    if !any {
        return Some(format!(
            "banger cannot tell whether virtio block and ext4 are built into this kernel (its vmlinux has no symbol table); {BOOTS_ALONE}"
        ));
    }
    let missing: Vec<&str> = BUILT_IN_NEEDS
        .iter()
        .zip(found)
        .filter(|(_, found)| !found)
        .map(|((_, what), _)| *what)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "this kernel does not have {} built in; {BOOTS_ALONE}",
            missing.join(", ")
        )
    })
}

/// Imports a kernel into `<kernels_dir>/<name>/`; all or nothing. The
/// caller's files are read in view of `watch`.
pub fn import_kernel(
    kernels_dir: &Path,
    name: &str,
    vmlinux: &CallerFile,
    initrd: Option<&CallerFile>,
    watch: &Watch,
) -> Result<ImportedKernel, CatalogError> {
    check_elf(vmlinux, watch)?;
    let (target, (vmlinux_sha256, initrd_sha256, note)) =
        new_entry(kernels_dir, name, |staging| {
            let copy = staging.join("vmlinux");
            let vmlinux_sha256 = copy_hashed(vmlinux, &copy, watch)?;
            let initrd_sha256 = initrd
                .map(|initrd| copy_hashed(initrd, &staging.join("initrd"), watch))
                .transpose()?;
            let note = match initrd {
                Some(_) => None,
                None => {
                    let file = fs::File::open(&copy).map_err(io_err("read", &copy))?;
                    agent_only_note(&object::ReadCache::new(file))
                }
            };
            Ok((vmlinux_sha256, initrd_sha256, note))
        })?;
    let vmlinux = target.join("vmlinux");
    Ok(ImportedKernel {
        vmlinux,
        vmlinux_sha256,
        initrd: initrd_sha256.as_ref().map(|_| target.join("initrd")),
        initrd_sha256,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> Watch {
        Watch::new(std::time::Duration::from_secs(30))
    }

    /// A file as the RPC layer hands it over, opened by its caller.
    fn opened(path: &Path) -> CallerFile {
        let file = File::open(path).expect("open");
        let len = file.metadata().expect("stat").len();
        CallerFile {
            path: path.to_path_buf(),
            file: file.into(),
            len,
        }
    }

    #[test]
    fn imports_copy_and_hash_and_refuse_a_second_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vmlinux = dir.path().join("vmlinux");
        std::fs::write(&vmlinux, b"\x7fELF rest").expect("write");
        let kernels = dir.path().join("kernels");
        let imported =
            import_kernel(&kernels, "k1", &opened(&vmlinux), None, &watch()).expect("import");
        assert_eq!(
            std::fs::read(&imported.vmlinux).expect("read"),
            b"\x7fELF rest"
        );
        assert_eq!(imported.vmlinux_sha256.len(), 64);
        assert!(matches!(
            import_kernel(&kernels, "k1", &opened(&vmlinux), None, &watch()),
            Err(CatalogError::Exists(_))
        ));
    }

    #[test]
    fn a_non_elf_kernel_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bz = dir.path().join("bzImage");
        std::fs::write(&bz, b"MZ....").expect("write");
        let err = import_kernel(&dir.path().join("k"), "k1", &opened(&bz), None, &watch())
            .expect_err("not ELF");
        assert!(err.to_string().starts_with("invalid vmlinux: "), "{err}");
    }

    #[test]
    fn a_package_import_needs_a_real_package_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernels = dir.path().join("kernels");
        let garbage = dir.path().join("garbage.deb");
        std::fs::write(&garbage, b"not an ar archive").expect("write");
        let phases = std::cell::RefCell::new(Vec::new());
        let error = import_package(
            &kernels,
            "k",
            &opened(&garbage),
            UnpackLimit::DEFAULT,
            &watch(),
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
    }

    #[test]
    fn a_kernel_alone_is_noted_unless_its_symbols_show_the_drivers() {
        let unknown = agent_only_note(&b"\x7fELF stripped"[..]).expect("a note");
        assert!(unknown.contains("cannot tell"), "{unknown}");
        // This test binary has a symbol table, and no virtio drivers.
        let own = std::fs::read("/proc/self/exe").expect("own binary");
        let missing = agent_only_note(own.as_slice()).expect("a note");
        assert!(
            missing.contains("does not have virtio block (virtio_blk), ext4, virtio PCI"),
            "{missing}"
        );
    }

    fn kernel_with_initrd(dir: &Path, initrd: &[u8]) -> KernelRecord {
        let vmlinux = dir.join("vmlinux");
        std::fs::write(&vmlinux, b"\x7fELF").expect("vmlinux");
        std::fs::write(dir.join("initrd"), initrd).expect("initrd");
        KernelRecord {
            name: "k".into(),
            vmlinux,
            vmlinux_sha256: None,
            initrd: Some(dir.join("initrd")),
            initrd_sha256: Some(format!("{:x}", Sha256::digest(initrd))),
            bzimage: None,
            bzimage_sha256: None,
            version: None,
            package: None,
            modules: Vec::new(),
            cmdline: None,
            note: None,
            boot_image: None,
            created_at: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_boot_image_is_the_initrd_then_the_agent_once_per_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = Agent::load(&dir.path().join("banger-agent")).expect_err("no agent");
        assert!(matches!(missing, CatalogError::NoAgent(_)), "{missing}");
        assert!(missing.to_string().contains("scripts/build-agent.sh"));
        let kernel = kernel_with_initrd(dir.path(), b"user initrd");
        std::fs::write(dir.path().join("banger-agent"), b"agent 1").expect("agent");
        let first = Agent::load(&dir.path().join("banger-agent")).expect("agent");
        let image = boot_image(&kernel, &first).expect("boot image");
        let bytes = std::fs::read(&image.path).expect("read");
        assert!(bytes.starts_with(b"user initrd"));
        assert_eq!(&bytes[b"user initrd".len()..], first.archive);
        assert_eq!(image.agent_sha256, first.sha256);
        assert_eq!(boot_image(&kernel, &first).expect("again"), image, "cached");

        std::fs::write(dir.path().join("banger-agent"), b"agent 2").expect("agent");
        let second = Agent::load(&dir.path().join("banger-agent")).expect("agent");
        let upgraded = boot_image(&kernel, &second).expect("upgraded");
        assert_ne!(upgraded.path, image.path);
        assert!(!image.path.exists(), "the old agent's image is gone");

        std::fs::write(dir.path().join("initrd"), b"swapped").expect("swap");
        std::fs::remove_file(&upgraded.path).expect("rm");
        let changed = boot_image(&kernel, &second).expect_err("changed initrd");
        assert!(matches!(changed, CatalogError::Changed { .. }), "{changed}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("boot"))
            .collect();
        assert!(left.is_empty(), "nothing half-written: {left:?}");
    }
}
