//! `CatalogActor`: the owner of the kernel and image catalogs. It is
//! the one place that decides whether an entry may go: VMs hold a
//! reservation on a kernel from the moment `vm create` chooses it until
//! their record names it, and `kernel rm` is refused while any VM record or
//! reservation uses the kernel. Its handlers that read the store run under
//! `ctx.wait`, so a reservation cannot slip between a removal's check and
//! its delete.
//!
//! Imports run their file work on a blocking thread (`crate::catalog`),
//! into a staging directory renamed into place; the record follows. At
//! start-up, anything under `kernels/` that no record names (a staging
//! directory, an entry whose record was never written) is removed.
//!
//! Image imports (`crate::image::import`) run one at a time (they share
//! blobs) on a blocking thread; the record is stored after the ext4 is in
//! place. At start-up, files under `images/` and `blobs/sha256/` that no
//! image record claims (an import a killed daemon left) are removed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use jiff::Timestamp;
use tracing::{info, warn};

use crate::actors::store::{Delete, Get, List, Put, Quarantined, StoreActor};
use crate::caller::{CallerFile, Stalled, Watch};
use crate::catalog::{self, Agent, CatalogError, KernelRecord};
use crate::image::import::{self as image_import, ImportError};
use crate::image::source::Source;
use crate::image::{ImageRecord, Lookup, blob_path};
use crate::kernel::UnpackLimit;
use crate::reconcile;
use crate::store::{StoreError, Undecodable};
use crate::vm::record::{VmImage, VmRecord};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "no kernel named {0}; `banger kernel ls` lists them and `banger kernel import` adds one"
    )]
    NotFound(String),
    #[error("kernel {kernel} is used by VM {vms}; remove the VM first", vms = vms.join(", VM "))]
    InUse { kernel: String, vms: Vec<String> },
    #[error("a kernel named {0} is being imported")]
    Importing(String),
    #[error(
        "no kernel given and no default: {}; give --kernel NAME or set vm.default_kernel",
        if .0.is_empty() { "the catalog holds none (`banger kernel import` adds one)".to_string() } else { format!("the catalog holds {}", .0.join(", ")) }
    )]
    Unchosen(Vec<String>),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
    #[error(transparent)]
    Stalled(#[from] Stalled),
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Lookup(#[from] Lookup),
    #[error(
        "image {image} is held by VM {vms}; remove the VM first, or give --force (the VMs keep their own disks)",
        vms = vms.join(", VM ")
    )]
    InUse { image: String, vms: Vec<String> },
    #[error("image records {} do not decode; no image is removed while their claims are unknown", .0.join(", "))]
    Quarantined(Vec<String>),
    #[error("an image named {name} exists already ({digest}); import under another --name")]
    Exists { name: String, digest: String },
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
    #[error(transparent)]
    Stalled(#[from] Stalled),
}

/// Where an import's files come from.
pub enum KernelSource {
    /// A vmlinux (and optionally an initrd) the caller opened.
    Vmlinux {
        vmlinux: CallerFile,
        initrd: Option<CallerFile>,
        cmdline: Option<String>,
    },
    /// A Debian kernel package the caller opened.
    Package { package: CallerFile },
}

/// Hears an import's phases (name, step of 4), from its blocking thread.
pub type ImportProgress = Arc<dyn Fn(&str, u64) + Send + Sync>;

pub struct CatalogActor {
    store: Addr<StoreActor>,
    kernels_dir: PathBuf,
    /// The banger-agent binary VMs boot with (read at the first boot).
    agent: PathBuf,
    /// The most one decompressed stream of an import may hold.
    unpack_limit: UnpackLimit,
    /// Kernels chosen by VMs whose records do not name them yet.
    reservations: HashMap<String, HashSet<String>>,
    /// Images (by digest) chosen by VMs whose records do not name them yet.
    image_reservations: HashMap<String, HashSet<String>>,
    importing: HashSet<String>,
    /// Kernel records that do not decode: their files are left alone.
    quarantined: Vec<Undecodable>,
    /// The agent VMs boot with, once read.
    boot_agent: Option<Arc<Agent>>,
    /// Kernels whose boot image is built for `boot_agent`, as VMs boot
    /// them: a start reads nothing but this.
    bootable: HashMap<String, KernelRecord>,
    /// Where images and blobs live, and the bounds of an import.
    images: image_import::Store,
    /// Held by the import under way: imports share blobs.
    importing_image: Arc<tokio::sync::Mutex<()>>,
}

