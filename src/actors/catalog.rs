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
use crate::caller::CallerFile;
use crate::catalog::{self, Agent, CatalogError, KernelRecord};
use crate::image::import::{self as image_import, ImportError};
use crate::image::source::Source;
use crate::image::{ImageRecord, blob_path};
use crate::kernel::UnpackLimit;
use crate::reconcile;
use crate::store::{StoreError, Undecodable};
use crate::vm::record::VmRecord;

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
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no image named {0}; `banger image ls` lists them and `banger image import` adds one")]
    NotFound(String),
    #[error("an image named {name} exists already ({digest}); import under another --name")]
    Exists { name: String, digest: String },
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
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

/// The VM `vm` chose `kernel`: it may not go until the VM's record names
/// it (then the record holds it) and [`Unreserve`] ends the reservation.
pub struct Reserve {
    pub kernel: String,
    pub vm: String,
}

impl Message for Reserve {
    type Result = Result<(), KernelError>;
}

impl Handler<Reserve> for CatalogActor {
    type Result = ResponseFuture<Result<(), KernelError>>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) -> Self::Result {
        let get = self
            .store
            .send(Get::<KernelRecord>::new(msg.kernel.clone()));
        in_one_turn(
            ctx,
            get.into_actor(self).map(move |found, act, _| {
                found
                    .map_err(store_gone)??
                    .ok_or(KernelError::NotFound(msg.kernel.clone()))?;
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
fn in_one_turn<T: Send + 'static>(
    ctx: &mut Context<CatalogActor>,
    work: impl ActorFuture<CatalogActor, Output = Result<T, KernelError>> + 'static,
) -> ResponseFuture<Result<T, KernelError>> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    ctx.wait(work.map(|result, _, _| {
        let _ = answer.send(result);
    }));
    Box::pin(async move {
        answered
            .await
            .unwrap_or(Err(KernelError::Unavailable("catalog")))
    })
}

pub struct Unreserve {
    pub kernel: String,
    pub vm: String,
}

impl Message for Unreserve {
    type Result = ();
}

impl Handler<Unreserve> for CatalogActor {
    type Result = ();

    fn handle(&mut self, msg: Unreserve, _: &mut Context<Self>) {
        if let Some(vms) = self.reservations.get_mut(&msg.kernel) {
            vms.remove(&msg.vm);
            if vms.is_empty() {
                self.reservations.remove(&msg.kernel);
            }
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
            let record = tokio::task::spawn_blocking(move || {
                // No record, no import under way: files under this name
                // are a failed removal's leftovers.
                let _ = reconcile::remove_any(&catalog::kernel_dir(&staging, &name));
                import_files(&staging, &name, msg.source, limit, progress)
            })
            .await
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
    progress: ImportProgress,
) -> Result<KernelRecord, CatalogError> {
    let created_at = Timestamp::now();
    match source {
        KernelSource::Vmlinux {
            vmlinux,
            initrd,
            cmdline,
        } => {
            let imported = catalog::import_kernel(dir, name, &vmlinux, initrd.as_ref())?;
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
            let imported = catalog::import_package(dir, name, &package, limit, |phase, step| {
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
/// are an interrupted import's: removed. With a record that does not
/// decode, nothing is (its claims are unknown).
fn sweep_images(images: &image_import::Store, listing: &crate::store::Listing<ImageRecord>) {
    if !listing.undecodable.is_empty() {
        for bad in &listing.undecodable {
            warn!(table = %bad.table, key = %bad.key, reason = %bad.reason, "an image record does not decode; images and blobs are not swept");
        }
        return;
    }
    let disks: HashSet<PathBuf> = listing.records.iter().map(|i| i.disk.clone()).collect();
    reconcile::sweep(&images.images, &disks, reconcile::remove_any);
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
    reconcile::sweep(&images.blobs.join("sha256"), &blobs, reconcile::remove_any);
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
            let watch = {
                let (cancel, cancelled) = (msg.cancel.clone(), cancelled.clone());
                tokio::spawn(async move {
                    cancel.cancelled().await;
                    cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
                })
            };
            let work_images = images.clone();
            let (source, archive, name, progress) =
                (msg.source, msg.archive, msg.name, msg.progress);
            let imported = tokio::task::spawn_blocking(move || {
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
            })
            .await;
            watch.abort();
            let record =
                imported.map_err(|_| ImageError::Unavailable("blocking thread pool"))??;
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
