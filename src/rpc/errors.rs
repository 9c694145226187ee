//! The one mapping from the daemon's error enums to wire error codes.

use actix::MailboxError;

use super::protocol::{ErrorCode, RpcError};
use crate::actors::catalog::{ImageError, KernelError};
use crate::actors::netns::NetworkError;
use crate::actors::operation::OperationError;
use crate::actors::records::{FailureKind, StoreFailure};
use crate::actors::vm::VmError;
use crate::catalog::CatalogError;
use crate::error_chain;
use crate::guest::link::AgentError;
use crate::image::Lookup;
use crate::image::import::ImportError;
use crate::vm::InvalidVm;

impl From<StoreFailure> for RpcError {
    fn from(e: StoreFailure) -> RpcError {
        let code = match e.kind {
            FailureKind::Conflict => ErrorCode::Conflict,
            FailureKind::Unavailable => ErrorCode::Unavailable,
            FailureKind::Cancelled => ErrorCode::Cancelled,
            FailureKind::Exists => ErrorCode::AlreadyExists,
            FailureKind::Internal => ErrorCode::Internal,
        };
        RpcError::new(code, e.message)
    }
}

impl From<OperationError> for RpcError {
    fn from(e: OperationError) -> RpcError {
        let code = match &e {
            OperationError::NotFound(_) => ErrorCode::NotFound,
            OperationError::Finished { .. } | OperationError::NotCancellable { .. } => {
                ErrorCode::Conflict
            }
            OperationError::ShuttingDown | OperationError::Unavailable(_) => ErrorCode::Unavailable,
            OperationError::Store(_) => ErrorCode::Internal,
        };
        match e {
            OperationError::Store(e) => e.into(),
            e => RpcError::new(code, error_chain(&e)),
        }
    }
}

impl From<MailboxError> for RpcError {
    fn from(_: MailboxError) -> RpcError {
        RpcError::new(
            ErrorCode::Unavailable,
            "the daemon is shutting down or overloaded; retry",
        )
    }
}

impl From<InvalidVm> for RpcError {
    fn from(e: InvalidVm) -> RpcError {
        RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid params: {}: {}", e.field, e.reason),
        )
    }
}

impl From<CatalogError> for RpcError {
    fn from(e: CatalogError) -> RpcError {
        match e {
            CatalogError::Invalid { field, reason } => InvalidVm { field, reason }.into(),
            CatalogError::Exists(_) => RpcError::new(ErrorCode::AlreadyExists, error_chain(&e)),
            CatalogError::Package { .. } => {
                RpcError::new(ErrorCode::InvalidParams, error_chain(&e))
            }
            CatalogError::Io { .. } | CatalogError::NoAgent(_) | CatalogError::Changed { .. } => {
                RpcError::new(ErrorCode::Internal, error_chain(&e))
            }
        }
    }
}

impl From<KernelError> for RpcError {
    fn from(e: KernelError) -> RpcError {
        match e {
            KernelError::Catalog(e) => e.into(),
            KernelError::Store(e) => e.into(),
            e => {
                let code = match &e {
                    KernelError::NotFound(_) => ErrorCode::NotFound,
                    KernelError::InUse { .. } | KernelError::Importing(_) => ErrorCode::Conflict,
                    KernelError::Unchosen(_) => {
                        return RpcError::invalid_params("kernel", error_chain(&e));
                    }
                    _ => ErrorCode::Unavailable,
                };
                RpcError::new(code, error_chain(&e))
            }
        }
    }
}

impl From<ImageError> for RpcError {
    fn from(e: ImageError) -> RpcError {
        let e = match e {
            ImageError::Store(e) => return e.into(),
            e => e,
        };
        let code = match &e {
            ImageError::Store(_) => ErrorCode::Internal,
            ImageError::Lookup(Lookup::NotFound(_)) => ErrorCode::NotFound,
            ImageError::Lookup(Lookup::Ambiguous(_)) => {
                return RpcError::invalid_params("name", error_chain(&e));
            }
            ImageError::InUse { .. } | ImageError::Quarantined(_) => ErrorCode::Conflict,
            ImageError::Exists { .. } => ErrorCode::AlreadyExists,
            ImageError::Unavailable(_) | ImageError::Stalled(_) => ErrorCode::Unavailable,
            ImageError::Import(ImportError::Cancelled)
            | ImageError::Import(ImportError::Layer(crate::image::layer::LayerError::Cancelled))
            | ImageError::Import(ImportError::Ext4(crate::image::ext4::Ext4Error::Cancelled)) => {
                ErrorCode::Cancelled
            }
            ImageError::Import(ImportError::Name(_) | ImportError::Unnamed) => {
                return RpcError::invalid_params("name", error_chain(&e));
            }
            ImageError::Import(ImportError::Io { .. }) => ErrorCode::Internal,
            ImageError::Import(ImportError::NoSpace { .. }) => ErrorCode::Unavailable,
            // What the image holds is the request's to answer for.
            ImageError::Import(_) => {
                return RpcError::invalid_params("path", error_chain(&e));
            }
        };
        RpcError::new(code, error_chain(&e))
    }
}

impl From<NetworkError> for RpcError {
    fn from(e: NetworkError) -> RpcError {
        match e {
            NetworkError::Store(e) => e.into(),
            NetworkError::Subnet(e) => RpcError::invalid_params("subnet", e),
            e => {
                let code = match &e {
                    NetworkError::NotFound(_) | NetworkError::NoDefault => ErrorCode::NotFound,
                    NetworkError::Exists(_) => ErrorCode::AlreadyExists,
                    NetworkError::InUse { .. }
                    | NetworkError::Exhausted { .. }
                    | NetworkError::NoLease { .. } => ErrorCode::Conflict,
                    NetworkError::Off(_) | NetworkError::Unavailable(_) => ErrorCode::Unavailable,
                    _ => ErrorCode::Internal,
                };
                RpcError::new(code, error_chain(&e))
            }
        }
    }
}

impl From<VmError> for RpcError {
    fn from(e: VmError) -> RpcError {
        match e {
            VmError::Invalid(e) => e.into(),
            VmError::Network(e) => e.into(),
            VmError::Catalog(e) => e.into(),
            VmError::Kernel(e) => e.into(),
            VmError::Image(e) => e.into(),
            VmError::Store(e) => e.into(),
            e => {
                let code = match &e {
                    VmError::NotFound(_) | VmError::NoKernel(_) | VmError::NotQuarantined(_) => {
                        ErrorCode::NotFound
                    }
                    VmError::Exists(_) => ErrorCode::AlreadyExists,
                    VmError::Conflict { .. } => ErrorCode::Conflict,
                    VmError::Unavailable(_)
                    | VmError::Agent { .. }
                    | VmError::NotRecorded { .. }
                    | VmError::Reloading(_)
                    | VmError::Stalled(_) => ErrorCode::Unavailable,
                    VmError::Disk(crate::disk::DiskError::NoSpace { .. }) => ErrorCode::Unavailable,
                    _ => ErrorCode::Internal,
                };
                RpcError::new(code, error_chain(&e))
            }
        }
    }
}

impl From<AgentError> for RpcError {
    fn from(e: AgentError) -> RpcError {
        let code = match &e {
            // The agent could not do what was asked (e.g. no such program).
            AgentError::Refused(_) => ErrorCode::InvalidParams,
            AgentError::Version { .. } => ErrorCode::ProtocolMismatch,
            _ => ErrorCode::Unavailable,
        };
        RpcError::new(code, error_chain(&e))
    }
}
