//! `VmManager`: creates VMs, holds their actors by name, lists them,
//! reconciles the ledgers at start-up and keeps the records that do not
//! decode in quarantine until `vm forget`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use jiff::Timestamp;
use rustix::process::Signal;
use tracing::{error, info, warn};

use super::agent::GetAgent;
use super::commands::VmCommand;
use super::settings::{VmError, VmSettings};
use super::{ORPHAN_EXIT_TIMEOUT, OnStart, VmActor, VmRemoved};
use crate::actors::catalog::{CatalogActor, Reserve, Unreserve};
use crate::actors::netns::{NetworkManager, ReconcileNetworks};
use crate::actors::records::QuarantinedRecord;
use crate::actors::store::{Delete, List, Quarantined, StoreActor};
use crate::disk::DiskSource;
use crate::error_chain;
use crate::guest::link::AgentLink;
use crate::reconcile;
use crate::store::{Listing, Undecodable};
use crate::vm::ledger::Resource;
use crate::vm::phase::Phase;
use crate::vm::record::{VmImage, VmNetwork, VmRecord, VmmKind};
use crate::vm::restart::{self, RestartPolicy};
use crate::vmm::orphans::Layout;
use crate::vmm::process::{ProcessHandle, is_alive};

/// How long `vm ls` waits for one VM actor's memory while the store
/// cannot write.
const MEMORY_ANSWER: Duration = Duration::from_secs(1);

/// A validated `vm create`, its root disk open with the caller's authority.
pub struct CreateVm {
    pub name: String,
    pub kernel: String,
    /// The root disk's source: a user's file, or an image's disk.
    pub rootfs: DiskSource,
    /// The image it comes from, which the VM then holds.
    pub image: Option<VmImage>,
    /// The size the root disk is grown to, when larger than its source.
    pub disk_bytes: Option<u64>,
    /// The image's command as the VM's main process.
    pub main: Option<crate::image::RunConfig>,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The daemon's default backend when not given.
    pub vmm: Option<VmmKind>,
    pub restart: Option<restart::RestartMode>,
    pub restart_delay_ms: Option<u64>,
    pub restart_max_delay_ms: Option<u64>,
    /// The network it joins (resolved: `--network`, or `default` when
    /// networking is on), or none.
    pub network: Option<String>,
    pub start: bool,
}

impl Message for CreateVm {
    type Result = Result<VmRecord, VmError>;
}

/// Creates VMs, holds their actors by name, lists them, and keeps the VM
/// records that do not decode in quarantine (their files and processes
/// are left alone until `vm forget`).
pub struct VmManager {
    store: Addr<StoreActor>,
    catalog: Addr<CatalogActor>,
    networks: Addr<NetworkManager>,
    settings: Arc<VmSettings>,
    vms: HashMap<String, Addr<VmActor>>,
    quarantined: Vec<Undecodable>,
}

impl VmManager {
    pub fn new(
        store: Addr<StoreActor>,
        catalog: Addr<CatalogActor>,
        networks: Addr<NetworkManager>,
        settings: Arc<VmSettings>,
    ) -> VmManager {
        VmManager {
            store,
            catalog,
            networks,
            settings,
            vms: HashMap::new(),
            quarantined: Vec::new(),
        }
    }

    fn start_actor(&self, record: VmRecord, fresh: bool, ctx: &mut Context<Self>) -> Addr<VmActor> {
        let (settings, store, catalog, networks) = (
            self.settings.clone(),
            self.store.clone(),
            self.catalog.clone(),
            self.networks.clone(),
        );
        let manager = ctx.address().recipient();
        Supervisor::start(move |_| {
            let mut actor = VmActor::new(record, settings, store, catalog, networks, manager);
            if fresh {
                actor.on_start = OnStart::Nothing;
                actor.in_store = false;
            }
            actor
        })
    }
}

impl Handler<VmRemoved> for VmManager {
    type Result = ();