impl CatalogActor {
    pub fn new(
        store: Addr<StoreActor>,
        kernels_dir: PathBuf,
        agent: PathBuf,
        unpack_limit: UnpackLimit,
        images: image_import::Store,
    ) -> CatalogActor {
        CatalogActor {
            store,
            kernels_dir,
            agent,
            unpack_limit,
            reservations: HashMap::new(),
            image_reservations: HashMap::new(),
            importing: HashSet::new(),
            quarantined: Vec::new(),
            boot_agent: None,
            bootable: HashMap::new(),
            images,
            importing_image: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

impl Actor for CatalogActor {
    type Context = Context<Self>;
}

impl Supervised for CatalogActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("catalog restarting");
    }
}

fn store_gone<T>(_: T) -> KernelError {
    KernelError::Unavailable("store")
}

/// Start-up: the kernel records, and a sweep of `kernels/` against them.
/// Answers how many kernels there are.
pub struct LoadCatalog;

impl Message for LoadCatalog {
    type Result = Result<usize, KernelError>;
}

impl Handler<LoadCatalog> for CatalogActor {
    type Result = ResponseActFuture<Self, Result<usize, KernelError>>;

    fn handle(&mut self, _: LoadCatalog, _: &mut Context<Self>) -> Self::Result {
        let (store, dir) = (self.store.clone(), self.kernels_dir.clone());
        let images = self.images.clone();
        Box::pin(
            async move {
                let listing = store
                    .send(List::<KernelRecord>::new())
                    .await
                    .map_err(store_gone)??;
                let image_listing = store
                    .send(List::<ImageRecord>::new())
                    .await
                    .map_err(store_gone)??;
                let claimed: HashSet<PathBuf> = listing
                    .records
                    .iter()
                    .map(|k| k.name.as_str())
                    .chain(listing.undecodable.iter().map(|bad| bad.key.as_str()))
                    .map(|name| catalog::kernel_dir(&dir, name))
                    .collect();
                tokio::task::spawn_blocking(move || {
                    reconcile::sweep(&dir, &claimed, reconcile::remove_any);
                    sweep_images(&images, &image_listing);
                })
                .await
                .map_err(|_| KernelError::Unavailable("blocking thread pool"))?;
                Ok::<_, KernelError>(listing)
            }
            .into_actor(self)
            .map(|listing, act, _| {
                let listing = listing?;
                for bad in &listing.undecodable {
                    warn!(table = %bad.table, key = %bad.key, reason = %bad.reason, "quarantined a kernel record that does not decode");
                }
                act.quarantined = listing.undecodable;
                Ok(listing.records.len())
            }),
        )
    }
}

/// Every kernel, by name.
pub struct ListKernels;

impl Message for ListKernels {
    type Result = Result<Vec<KernelRecord>, KernelError>;
}

impl Handler<ListKernels> for CatalogActor {
    type Result = ResponseFuture<Result<Vec<KernelRecord>, KernelError>>;

    fn handle(&mut self, _: ListKernels, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move {
            let mut kernels = store
                .send(List::<KernelRecord>::new())
                .await
                .map_err(store_gone)??
                .records;
            kernels.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(kernels)
        })
    }
}

impl Handler<Quarantined> for CatalogActor {
    type Result = MessageResult<Quarantined>;

    fn handle(&mut self, _: Quarantined, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.quarantined.clone())
    }
}

/// The VM `vm` chose `kernel` (and the image of digest `image`): they may
/// not go until the VM's record names them (then the record holds them)
/// and [`Unreserve`] ends the reservation.
pub struct Reserve {
    pub kernel: String,
    pub image: Option<VmImage>,
    pub vm: String,
}

impl Message for Reserve {
    type Result = Result<(), VmReserveError>;
}

/// Why a VM cannot have what it chose.
#[derive(Debug, thiserror::Error)]
pub enum VmReserveError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl From<Gone> for VmReserveError {
    fn from(gone: Gone) -> VmReserveError {
        VmReserveError::Kernel(gone.into())
    }
}

