//! `SystemSupervisor`: the root of bangerd's actor tree. It starts the
//! actors in dependency order (store, operations, RPC server), reconciles
//! what a previous daemon left, and runs the shutdown sequence: stop
//! accepting, cancel and drain operations, let the store close. It never
//! touches VMs: they outlive the daemon.

use crate::caller::SizeCap;
use crate::vmm::logs::LogCap;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Addr, MailboxError, Supervisor};
use jiff::Timestamp;
use nix::unistd::{Gid, geteuid};
use tracing::{info, warn};

use crate::actors::catalog::{CatalogActor, KernelError, LoadCatalog};
use crate::actors::netns::{LoadNetworks, NetworkError, NetworkManager, NetworkSettings};
use crate::actors::operation::{Drain, OperationError, OperationRegistry, Reconcile};
use crate::actors::records::Records;
use crate::actors::store::{StoreActor, StoreClosed};
use crate::actors::vm::{LoadVms, VmError, VmManager, VmSettings};
use crate::config::{Config, Mode};
use crate::rpc::access::AccessPolicy;
use crate::rpc::daemon::{DaemonInfo, DaemonServices};
use crate::rpc::dispatch::Services;
use crate::rpc::image::ImageServices;
use crate::rpc::kernel::KernelServices;
use crate::rpc::network::NetworkServices;
use crate::rpc::server::{RpcServer, StopAccepting};
use crate::rpc::vm::VmServices;
use crate::store::{Store, StoreError};
use crate::vm::record::{Accel, VmmKind};
use crate::vm::restart::RestartPolicy;
use crate::vmm::firecracker::{Firecracker, JailSpec};
use crate::vmm::host::LocalHost;
use crate::vmm::orphans::Layout;
use crate::vmm::process::{ProcessHandle, is_alive};
use crate::vmm::qemu::{AccelChoice, Qemu};