    fn handle(&mut self, msg: VmRemoved, _: &mut Context<Self>) {
        if self.vms.get(&msg.name) == Some(&msg.actor) {
            self.vms.remove(&msg.name);
        }
    }
}

/// Kills a VMM that no record claims (left by a daemon killed between the
/// spawn and its record, or by a restored store) and waits for it to exit,
/// so the VM directory's lock is free before the VMs start. The pidfd is
/// opened first and the identity checked after, so a recycled pid is never
/// signalled.
async fn terminate_orphan(found: crate::vmm::orphans::FoundVmm) {
    let Ok(process) = ProcessHandle::open(found.pid) else {
        return;
    };
    if !is_alive(found.pid, found.start_time) {
        return;
    }
    warn!(pid = found.pid, id = %found.id, "terminating a VMM that no VM record claims");
    if process.signal(Signal::KILL).is_ok()
        && tokio::time::timeout(ORPHAN_EXIT_TIMEOUT, process.exited())
            .await
            .is_err()
    {
        warn!(pid = found.pid, id = %found.id, "the orphaned VMM did not exit after SIGKILL");
    }
}

impl Actor for VmManager {
    type Context = Context<Self>;
}

impl Supervised for VmManager {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("VM manager restarting; VMs are looked up again");
    }
}

/// Start-up, in order: every VM's ledger from the store, the VMMs no
/// record claims terminated, `vms/` and the jail base swept of what no
/// ledger claims, then one VmActor per VM. Answers how many VMs there are.
pub struct LoadVms;

impl Message for LoadVms {
    type Result = Result<usize, VmError>;
}

impl Handler<LoadVms> for VmManager {
    type Result = ResponseActFuture<Self, Result<usize, VmError>>;

    fn handle(&mut self, _: LoadVms, _: &mut Context<Self>) -> Self::Result {
        let (store, settings) = (self.store.clone(), self.settings.clone());
        let networks = self.networks.clone();
        let layout = Layout {
            vms_dir: settings.vms_dir.clone(),
            jail_base: settings.jail_base.clone(),
        };
        Box::pin(
            async move {
                let started = std::time::Instant::now();
                let listing = store
                    .send(List::<VmRecord>::new())
                    .await
                    .map_err(|_| VmError::Unavailable("store"))??;
                let quarantined: HashSet<&str> =
                    listing.undecodable.iter().map(|bad| bad.key.as_str()).collect();
                // A VMM is its VM's only if it is the very process (pid and
                // start time) the record holds; a quarantined VM's are left.
                let claimed: HashSet<(String, i32, u64)> = listing
                    .records
                    .iter()
                    .filter_map(|r| {
                        let p = r.process.as_ref()?;
                        Some((r.id.clone(), p.pid, p.start_time))
                    })
                    .collect();
                let vmms = tokio::task::spawn_blocking(move || layout.scan())
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?;
                for found in vmms {
                    let key = (found.id.clone(), found.pid, found.start_time);
                    if claimed.contains(&key) || quarantined.contains(found.id.as_str()) {
                        continue;
                    }
                    terminate_orphan(found).await;
                }
                let (vms, jails) = ledger_claims(&settings, &listing);
                let swept = {
                    let settings = settings.clone();
                    tokio::task::spawn_blocking(move || {
                        reconcile::sweep(&settings.vms_dir, &vms, reconcile::remove_any)
                            + reconcile::sweep(&settings.jail_base.join("firecracker"), &jails, |p| {
                                settings.host.remove_jail(p)
                            })
                    })
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?
                };
                info!(
                    vms = listing.records.len(),
                    removed = swept,
                    ms = started.elapsed().as_secs_f64() * 1000.0,
                    "VM ledgers reconciled"
                );
                // Before any VM actor starts: nothing attaches meanwhile. A
                // host that cannot be reconciled is reported, and the VMs
                // still start (a VM whose tap cannot be made fails its own
                // launch, saying why).
                match networks.send(ReconcileNetworks).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        error!(error = %error_chain(&e), "the networks could not be reconciled")
                    }
                    Err(_) => return Err(VmError::Unavailable("network manager")),
                }
                Ok::<_, VmError>(listing)
            }
            .into_actor(self)
            .map(|listing, manager, ctx| {
                let listing = listing?;
                for bad in &listing.undecodable {
                    warn!(table = %bad.table, key = %bad.key, reason = %bad.reason, "quarantined a VM record that does not decode; `banger vm forget` removes it");
                }
                manager.quarantined = listing.undecodable;
                for record in listing.records {
                    let name = record.name.clone();
                    let actor = manager.start_actor(record, false, ctx);
                    manager.vms.insert(name, actor);
                }
                Ok(manager.vms.len())
            }),
        )
    }
}

