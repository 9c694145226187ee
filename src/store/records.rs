//! What a record type is to the store: a serde type and the table it
//! lives in, keyed by a string. The record types themselves belong to their
//! domains (`vm::record`, `catalog`, `operations`).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A record type and the table it lives in.
pub trait Record: Serialize + DeserializeOwned + Send + 'static {
    const TABLE: &'static str;
    fn key(&self) -> String;
}
