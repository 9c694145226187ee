//! The kernel catalog: list, import (files or a Debian package, staged
//! then renamed into place), remove (refused while a VM or reservation
//! uses it), choose, and prepare for boot (the boot image built once per
//! agent).

use std::sync::Arc;

use actix::prelude::*;
use jiff::Timestamp;
use tracing::{info, warn};

use super::reservations::in_one_turn;
use super::{CatalogActor, ImportProgress, KernelError, KernelSource, store_gone};
use crate::actors::store::{Delete, Get, List, Put};
use crate::caller::Watch;
use crate::catalog::{self, Agent, CatalogError, KernelRecord};
use crate::kernel::UnpackLimit;
use crate::reconcile;
use crate::vm::record::VmRecord;

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
