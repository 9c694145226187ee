//! banger: a host supervisor for microVMs. `bangerd` owns every VM on the
//! host; the `banger` CLI talks to it over a Unix socket.

pub mod actors;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod host;
pub mod operations;
pub mod rpc;
pub mod store;
pub mod vm;
pub mod vmm;