/// Store worker threads: reads run in parallel, writes serialise in redb.
const STORE_THREADS: usize = 2;
/// How long shutdown waits for operations to finish or honour a cancel.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// The version line of banger's binaries, with the commit and the date
/// stamped at build time.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BANGER_GIT_COMMIT"),
    ", built ",
    env!("BANGER_BUILD_DATE"),
    ")"
);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "[host] tool_uid {uid} is already {holder}'s; choose a uid no user, group or process of this host has"
    )]
    ToolUid { uid: u32, holder: String },
    #[error("cannot start watching the VMs' logs (inotify)")]
    LogWatcher(#[source] io::Error),
    #[error("cannot {action} {path}")]
    Socket {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the socket path {path} is {len} bytes long; Unix sockets allow {MAX_SOCKET_PATH}: choose a shorter --socket"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("{0} exists and is not a socket; remove it or choose another --socket")]
    NotASocket(PathBuf),
    #[error("cannot reconcile operations left by the previous daemon")]
    Reconcile(#[source] OperationError),
    #[error("cannot read the store's schema")]
    Store(#[source] StoreError),
    #[error("cannot load the VMs")]
    LoadVms(#[source] VmError),
    #[error("cannot load the kernel catalog")]
    LoadCatalog(#[source] KernelError),
    #[error("the catalog stopped during start-up")]
    CatalogGone,
    #[error("the VM manager stopped during start-up")]
    VmManagerGone,
    #[error("cannot load the networks")]
    LoadNetworks(#[source] NetworkError),
    #[error("the network manager stopped during start-up")]
    NetworkManagerGone,
    #[error("the operations registry stopped during start-up")]
    RegistryGone(#[source] MailboxError),
}

/// How networks are made; off, with the reason, when the configuration
/// says so or the daemon lacks CAP_NET_ADMIN.
fn network_settings(config: &Config) -> NetworkSettings {
    let network = &config.network;
    let off = if !network.enabled {
        Some("the configuration sets network.enabled = false".to_string())
    } else if !crate::network::host::has_net_admin() {
        Some("the daemon lacks CAP_NET_ADMIN (run it as root, in system mode)".to_string())
    } else {
        None
    };
    let dns = network.dns.or_else(|| {
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        crate::network::first_nameserver(&resolv)
    });
    if off.is_none() && dns.is_none() {
        warn!(
            "no DNS server for guests: set network.dns (the host's resolv.conf names none a guest can reach)"
        );
    }
    NetworkSettings {
        off,
        default_subnet: network.default_subnet,
        dns,
        mtu: network.mtu,
        group: network.group,
        jailed_owner: config.jailer.as_ref().map(|jailer| jailer.uid),
        forwarding_marker: config.state_dir.join("ipv4-forwarding.banger"),
    }
}

/// A launch's child between fork and exec is a copy of the daemon that
/// holds the daemon's files (the state directory's lock among them) until
/// it execs. One whose daemon is gone (SIGKILLed in a spawn) would keep the
/// next daemon out, then exec a VMM no record claims: it is killed, and
/// waited for. Answers how many there were.
pub fn end_launch_children(config: &Config) -> usize {
    let layout = Layout {
        vms_dir: config.state_dir.join("vms"),
        jail_base: config.jail_dir.clone(),
    };
    let children: Vec<_> = layout
        .scan()
        .into_iter()
        // Only a launch's child whose daemon is gone (its parent is not a
        // bangerd): a live daemon's launch is its own business.
        .filter(|found| found.launch_child && !parent_is_bangerd(found.pid))
        .collect();
    for found in &children {
        let Ok(pidfd) = ProcessHandle::pidfd(found.pid) else {
            continue;
        };
        if !is_alive(found.pid, found.start_time) {
            continue;
        }
        warn!(pid = found.pid, vm = %found.id, "killing a VM launch whose daemon is gone before it exec'd");
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(found.pid, found.start_time) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    children.len()
}

fn parent_is_bangerd(pid: i32) -> bool {
    let parent = crate::vmm::process::read_stat(pid)
        .ok()
        .flatten()
        .map(|stat| stat.ppid);
    parent.is_some_and(|ppid| {
        std::fs::read_to_string(format!("/proc/{ppid}/comm"))
            .is_ok_and(|comm| comm.trim_end() == "bangerd")
    })
}

pub struct SystemSupervisor {
    rpc: Addr<RpcServer>,
    operations: Addr<OperationRegistry>,
    store_closed: StoreClosed,
}

impl SystemSupervisor {
    /// Starts every actor; must run inside the actix `System`.
    pub async fn start(config: &Config, store: Store) -> Result<SystemSupervisor, DaemonError> {
        // Only as root do the tools drop to it; then nobody else may have it.
        if rustix::process::geteuid().is_root()
            && let Some(holder) = crate::disk::uid_taken(config.tool_uid)
        {
            return Err(DaemonError::ToolUid {
                uid: config.tool_uid,
                holder,
            });
        }
        let store_path = store.path().to_path_buf();
        let schema = store.observe().map_err(DaemonError::Store)?;
        let store_health = store.health();
        let (store, store_closed) = StoreActor::start(store, STORE_THREADS);
        let operations = {
            let (store, retention) = (store.clone(), config.retention);
            Supervisor::start(move |_| OperationRegistry::new(store, retention))
        };
        let interrupted = operations
            .send(Reconcile)
            .await
            .map_err(DaemonError::RegistryGone)?
            .map_err(DaemonError::Reconcile)?;
        if !interrupted.is_empty() {
            warn!(
                count = interrupted.len(),
                "marked operations interrupted by the previous daemon's stop"
            );
        }

        let jail_base = config.jail_dir.clone();
        let (dev_kvm, sys_module) = (Path::new("/dev/kvm"), Path::new("/sys/module"));
        let accel = config.qemu_accel.resolve(dev_kvm, sys_module);
        // Whether KVM boots stock guests here, whatever QEMU is told to use.
        let kvm_boots_guests = AccelChoice::Auto.resolve(dev_kvm, sys_module) == Accel::Kvm;
        let firecracker = Firecracker {
            binary: config.firecracker.clone(),
            jail: config.jailer.as_ref().map(|jailer| JailSpec {
                jailer: jailer.binary.clone(),
                base: jail_base.clone(),
                uid: jailer.uid,
                gid: jailer.gid,
            }),
        };
        // Firecracker needs KVM that boots stock guests; QEMU runs anywhere.
        let default_vmm = if kvm_boots_guests && installed(&firecracker.binary) {
            VmmKind::Firecracker
        } else {
            VmmKind::Qemu
        };
        info!(default_vmm = ?default_vmm, qemu_accel = ?accel, "VMM backends");
        let vm_settings = Arc::new(VmSettings {
            firecracker,
            qemu: Qemu {
                binary: config.qemu.clone(),
                accel,
            },
            default_vmm,
            default_kernel: config.default_kernel.clone(),
            host: Arc::new(LocalHost),
            max_rootfs: SizeCap {
                bytes: config.max_rootfs_bytes,
                setting: "vm.max_rootfs_gib",
            },
            io_stall: config.io_stall,
            tool_uid: config.tool_uid,
            log_cap: LogCap::start().map_err(DaemonError::LogWatcher)?,
            jail_base,
            vms_dir: config.state_dir.join("vms"),
            store_health: store_health.clone(),
            restart_defaults: RestartPolicy {
                delay_ms: config.restart_delay_ms,
                max_delay_ms: config.restart_max_delay_ms,
                ..RestartPolicy::default()
            },
        });
        // The catalog, then the VMs: each loads its records, then sweeps
        // what no record claims, then starts (`crate::reconcile`).
        let kernels_dir = config.state_dir.join("kernels");
        let catalog = {
            let (store, dir) = (store.clone(), kernels_dir.clone());
            let agent = config.agent.clone().unwrap_or_else(agent_beside_daemon);
            let limit = config.unpack_limit;
            let images = crate::image::import::Store {
                blobs: config.state_dir.join("blobs"),
                images: config.state_dir.join("images"),
                limits: config.image.limits,
                headroom: config.image.headroom,
            };
            Supervisor::start(move |_| CatalogActor::new(store, dir, agent, limit, images.clone()))
        };
        let kernels = catalog
            .send(LoadCatalog)
            .await
            .map_err(|_| DaemonError::CatalogGone)?
            .map_err(DaemonError::LoadCatalog)?;
        info!(kernels, "catalog loaded");
        // The networks before the VMs: their reconciliation holds the
        // host's taps and rules against the VM records.
        let networks = {
            let (store, settings) = (store.clone(), network_settings(config));
            Supervisor::start(move |_| NetworkManager::new(store, settings))
        };
        let count = networks
            .send(LoadNetworks)
            .await
            .map_err(|_| DaemonError::NetworkManagerGone)?
            .map_err(DaemonError::LoadNetworks)?;
        info!(networks = count, "networks loaded");
        let vms = {
            let (store, catalog, networks, settings) = (
                store.clone(),
                catalog.clone(),
                networks.clone(),
                vm_settings.clone(),
            );
            Supervisor::start(move |_| VmManager::new(store, catalog, networks, settings))
        };
        // Every VM actor re-adopts or reconciles its VM as it starts.
        let count = vms
            .send(LoadVms)
            .await
            .map_err(|_| DaemonError::VmManagerGone)?
            .map_err(DaemonError::LoadVms)?;
        info!(vms = count, "VMs loaded");

        let (listener, access) = bind_socket(config)?;
        let services = Services {
            vm: VmServices {
                vms: vms.clone(),
                networks: networks.clone(),
                catalog: catalog.clone(),
                settings: vm_settings,
            },
            network: NetworkServices { networks },
            kernel: KernelServices {
                catalog: catalog.clone(),
                max_file: SizeCap {
                    bytes: config.unpack_limit.0,
                    setting: "kernel.max_unpacked_mib",
                },
                io_stall: config.io_stall,
            },
            image: ImageServices {
                catalog: catalog.clone(),
                max_file: SizeCap {
                    bytes: config.image.limits.max_unpacked_bytes,
                    setting: "image.max_unpacked_mib",
                },
                limits: config.image.limits,
                io_stall: config.io_stall,
            },
            operations: operations.clone(),
            daemon: DaemonServices {
                methods: crate::rpc::request::methods().collect(),
                records: Records::new(
                    store,
                    store_health,
                    vec![vms.recipient(), catalog.recipient()],
                ),
                info: DaemonInfo {
                    version: VERSION.to_string(),
                    pid: std::process::id(),
                    mode: config.mode,
                    started_at: Timestamp::now(),
                    started: Instant::now(),
                    state_dir: config.state_dir.clone(),
                    socket: config.socket.clone(),
                    store_path,
                    heartbeat: config.rpc_limits.heartbeat,
                    tables: schema.tables,
                    applied_migrations: schema.applied.into_iter().collect(),
                },
            },
        };
        let socket = config.socket.clone();
        let limits = config.rpc_limits;
        let rpc =
            Supervisor::start(move |_| RpcServer::new(listener, socket, services, access, limits));
        Ok(SystemSupervisor {
            rpc,
            operations,
            store_closed,
        })
    }

    /// Stops serving and drains operations; answers the store's close
    /// signal, which fires once the actor system is dropped.
    pub async fn shutdown(self) -> StoreClosed {
        let _ = self.rpc.send(StopAccepting).await;
        match tokio::time::timeout(DRAIN_TIMEOUT, self.operations.send(Drain)).await {
            Ok(Ok(Ok(()))) => info!("no operation in flight"),
            Ok(_) => warn!("the operations registry stopped before draining"),
            Err(_) => {
                warn!(timeout = ?DRAIN_TIMEOUT, "operations still in flight at shutdown; they will show as interrupted")
            }
        }
        self.store_closed
    }
}

fn socket_err<'p>(
    action: &'static str,
    path: &'p Path,
) -> impl FnOnce(io::Error) -> DaemonError + 'p {
    move |source| DaemonError::Socket {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Binds the daemon's socket with the mode's permissions. The caller holds
/// the state directory's lock, so a socket already there is stale.
fn bind_socket(config: &Config) -> Result<(tokio::net::UnixListener, AccessPolicy), DaemonError> {
    let path = &config.socket;
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(DaemonError::SocketPathTooLong {
            path: path.clone(),
            len,
        });
    }
    if let Some(dir) = path.parent() {
        let mode = match config.mode {
            Mode::System => 0o755,
            Mode::User => 0o700,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .map_err(socket_err("create the socket directory", dir))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(socket_err("remove the stale socket", path))?
        }
        Ok(_) => return Err(DaemonError::NotASocket(path.clone())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err("inspect", path)(e)),
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(socket_err("bind", path))?;
    let group = match config.mode {
        Mode::System => shared_group(path, &config.socket_group)?,
        Mode::User => None,
    };
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(socket_err("set the mode of", path))?;
    listener
        .set_nonblocking(true)
        .map_err(socket_err("configure", path))?;
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(socket_err("listen on", path))?;
    info!(socket = %path.display(), mode = format!("{mode:o}"), "listening");
    Ok((
        listener,
        AccessPolicy {
            owner: geteuid(),
            group,
        },
    ))
}

/// Gives the socket to the configured group, when it exists.
fn shared_group(path: &Path, name: &str) -> Result<Option<Gid>, DaemonError> {
    let Some(gid) = AccessPolicy::lookup_group(name) else {
        info!(
            group = name,
            "the socket group does not exist, so only root may use the daemon; create it (groupadd --system {name}) and add users to it (usermod -aG {name} USER)"
        );
        return Ok(None);
    };
    nix::unistd::chown(path, None, Some(gid))
        .map_err(|e| socket_err("change the group of", path)(e.into()))?;
    Ok(Some(gid))
}

/// Whether a binary named by path or by a name in PATH exists.
fn installed(binary: &Path) -> bool {
    if binary.components().count() > 1 {
        return binary.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
}

/// The guest agent's default place: beside the running bangerd.
fn agent_beside_daemon() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("banger-agent")))
        .unwrap_or_else(|| PathBuf::from("/usr/lib/banger/banger-agent"))
}
