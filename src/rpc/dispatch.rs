//! From a typed request to its domain's handlers (`rpc::{daemon, ops, vm,
//! kernel,
//! network}`), which receive only their own services and the transport's
//! [`Wire`].

use actix::Addr;
use serde_json::value::RawValue;

use super::daemon::{self, DaemonServices};
use super::image::{self, ImageServices};
use super::kernel::{self, KernelServices};
use super::network::{self, NetworkServices};
use super::ops;
use super::protocol::{ErrorCode, RpcError};
use super::request::Request;
use super::vm::{self, Opened, VmServices};
use super::wire::{Reply, Wire};
use crate::actors::operation::OperationRegistry;

/// What request handlers reach, by domain.
pub struct Services {
    pub daemon: DaemonServices,
    pub vm: VmServices,
    pub kernel: KernelServices,
    pub image: ImageServices,
    pub network: NetworkServices,
    pub operations: Addr<OperationRegistry>,
}

pub async fn handle(
    services: &Services,
    request: Request,
    reply: &Reply<'_>,
) -> Result<Box<RawValue>, RpcError> {
    let wire = Wire {
        reply,
        operations: &services.operations,
    };
    match request {
        Request::Daemon(request) => daemon::handle(&services.daemon, &wire, request).await,
        Request::Ops(request) => ops::handle(&wire, request).await,
        Request::Vm(request) => vm::handle(&services.vm, &wire, request).await,
        Request::Kernel(request) => kernel::handle(&services.kernel, &wire, request).await,
        Request::Image(request) => image::handle(&services.image, &wire, request).await,
        Request::Network(request) => network::handle(&services.network, &wire, request).await,
    }
}

/// Accepts a streaming request: what to stream, ready to run.
pub async fn open_stream(services: &Services, request: Request) -> Result<Opened, RpcError> {
    match request {
        Request::Vm(request) => vm::open_stream(&services.vm, request).await,
        _ => Err(RpcError::new(
            ErrorCode::InvalidRequest,
            "not a streaming request",
        )),
    }
}