impl Handler<Reserve> for CatalogActor {
    type Result = ResponseFuture<Result<(), VmReserveError>>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let kernel = msg.kernel.clone();
        let looked = async move {
            let found = store
                .send(Get::<KernelRecord>::new(kernel))
                .await
                .map_err(store_gone)?
                .map_err(KernelError::from)?;
            let images = store
                .send(List::<ImageRecord>::new())
                .await
                .map_err(|_| ImageError::Unavailable("store"))?
                .map_err(ImageError::from)?;
            Ok::<_, VmReserveError>((found, images.records))
        };
        in_one_turn(
            ctx,
            looked.into_actor(self).map(move |looked, act, _| {
                let (kernel, images) = looked?;
                kernel.ok_or(KernelError::NotFound(msg.kernel.clone()))?;
                if let Some(image) = &msg.image {
                    // Removed since the create found it (`image rm` won).
                    if !images.iter().any(|i| i.digest == image.digest) {
                        return Err(ImageError::Lookup(Lookup::NotFound(image.name.clone())).into());
                    }
                    act.image_reservations
                        .entry(image.digest.clone())
                        .or_default()
                        .insert(msg.vm.clone());
                }
                act.reservations
                    .entry(msg.kernel)
                    .or_default()
                    .insert(msg.vm);
                Ok(())
            }),
        )
    }
}

/// Runs `work` with the catalog's mailbox held (`ctx.wait`), so that no
/// other message interleaves between a check and what relies on it, and
/// answers its result.
fn in_one_turn<T: Send + 'static, E: Send + From<Gone> + 'static>(
    ctx: &mut Context<CatalogActor>,
    work: impl ActorFuture<CatalogActor, Output = Result<T, E>> + 'static,
) -> ResponseFuture<Result<T, E>> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    ctx.wait(work.map(|result, _, _| {
        let _ = answer.send(result);
    }));
    Box::pin(async move { answered.await.unwrap_or(Err(E::from(Gone("catalog")))) })
}

