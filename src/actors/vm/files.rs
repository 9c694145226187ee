//! The VM's files: its root disk cloned from the caller's source, its
//! ledger's files released at removal, and its logs capped as they grow.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{info, warn};

use super::VmActor;
use super::settings::{VmError, VmSettings};
use crate::actors::netns::{Detach, NetworkError, NetworkManager, Release};
use crate::caller::Watch;
use crate::disk::{self, DiskSource};
use crate::fault;
use crate::reconcile;
use crate::vm::ledger::Resource;
use crate::vm::record::VmRecord;
use crate::vmm::logs;

/// How often a VM's console log size is checked against its cap.
const CONSOLE_CHECK: Duration = Duration::from_secs(10);

/// Releases a VM's ledger: its tap (through its network), its jail
/// (through the host) and its directory, then its lease, last, so that its
/// address is free only once nothing of the VM is left. A network that is
/// gone, or networking turned off, holds nothing of the VM any more.
pub(super) async fn release_resources(
    settings: Arc<VmSettings>,
    networks: Addr<NetworkManager>,
    record: VmRecord,
) -> Result<(), VmError> {
    let released = |result: Result<Result<(), NetworkError>, MailboxError>| match result {
        Err(_) => Err(VmError::Unavailable("network manager")),
        Ok(Err(NetworkError::NotFound(_) | NetworkError::Off(_))) | Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(VmError::Network(e)),
    };
    if let Some((network, guest)) = record.guest()
        && record.resources.contains(&Resource::Tap)
    {
        released(networks.send(Detach { network, guest }).await)?;
    }
    let lease = record
        .network
        .as_ref()
        .filter(|_| record.resources.contains(&Resource::Lease))
        .map(|network| Release {
            network: network.network.clone(),
            vm: record.id.clone(),
        });
    tokio::task::spawn_blocking(move || {
        for resource in record.resources.iter().rev() {
            let Some(path) = settings.path_of(&record, *resource) else {
                continue;
            };
            let released = match resource {
                Resource::Jail => settings.host.remove_jail(&path),
                Resource::VmDirectory => reconcile::remove_any(&path),
                Resource::Lease | Resource::Tap | Resource::Image => continue,
            };
            released.map_err(|source| VmError::Io {
                action: "remove",
                path,
                source,
            })?;
        }
        Ok::<_, VmError>(())
    })
    .await
    .map_err(|_| VmError::Unavailable("blocking thread pool"))??;
    if let Some(lease) = lease {
        released(networks.send(lease).await)?;
    }
    Ok(())
}

/// The VM's own copy of the root disk (`crate::disk`), read through the
/// descriptor opened with the caller's authority (or the daemon's, for an
/// image's disk) and grown to `size`. The source is never written; a read
/// of it that stalls for `io_stall` fails the copy.
pub(super) async fn clone_rootfs(
    source: Option<DiskSource>,
    size: Option<u64>,
    target: PathBuf,
    io_stall: Duration,
    tool_uid: u32,
) -> Result<(), VmError> {
    let from_caller = source.as_ref().is_some_and(|s| s.from_caller);
    let watch = Watch::new(io_stall);
    let watched = from_caller.then(|| watch.clone());
    let copy = tokio::task::spawn_blocking(move || {
        let Some(source) = source else {
            return Err(VmError::Io {
                action: "copy the root filesystem",
                path: target,
                source: std::io::Error::other("the opened file was lost"),
            });
        };
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(|e| VmError::Io {
                action: "create",
                path: dir.to_path_buf(),
                source: e,
            })?;
        }
        let cloned = disk::clone_disk(&source, &target, size, tool_uid, watched.as_ref(), || {
            fault::boundary("disk-cloning")
        })?;
        info!(disk = %target.display(), from = %source.named.display(), ?cloned, "root disk cloned");
        fault::boundary("disk-cloned");
        Ok(())
    });
    watch
        .bound(copy)
        .await?
        .map_err(|_| VmError::Unavailable("blocking thread pool"))?
}

impl VmActor {
    /// Caps the VM's logs (`vmm::logs`): checked as they grow, and
    /// every [`CONSOLE_CHECK`] (a jail's own log, a directory the watcher
    /// could not watch).
    pub(super) fn watch_console(&mut self, ctx: &mut Context<Self>) {
        if self.console_check.is_some() {
            return;
        }
        self.watch_logs();
        self.console_check = Some(ctx.run_interval(CONSOLE_CHECK, |act, _| {
            let dirs = act.log_dirs();
            let vm = act.vm.record.name.clone();
            actix::spawn(async move {
                let _ = tokio::task::spawn_blocking(move || {
                    for name in logs::CAPPED {
                        for dir in &dirs {
                            let path = dir.join(name);
                            if let Err(e) = logs::rotate_if_larger(&path, logs::MAX_LOG_BYTES) {
                                warn!(vm = %vm, log = %path.display(), error = %e, "cannot rotate the log");
                            }
                        }
                    }
                })
                .await;
            });
        }));
    }

    /// The directories that hold the VM's logs: its own, its jail's root.
    pub(super) fn log_dirs(&self) -> [PathBuf; 2] {
        let id = &self.vm.record.id;
        [
            self.settings.paths(id).dir,
            self.settings.jail_dir(id).join("root"),
        ]
    }

    /// Has the logs that exist now watched as they grow (again after each
    /// launch, which makes them).
    pub(super) fn watch_logs(&self) {
        self.settings.log_cap.watch(&self.log_dirs());
    }
}
