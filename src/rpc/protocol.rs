//! The wire protocol between `banger` and `bangerd`: closed enums of typed
//! requests, results and errors, with no actix or tokio in sight, so the
//! CLI, the daemon and the tests share one definition. `docs/rpc.md` is the
//! user-facing description; the steps are:
//!
//! 1. The client connects to the daemon's Unix socket; the daemon admits
//!    root, its own user and members of the configured group (SO_PEERCRED).
//! 2. Every message is one JSON-RPC 2.0 object on one line of at most
//!    [`MAX_LINE_BYTES`].
//! 3. The client opens with `daemon.hello`, so an old CLI and a new daemon
//!    can tell each other apart.
//! 4. Every request is given an `op_id` (a ULID): it is in the result, in
//!    the error's `data`, in every `progress` notification and in the
//!    daemon's logs for that request.
//! 5. Long requests send `progress` notifications, carrying the request's
//!    `id` and `op_id`, before the final response; several requests may be
//!    in flight on one connection.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::catalog::KernelRecord;
use crate::operations::OperationRecord;
use crate::store::Undecodable;
use crate::vm::machine::Phase;
use crate::vm::record::{Accel, VmRecord, VmState, VmmKind};
use crate::vm::restart::RestartMode;
use crate::vm::state::LastExit;

pub const PROTOCOL_VERSION: u32 = 1;

/// Longest accepted line, newline excluded.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Stable error codes: JSON-RPC's own, then banger's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Parse,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    Internal,
    NotFound,
    AlreadyExists,
    Conflict,
    Unavailable,
    Cancelled,
    PermissionDenied,
    ProtocolMismatch,
}

impl ErrorCode {
    const ALL: [ErrorCode; 12] = [
        ErrorCode::Parse,
        ErrorCode::InvalidRequest,
        ErrorCode::MethodNotFound,
        ErrorCode::InvalidParams,
        ErrorCode::Internal,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::Conflict,
        ErrorCode::Unavailable,
        ErrorCode::Cancelled,
        ErrorCode::PermissionDenied,
        ErrorCode::ProtocolMismatch,
    ];

    pub const fn code(self) -> i64 {
        match self {
            ErrorCode::Parse => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::MethodNotFound => -32601,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::Internal => -32603,
            ErrorCode::NotFound => -32001,
            ErrorCode::AlreadyExists => -32002,
            ErrorCode::Conflict => -32003,
            ErrorCode::Unavailable => -32004,
            ErrorCode::Cancelled => -32005,
            ErrorCode::PermissionDenied => -32006,
            ErrorCode::ProtocolMismatch => -32007,
        }
    }

    /// The code's stable name, also sent as `error.data.kind`.
    pub const fn kind(self) -> &'static str {
        match self {
            ErrorCode::Parse => "parse_error",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MethodNotFound => "method_not_found",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::Internal => "internal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::ProtocolMismatch => "protocol_mismatch",
        }
    }

    pub fn from_code(code: i64) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// An error as the daemon reports it: a stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    fn invalid_params(field: &str, reason: impl std::fmt::Display) -> RpcError {
        RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid params: {field}: {reason}"),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorData {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ErrorData>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    pub id: Value,
    /// Kept as raw JSON: results are written once by the daemon and parsed
    /// once, straight into their type, by the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorObject>,
}

impl Response {
    pub fn success(id: Value, result: Box<RawValue>) -> Response {
        Response {
            jsonrpc: "2.0".into(),
            id,
            result: Some(result),
            error: None,
        }
    }

    pub fn failure(id: Value, error: &RpcError, op_id: Option<&str>) -> Response {
        Response {
            jsonrpc: "2.0".into(),
            id,
            result: None,
            error: Some(ErrorObject {
                code: error.code.code(),
                message: error.message.clone(),
                data: Some(ErrorData {
                    kind: error.code.kind().into(),
                    op_id: op_id.map(str::to_string),
                }),
            }),
        }
    }
}

/// The `params` of a `progress` notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The `id` of the request this progress belongs to.
    pub id: Value,
    pub op_id: String,
    pub phase: String,
    #[serde(default)]
    pub current: Option<u64>,
    #[serde(default)]
    pub total: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub jsonrpc: String,
    pub method: String,
    pub params: Value,
}

