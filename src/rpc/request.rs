//! The daemon's requests: one closed enum per domain (`daemon`, `ops`,
//! `vm`, `kernel`, `image`, `network`), routed by the method's prefix. Every listed method is
//! a variant of its domain's enum and back: both come from one
//! `requests!` table per domain.

use serde_json::Value;

use super::protocol::{Envelope, MethodInfo, RpcError, parse_envelope, unknown_method};
use super::{daemon, image, kernel, network, ops, vm};

/// Every request the daemon serves, by domain.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Daemon(daemon::Request),
    Ops(ops::Request),
    Vm(vm::Request),
    Kernel(kernel::Request),
    Image(image::Request),
    Network(network::Request),
}

impl Request {
    /// Routes by the method's prefix, then types and validates its params.
    pub fn parse(method: &str, params: Option<Value>) -> Result<Request, RpcError> {
        let params = params.unwrap_or_else(|| Value::Object(Default::default()));
        if method.starts_with("daemon.operations.") {
            Ok(Request::Ops(ops::Request::parse(method, params)?))
        } else if method.starts_with("daemon.") {
            Ok(Request::Daemon(daemon::Request::parse(method, params)?))
        } else if method.starts_with("vm.") {
            Ok(Request::Vm(vm::Request::parse(method, params)?))
        } else if method.starts_with("kernel.") {
            Ok(Request::Kernel(kernel::Request::parse(method, params)?))
        } else if method.starts_with("image.") {
            Ok(Request::Image(image::Request::parse(method, params)?))
        } else if method.starts_with("network.") {
            Ok(Request::Network(network::Request::parse(method, params)?))
        } else {
            Err(unknown_method(method))
        }
    }

    pub fn method(&self) -> &'static str {
        match self {
            Request::Daemon(request) => request.method(),
            Request::Ops(request) => request.method(),
            Request::Vm(request) => request.method(),
            Request::Kernel(request) => request.method(),
            Request::Image(request) => request.method(),
            Request::Network(request) => request.method(),
        }
    }

    /// Whether an accepted request switches its connection to a byte stream.
    pub fn is_streaming(&self) -> bool {
        matches!(self, Request::Vm(request) if request.is_streaming())
    }
}

/// Every method, domain by domain, as `daemon.methods` lists them.
pub fn methods() -> impl Iterator<Item = &'static MethodInfo> {
    daemon::Request::METHODS
        .iter()
        .chain(ops::Request::METHODS)
        .chain(vm::Request::METHODS)
        .chain(kernel::Request::METHODS)
        .chain(image::Request::METHODS)
        .chain(network::Request::METHODS)
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
    let Envelope { id, method, params } = parse_envelope(line)?;
    match Request::parse(&method, params) {
        Ok(request) => Ok(Call { id, request }),
        Err(e) => Err((id, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::protocol::ErrorCode;

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
                request: Request::Daemon(daemon::Request::Status)
            }
        );
        let call = parse_line(
            br#"{"jsonrpc":"2.0","id":"a","method":"daemon.backup","params":{"path":"/tmp/b.redb","rate_limit":1000}}"#,
        )
        .expect("parse");
        assert_eq!(
            call.request,
            Request::Daemon(daemon::Request::Backup(daemon::BackupParams {
                path: "/tmp/b.redb".into(),
                rate_limit: Some(1000)
            }))
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
        let e = err(
            r#"{"jsonrpc":"2.0","id":1,"method":"daemon.backup","params":{"path":"some/rel"}}"#,
        )
        .1;
        assert_eq!(
            e.message,
            "invalid params: path: must be a file name or an absolute path in the backup directory"
        );
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
        for info in methods() {
            let params = match info.name {
                "daemon.hello" => serde_json::json!({"protocol_version": 1}),
                "daemon.backup" => serde_json::json!({"path": "/x"}),
                "vm.create" => serde_json::json!({"kernel": "k", "rootfs": "/r", "memory": "2G"}),
                "kernel.import" => serde_json::json!({"name": "k", "vmlinux": "/v"}),
                "vm.exec" => serde_json::json!({"name": "a", "argv": ["uname", "-r"]}),
                "kernel.import_deb" => serde_json::json!({"name": "k", "path": "/k.deb"}),
                "network.create" => serde_json::json!({"name": "lab", "subnet": "10.9.0.0/24"}),
                "image.import" => serde_json::json!({"path": "/layout"}),
                "vm.list" | "kernel.list" | "image.list" | "image.prune" | "network.list"
                | "network.reconcile" => {
                    serde_json::json!({})
                }
                "vm.forget" => serde_json::json!({"id": "abcdefghij"}),
                n if n.starts_with("vm.")
                    || n.starts_with("kernel.")
                    || n.starts_with("image.")
                    || n.starts_with("network.") =>
                {
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
    fn method_names_are_unique_and_prefixed_by_their_domain() {
        let mut names: Vec<&str> = methods().map(|m| m.name).collect();
        let listed = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), listed, "a method is listed twice");
        let domains = [
            ("daemon.", daemon::Request::METHODS),
            ("daemon.operations.", ops::Request::METHODS),
            ("vm.", vm::Request::METHODS),
            ("kernel.", kernel::Request::METHODS),
        ];
        for (prefix, methods) in domains {
            assert!(
                methods.iter().all(|m| m.name.starts_with(prefix)),
                "{prefix}"
            );
        }
    }
}