/// What the VM ledgers claim under `vms/` and under the jail base: every
/// resource of every record, and everything a quarantined key could own.
fn ledger_claims(
    settings: &VmSettings,
    listing: &Listing<VmRecord>,
) -> (HashSet<PathBuf>, HashSet<PathBuf>) {
    let (mut vms, mut jails) = (HashSet::new(), HashSet::new());
    for record in &listing.records {
        for resource in &record.resources {
            if let Some(path) = settings.path_of(record, *resource) {
                match resource {
                    Resource::VmDirectory => vms.insert(path),
                    Resource::Jail => jails.insert(path),
                    Resource::Lease | Resource::Tap | Resource::Image => false,
                };
            }
        }
    }
    for bad in &listing.undecodable {
        vms.insert(settings.paths(&bad.key).dir);
        jails.insert(settings.jail_dir(&bad.key));
    }
    (vms, jails)
}

/// A command for the VM named `name`.
pub struct ForVm {
    pub name: String,
    pub command: VmCommand,
}

impl Message for ForVm {
    type Result = Result<VmRecord, VmError>;
}

impl Handler<ForVm> for VmManager {
    type Result = ResponseActFuture<Self, Result<VmRecord, VmError>>;

    fn handle(&mut self, msg: ForVm, _: &mut Context<Self>) -> Self::Result {
        let Some(vm) = self.vms.get(&msg.name).cloned() else {
            return Box::pin(fut::ready(Err(VmError::NotFound(msg.name))));
        };
        let removing = matches!(msg.command, VmCommand::Remove { .. });
        let name = msg.name;
        let actor = vm.clone();
        Box::pin(
            async move {
                vm.send(msg.command)
                    .await
                    .map_err(|_| VmError::Unavailable("VM actor"))?
            }
            .into_actor(self)
            .map(move |result, manager, _| {
                // Only this VM's entry: the name may already be a new VM's.
                if removing && result.is_ok() && manager.vms.get(&name) == Some(&actor) {
                    manager.vms.remove(&name);
                }
                result
            }),
        )
    }
}

/// The agent of the VM named `name` (see [`GetAgent`]).
pub struct AgentOf {
    pub name: String,
    pub timeout: Duration,
}

impl Message for AgentOf {
    type Result = Result<AgentLink, VmError>;
}

impl Handler<AgentOf> for VmManager {
    type Result = ResponseFuture<Result<AgentLink, VmError>>;

    fn handle(&mut self, msg: AgentOf, _: &mut Context<Self>) -> Self::Result {
        let vm = self.vms.get(&msg.name).cloned();
        Box::pin(async move {
            let vm = vm.ok_or(VmError::NotFound(msg.name))?;
            vm.send(GetAgent {
                timeout: msg.timeout,
            })
            .await
            .map_err(|_| VmError::Unavailable("VM actor"))?
        })
    }
}

/// Every VM's record, by name.
pub struct ListVms;

impl Message for ListVms {
    type Result = Result<Vec<VmRecord>, VmError>;
}

