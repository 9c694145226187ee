//! Daemon configuration: the mode (system or user), the TOML file, and the
//! paths that follow from them. Parsing is pure; `load` reads the file.
//! `config/bangerd.toml` documents every key with its default.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::kernel::UnpackLimit;
use crate::operations::Retention;
use crate::vmm::qemu::AccelChoice;

/// System mode serves the whole host as root; user mode serves one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    System,
    User,
}

impl Mode {
    /// `--system`/`--user` when given, else system mode for root.
    pub fn select(system: bool, user: bool) -> Mode {
        match (system, user) {
            (true, _) => Mode::System,
            (_, true) => Mode::User,
            _ if nix::unistd::geteuid().is_root() => Mode::System,
            _ => Mode::User,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("cannot find the home directory for user-mode paths; set HOME or pass --state-dir")]
    NoHome,
}

/// The file's keys; every one optional.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub log_level: Option<String>,
    #[serde(default)]
    pub operations: OperationsSection,
    #[serde(default)]
    pub firecracker: FirecrackerSection,
    #[serde(default)]
    pub restart: RestartSection,
    #[serde(default)]
    pub qemu: QemuSection,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub kernel: KernelSection,
    #[serde(default)]
    pub image: ImageSection,
    #[serde(default)]
    pub vm: VmSection,
    #[serde(default)]
    pub rpc: RpcSection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub caller: CallerSection,
    #[serde(default)]
    pub host: HostSection,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    pub tool_uid: Option<u32>,
}

/// `[host] tool_uid` when unset: high above the ranges distributions give
/// users, services and containers' subordinate ids.
pub const DEFAULT_TOOL_UID: u32 = 2_000_000_000;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CallerSection {
    pub io_stall_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    pub enabled: Option<bool>,
    pub default_subnet: Option<String>,
    pub dns: Option<String>,
    pub mtu: Option<u32>,
    pub interface_group: Option<u32>,
}

/// How VMs are networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub enabled: bool,
    pub default_subnet: Option<ipnet::Ipv4Net>,
    /// The DNS server guests are given; the host's own first
    /// non-loopback nameserver when unset.
    pub dns: Option<std::net::Ipv4Addr>,
    pub mtu: u32,
    /// The interface group of every bridge and tap banger makes (the
    /// group after it is the sweep group, see `network::host`).
    pub group: u32,
}

/// `network.interface_group` when unset.
pub const DEFAULT_INTERFACE_GROUP: u32 = 2894;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    pub max_rootfs_gib: Option<u64>,
    pub default_kernel: Option<String>,
}

/// `vm.max_rootfs_gib` when unset: far above any root disk, yet a bound.
pub const DEFAULT_MAX_ROOTFS_GIB: u64 = 1024;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RpcSection {
    pub max_connections: Option<usize>,
    pub max_connections_per_uid: Option<usize>,
    pub max_in_flight_per_connection: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub first_request_secs: Option<f64>,
    pub heartbeat_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    pub max_entries: Option<u64>,
    pub max_unpacked_mib: Option<u64>,
    pub max_path_bytes: Option<usize>,
    pub max_nodes: Option<u64>,
    pub max_memory_mib: Option<u64>,
    pub max_metadata_kib: Option<u64>,
    pub max_layers: Option<usize>,
    pub headroom_mib: Option<u64>,
}

/// `image.headroom_mib` when unset: room for a guest's first writes.
pub const DEFAULT_IMAGE_HEADROOM_MIB: u64 = 128;

/// The bounds of an image import and the free room in its ext4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageConfig {
    pub limits: crate::image::layer::Limits,
    pub headroom: u64,
}