/// A part of the daemon that stopped answering.
pub struct Gone(&'static str);

impl From<Gone> for KernelError {
    fn from(gone: Gone) -> KernelError {
        KernelError::Unavailable(gone.0)
    }
}

impl From<Gone> for ImageError {
    fn from(gone: Gone) -> ImageError {
        ImageError::Unavailable(gone.0)
    }
}

pub struct Unreserve {
    pub kernel: String,
    pub image: Option<String>,
    pub vm: String,
}

impl Message for Unreserve {
    type Result = ();
}

impl Handler<Unreserve> for CatalogActor {
    type Result = ();

    fn handle(&mut self, msg: Unreserve, _: &mut Context<Self>) {
        let unreserve = |reservations: &mut HashMap<String, HashSet<String>>, key: &str| {
            if let Some(vms) = reservations.get_mut(key) {
                vms.remove(&msg.vm);
                if vms.is_empty() {
                    reservations.remove(key);
                }
            }
        };
        unreserve(&mut self.reservations, &msg.kernel);
        if let Some(digest) = &msg.image {
            unreserve(&mut self.image_reservations, digest);
        }
    }
}

/// `kernel rm`: refused while a VM record or a reservation uses it.
pub struct RemoveKernel {
    pub name: String,
}

impl Message for RemoveKernel {
    type Result = Result<KernelRecord, KernelError>;
}

impl Handler<RemoveKernel> for CatalogActor {
    type Result = ResponseFuture<Result<KernelRecord, KernelError>>;

    fn handle(&mut self, msg: RemoveKernel, ctx: &mut Context<Self>) -> Self::Result {
        let (store, name) = (self.store.clone(), msg.name);
        let looked = {
            let (store, name) = (store.clone(), name.clone());
            async move {
                let kernel = store
                    .send(Get::<KernelRecord>::new(name.clone()))
                    .await
                    .map_err(store_gone)??
                    .ok_or_else(|| KernelError::NotFound(name.clone()))?;
                let vms = store
                    .send(List::<VmRecord>::new())
                    .await
                    .map_err(store_gone)??;
                Ok::<_, KernelError>((kernel, vms))
            }
        };
        let dir = catalog::kernel_dir(&self.kernels_dir, &name);
        let work = looked.into_actor(self).then(move |looked, act, _| {
            let checked = looked.and_then(|(kernel, vms)| {
                // A quarantined VM may use any kernel: it counts as a user
                // until it is forgotten.
                let mut users: Vec<String> = vms
                    .records
                    .into_iter()
                    .filter(|vm| vm.kernel == name)
                    .map(|vm| vm.name)
                    .chain(act.reservations.get(&name).into_iter().flatten().cloned())
                    .chain(vms.undecodable.into_iter().map(|bad| {
                        format!(
                            "{} (quarantined; `banger vm forget {}` removes it)",
                            bad.key, bad.key
                        )
                    }))
                    .collect();
                users.sort();
                users.dedup();
                if users.is_empty() {
                    Ok(kernel)
                } else {
                    Err(KernelError::InUse {
                        kernel: name.clone(),
                        vms: users,
                    })
                }
            });
            async move {
                let kernel = checked?;
                store
                    .send(Delete::<KernelRecord>::new(kernel.name.clone()))
                    .await
                    .map_err(store_gone)??;
                let removed = tokio::task::spawn_blocking(move || reconcile::remove_any(&dir))
                    .await
                    .map_err(|_| KernelError::Unavailable("blocking thread pool"))?;
                if let Err(e) = removed {
                    // The record is gone; the next start sweeps the files.
                    warn!(kernel = %kernel.name, error = %e, "cannot remove the kernel's files");
                }
                info!(kernel = %kernel.name, "kernel removed");
                Ok(kernel)
            }
            .into_actor(act)
            .map(|removed, act, _| {
                if let Ok(kernel) = &removed {
                    act.bootable.remove(&kernel.name);
                }
                removed
            })
        });
        in_one_turn(ctx, work)
    }
}

/// What a VM boots: the kernel's record, its `boot_image` built for the
/// daemon's agent (once per kernel and agent; the record keeps it). Only
/// the first start of a kernel in a daemon's life reads the store.
pub struct PrepareBoot {
    pub kernel: String,
}

impl Message for PrepareBoot {
    type Result = Result<KernelRecord, KernelError>;
}

impl Handler<PrepareBoot> for CatalogActor {
    type Result = ResponseFuture<Result<KernelRecord, KernelError>>;

    fn handle(&mut self, msg: PrepareBoot, ctx: &mut Context<Self>) -> Self::Result {
        // A stat of the daemon's own file: an image removed by hand is rebuilt.
        if let Some(kernel) = self.bootable.get(&msg.kernel)
            && kernel.boot_image.as_ref().is_some_and(|b| b.path.is_file())
        {
            let kernel = kernel.clone();
            return Box::pin(async move { Ok(kernel) });
        }
        let (store, agent, agent_path) = (
            self.store.clone(),
            self.boot_agent.clone(),
            self.agent.clone(),
        );
        let name = msg.kernel;
        let work = async move {
            let kernel = store
                .send(Get::<KernelRecord>::new(name.clone()))
                .await
                .map_err(store_gone)??
                .ok_or_else(|| KernelError::NotFound(name.clone()))?;
            let (kernel, agent, built) = tokio::task::spawn_blocking(move || {
                let agent = match agent {
                    Some(agent) => agent,
                    None => Arc::new(Agent::load(&agent_path)?),
                };
                let current = kernel.boot_image.as_ref().is_some_and(|image| {
                    image.agent_sha256 == agent.sha256 && image.path.is_file()
                });
                let built = (!current)
                    .then(|| catalog::boot_image(&kernel, &agent))
                    .transpose()?;
                Ok::<_, CatalogError>((kernel, agent, built))
            })
            .await
            .map_err(|_| KernelError::Unavailable("blocking thread pool"))??;
            let kernel = match built {
                Some(image) => {
                    let kernel = KernelRecord {
                        boot_image: Some(image),
                        ..kernel
                    };
                    store
                        .send(Put(kernel.clone()))
                        .await
                        .map_err(store_gone)??;
                    info!(kernel = %kernel.name, agent = %agent.sha256, "boot image built");
                    kernel
                }
                None => kernel,
            };
            Ok::<_, KernelError>((kernel, agent))
        };
        // One build at a time: starts that come meanwhile find it done.
        in_one_turn(
            ctx,
            work.into_actor(self).map(|built, act, _| {
                let (kernel, agent) = built?;
                act.boot_agent = Some(agent);
                act.bootable.insert(kernel.name.clone(), kernel.clone());
                Ok(kernel)
            }),
        )
    }
}

/// `kernel import` and `kernel import-deb`: the files staged and renamed
/// into place on a blocking thread, then the record; a name is imported
/// once at a time.
pub struct ImportKernel {
    pub name: String,
    pub source: KernelSource,
    pub progress: ImportProgress,
    /// Bounds the reads of the source's files.
    pub watch: Watch,
}

impl Message for ImportKernel {
    type Result = Result<KernelRecord, KernelError>;
}

impl Handler<ImportKernel> for CatalogActor {
    type Result = ResponseActFuture<Self, Result<KernelRecord, KernelError>>;

    fn handle(&mut self, msg: ImportKernel, _: &mut Context<Self>) -> Self::Result {
        let name = msg.name.clone();
        if !self.importing.insert(name.clone()) {
            return Box::pin(fut::ready(Err(KernelError::Importing(name))));
        }
        let (store, dir, limit) = (
            self.store.clone(),
            self.kernels_dir.clone(),
            self.unpack_limit,
        );
        let work = async move {
            if store
                .send(Get::<KernelRecord>::new(msg.name.clone()))
                .await
                .map_err(store_gone)??
                .is_some()
            {
                return Err(CatalogError::Exists(msg.name).into());
            }
            let (name, progress, staging) = (msg.name.clone(), msg.progress, dir.clone());
            let watch = msg.watch;
            let watched = watch.clone();
            let files = tokio::task::spawn_blocking(move || {
                // No record, no import under way: files under this name
                // are a failed removal's leftovers (a stalled import's
                // thread fails at its next read, before its rename).
                let _ = reconcile::remove_any(&catalog::kernel_dir(&staging, &name));
                import_files(&staging, &name, msg.source, limit, &watched, progress)
            });
            let record = watch
                .bound(files)
                .await?
                .map_err(|_| KernelError::Unavailable("blocking thread pool"))??;
            crate::fault::boundary("kernel-staged");
            if let Err(e) = store.send(Put(record.clone())).await.map_err(store_gone)? {
                // Its files go with it (or, if that fails, at the next start).
                let entry = catalog::kernel_dir(&dir, &record.name);
                let _ = tokio::task::spawn_blocking(move || reconcile::remove_any(&entry)).await;
                return Err(e.into());
            }
            info!(kernel = %record.name, "kernel imported");
            Ok(record)
        };
        Box::pin(work.into_actor(self).map(move |result, act, _| {
            act.importing.remove(&name);
            result
        }))
    }
}

/// The catalog entry's files and its record (not yet stored).
fn import_files(
    dir: &std::path::Path,
    name: &str,
    source: KernelSource,
    limit: UnpackLimit,
    watch: &Watch,
    progress: ImportProgress,
) -> Result<KernelRecord, CatalogError> {
    let created_at = Timestamp::now();
    match source {
        KernelSource::Vmlinux {
            vmlinux,
            initrd,
            cmdline,
        } => {
            let imported = catalog::import_kernel(dir, name, &vmlinux, initrd.as_ref(), watch)?;
            Ok(KernelRecord {
                name: name.to_string(),
                vmlinux: imported.vmlinux,
                vmlinux_sha256: Some(imported.vmlinux_sha256),
                initrd: imported.initrd,
                initrd_sha256: imported.initrd_sha256,
                bzimage: None,
                bzimage_sha256: None,
                version: None,
                package: None,
                modules: Vec::new(),
                cmdline,
                note: imported.note,
                boot_image: None,
                created_at,
            })
        }
        KernelSource::Package { package } => {
            let imported =
                catalog::import_package(dir, name, &package, limit, watch, |phase, step| {
                    progress(phase, step)
                })?;
            Ok(KernelRecord {
                name: name.to_string(),
                vmlinux: imported.vmlinux,
                vmlinux_sha256: Some(imported.vmlinux_sha256),
                initrd: Some(imported.initrd),
                initrd_sha256: Some(imported.initrd_sha256),
                bzimage: Some(imported.bzimage),
                bzimage_sha256: Some(imported.bzimage_sha256),
                version: Some(imported.version),
                package: package
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned()),
                modules: imported.modules,
                cmdline: None,
                note: None,
                boot_image: None,
                created_at,
            })
        }
    }
}