impl Handler<ListVms> for VmManager {
    type Result = ResponseFuture<Result<Vec<VmRecord>, VmError>>;

    /// From the store; while it cannot write, from each VM actor's memory
    /// (a held write's record is what the host shows, not yet stored).
    fn handle(&mut self, _: ListVms, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let from_memory = self.settings.store_health.borrow().unwritable().is_some();
        let actors: Vec<Addr<VmActor>> = self.vms.values().cloned().collect();
        Box::pin(async move {
            let mut vms = if from_memory {
                // Bounded per VM: one actor busy reloading is left out, not
                // waited for.
                let answers = futures_util::future::join_all(
                    actors
                        .iter()
                        .map(|vm| tokio::time::timeout(MEMORY_ANSWER, vm.send(VmCommand::Get))),
                )
                .await;
                answers
                    .into_iter()
                    .filter_map(|answer| answer.ok()?.ok()?.ok())
                    .collect()
            } else {
                store
                    .send(List::<VmRecord>::new())
                    .await
                    .map_err(|_| VmError::Unavailable("store"))??
                    .records
            };
            vms.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(vms)
        })
    }
}

impl Handler<Quarantined> for VmManager {
    type Result = MessageResult<Quarantined>;

    fn handle(&mut self, _: Quarantined, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.quarantined.clone())
    }
}

/// `vm forget ID`: a quarantined VM record goes, with everything it could
/// own (its directory, its jail). Only quarantined records: a VM that
/// decodes is removed with `vm rm`.
pub struct ForgetVm {
    pub id: String,
}

impl Message for ForgetVm {
    type Result = Result<QuarantinedRecord, VmError>;
}

impl Handler<ForgetVm> for VmManager {
    type Result = ResponseActFuture<Self, Result<QuarantinedRecord, VmError>>;

    fn handle(&mut self, msg: ForgetVm, _: &mut Context<Self>) -> Self::Result {
        let Some(bad) = self.quarantined.iter().find(|b| b.key == msg.id).cloned() else {
            return Box::pin(fut::ready(Err(VmError::NotQuarantined(msg.id))));
        };
        let (store, settings) = (self.store.clone(), self.settings.clone());
        let id = msg.id;
        let layout = Layout {
            vms_dir: settings.vms_dir.clone(),
            jail_base: settings.jail_base.clone(),
        };
        Box::pin(
            async move {
                // Its VMM first: nothing may run on files about to go.
                let scan = tokio::task::spawn_blocking(move || layout.scan())
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?;
                for found in scan.into_iter().filter(|found| found.id == id) {
                    terminate_orphan(found).await;
                }
                store
                    .send(Delete::<VmRecord>::new(id.clone()))
                    .await
                    .map_err(|_| VmError::Unavailable("store"))??;
                Ok::<_, VmError>(id)
            }
            .into_actor(self)
            .then(move |deleted, manager, _| {
                if let Ok(id) = &deleted {
                    // The record is gone from the store: so from quarantine.
                    manager.quarantined.retain(|b| &b.key != id);
                }
                async move {
                    let id = deleted?;
                    let dir = settings.paths(&id).dir;
                    let jail = settings.jail_dir(&id);
                    tokio::task::spawn_blocking(move || {
                        settings.host.remove_jail(&jail)?;
                        reconcile::remove_any(&dir)
                    })
                    .await
                    .map_err(|_| VmError::Unavailable("blocking thread pool"))?
                    .map_err(|source| VmError::Io {
                        action: "remove the files of",
                        path: PathBuf::from(&id),
                        source,
                    })?;
                    info!(id = %id, "forgot a quarantined VM");
                    Ok(bad.into())
                }
                .into_actor(manager)
            }),
        )
    }
}

impl Handler<CreateVm> for VmManager {
    type Result = ResponseActFuture<Self, Result<VmRecord, VmError>>;