fn image_config(section: &ImageSection) -> Result<ImageConfig, ConfigError> {
    let defaults = crate::image::layer::Limits::DEFAULT;
    let within = |key: &'static str, value: Option<u64>, default: u64, max: u64| match value {
        None => Ok(default),
        Some(v @ 1..) if v <= max => Ok(v),
        Some(v) => Err(ConfigError::Invalid {
            key,
            reason: format!("{v} is outside 1 to {max}"),
        }),
    };
    Ok(ImageConfig {
        limits: crate::image::layer::Limits {
            max_entries: within(
                "image.max_entries",
                section.max_entries,
                defaults.max_entries,
                100_000_000,
            )?,
            max_unpacked_bytes: within(
                "image.max_unpacked_mib",
                section.max_unpacked_mib,
                defaults.max_unpacked_bytes >> 20,
                1 << 24,
            )? << 20,
            max_path_bytes: within(
                "image.max_path_bytes",
                section.max_path_bytes.map(|b| b as u64),
                defaults.max_path_bytes as u64,
                65_536,
            )? as usize,
            max_nodes: within(
                "image.max_nodes",
                section.max_nodes,
                defaults.max_nodes,
                1_000_000_000,
            )?,
            max_memory_bytes: within(
                "image.max_memory_mib",
                section.max_memory_mib,
                defaults.max_memory_bytes >> 20,
                1 << 24,
            )? << 20,
            max_metadata_bytes: within(
                "image.max_metadata_kib",
                section.max_metadata_kib,
                defaults.max_metadata_bytes >> 10,
                1 << 20,
            )? << 10,
            max_layers: within(
                "image.max_layers",
                section.max_layers.map(|l| l as u64),
                defaults.max_layers as u64,
                4096,
            )? as usize,
        },
        headroom: match section.headroom_mib {
            None => DEFAULT_IMAGE_HEADROOM_MIB << 20,
            Some(mib @ 0..=1_048_576) => mib << 20,
            Some(mib) => {
                return Err(ConfigError::Invalid {
                    key: "image.headroom_mib",
                    reason: format!("{mib} is outside 0 to 1048576"),
                });
            }
        },
    })
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    pub max_unpacked_mib: Option<u64>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QemuSection {
    pub binary: Option<PathBuf>,
    pub accel: Option<AccelChoice>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerSection {
    pub binary: Option<PathBuf>,
    pub jailer: Option<bool>,
    pub jailer_binary: Option<PathBuf>,
    pub jailer_uid: Option<u32>,
    pub jailer_gid: Option<u32>,
    pub jail_dir: Option<PathBuf>,
}

/// The jailer's settings, when VMs run jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    pub binary: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RestartSection {
    pub delay_secs: Option<f64>,
    pub max_delay_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperationsSection {
    pub keep_finished: Option<usize>,
    pub keep_hours: Option<u64>,
}

impl ConfigFile {
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
    }
}

/// Values given on the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mode: Mode,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// System mode shares the socket with this group (when it exists).
    pub socket_group: String,
    /// A `RUST_LOG`-style filter, e.g. `info` or `banger=debug,info`.
    pub log_level: String,
    pub retention: Retention,
    /// The firecracker binary: a path, or a name looked up in PATH.
    pub firecracker: PathBuf,
    pub jailer: Option<JailerConfig>,
    /// Where the jailer makes each VM's chroot (`[firecracker] jail_dir`).
    pub jail_dir: PathBuf,
    /// The QEMU binary: a path, or a name looked up in PATH.
    pub qemu: PathBuf,
    pub qemu_accel: AccelChoice,
    /// The static banger-agent put into every VM; beside bangerd when unset.
    pub agent: Option<PathBuf>,
    /// The most one decompressed stream of a kernel import may hold (and
    /// the most a kernel file a request names may hold).
    pub unpack_limit: UnpackLimit,
    /// The most a root disk a request names may hold, in bytes.
    pub max_rootfs_bytes: u64,
    /// The kernel of a VM created without `--kernel`.
    pub default_kernel: Option<String>,
    pub image: ImageConfig,
    /// How many clients and requests the socket takes at once.
    pub rpc_limits: RpcLimits,
    pub network: NetworkConfig,
    /// Backoff for VMs that do not set their own.
    pub restart_delay_ms: u64,
    pub restart_max_delay_ms: u64,
    /// How long one read of a caller's file may wait before its request
    /// fails (`[caller] io_stall_secs`).
    pub io_stall: Duration,
    /// The uid (and gid) e2fsck and resize2fs run as on a new root disk
    /// (`[host] tool_uid`): banger's own, shared with no other process.
    pub tool_uid: u32,
}

