//! The `image.*` methods: import (an OCI layout directory, an OCI archive
//! or a docker archive, opened with the caller's authority; with progress
//! and cancel), list, inspect, remove, prune. They ask only the catalog.

use std::path::PathBuf;
use std::sync::Arc;

use actix::Addr;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::protocol::{ErrorCode, Params, RpcError, requests};
use super::wire::Wire;
use crate::actors::catalog::{
    CatalogActor, FindImage, ImageError, ImageProgress, ImportImage, ListImages, PruneImages,
    RemoveImage,
};
use crate::caller::{CallerPath, SizeCap, Watch};
use crate::image::source::Source;
use crate::image::{ImageRecord, validate_image_name};

requests! {
    /// Requests about the image catalog.
    pub enum Request {
        Import(ImageImportParams) => "image.import",
            "Import an OCI image layout directory, OCI archive or docker archive into an ext4 image; with progress and cancel.";
        List => "image.list", "Every image in the catalog.";
        Inspect(ImageRef) => "image.inspect", "One image, by name or digest.";
        Remove(ImageRemoveParams) => "image.remove",
            "Remove an image; refused while a VM holds it unless forced (the VMs keep their own disks).";
        Prune => "image.prune", "Remove every image no VM holds, with its disk and blobs; says what it freed.";
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageImportParams {
    /// The layout directory or archive, an absolute path.
    pub path: PathBuf,
    /// Default: the name the image gives itself.
    #[serde(default)]
    pub name: Option<String>,
}

impl Params for ImageImportParams {
    fn validate(&self) -> Result<(), RpcError> {
        if !self.path.is_absolute() {
            return Err(RpcError::invalid_params("path", "must be an absolute path"));
        }
        if let Some(name) = &self.name {
            validate_image_name(name).map_err(|e| RpcError::invalid_params("name", e))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// A name, a digest (`sha256:<hex>`) or a unique prefix of one.
    pub name: String,
}

impl Params for ImageRef {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRemoveParams {
    /// A name, a digest or a unique prefix of one.
    pub name: String,
    /// Remove it even while VMs hold it.
    #[serde(default)]
    pub force: bool,
}

impl Params for ImageRemoveParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageResult {
    pub image: ImageRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagesResult {
    pub images: Vec<ImageRecord>,
}

/// What the image handlers reach.
pub struct ImageServices {
    pub catalog: Addr<CatalogActor>,
    /// The most an archive a request names may hold.
    pub max_file: SizeCap,
    /// What an image may hold (`image.*`).
    pub limits: crate::image::layer::Limits,
    /// How long one read of what a request names may wait.
    pub io_stall: std::time::Duration,
}

pub async fn handle(
    services: &ImageServices,
    wire: &Wire<'_>,
    request: Request,
) -> Result<Box<RawValue>, RpcError> {
    let catalog = &services.catalog;
    match request {
        Request::Import(params) => {
            let opened = wire
                .open_file_or_dir("path", &params.path, services.max_file)
                .await?;
            let target = params
                .name
                .clone()
                .unwrap_or_else(|| params.path.display().to_string());
            let (watch, limits) = (Watch::new(services.io_stall), services.limits);
            let (source, archive) = match opened {
                CallerPath::Dir(dir) => (
                    Source::dir(
                        Box::new(move |name: &str| dir.open(name)),
                        &params.path,
                        watch,
                        limits,
                    ),
                    false,
                ),
                // Indexing reads headers only, on a blocking thread.
                CallerPath::File(file) => {
                    let (path, watched) = (params.path.clone(), watch.clone());
                    let indexing = tokio::task::spawn_blocking(move || {
                        Source::archive(file.file, &path, watched, limits)
                    });
                    let indexed = watch
                        .bound(indexing)
                        .await
                        .map_err(ImageError::from)?
                        .map_err(|_| RpcError::new(ErrorCode::Unavailable, "blocking pool gone"))?
                        .map_err(|e| RpcError::invalid_params("path", crate::error_chain(&e)))?;
                    (indexed, true)
                }
            };
            let image = wire
                .with_progress(
                    "image.import",
                    &target,
                    true,
                    true,
                    |report, cancel| async move {
                        let report = std::sync::Mutex::new(report);
                        let progress: ImageProgress = Arc::new(move |phase, done, total| {
                            if let Ok(report) = report.lock() {
                                report(phase, Some(done), Some(total));
                            }
                        });
                        let import = ImportImage {
                            source,
                            archive,
                            name: params.name,
                            cancel,
                            progress,
                        };
                        Ok(catalog.send(import).await??)
                    },
                )
                .await?;
            wire.answer(ImageResult { image })
        }
        Request::List => {
            let images = catalog.send(ListImages).await??;
            wire.answer(ImagesResult { images })
        }
        Request::Inspect(ImageRef { name }) => {
            let image = catalog.send(FindImage(name)).await??;
            wire.answer(ImageResult { image })
        }
        Request::Remove(ImageRemoveParams { name, force }) => {
            let removed = catalog.send(RemoveImage { name, force }).await??;
            wire.answer(removed)
        }
        Request::Prune => {
            let pruned = catalog.send(PruneImages).await??;
            wire.answer(pruned)
        }
    }
}