    fn handle(&mut self, msg: CreateVm, ctx: &mut Context<Self>) -> Self::Result {
        if self.vms.contains_key(&msg.name) {
            return Box::pin(fut::ready(Err(VmError::Exists(msg.name))));
        }
        let defaults = self.settings.restart_defaults;
        let policy = RestartPolicy {
            mode: msg.restart.unwrap_or(defaults.mode),
            delay_ms: msg.restart_delay_ms.unwrap_or(defaults.delay_ms),
            max_delay_ms: msg.restart_max_delay_ms.unwrap_or(defaults.max_delay_ms),
        };
        let id = crate::vm::new_vm_id();
        let vmm = msg.vmm.unwrap_or(self.settings.default_vmm);
        // The ledger names the directory (and the jail, if the backend
        // makes one) before anything is created.
        let mut resources = vec![Resource::VmDirectory];
        if vmm == VmmKind::Firecracker {
            resources.push(Resource::Jail);
        }
        if msg.network.is_some() {
            resources.push(Resource::Lease);
        }
        if msg.image.is_some() {
            resources.push(Resource::Image);
        }
        let record = VmRecord {
            rootfs: self.settings.paths(&id).dir.join("rootfs.ext4"),
            id,
            name: msg.name.clone(),
            phase: Phase::Creating,
            resources,
            vmm,
            vcpus: msg.vcpus,
            memory_mib: msg.memory_mib,
            kernel: msg.kernel.clone(),
            created_at: Timestamp::now(),
            started_at: None,
            restart_policy: policy,
            restart_count: 0,
            restart_history: Default::default(),
            last_exit: None,
            process: None,
            error: None,
            degraded: None,
            network: msg.network.clone().map(|network| VmNetwork {
                network,
                address: None,
            }),
            image: msg.image.clone(),
            disk_bytes: msg.disk_bytes,
            main: msg.main.clone(),
        };
        // The name is taken from here on; a failed create gives it back.
        let actor = self.start_actor(record.clone(), true, ctx);
        self.vms.insert(msg.name.clone(), actor.clone());
        let catalog = self.catalog.clone();
        let (kernel, name) = (msg.kernel.clone(), msg.name.clone());
        let reserved_image = msg.image.clone();
        let image = msg.image.as_ref().map(|i| i.digest.clone());
        let (source, start) = (msg.rootfs, msg.start);
        // Err(true, _): refused before the actor took the create, so the
        // name is free again; Err(false, _): the VM's own record decides.
        let created = async move {
            catalog
                .send(Reserve {
                    kernel: kernel.clone(),
                    image: reserved_image,
                    vm: name.clone(),
                })
                .await
                .map_err(|_| VmError::Unavailable("catalog"))
                .and_then(|reserved| reserved.map_err(VmError::from))
                .map_err(|e| (true, e))?;
            let created = actor
                .send(VmCommand::Create { source })
                .await
                .map_err(|_| VmError::Unavailable("VM actor"));
            // The record (if any) names the kernel and image now: it holds them.
            let _ = catalog
                .send(Unreserve {
                    kernel,
                    image,
                    vm: name.clone(),
                })
                .await;
            let created = created.and_then(|c| c).map_err(|e| (false, e))?;
            info!(vm = %created.name, id = %created.id, "VM created");
            if start {
                actor
                    .send(VmCommand::Start)
                    .await
                    .map_err(|_| VmError::Unavailable("VM actor"))
                    .and_then(|started| started)
                    .map_err(|e| (false, e))
            } else {
                Ok(created)
            }
        };
        let ours = self.vms.get(&msg.name).cloned();
        let name = msg.name;
        Box::pin(created.into_actor(self).map(move |created, manager, _| {
            // Refused before the record was written: nothing to undo, and
            // the actor ends with its address.
            created.map_err(|(free, e)| {
                if free && manager.vms.get(&name) == ours.as_ref() {
                    manager.vms.remove(&name);
                }
                e
            })
        }))
    }
}
