//! The wire protocol between `banger` and `bangerd`, the transport half:
//! envelopes, errors, notifications and the `requests!` table every domain
//! declares its closed request enum with (`rpc::{daemon, ops, vm,
//! kernel}`), with no actix or tokio in sight. `docs/rpc.md` is the
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

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

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

    pub fn invalid_params(field: &str, reason: impl std::fmt::Display) -> RpcError {
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
    /// The daemon lives, and request `id` is still in flight.
    pub fn heartbeat(id: &Value) -> Notification {
        Notification {
            jsonrpc: "2.0".into(),
            method: "heartbeat".into(),
            params: serde_json::json!({ "id": id }),
        }
    }

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

/// A method's name and one-line description, as `daemon.methods` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    pub name: &'static str,
    pub summary: &'static str,
}

/// What a request's params must satisfy beyond their type: checks that
/// name the field. Most params have none.
pub trait Params: DeserializeOwned {
    fn validate(&self) -> Result<(), RpcError> {
        Ok(())
    }
}

/// Typed and validated params; errors name the field.
pub fn params<T: Params>(params: Value) -> Result<T, RpcError> {
    let typed: T = typed(params)?;
    typed.validate()?;
    Ok(typed)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// Params of a method that takes none: `{}` or nothing.
pub fn no_params(params: Value) -> Result<(), RpcError> {
    typed::<NoParams>(params).map(drop)
}

pub fn unknown_method(method: &str) -> RpcError {
    RpcError::new(
        ErrorCode::MethodNotFound,
        format!("unknown method {method:?}; daemon.methods lists them"),
    )
}

/// A seconds field bounded to an hour (waits the client chose).
pub fn check_wait(field: &'static str, secs: Option<f64>) -> Result<(), RpcError> {
    match secs {
        Some(s) if !(s.is_finite() && (0.0..=3600.0).contains(&s)) => Err(
            RpcError::invalid_params(field, "must be between 0 and 3600 seconds"),
        ),
        _ => Ok(()),
    }
}

/// A domain's closed request enum from one table of its methods, so the
/// enum, its method names, `daemon.methods` and the parser cannot
/// disagree: `Variant(Params) => "domain.method", "summary";` or, for a
/// method without params, `Variant => "domain.method", "summary";`.
macro_rules! requests {
    ($(#[$meta:meta])* pub enum $name:ident {
        $( $variant:ident $( ($params:ty) )? => $method:literal, $summary:literal; )*
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub enum $name {
            $( $variant $( ($params) )? ),*
        }

        impl $name {
            pub const METHODS: &'static [$crate::rpc::protocol::MethodInfo] = &[
                $( $crate::rpc::protocol::MethodInfo { name: $method, summary: $summary } ),*
            ];

            pub fn method(&self) -> &'static str {
                match self {
                    $( requests!(@pattern $name $variant $( $params )?) => $method ),*
                }
            }

            /// Types and validates a method's params; errors name the field.
            pub fn parse(
                method: &str,
                params: serde_json::Value,
            ) -> Result<$name, $crate::rpc::protocol::RpcError> {
                match method {
                    $( $method => Ok(requests!(@build $name $variant params $( $params )?)), )*
                    other => Err($crate::rpc::protocol::unknown_method(other)),
                }
            }
        }
    };
    (@pattern $name:ident $variant:ident $params:ty) => { $name::$variant(_) };
    (@pattern $name:ident $variant:ident) => { $name::$variant };
    (@build $name:ident $variant:ident $value:ident $params:ty) => {
        $name::$variant($crate::rpc::protocol::params::<$params>($value)?)
    };
    (@build $name:ident $variant:ident $value:ident) => {{
        $crate::rpc::protocol::no_params($value)?;
        $name::$variant
    }};
}
pub(crate) use requests;

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

/// One request line's envelope: its id, method and params, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: Value,
    pub method: String,
    pub params: Option<Value>,
}

/// Parses one request line's envelope. The error carries the request's id
/// when one could be read, else `null`, as JSON-RPC asks.
pub fn parse_envelope(line: &[u8]) -> Result<Envelope, (Value, RpcError)> {
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
    Ok(Envelope { id, method, params })
}

/// A result with the request's `op_id` beside its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WithOpId<T> {
    pub op_id: String,
    #[serde(flatten)]
    pub result: T,
}

/// The answer to a streaming request; frames follow it on the connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamAccepted {
    pub stream: StreamInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// 2: stdin is flow-controlled by credit frames.
    pub version: u32,
    /// The stdin bytes a client may send before the daemon grants more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_window: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::daemon::HelloResult;

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
                heartbeat_secs: None,
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
