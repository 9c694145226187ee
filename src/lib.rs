//! banger: a host supervisor for microVMs. `bangerd` owns every VM on the
//! host; the `banger` CLI talks to it over a Unix socket.

pub mod actors;
pub mod caller;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod disk;
pub mod fault;
pub mod guest;
pub mod image;
pub mod kernel;
pub mod network;
pub mod operations;
pub mod reconcile;
pub mod rpc;
pub mod store;
pub mod tables;
pub mod vm;
pub mod vmm;

/// An error and its sources as one line (`what failed: why: root cause`),
/// for answers that are one line: RPC error messages, the probe's output.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// A unit enum variant's serde name (`crash-loop`, `on-failure`, `running`):
/// how states and kinds read in messages and tables, as in the JSON.
pub fn wire_name(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
