//! The image catalog: imports (one at a time, sharing blobs), listings,
//! lookups, removals and prunes that spare what VMs hold, and the sweep of
//! files no image record claims.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use tracing::{info, warn};

use super::reservations::in_one_turn;
use super::{CatalogActor, ImageError};
use crate::actors::store::{Delete, Get, List, Put};
use crate::image::import as image_import;
use crate::image::source::Source;
use crate::image::{ImageRecord, blob_path};
use crate::reconcile;
use crate::vm::record::VmRecord;

/// Files under `images/` and `blobs/sha256/` that no image record claims
/// (an interrupted import's, or a removed image's) are removed; answers
/// the bytes they held. With a record that does not decode, nothing is
/// (its claims are unknown). No import may be under way.
pub(super) fn sweep_images(
    images: &image_import::Store,
    listing: &crate::store::Listing<ImageRecord>,
) -> u64 {
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
