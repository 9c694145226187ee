//! JSON-RPC over the daemon's Unix socket. Transport: the envelope,
//! errors and the `requests!` table ([`protocol`]), routing ([`request`],
//! [`dispatch`]), what a handler sees of the transport ([`wire`]), the
//! server ([`server`], [`access`], [`stream`]) and a blocking client for
//! the CLI ([`client`]). One module per domain holds
//! its requests, params, results and handlers: [`daemon`], [`ops`],
//! [`vm`], [`kernel`].

pub mod access;
pub mod client;
pub mod daemon;
pub mod dispatch;
pub mod errors;
pub mod image;
pub mod kernel;
pub mod network;
pub mod ops;
pub mod protocol;
pub mod request;
pub mod server;
pub mod stream;
pub mod vm;
pub mod wire;
