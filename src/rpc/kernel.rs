//! The `kernel.*` methods: import (a vmlinux, or a Debian package with
//! progress), list, remove. They ask only the catalog.

use crate::caller::{SizeCap, Watch};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::protocol::{Params, RpcError, requests};
use super::wire::Wire;
use crate::actors::catalog::{
    CatalogActor, ImportKernel, ImportProgress, KernelSource, ListKernels, RemoveKernel,
};
use crate::catalog::KernelRecord;
use crate::vm::validate_name;

requests! {
    /// Requests about the kernel catalog.
    pub enum Request {
        Import(KernelImportParams) => "kernel.import",
            "Copy a vmlinux (and initrd) into the kernel catalog under a name.";
        ImportDeb(KernelImportDebParams) => "kernel.import_deb",
            "Import a Debian kernel package: vmlinux, bzImage, and an initramfs of the guest modules with banger-agent; with progress.";
        List => "kernel.list", "Every kernel in the catalog.";
        Remove(KernelRef) => "kernel.remove", "Remove a kernel no VM uses.";
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelImportParams {
    pub name: String,
    pub vmlinux: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

impl Params for KernelImportParams {
    fn validate(&self) -> Result<(), RpcError> {
        validate_name("name", &self.name)?;
        for (field, path) in [
            ("vmlinux", Some(&self.vmlinux)),
            ("initrd", self.initrd.as_ref()),
        ] {
            if path.is_some_and(|p| !p.is_absolute()) {
                return Err(RpcError::invalid_params(field, "must be an absolute path"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelImportDebParams {
    pub name: String,
    /// The Debian kernel package (`linux-image-*.deb`), an absolute path.
    pub path: PathBuf,
}

impl Params for KernelImportDebParams {
    fn validate(&self) -> Result<(), RpcError> {
        validate_name("name", &self.name)?;
        if !self.path.is_absolute() {
            return Err(RpcError::invalid_params("path", "must be an absolute path"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelRef {
    pub name: String,
}

impl Params for KernelRef {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelResult {
    pub kernel: KernelRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelsResult {
    pub kernels: Vec<KernelRecord>,
}

/// What the kernel handlers reach.
pub struct KernelServices {
    pub catalog: Addr<CatalogActor>,
    /// The most a kernel file a request names may hold.
    pub max_file: SizeCap,
    /// How long one read of such a file may wait.
    pub io_stall: Duration,
}

pub async fn handle(
    services: &KernelServices,
    wire: &Wire<'_>,
    request: Request,
) -> Result<Box<RawValue>, RpcError> {
    let catalog = &services.catalog;
    match request {
        Request::Import(params) => {
            let name = params.name.clone();
            let vmlinux = wire
                .open_named("vmlinux", &params.vmlinux, services.max_file)
                .await?;
            let initrd = match &params.initrd {
                Some(initrd) => Some(wire.open_named("initrd", initrd, services.max_file).await?),
                None => None,
            };
            let import = ImportKernel {
                name: params.name,
                source: KernelSource::Vmlinux {
                    vmlinux,
                    initrd,
                    cmdline: params.cmdline,
                },
                progress: Arc::new(|_, _| {}),
                watch: Watch::new(services.io_stall),
            };
            let kernel = wire
                .operation("kernel.import", &name, async {
                    Ok(catalog.send(import).await??)
                })
                .await?;
            wire.answer(KernelResult { kernel })
        }
        Request::ImportDeb(params) => {
            let name = params.name.clone();
            let package = wire
                .open_named("path", &params.path, services.max_file)
                .await?;
            let kernel = wire
                .with_progress(
                    "kernel.import_deb",
                    &name,
                    false,
                    false,
                    |report, _| async move {
                        // The import reports from its blocking thread.
                        let report = std::sync::Mutex::new(report);
                        let progress: ImportProgress = Arc::new(move |phase, step| {
                            if let Ok(report) = report.lock() {
                                report(phase, Some(step), Some(4));
                            }
                        });
                        let import = ImportKernel {
                            name: params.name,
                            source: KernelSource::Package { package },
                            progress,
                            watch: Watch::new(services.io_stall),
                        };
                        Ok(catalog.send(import).await??)
                    },
                )
                .await?;
            wire.answer(KernelResult { kernel })
        }
        Request::List => {
            let kernels = catalog.send(ListKernels).await??;
            wire.answer(KernelsResult { kernels })
        }
        Request::Remove(KernelRef { name }) => {
            let kernel = wire
                .operation("kernel.remove", &name.clone(), async {
                    Ok(catalog.send(RemoveKernel { name }).await??)
                })
                .await?;
            wire.answer(KernelResult { kernel })
        }
    }
}