fn network_config(section: &NetworkSection) -> Result<NetworkConfig, ConfigError> {
    let default_subnet = section
        .default_subnet
        .as_deref()
        .map(crate::network::ipam::parse_subnet)
        .transpose()
        .map_err(|e| ConfigError::Invalid {
            key: "network.default_subnet",
            reason: e.to_string(),
        })?;
    let dns = section
        .dns
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|_| ConfigError::Invalid {
            key: "network.dns",
            reason: "is not an IPv4 address".into(),
        })?;
    let mtu = section.mtu.unwrap_or(1500);
    if !(576..=9000).contains(&mtu) {
        return Err(ConfigError::Invalid {
            key: "network.mtu",
            reason: format!("{mtu} is outside 576 to 9000"),
        });
    }
    let group = section.interface_group.unwrap_or(DEFAULT_INTERFACE_GROUP);
    if group == 0 || group == u32::MAX {
        return Err(ConfigError::Invalid {
            key: "network.interface_group",
            reason: "0 is every link's group; choose 1 to 4294967294".into(),
        });
    }
    Ok(NetworkConfig {
        enabled: section.enabled.unwrap_or(true),
        default_subnet,
        dns,
        mtu,
        group,
    })
}

/// Seconds as given by a user (fractions allowed) to milliseconds.
pub fn seconds_to_ms(key: &'static str, seconds: f64) -> Result<u64, ConfigError> {
    if seconds.is_finite() && (0.001..=86_400.0).contains(&seconds) {
        Ok((seconds * 1000.0).round() as u64)
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!("{seconds} is outside 0.001 to 86400 seconds"),
        })
    }
}

/// Where a mode keeps things when nothing overrides it.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: Option<PathBuf>,
}

impl Defaults {
    pub fn for_mode(mode: Mode) -> Result<Defaults, ConfigError> {
        match mode {
            Mode::System => Ok(Defaults {
                config: PathBuf::from("/etc/banger/bangerd.toml"),
                state_dir: PathBuf::from("/var/lib/banger"),
                runtime_dir: Some(PathBuf::from("/run/banger")),
            }),
            Mode::User => Ok(Defaults {
                config: dirs::config_dir()
                    .ok_or(ConfigError::NoHome)?
                    .join("banger/bangerd.toml"),
                state_dir: dirs::state_dir().ok_or(ConfigError::NoHome)?.join("banger"),
                runtime_dir: dirs::runtime_dir().map(|d| d.join("banger")),
            }),
        }
    }

    /// The socket path when nothing names one: the runtime directory, or a
    /// private directory under the state directory when there is none.
    pub fn socket(&self, state_dir: &Path) -> PathBuf {
        match &self.runtime_dir {
            Some(dir) => dir.join("bangerd.sock"),
            None => state_dir.join("run/bangerd.sock"),
        }
    }
}

