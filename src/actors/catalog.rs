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
//!
//! Its parts: `kernels`, `images` and `reservations` (what VMs hold while
//! their records do not name it yet); the start-up load is here.

mod images;
mod kernels;
mod reservations;

pub use images::{
    FindImage, ImageProgress, ImagesRemoved, ImportImage, ListImages, PruneImages, RemoveImage,
};
pub use kernels::{ChooseKernel, ImportKernel, ListKernels, PrepareBoot, RemoveKernel};
pub use reservations::{Gone, Reserve, Unreserve, VmReserveError};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use tracing::warn;

use crate::actors::records::StoreFailure;
use crate::actors::store::{List, Quarantined, StoreActor};
use crate::caller::{CallerFile, Stalled};
use crate::catalog::{self, Agent, CatalogError, KernelRecord};
use crate::image::import::{self as image_import, ImportError};
use crate::image::{ImageRecord, Lookup};
use crate::kernel::UnpackLimit;
use crate::reconcile;
use crate::store::{StoreError, Undecodable};

use images::sweep_images;

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
    Store(StoreFailure),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
    #[error(transparent)]
    Stalled(#[from] Stalled),
}

impl From<StoreError> for KernelError {
    fn from(e: StoreError) -> KernelError {
        KernelError::Store(e.into())
    }
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
    Store(StoreFailure),
    #[error("the {0} is not answering")]
    Unavailable(&'static str),
    #[error(transparent)]
    Stalled(#[from] Stalled),
}

impl From<StoreError> for ImageError {
    fn from(e: StoreError) -> ImageError {
        ImageError::Store(e.into())
    }
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

impl Handler<Quarantined> for CatalogActor {
    type Result = MessageResult<Quarantined>;

    fn handle(&mut self, _: Quarantined, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.quarantined.clone())
    }
}
