//! JSON-RPC over the daemon's Unix socket: the protocol types
//! ([`protocol`]), the server side ([`server`], [`dispatch`], [`access`])
//! and a blocking client for the CLI ([`client`]).

pub mod access;
pub mod client;
pub mod dispatch;
pub mod errors;
pub mod protocol;
pub mod server;
pub mod stream;