/// Files under `images/` and `blobs/sha256/` that no image record claims
/// (an interrupted import's, or a removed image's) are removed; answers
/// the bytes they held. With a record that does not decode, nothing is
/// (its claims are unknown). No import may be under way.
fn sweep_images(images: &image_import::Store, listing: &crate::store::Listing<ImageRecord>) -> u64 {
    if !listing.undecodable.is_empty() {
        for bad in &listing.undecodable {
            warn!(table = %bad.table, key = %bad.key, reason = %bad.reason, "an image record does not decode; images and blobs are not swept");
        }
        return 0;
    }
    let disks: HashSet<PathBuf> = listing.records.iter().map(|i| i.disk.clone()).collect();
    let blobs: HashSet<PathBuf> = listing
        .records
        .iter()
        .flat_map(|i| {
            i.layers
                .iter()
                .map(|l| l.digest.as_str())
                .chain(std::iter::once(i.digest.as_str()))
        })
        .filter_map(|digest| blob_path(&images.blobs, digest))
        .collect();
    let freed = std::cell::Cell::new(0u64);
    let remove = |path: &std::path::Path| {
        use std::os::unix::fs::MetadataExt as _;
        let bytes = std::fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512);
        reconcile::remove_any(path)?;
        freed.set(freed.get() + bytes);
        Ok(())
    };
    reconcile::sweep(&images.images, &disks, remove);
    reconcile::sweep(&images.blobs.join("sha256"), &blobs, remove);
    freed.get()
}