/// Combines defaults, the file and the overrides, and validates the result.
pub fn resolve(
    mode: Mode,
    defaults: &Defaults,
    file: ConfigFile,
    overrides: Overrides,
) -> Result<Config, ConfigError> {
    let state_dir = overrides
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| defaults.state_dir.clone());
    let socket = overrides
        .socket
        .or(file.socket)
        .unwrap_or_else(|| defaults.socket(&state_dir));
    let log_level = file.log_level.unwrap_or_else(|| "info".to_string());
    let socket_group = file.socket_group.unwrap_or_else(|| "banger".to_string());
    if socket_group.is_empty() || socket_group.contains(['/', ':', '\n']) {
        return Err(ConfigError::Invalid {
            key: "socket_group",
            reason: format!("{socket_group:?} is not a group name"),
        });
    }
    let defaults_retention = Retention::default();
    let retention = Retention {
        max_finished: file
            .operations
            .keep_finished
            .unwrap_or(defaults_retention.max_finished),
        max_age: file
            .operations
            .keep_hours
            .map(|h| std::time::Duration::from_secs(h.saturating_mul(3600)))
            .unwrap_or(defaults_retention.max_age),
    };
    let unpack_limit = match file.kernel.max_unpacked_mib {
        None => UnpackLimit::DEFAULT,
        Some(mib @ 1..=1_048_576) => UnpackLimit(mib << 20),
        Some(mib) => {
            return Err(ConfigError::Invalid {
                key: "kernel.max_unpacked_mib",
                reason: format!("{mib} is outside 1 to 1048576"),
            });
        }
    };
    let max_rootfs_bytes = match file.vm.max_rootfs_gib {
        None => DEFAULT_MAX_ROOTFS_GIB << 30,
        Some(gib @ 1..=1_048_576) => gib << 30,
        Some(gib) => {
            return Err(ConfigError::Invalid {
                key: "vm.max_rootfs_gib",
                reason: format!("{gib} is outside 1 to 1048576"),
            });
        }
    };
    if let Some(kernel) = &file.vm.default_kernel {
        crate::vm::validate_name("vm.default_kernel", kernel).map_err(|e| {
            ConfigError::Invalid {
                key: "vm.default_kernel",
                reason: e.reason,
            }
        })?;
    }
    let rpc_limits = rpc_limits(&file.rpc)?;
    let network = network_config(&file.network)?;
    let image = image_config(&file.image)?;
    require_absolute("state_dir", &state_dir)?;
    if let Some(agent) = &file.agent.binary {
        require_absolute("agent.binary", agent)?;
    }
    require_absolute("socket", &socket)?;
    let jail_dir = file
        .firecracker
        .jail_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("jail"));
    require_absolute("firecracker.jail_dir", &jail_dir)?;
    // The VMs' sweep would take the jails for strays, and the other way.
    if jail_dir == state_dir || jail_dir.starts_with(state_dir.join("vms")) {
        return Err(ConfigError::Invalid {
            key: "firecracker.jail_dir",
            reason: format!(
                "{} is the state directory or inside its vms/; choose a directory of its own",
                jail_dir.display()
            ),
        });
    }
    tracing_subscriber::EnvFilter::try_new(&log_level).map_err(|e| ConfigError::Invalid {
        key: "log_level",
        reason: e.to_string(),
    })?;
    let restart_delay_ms =
        seconds_to_ms("restart.delay_secs", file.restart.delay_secs.unwrap_or(1.0))?;
    let restart_max_delay_ms = seconds_to_ms(
        "restart.max_delay_secs",
        file.restart.max_delay_secs.unwrap_or(60.0),
    )?;
    if restart_max_delay_ms < restart_delay_ms {
        return Err(ConfigError::Invalid {
            key: "restart.max_delay_secs",
            reason: "is shorter than restart.delay_secs".into(),
        });
    }
    let tool_uid = file.host.tool_uid.unwrap_or(DEFAULT_TOOL_UID);
    let jailer_ids = [
        file.firecracker.jailer_uid.unwrap_or(65534),
        file.firecracker.jailer_gid.unwrap_or(65534),
    ];
    if tool_uid == 0 || tool_uid == u32::MAX || jailer_ids.contains(&tool_uid) {
        return Err(ConfigError::Invalid {
            key: "host.tool_uid",
            reason: format!(
                "{tool_uid} is root's, no one's or the jailer's; choose a uid of banger's own"
            ),
        });
    }
    let io_stall = Duration::from_millis(seconds_to_ms(
        "caller.io_stall_secs",
        file.caller.io_stall_secs.unwrap_or(30.0),
    )?);
    Ok(Config {
        mode,
        state_dir,
        socket,
        socket_group,
        log_level,
        retention,
        network,
        image,
        jailer: file
            .firecracker
            .jailer
            .unwrap_or(false)
            .then(|| JailerConfig {
                binary: file
                    .firecracker
                    .jailer_binary
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("jailer")),
                uid: file.firecracker.jailer_uid.unwrap_or(65534),
                gid: file.firecracker.jailer_gid.unwrap_or(65534),
            }),
        jail_dir,
        firecracker: file
            .firecracker
            .binary
            .unwrap_or_else(|| PathBuf::from("firecracker")),
        qemu: file
            .qemu
            .binary
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
        qemu_accel: file.qemu.accel.unwrap_or_default(),
        agent: file.agent.binary,
        unpack_limit,
        max_rootfs_bytes,
        default_kernel: file.vm.default_kernel.clone(),
        rpc_limits,
        restart_delay_ms,
        restart_max_delay_ms,
        io_stall,
        tool_uid,
    })
}