impl Notification {
    pub fn progress(progress: &Progress) -> Notification {
        Notification {
            jsonrpc: "2.0".into(),
            method: "progress".into(),
            params: serde_json::to_value(progress).unwrap_or(Value::Null),
        }
    }
}

/// What a client reads: a notification or the final response.
#[derive(Debug, Clone)]
pub enum Incoming {
    Notification(Notification),
    Response(Response),
}

/// Any message a daemon sends, read in one pass; the result stays raw.
#[derive(Deserialize)]
struct AnyMessage {
    jsonrpc: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    id: Value,
    #[serde(default)]
    result: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<ErrorObject>,
}

impl Incoming {
    pub fn parse(line: &str) -> Result<Incoming, serde_json::Error> {
        let message: AnyMessage = serde_json::from_str(line)?;
        Ok(match message.method {
            Some(method) => Incoming::Notification(Notification {
                jsonrpc: message.jsonrpc,
                method,
                params: message.params.unwrap_or(Value::Null),
            }),
            None => Incoming::Response(Response {
                jsonrpc: message.jsonrpc,
                id: message.id,
                result: message.result,
                error: message.error,
            }),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloParams {
    pub protocol_version: u32,
    #[serde(default)]
    pub client_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOperationsParams {
    /// Include finished operations, not only those in flight.
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationRef {
    pub op_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupParams {
    /// Where the copy goes; absolute, and must not exist yet.
    pub path: PathBuf,
    /// Copy at most this many bytes per second (spares a busy disk).
    #[serde(default)]
    pub rate_limit: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// `--memory`: MiB as a number, or a size such as "512M" or "2G".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MemoryArg {
    Mib(u64),
    Size(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCreateParams {
    /// Generated (`adjective-noun`) when absent.
    #[serde(default)]
    pub name: Option<String>,
    pub kernel: String,
    pub rootfs: PathBuf,
    #[serde(default)]
    pub vcpus: Option<u8>,
    #[serde(default)]
    pub memory: Option<MemoryArg>,
    #[serde(default)]
    pub restart: Option<RestartMode>,
    #[serde(default)]
    pub restart_delay_secs: Option<f64>,
    #[serde(default)]
    pub restart_max_delay_secs: Option<f64>,
    #[serde(default)]
    pub vmm: Option<VmmKind>,
    #[serde(default)]
    pub start: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStopParams {
    pub name: String,
    /// Seconds to wait for the guest before SIGKILL (default 30).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmForgetParams {
    /// The quarantined record's key: the VM's id.
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgetResult {
    pub forgotten: Undecodable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRemoveParams {
    pub name: String,
    /// Stop (kill) a running VM first.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLogsParams {
    pub name: String,
    /// Only the last N lines.
    #[serde(default)]
    pub tail: Option<usize>,
    /// Keep sending new output: the connection becomes a byte stream.
    #[serde(default)]
    pub follow: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmExecParams {
    pub name: String,
    /// The program and its arguments; the program is looked up in the
    /// guest's PATH.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A pseudo-terminal (not yet served).
    #[serde(default)]
    pub tty: bool,
    /// How long to wait for the agent of a VM that is still booting (default 60).
    #[serde(default)]
    pub wait_secs: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPingParams {
    pub name: String,
    /// How long to wait for the agent of a VM that is still booting (default 60).
    #[serde(default)]
    pub wait_secs: Option<f64>,
}

/// The agent's answer to `vm.ping`, with what it said in its hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub round_trip_ms: f64,
    pub agent_version: String,
    pub kernel: String,
    pub hostname: String,
    /// Guest boot clock (ms) when the agent's stages started and when it
    /// began serving.
    pub boot: banger_agent::protocol::BootTimes,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelImportDebParams {
    pub name: String,
    /// The Debian kernel package (`linux-image-*.deb`), an absolute path.
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelRef {
    pub name: String,
}

/// Every request the daemon serves.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Hello(HelloParams),
    Status,
    Methods,
    StoreSchema,
    OperationsList(ListOperationsParams),
    OperationsGet(OperationRef),
    OperationsCancel(OperationRef),
    OperationsWatch(OperationRef),
    Backup(BackupParams),
    VmCreate(VmCreateParams),
    VmStart(VmRef),
    VmStop(VmStopParams),
    VmKill(VmRef),
    VmRestart(VmStopParams),
    VmRemove(VmRemoveParams),
    VmForget(VmForgetParams),
    VmList,
    VmGet(VmRef),
    VmLogs(VmLogsParams),
    VmExec(VmExecParams),
    VmPing(VmPingParams),
    KernelImport(KernelImportParams),
    KernelImportDeb(KernelImportDebParams),
    KernelList,
    KernelRemove(KernelRef),
}

pub struct MethodInfo {
    pub name: &'static str,
    pub summary: &'static str,
}

pub const METHODS: &[MethodInfo] = &[
    MethodInfo {
        name: "daemon.hello",
        summary: "Exchange protocol and daemon versions; the first call on a connection.",
    },
    MethodInfo {
        name: "daemon.status",
        summary: "Version, uptime, pid, state directory, store schema and counts.",
    },
    MethodInfo {
        name: "daemon.methods",
        summary: "Names and one-line descriptions of every method.",
    },
    MethodInfo {
        name: "daemon.store.schema",
        summary: "The store's table versions and applied migrations (the online migration probe).",
    },
    MethodInfo {
        name: "daemon.operations.list",
        summary: "Operations in flight, or with all=true also finished ones.",
    },
    MethodInfo {
        name: "daemon.operations.get",
        summary: "One operation by op_id.",
    },
    MethodInfo {
        name: "daemon.operations.cancel",
        summary: "Ask a cancellable operation in flight to stop.",
    },
    MethodInfo {
        name: "daemon.operations.watch",
        summary: "Stream an operation's progress until it ends, then return it.",
    },
    MethodInfo {
        name: "daemon.backup",
        summary: "Write a consistent copy of the store to a path, with progress; cancellable.",
    },
    MethodInfo {
        name: "vm.create",
        summary: "Create a VM from a kernel and a root filesystem (cloned), optionally starting it.",
    },
    MethodInfo {
        name: "vm.start",
        summary: "Start a VM; a no-op when it is running.",
    },
    MethodInfo {
        name: "vm.stop",
        summary: "Stop a VM gracefully, SIGKILL after the timeout; a no-op when stopped.",
    },
    MethodInfo {
        name: "vm.kill",
        summary: "SIGKILL a VM's VMM at once.",
    },
    MethodInfo {
        name: "vm.restart",
        summary: "Stop a VM, then start it.",
    },
    MethodInfo {
        name: "vm.remove",
        summary: "Remove a stopped VM and everything it left on the host (force: kill it first).",
    },
    MethodInfo {
        name: "vm.forget",
        summary: "Remove a quarantined VM record (one that does not decode) and the files it could own.",
    },
    MethodInfo {
        name: "vm.list",
        summary: "Every VM, by name.",
    },
    MethodInfo {
        name: "vm.get",
        summary: "One VM in detail.",
    },
    MethodInfo {
        name: "vm.logs",
        summary: "A VM's serial console output (the last lines with tail).",
    },
    MethodInfo {
        name: "vm.exec",
        summary: "Run a command in a VM through its agent; the connection becomes a byte stream of stdin, stdout, stderr and the exit status.",
    },
    MethodInfo {
        name: "vm.ping",
        summary: "Ping a VM's agent (waiting for a booting VM's agent to come up).",
    },
    MethodInfo {
        name: "kernel.import",
        summary: "Copy a vmlinux (and initrd) into the kernel catalog under a name.",
    },
    MethodInfo {
        name: "kernel.import_deb",
        summary: "Import a Debian kernel package: vmlinux, bzImage, and an initramfs of the guest modules with banger-agent; with progress.",
    },
    MethodInfo {
        name: "kernel.list",
        summary: "Every kernel in the catalog.",
    },
    MethodInfo {
        name: "kernel.remove",
        summary: "Remove a kernel no VM uses.",
    },
];

impl Request {
    pub fn method(&self) -> &'static str {
        match self {
            Request::Hello(_) => "daemon.hello",
            Request::Status => "daemon.status",
            Request::Methods => "daemon.methods",
            Request::StoreSchema => "daemon.store.schema",
            Request::OperationsList(_) => "daemon.operations.list",
            Request::OperationsGet(_) => "daemon.operations.get",
            Request::OperationsCancel(_) => "daemon.operations.cancel",
            Request::OperationsWatch(_) => "daemon.operations.watch",
            Request::Backup(_) => "daemon.backup",
            Request::VmCreate(_) => "vm.create",
            Request::VmStart(_) => "vm.start",
            Request::VmStop(_) => "vm.stop",
            Request::VmKill(_) => "vm.kill",
            Request::VmRestart(_) => "vm.restart",
            Request::VmRemove(_) => "vm.remove",
            Request::VmForget(_) => "vm.forget",
            Request::VmList => "vm.list",
            Request::VmGet(_) => "vm.get",
            Request::VmLogs(_) => "vm.logs",
            Request::VmExec(_) => "vm.exec",
            Request::VmPing(_) => "vm.ping",
            Request::KernelImport(_) => "kernel.import",
            Request::KernelImportDeb(_) => "kernel.import_deb",
            Request::KernelList => "kernel.list",
            Request::KernelRemove(_) => "kernel.remove",
        }
    }

    /// Types and validates a method's params; errors name the field.
    pub fn parse(method: &str, params: Option<Value>) -> Result<Request, RpcError> {
        let params = params.unwrap_or_else(|| Value::Object(Default::default()));
        Ok(match method {
            "daemon.hello" => Request::Hello(typed(params)?),
            "daemon.status" => typed::<NoParams>(params).map(|_| Request::Status)?,
            "daemon.methods" => typed::<NoParams>(params).map(|_| Request::Methods)?,
            "daemon.store.schema" => typed::<NoParams>(params).map(|_| Request::StoreSchema)?,
            "daemon.operations.list" => Request::OperationsList(typed(params)?),
            "daemon.operations.get" => Request::OperationsGet(op_ref(params)?),
            "daemon.operations.cancel" => Request::OperationsCancel(op_ref(params)?),
            "daemon.operations.watch" => Request::OperationsWatch(op_ref(params)?),
            "daemon.backup" => {
                let backup: BackupParams = typed(params)?;
                if !backup.path.is_absolute() {
                    return Err(RpcError::invalid_params("path", "must be an absolute path"));
                }
                if backup.rate_limit == Some(0) {
                    return Err(RpcError::invalid_params(
                        "rate_limit",
                        "must be at least 1 byte per second",
                    ));
                }
                Request::Backup(backup)
            }
            "vm.create" => Request::VmCreate(typed(params)?),
            "vm.start" => Request::VmStart(typed(params)?),
            "vm.stop" => Request::VmStop(typed(params)?),
            "vm.kill" => Request::VmKill(typed(params)?),
            "vm.restart" => Request::VmRestart(typed(params)?),
            "vm.remove" => Request::VmRemove(typed(params)?),
            "vm.forget" => Request::VmForget(typed(params)?),
            "vm.list" => typed::<NoParams>(params).map(|_| Request::VmList)?,
            "vm.get" => Request::VmGet(typed(params)?),
            "vm.logs" => Request::VmLogs(typed(params)?),
            "vm.exec" => {
                let exec: VmExecParams = typed(params)?;
                if exec.argv.is_empty() || exec.argv[0].is_empty() {
                    return Err(RpcError::invalid_params("argv", "must name a program"));
                }
                if exec.tty {
                    return Err(RpcError::invalid_params(
                        "tty",
                        "a pseudo-terminal is not served yet; run without -t",
                    ));
                }
                if let Some(key) = exec.env.keys().find(|k| k.is_empty() || k.contains('=')) {
                    return Err(RpcError::invalid_params(
                        "env",
                        format!("{key:?} is not a variable name"),
                    ));
                }
                check_wait("wait_secs", exec.wait_secs)?;
                Request::VmExec(exec)
            }
            "vm.ping" => {
                let ping: VmPingParams = typed(params)?;
                check_wait("wait_secs", ping.wait_secs)?;
                Request::VmPing(ping)
            }
            "kernel.import" => Request::KernelImport(typed(params)?),
            "kernel.import_deb" => {
                let import: KernelImportDebParams = typed(params)?;
                if !import.path.is_absolute() {
                    return Err(RpcError::invalid_params("path", "must be an absolute path"));
                }
                Request::KernelImportDeb(import)
            }
            "kernel.list" => typed::<NoParams>(params).map(|_| Request::KernelList)?,
            "kernel.remove" => Request::KernelRemove(typed(params)?),
            other => {
                return Err(RpcError::new(
                    ErrorCode::MethodNotFound,
                    format!("unknown method {other:?}; daemon.methods lists them"),
                ));
            }
        })
    }

    /// Whether an accepted request switches its connection to a byte stream.
    pub fn is_streaming(&self) -> bool {
        matches!(
            self,
            Request::VmLogs(VmLogsParams { follow: true, .. }) | Request::VmExec(_)
        )
    }
}

fn check_wait(field: &'static str, secs: Option<f64>) -> Result<(), RpcError> {
    match secs {
        Some(s) if !(s.is_finite() && (0.0..=3600.0).contains(&s)) => Err(
            RpcError::invalid_params(field, "must be between 0 and 3600 seconds"),
        ),
        _ => Ok(()),
    }
}

fn typed<T: DeserializeOwned>(params: Value) -> Result<T, RpcError> {
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "params".to_string()
        } else {
            path
        };
        RpcError::invalid_params(&field, e.into_inner())
    })
}

fn op_ref(params: Value) -> Result<OperationRef, RpcError> {
    let op: OperationRef = typed(params)?;
    if ulid::Ulid::from_string(&op.op_id).is_err() {
        return Err(RpcError::invalid_params(
            "op_id",
            format!("{:?} is not an operation id", op.op_id),
        ));
    }
    Ok(op)
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: Value,
    pub request: Request,
}

/// Parses one request line. The error carries the request's id when one
/// could be read, else `null`, as JSON-RPC asks.
pub fn parse_line(line: &[u8]) -> Result<Call, (Value, RpcError)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        (
            Value::Null,
            RpcError::new(ErrorCode::Parse, format!("parse error: {e}")),
        )
    })?;
    let Value::Object(mut object) = value else {
        let what = if value.is_array() {
            "batches are not supported"
        } else {
            "a request must be a JSON object"
        };
        return Err((Value::Null, RpcError::new(ErrorCode::InvalidRequest, what)));
    };
    let id = object.remove("id");
    let invalid = |id: Option<&Value>, message: &str| {
        (
            id.cloned().unwrap_or(Value::Null),
            RpcError::new(ErrorCode::InvalidRequest, message),
        )
    };
    let id = match id {
        Some(id @ (Value::Number(_) | Value::String(_))) => id,
        Some(Value::Null) | None => {
            return Err(invalid(
                None,
                "a request needs an id (a number or a string)",
            ));
        }
        Some(_) => return Err(invalid(None, "id must be a number or a string")),
    };
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(Some(&id), "jsonrpc must be \"2.0\""));
    }
    let Some(Value::String(method)) = object.remove("method") else {
        return Err(invalid(Some(&id), "method must be a string"));
    };
    let params = match object.remove("params") {
        None | Some(Value::Null) => None,
        Some(params @ Value::Object(_)) => Some(params),
        Some(_) => {
            return Err((
                id,
                RpcError::new(
                    ErrorCode::InvalidParams,
                    "invalid params: params must be an object",
                ),
            ));
        }
    };
    match Request::parse(&method, params) {
        Ok(request) => Ok(Call { id, request }),
        Err(e) => Err((id, e)),
    }
}

/// A result with the request's `op_id` beside its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WithOpId<T> {
    pub op_id: String,
    #[serde(flatten)]
    pub result: T,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloResult {
    pub protocol_version: u32,
    pub daemon_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub path: PathBuf,
    /// Table name to schema version.
    pub tables: BTreeMap<String, u32>,
    pub applied_migrations: Vec<String>,
    /// Table name to record count.
    pub records: BTreeMap<String, u64>,
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
    pub quarantined: Vec<Undecodable>,
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
pub struct OperationsResult {
    pub operations: Vec<OperationRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationResult {
    pub operation: OperationRecord,
}

/// A VM as `vm ls --json` and `vm inspect --json` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    pub id: String,
    pub state: VmState,
    /// The lifecycle phase behind `state`, with its deadline or next timer.
    pub phase: Phase,
    pub vmm: VmmKind,
    /// The VMM's pid; null unless a VMM process exists.
    pub pid: Option<i32>,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: String,
    pub rootfs: PathBuf,
    pub restart_policy: RestartMode,
    pub restart_delay_secs: f64,
    pub restart_max_delay_secs: f64,
    pub restart_count: u32,
    pub next_restart_at: Option<jiff::Timestamp>,
    pub last_exit: Option<LastExit>,
    pub created_at: jiff::Timestamp,
    pub started_at: Option<jiff::Timestamp>,
    /// Why the VM is `failed`.
    pub error: Option<String>,
    /// QEMU's accelerator while it runs (`kvm` or `tcg`).
    pub accel: Option<Accel>,
    /// Why a re-adopted VMM counts as degraded (alive, not answering).
    pub degraded: Option<String>,
}

impl From<&VmRecord> for VmView {
    fn from(vm: &VmRecord) -> VmView {
        VmView {
            name: vm.name.clone(),
            id: vm.id.clone(),
            state: vm.phase.state(),
            phase: vm.phase,
            vmm: vm.vmm,
            pid: vm.process.as_ref().map(|p| p.pid),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel: vm.kernel.clone(),
            rootfs: vm.rootfs.clone(),
            restart_policy: vm.restart_policy.mode,
            restart_delay_secs: vm.restart_policy.delay_ms as f64 / 1000.0,
            restart_max_delay_secs: vm.restart_policy.max_delay_ms as f64 / 1000.0,
            restart_count: vm.restart_count,
            next_restart_at: match vm.phase {
                Phase::BackingOff { until, .. } => Some(until),
                _ => None,
            },
            last_exit: vm.last_exit,
            created_at: vm.created_at,
            started_at: vm.started_at,
            error: vm.error.clone(),
            accel: vm.process.as_ref().and_then(|p| p.accel),
            degraded: vm.degraded.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmResult {
    pub vm: VmView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmsResult {
    pub vms: Vec<VmView>,
}

/// The answer to a streaming request; frames follow it on the connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamAccepted {
    pub stream: StreamInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub version: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogsResult {
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelResult {
    pub kernel: KernelRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelsResult {
    pub kernels: Vec<KernelRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupResult {
    pub path: PathBuf,
    pub records: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str) -> (Value, RpcError) {
        parse_line(line.as_bytes()).expect_err("should be refused")
    }

    #[test]
    fn a_well_formed_request_parses() {
        let call =
            parse_line(br#"{"jsonrpc":"2.0","id":7,"method":"daemon.status"}"#).expect("parse");
        assert_eq!(
            call,
            Call {
                id: 7.into(),
                request: Request::Status
            }
        );
        let call = parse_line(
            br#"{"jsonrpc":"2.0","id":"a","method":"daemon.backup","params":{"path":"/tmp/b.redb","rate_limit":1000}}"#,
        )
        .expect("parse");
        assert_eq!(
            call.request,
            Request::Backup(BackupParams {
                path: "/tmp/b.redb".into(),
                rate_limit: Some(1000)
            })
        );
    }

    #[test]
    fn malformed_json_is_a_parse_error_with_a_null_id() {
        let (id, e) = err(r#"{"jsonrpc":"2.0","id":1,"#);
        assert_eq!((id, e.code), (Value::Null, ErrorCode::Parse));
        assert_eq!(
            parse_line(b"\xff\xfe{}").expect_err("utf8").1.code,
            ErrorCode::Parse
        );
    }

    #[test]
    fn envelope_mistakes_are_invalid_requests() {
        assert_eq!(err("[1,2]").1.message, "batches are not supported");
        assert_eq!(err("42").1.code, ErrorCode::InvalidRequest);
        assert_eq!(
            err(r#"{"jsonrpc":"2.0","method":"daemon.status"}"#).1.code,
            ErrorCode::InvalidRequest
        );
        let (id, e) = err(r#"{"jsonrpc":"1.0","id":3,"method":"daemon.status"}"#);
        assert_eq!((id, e.code), (3.into(), ErrorCode::InvalidRequest));
        assert_eq!(
            err(r#"{"jsonrpc":"2.0","id":3,"method":5}"#).1.code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn unknown_methods_are_named() {
        let (id, e) = err(r#"{"jsonrpc":"2.0","id":1,"method":"vm.explode"}"#);
        assert_eq!((id, e.code), (1.into(), ErrorCode::MethodNotFound));
        assert!(e.message.contains("vm.explode"));
    }

    #[test]
    fn invalid_params_name_the_field() {
        let e = err(r#"{"jsonrpc":"2.0","id":1,"method":"daemon.backup","params":{"path":5}}"#).1;
        assert_eq!(e.code, ErrorCode::InvalidParams);
        assert!(
            e.message.starts_with("invalid params: path: "),
            "{}",
            e.message
        );
        let e =
            err(r#"{"jsonrpc":"2.0","id":1,"method":"daemon.backup","params":{"path":"rel"}}"#).1;
        assert_eq!(e.message, "invalid params: path: must be an absolute path");
        let e = err(r#"{"jsonrpc":"2.0","id":1,"method":"daemon.backup","params":{}}"#).1;
        assert!(e.message.contains("missing field `path`"), "{}", e.message);
        let e =
            err(r#"{"jsonrpc":"2.0","id":1,"method":"daemon.status","params":{"verbose":true}}"#).1;
        assert!(
            e.message.contains("unknown field `verbose`"),
            "{}",
            e.message
        );
        let e = err(r#"{"jsonrpc":"2.0","id":1,"method":"daemon.operations.get","params":{"op_id":"nope"}}"#).1;
        assert!(
            e.message.starts_with("invalid params: op_id: "),
            "{}",
            e.message
        );
        let e = err(r#"{"jsonrpc":"2.0","id":1,"method":"daemon.status","params":[1]}"#).1;
        assert_eq!(e.code, ErrorCode::InvalidParams);
    }

    #[test]
    fn every_method_parses_and_names_itself() {
        for info in METHODS {
            let params = match info.name {
                "daemon.hello" => serde_json::json!({"protocol_version": 1}),
                "daemon.backup" => serde_json::json!({"path": "/x"}),
                "vm.create" => serde_json::json!({"kernel": "k", "rootfs": "/r", "memory": "2G"}),
                "kernel.import" => serde_json::json!({"name": "k", "vmlinux": "/v"}),
                "vm.exec" => serde_json::json!({"name": "a", "argv": ["uname", "-r"]}),
                "kernel.import_deb" => serde_json::json!({"name": "k", "path": "/k.deb"}),
                "vm.list" | "kernel.list" => serde_json::json!({}),
                "vm.forget" => serde_json::json!({"id": "abcdefghij"}),
                n if n.starts_with("vm.") || n.starts_with("kernel.") => {
                    serde_json::json!({"name": "a"})
                }
                n if n.starts_with("daemon.operations.") && n != "daemon.operations.list" => {
                    serde_json::json!({"op_id": ulid::Ulid::new().to_string()})
                }
                _ => serde_json::json!({}),
            };
            let request = Request::parse(info.name, Some(params)).expect(info.name);
            assert_eq!(request.method(), info.name);
        }
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.code()), Some(code));
        }
    }

    #[test]
    fn results_carry_their_op_id_beside_their_fields() {
        let value = serde_json::to_value(WithOpId {
            op_id: "01J".into(),
            result: HelloResult {
                protocol_version: 1,
                daemon_version: "0.1.0".into(),
            },
        })
        .expect("serialize");
        assert_eq!(
            value,
            serde_json::json!({"op_id": "01J", "protocol_version": 1, "daemon_version": "0.1.0"})
        );
    }
}