/// Hears an image import's progress (phase, done, total), from its
/// blocking thread.
pub type ImageProgress = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// `image import`: one at a time; the record is stored once the ext4 is
/// in place. A name that exists is refused unless it is the same image.
pub struct ImportImage {
    pub source: Source,
    pub archive: bool,
    pub name: Option<String>,
    pub cancel: tokio_util::sync::CancellationToken,
    pub progress: ImageProgress,
}

impl Message for ImportImage {
    type Result = Result<ImageRecord, ImageError>;
}

impl Handler<ImportImage> for CatalogActor {
    type Result = ResponseFuture<Result<ImageRecord, ImageError>>;

    fn handle(&mut self, msg: ImportImage, _: &mut Context<Self>) -> Self::Result {
        let (store, images, lock) = (
            self.store.clone(),
            self.images.clone(),
            self.importing_image.clone(),
        );
        let gone = |_| ImageError::Unavailable("store");
        Box::pin(async move {
            let _one_at_a_time = lock.lock().await;
            if let Some(name) = &msg.name
                && let Some(existing) = store
                    .send(Get::<ImageRecord>::new(name.clone()))
                    .await
                    .map_err(gone)??
            {
                return Err(ImageError::Exists {
                    name: name.clone(),
                    digest: existing.digest,
                });
            }
            let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let cancel_watch = {
                let (cancel, cancelled) = (msg.cancel.clone(), cancelled.clone());
                tokio::spawn(async move {
                    cancel.cancelled().await;
                    cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
                })
            };
            let work_images = images.clone();
            let watch = msg.source.watch().clone();
            let (source, archive, name, progress) =
                (msg.source, msg.archive, msg.name, msg.progress);
            let importing = tokio::task::spawn_blocking(move || {
                image_import::import(
                    &work_images,
                    image_import::Request {
                        source,
                        archive,
                        name,
                        cancelled: &cancelled,
                        progress: &*progress,
                    },
                )
            });
            let imported = watch.bound(importing).await;
            cancel_watch.abort();
            let record =
                imported?.map_err(|_| ImageError::Unavailable("blocking thread pool"))??;
            let listing = store
                .send(List::<ImageRecord>::new())
                .await
                .map_err(gone)??;
            if let Some(existing) = listing.records.iter().find(|i| i.name == record.name) {
                if existing.digest == record.digest {
                    return Ok(existing.clone());
                }
                if !listing.records.iter().any(|i| i.disk == record.disk) {
                    let disk = record.disk.clone();
                    let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(disk)).await;
                }
                return Err(ImageError::Exists {
                    name: record.name,
                    digest: existing.digest.clone(),
                });
            }
            crate::fault::boundary("image-staged");
            store.send(Put(record.clone())).await.map_err(gone)??;
            info!(image = %record.name, digest = %record.digest, "image imported");
            Ok(record)
        })
    }
}

/// Every image, by name.
pub struct ListImages;

