//! How a record sits in a table: a small versioned envelope around the
//! record's JSON, `{"v": <table version>, "data": {...}}`. The version lets a
//! migration know what it reads, and lets the store refuse a record written
//! at another version instead of misreading it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u32,
    data: &'a T,
}

#[derive(Deserialize)]
struct Envelope<T> {
    v: u32,
    data: T,
}

pub(crate) fn encode<T: Serialize>(version: u32, data: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&EnvelopeRef { v: version, data })
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(u32, T), serde_json::Error> {
    let envelope: Envelope<T> = serde_json::from_slice(bytes)?;
    Ok((envelope.v, envelope.data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_its_version() {
        let bytes = encode(3, &serde_json::json!({"name": "a"})).expect("encode");
        assert_eq!(bytes, br#"{"v":3,"data":{"name":"a"}}"#);
        let (v, data): (u32, serde_json::Value) = decode(&bytes).expect("decode");
        assert_eq!((v, data), (3, serde_json::json!({"name": "a"})));
    }

    #[test]
    fn rejects_bytes_without_an_envelope() {
        assert!(decode::<serde_json::Value>(b"\x00\x01garbage").is_err());
        assert!(decode::<serde_json::Value>(br#"{"data":{}}"#).is_err());
    }
}
