//! The `daemon.operations.*` methods: operations in flight and recently
//! finished, one by id, cancelling one, watching one's progress. They ask
//! only the operations registry.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::protocol::{Params, RpcError, requests};
use super::wire::Wire;
use crate::actors::operation::{CancelOperation, GetOperation, ListOperations, WatchOperation};
use crate::operations::OperationRecord;

requests! {
    /// Requests about operations.
    pub enum Request {
        List(ListOperationsParams) => "daemon.operations.list",
            "Operations in flight, or with all=true also finished ones.";
        Get(OperationRef) => "daemon.operations.get", "One operation by op_id.";
        Cancel(OperationRef) => "daemon.operations.cancel",
            "Ask a cancellable operation in flight to stop.";
        Watch(OperationRef) => "daemon.operations.watch",
            "Stream an operation's progress until it ends, then return it.";
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOperationsParams {
    /// Include finished operations, not only those in flight.
    #[serde(default)]
    pub all: bool,
}

impl Params for ListOperationsParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationRef {
    pub op_id: String,
}

impl Params for OperationRef {
    fn validate(&self) -> Result<(), RpcError> {
        if ulid::Ulid::from_string(&self.op_id).is_err() {
            return Err(RpcError::invalid_params(
                "op_id",
                format!("{:?} is not an operation id", self.op_id),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationsResult {
    pub operations: Vec<OperationRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationResult {
    pub operation: OperationRecord,
}

pub async fn handle(wire: &Wire<'_>, request: Request) -> Result<Box<RawValue>, RpcError> {
    let registry = wire.operations;
    match request {
        Request::List(params) => {
            let operations = registry.send(ListOperations { all: params.all }).await??;
            wire.answer(OperationsResult { operations })
        }
        Request::Get(OperationRef { op_id }) => {
            let operation = registry.send(GetOperation(op_id)).await??;
            wire.answer(OperationResult { operation })
        }
        Request::Cancel(OperationRef { op_id }) => {
            let operation = registry.send(CancelOperation(op_id)).await??;
            wire.answer(OperationResult { operation })
        }
        Request::Watch(OperationRef { op_id }) => {
            if let Some(status) = registry.send(WatchOperation(op_id.clone())).await? {
                wire.forward_progress(status).await;
            }
            let operation = registry.send(GetOperation(op_id)).await??;
            wire.answer(OperationResult { operation })
        }
    }
}