impl Message for ListImages {
    type Result = Result<Vec<ImageRecord>, ImageError>;
}

impl Handler<ListImages> for CatalogActor {
    type Result = ResponseFuture<Result<Vec<ImageRecord>, ImageError>>;

    fn handle(&mut self, _: ListImages, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move {
            let mut images = store
                .send(List::<ImageRecord>::new())
                .await
                .map_err(|_| ImageError::Unavailable("store"))??
                .records;
            images.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(images)
        })
    }
}

/// The kernel a `vm create` without `--kernel` boots: `preferred` (the
/// configured `vm.default_kernel`), else the only kernel there is.
pub struct ChooseKernel {
    pub preferred: Option<String>,
}

impl Message for ChooseKernel {
    type Result = Result<String, KernelError>;
}

impl Handler<ChooseKernel> for CatalogActor {
    type Result = ResponseFuture<Result<String, KernelError>>;

    fn handle(&mut self, msg: ChooseKernel, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move {
            if let Some(preferred) = msg.preferred {
                return Ok(preferred);
            }
            let kernels = store
                .send(List::<KernelRecord>::new())
                .await
                .map_err(store_gone)??
                .records;
            let mut names: Vec<String> = kernels.into_iter().map(|k| k.name).collect();
            names.sort();
            match &names[..] {
                [one] => Ok(one.clone()),
                _ => Err(KernelError::Unchosen(names)),
            }
        })
    }
}

/// One image by name, digest or unique digest prefix.
pub struct FindImage(pub String);

impl Message for FindImage {
    type Result = Result<ImageRecord, ImageError>;
}

impl Handler<FindImage> for CatalogActor {
    type Result = ResponseFuture<Result<ImageRecord, ImageError>>;

    fn handle(&mut self, msg: FindImage, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move {
            let images = store
                .send(List::<ImageRecord>::new())
                .await
                .map_err(|_| ImageError::Unavailable("store"))??
                .records;
            Ok(crate::image::find(&images, &msg.0)?.clone())
        })
    }
}

/// What an image removal or a prune did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImagesRemoved {
    /// The image records removed.
    pub images: Vec<ImageRecord>,
    /// Bytes of disks and blobs freed (allocated, not apparent).
    pub freed_bytes: u64,
    /// VMs that held a removed image (`--force`): they keep their disks.
    #[serde(default)]
    pub held_by: Vec<String>,
}

/// `image rm`: refused while a VM holds the image (its record or a
/// reservation), unless `force`.
pub struct RemoveImage {
    pub name: String,
    pub force: bool,
}

impl Message for RemoveImage {
    type Result = Result<ImagesRemoved, ImageError>;
}

/// `image prune`: every image no VM holds goes, and every disk and blob
/// no image left claims.
pub struct PruneImages;

impl Message for PruneImages {
    type Result = Result<ImagesRemoved, ImageError>;
}

/// The VMs holding the image of `digest`: records whose ledger names it,
/// VMs that chose it and are being created, and any VM record that does
/// not decode (it may hold any image until it is forgotten).
fn image_holders(
    vms: &crate::store::Listing<VmRecord>,
    reserved: Option<&HashSet<String>>,
    digest: &str,
) -> Vec<String> {
    let mut holders: Vec<String> = vms
        .records
        .iter()
        .filter(|vm| {
            vm.resources.contains(&crate::vm::ledger::Resource::Image)
                && vm.image.as_ref().is_some_and(|i| i.digest == digest)
        })
        .map(|vm| vm.name.clone())
        .chain(reserved.into_iter().flatten().cloned())
        .chain(vms.undecodable.iter().map(|bad| {
            format!(
                "{} (quarantined; `banger vm forget {}` removes it)",
                bad.key, bad.key
            )
        }))
        .collect();
    holders.sort();
    holders.dedup();
    holders
}

/// Picks the images to remove from the listing, given the VMs holding a
/// digest; answers them and the VMs that held them.
type ChooseImages = Box<
    dyn FnOnce(
            &[ImageRecord],
            &dyn Fn(&str) -> Vec<String>,
        ) -> Result<(Vec<ImageRecord>, Vec<String>), ImageError>
        + Send,
>;