/// Connections the socket takes at once, by default.
pub const MAX_SESSIONS: usize = 4096;
/// Requests in flight on one connection, by default.
pub const MAX_IN_FLIGHT: usize = 64;
/// How many clients and requests the daemon takes at once (`[rpc]` in
/// bangerd.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcLimits {
    /// Open connections; more are told `unavailable` and closed.
    pub connections: usize,
    /// Open connections of one uid, so that one user cannot hold every
    /// slot.
    pub connections_per_uid: usize,
    /// Requests in flight on one connection.
    pub in_flight_per_connection: usize,
    /// Requests in flight in the whole daemon, so that neither many
    /// connections nor many requests can grow the store's queue.
    pub in_flight: usize,
    /// A connection that sends no request within this is closed, so idle
    /// connections cannot hold every slot.
    pub first_request: Duration,
    /// How often clients that ask hear that the daemon lives, while a
    /// request of theirs is in flight or a stream is open.
    pub heartbeat: Duration,
}

impl Default for RpcLimits {
    fn default() -> RpcLimits {
        RpcLimits {
            connections: MAX_SESSIONS,
            connections_per_uid: MAX_SESSIONS / 4,
            in_flight_per_connection: MAX_IN_FLIGHT,
            in_flight: 1024,
            first_request: Duration::from_secs(5),
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// `[rpc]`: each count at least 1, the first-request deadline 0.1 to 3600 s.
fn rpc_limits(section: &RpcSection) -> Result<RpcLimits, ConfigError> {
    let defaults = RpcLimits::default();
    let count = |key: &'static str, value: Option<usize>, default: usize| match value {
        None => Ok(default),
        Some(n @ 1..=1_000_000) => Ok(n),
        Some(n) => Err(ConfigError::Invalid {
            key,
            reason: format!("{n} is outside 1 to 1000000"),
        }),
    };
    let first_request = match section.first_request_secs {
        None => defaults.first_request,
        Some(s) if s.is_finite() && (0.1..=3600.0).contains(&s) => {
            std::time::Duration::from_secs_f64(s)
        }
        Some(s) => {
            return Err(ConfigError::Invalid {
                key: "rpc.first_request_secs",
                reason: format!("{s} is outside 0.1 to 3600 seconds"),
            });
        }
    };
    let heartbeat = match section.heartbeat_secs {
        None => defaults.heartbeat,
        Some(s) if s.is_finite() && (0.05..=60.0).contains(&s) => {
            std::time::Duration::from_secs_f64(s)
        }
        Some(s) => {
            return Err(ConfigError::Invalid {
                key: "rpc.heartbeat_secs",
                reason: format!("{s} is outside 0.05 to 60 seconds"),
            });
        }
    };
    Ok(RpcLimits {
        heartbeat,
        connections: count(
            "rpc.max_connections",
            section.max_connections,
            defaults.connections,
        )?,
        connections_per_uid: count(
            "rpc.max_connections_per_uid",
            section.max_connections_per_uid,
            defaults.connections_per_uid,
        )?,
        in_flight_per_connection: count(
            "rpc.max_in_flight_per_connection",
            section.max_in_flight_per_connection,
            defaults.in_flight_per_connection,
        )?,
        in_flight: count(
            "rpc.max_in_flight",
            section.max_in_flight,
            defaults.in_flight,
        )?,
        first_request,
    })
}

fn require_absolute(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!("{} is not an absolute path", path.display()),
        })
    }
}

/// Reads the configuration: the file named by `--config` must exist; the
/// mode's default file may be absent.
pub fn load(mode: Mode, overrides: Overrides) -> Result<Config, ConfigError> {
    let defaults = Defaults::for_mode(mode)?;
    let (path, required) = match &overrides.config {
        Some(path) => (path.clone(), true),
        None => (defaults.config.clone(), false),
    };
    let file = match std::fs::read_to_string(&path) {
        Ok(text) => ConfigFile::parse(&text, &path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => ConfigFile::default(),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    resolve(mode, &defaults, file, overrides)
}

#[cfg(test)]
mod tests;
