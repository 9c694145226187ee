//! The `daemon.*` methods (but for `daemon.operations.*`, see `ops`): the
//! handshake, status, the method list, the store's schema, backups.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::protocol::{ErrorCode, MethodInfo, PROTOCOL_VERSION, Params, RpcError, requests};
use super::wire::Wire;
use crate::actors::operation::ListOperations;
use crate::actors::records::{QuarantinedRecord, Records};
use crate::config::Mode;

requests! {
    /// The daemon's own requests.
    pub enum Request {
        Hello(HelloParams) => "daemon.hello",
            "Exchange protocol and daemon versions; the first call on a connection.";
        Status => "daemon.status",
            "Version, uptime, pid, state directory, store schema and counts, quarantined records.";
        Methods => "daemon.methods", "Names and one-line descriptions of every method.";
        StoreSchema => "daemon.store.schema",
            "The store's table versions and applied migrations (the online migration probe).";
        Backup(BackupParams) => "daemon.backup",
            "Write a consistent copy of the store to a path, with progress; cancellable.";
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloParams {
    pub protocol_version: u32,
    #[serde(default)]
    pub client_version: Option<String>,
    /// The client tells a quiet connection from a dead daemon by
    /// heartbeats: a `heartbeat` notification per request in flight, and
    /// heartbeat frames on byte streams, every `heartbeat_secs`.
    #[serde(default)]
    pub heartbeats: bool,
}

impl Params for HelloParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupParams {
    /// Where the copy goes: a file name in the daemon's backup directory
    /// (`<state-dir>/backups`), or an absolute path there; it must not
    /// exist yet. The daemon writes nowhere else.
    pub path: PathBuf,
    /// Copy at most this many bytes per second (spares a busy disk).
    #[serde(default)]
    pub rate_limit: Option<u64>,
}

impl Params for BackupParams {
    fn validate(&self) -> Result<(), RpcError> {
        let named = self.path.file_name().map(Path::new);
        let plain_name = named.is_some_and(|n| n == self.path);
        if !self.path.is_absolute() && !plain_name {
            return Err(RpcError::invalid_params(
                "path",
                "must be a file name or an absolute path in the backup directory",
            ));
        }
        if self.rate_limit == Some(0) {
            return Err(RpcError::invalid_params(
                "rate_limit",
                "must be at least 1 byte per second",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloResult {
    /// How often heartbeats come, when the client asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_secs: Option<f64>,
    pub protocol_version: u32,
    pub daemon_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub path: PathBuf,
    /// Table name to schema version.
    pub tables: BTreeMap<String, u32>,
    pub applied_migrations: Vec<String>,
    /// Table name to record count (empty when the store cannot be read).
    pub records: BTreeMap<String, u64>,
    /// Set while the store cannot write, saying why and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResult {
    pub version: String,
    pub protocol_version: u32,
    pub pid: u32,
    pub mode: String,
    pub started_at: jiff::Timestamp,
    pub uptime_seconds: u64,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub store: StoreStatus,
    pub operations_running: u64,
    /// Records that do not decode, left alone (with what they own) until
    /// `vm forget` removes them.
    pub quarantined: Vec<QuarantinedRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodDescription {
    pub name: String,
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodsResult {
    pub methods: Vec<MethodDescription>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreSchemaResult {
    pub tables: BTreeMap<String, u32>,
    pub applied_migrations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupResult {
    pub path: PathBuf,
    pub records: u64,
    pub bytes: u64,
}

/// Facts about the running daemon, fixed at start-up.
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    pub mode: Mode,
    pub started_at: Timestamp,
    pub started: Instant,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub store_path: PathBuf,
    /// How often heartbeats go to the clients that ask (`rpc.heartbeat_secs`).
    pub heartbeat: std::time::Duration,
    /// The store's table versions: fixed while the daemon runs, since
    /// migrations happen only at start-up under the state directory's lock.
    pub tables: BTreeMap<String, u32>,
    /// The migrations applied to the store, fixed likewise.
    pub applied_migrations: Vec<String>,
}

/// What the daemon's handlers reach: the records (counts, quarantine,
/// backups) and the facts of the running daemon.
pub struct DaemonServices {
    /// Every method of every domain (`rpc::request::methods`).
    pub methods: Vec<&'static MethodInfo>,
    pub records: Records,
    pub info: DaemonInfo,
}

pub async fn handle(
    services: &DaemonServices,
    wire: &Wire<'_>,
    request: Request,
) -> Result<Box<RawValue>, RpcError> {
    match request {
        Request::Hello(params) => wire.answer(hello(services, params)?),
        Request::Status => wire.answer(status(services, wire).await?),
        Request::Methods => wire.answer(MethodsResult {
            methods: services
                .methods
                .iter()
                .map(|m| MethodDescription {
                    name: m.name.into(),
                    summary: m.summary.into(),
                })
                .collect(),
        }),
        Request::StoreSchema => wire.answer(StoreSchemaResult {
            tables: services.info.tables.clone(),
            applied_migrations: services.info.applied_migrations.clone(),
        }),
        Request::Backup(params) => wire.answer(backup(services, wire, params).await?),
    }
}

fn hello(services: &DaemonServices, params: HelloParams) -> Result<HelloResult, RpcError> {
    if params.protocol_version != PROTOCOL_VERSION {
        return Err(RpcError::new(
            ErrorCode::ProtocolMismatch,
            format!(
                "the client speaks protocol v{}, this daemon (banger {}) speaks v{PROTOCOL_VERSION}; use the banger CLI of the daemon's release",
                params.protocol_version, services.info.version
            ),
        ));
    }
    Ok(HelloResult {
        heartbeat_secs: params
            .heartbeats
            .then_some(services.info.heartbeat.as_secs_f64()),
        protocol_version: PROTOCOL_VERSION,
        daemon_version: services.info.version.clone(),
    })
}

async fn status(services: &DaemonServices, wire: &Wire<'_>) -> Result<StatusResult, RpcError> {
    let (records, running, quarantined) = tokio::join!(
        services.records.counts(),
        wire.operations.send(ListOperations { all: false }),
        services.records.quarantined(),
    );
    let running = running??;
    let unavailable = services.records.unwritable();
    // A store that cannot be read still leaves a status to report.
    let records = match records? {
        Ok(records) => records,
        Err(_) if unavailable.is_some() => BTreeMap::new(),
        Err(e) => return Err(e.into()),
    };
    let quarantined = quarantined?;
    let info = &services.info;
    Ok(StatusResult {
        version: info.version.clone(),
        protocol_version: PROTOCOL_VERSION,
        pid: info.pid,
        mode: match info.mode {
            Mode::System => "system".into(),
            Mode::User => "user".into(),
        },
        started_at: info.started_at,
        uptime_seconds: info.started.elapsed().as_secs(),
        state_dir: info.state_dir.clone(),
        socket: info.socket.clone(),
        store: StoreStatus {
            path: info.store_path.clone(),
            tables: info.tables.clone(),
            applied_migrations: info.applied_migrations.clone(),
            records,
            unavailable,
        },
        operations_running: running.len() as u64,
        quarantined,
    })
}

/// Where backups go: the one directory `daemon.backup` writes into.
pub const BACKUP_DIR: &str = "backups";

/// A backup's file in `dir`: `named` is a file name, or a path whose
/// directory is `dir` itself (a path elsewhere is refused, naming it).
fn backup_target(dir: &Path, named: &Path) -> Result<PathBuf, RpcError> {
    let outside = || {
        RpcError::invalid_params(
            "path",
            format!(
                "{} is outside the daemon's backup directory {}; name a file there",
                named.display(),
                dir.display()
            ),
        )
    };
    let name = match named.file_name() {
        Some(name) if named.is_absolute() && named.parent() == Some(dir) => name,
        Some(name) if Path::new(name) == named => name,
        _ => return Err(outside()),
    };
    Ok(dir.join(name))
}

/// A snapshot of the store, copied on a blocking thread with progress;
/// cancellable, and recorded intent-first so a killed daemon's partial
/// file is found.
async fn backup(
    services: &DaemonServices,
    wire: &Wire<'_>,
    params: BackupParams,
) -> Result<BackupResult, RpcError> {
    let dir = services.info.state_dir.join(BACKUP_DIR);
    let path = backup_target(&dir, &params.path)?;
    let target = path.display().to_string();
    let created = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    if let Err(e) = created {
        return Err(RpcError::new(
            ErrorCode::Internal,
            format!("cannot create the backup directory {}: {e}", dir.display()),
        ));
    }
    let written = path.clone();
    let copied = wire
        .with_progress(
            "daemon.backup",
            &target,
            true,
            true,
            |report, cancel| async move {
                services
                    .records
                    .backup(path, params.rate_limit, cancel, move |current, total| {
                        report("copying", Some(current), Some(total))
                    })
                    .await
                    .map_err(RpcError::from)
            },
        )
        .await?;
    Ok(BackupResult {
        path: written,
        records: copied.records,
        bytes: copied.bytes,
    })
}