/// Removes the image records `choose` picks, then every file no record
/// left claims; sent with imports excluded (the guard), run with the
/// mailbox held.
struct RemoveChosen {
    choose: ChooseImages,
    _imports: tokio::sync::OwnedMutexGuard<()>,
}

impl Message for RemoveChosen {
    type Result = Result<ImagesRemoved, ImageError>;
}

impl Handler<RemoveChosen> for CatalogActor {
    type Result = ResponseFuture<Result<ImagesRemoved, ImageError>>;

    fn handle(&mut self, msg: RemoveChosen, ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let looked = async move {
            let images = store
                .send(List::<ImageRecord>::new())
                .await
                .map_err(gone_store)??;
            let vms = store
                .send(List::<VmRecord>::new())
                .await
                .map_err(gone_store)??;
            Ok::<_, ImageError>((store, images, vms))
        };
        let images_dir = self.images.clone();
        let RemoveChosen { choose, _imports } = msg;
        let work = looked.into_actor(self).then(move |looked, act, _| {
            let chosen = looked.and_then(|(store, images, vms)| {
                if !images.undecodable.is_empty() {
                    return Err(ImageError::Quarantined(
                        images.undecodable.iter().map(|b| b.key.clone()).collect(),
                    ));
                }
                let holders =
                    |digest: &str| image_holders(&vms, act.image_reservations.get(digest), digest);
                let (gone, held_by) = choose(&images.records, &holders)?;
                Ok((store, images.records, gone, held_by))
            });
            async move {
                let _imports = _imports;
                let (store, all, gone, held_by) = chosen?;
                for image in &gone {
                    store
                        .send(Delete::<ImageRecord>::new(image.name.clone()))
                        .await
                        .map_err(gone_store)??;
                    info!(image = %image.name, digest = %image.digest, "image removed");
                }
                let left = crate::store::Listing {
                    records: all.into_iter().filter(|i| !gone.contains(i)).collect(),
                    undecodable: Vec::new(),
                };
                let freed_bytes =
                    tokio::task::spawn_blocking(move || sweep_images(&images_dir, &left))
                        .await
                        .map_err(|_| ImageError::Unavailable("blocking thread pool"))?;
                Ok(ImagesRemoved {
                    images: gone,
                    freed_bytes,
                    held_by,
                })
            }
            .into_actor(act)
        });
        in_one_turn(ctx, work)
    }
}

impl CatalogActor {
    /// Waits for the import under way (outside the mailbox), then removes
    /// what `choose` picks.
    fn remove_images(
        &self,
        ctx: &Context<Self>,
        choose: ChooseImages,
    ) -> ResponseFuture<Result<ImagesRemoved, ImageError>> {
        let (lock, me) = (self.importing_image.clone(), ctx.address());
        Box::pin(async move {
            let imports = lock.lock_owned().await;
            me.send(RemoveChosen {
                choose,
                _imports: imports,
            })
            .await
            .map_err(|_| ImageError::Unavailable("catalog"))?
        })
    }
}

fn gone_store<T>(_: T) -> ImageError {
    ImageError::Unavailable("store")
}

impl Handler<RemoveImage> for CatalogActor {
    type Result = ResponseFuture<Result<ImagesRemoved, ImageError>>;

    fn handle(&mut self, msg: RemoveImage, ctx: &mut Context<Self>) -> Self::Result {
        self.remove_images(
            ctx,
            Box::new(move |images, holders| {
                let removal = crate::image::removal(images, &msg.name)?;
                // The VMs holding the digest lose it only with its last
                // name: another name keeps the disk.
                let held_by = if removal.last {
                    holders(&removal.digest)
                } else {
                    Vec::new()
                };
                if !held_by.is_empty() && !msg.force {
                    return Err(ImageError::InUse {
                        image: msg.name,
                        vms: held_by,
                    });
                }
                Ok((removal.records, held_by))
            }),
        )
    }
}

impl Handler<PruneImages> for CatalogActor {
    type Result = ResponseFuture<Result<ImagesRemoved, ImageError>>;

    fn handle(&mut self, _: PruneImages, ctx: &mut Context<Self>) -> Self::Result {
        self.remove_images(
            ctx,
            Box::new(|images, holders| {
                let gone = images
                    .iter()
                    .filter(|i| holders(&i.digest).is_empty())
                    .cloned()
                    .collect();
                Ok((gone, Vec::new()))
            }),
        )
    }
}
