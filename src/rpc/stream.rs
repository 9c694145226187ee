//! The framed byte stream a connection switches to after a streaming
//! request is accepted (docs/rpc.md, "Byte streams"): a 1-byte type, a
//! 4-byte big-endian length, the payload. `vm logs --follow` uses it today.

use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::protocol::{ErrorCode, ErrorObject, MAX_LINE_BYTES};

pub const STDOUT: u8 = 0x11;
pub const STDERR: u8 = 0x12;
pub const EXIT: u8 = 0x13;
pub const ERROR: u8 = 0x14;

/// Largest payload in one frame.
pub const MAX_FRAME: usize = MAX_LINE_BYTES;
/// Output is sent in frames of at most this much.
const CHUNK: usize = 64 * 1024;
/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(5 + payload.len());
    bytes.push(kind);
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// Reads one frame; None at a clean end of stream.
pub fn read_frame(reader: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    match reader.read_exact(&mut header[..1]) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    reader.read_exact(&mut header[1..])?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    Ok(Some(Frame {
        kind: header[0],
        payload,
    }))
}

/// A console log to follow from `offset`.
pub struct LogFollow {
    pub path: PathBuf,
    pub offset: u64,
}

/// Sends what is appended to the log as stdout frames until the client goes
/// away (`client_gone` resolves) or the log disappears (its VM was removed).
/// A log that shrinks was rotated: following restarts at its beginning.
pub async fn follow_log(
    mut log: LogFollow,
    out: &mpsc::Sender<Vec<u8>>,
    client_gone: impl Future<Output = ()>,
) {
    tokio::pin!(client_gone);
    let mut buffer = vec![0u8; CHUNK];
    loop {
        match tokio::fs::File::open(&log.path).await {
            Ok(mut file) => {
                let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                if len < log.offset {
                    log.offset = 0;
                }
                if len > log.offset && file.seek(io::SeekFrom::Start(log.offset)).await.is_ok() {
                    while let Ok(n) = file.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        log.offset += n as u64;
                        if out.send(frame(STDOUT, &buffer[..n])).await.is_err() {
                            return;
                        }
                    }
                }
            }
            // A VM that never ran has no log yet; a removed VM has no directory.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && log.path.parent().is_some_and(|d| d.exists()) => {}
            Err(e) => {
                let error = ErrorObject {
                    code: ErrorCode::NotFound.code(),
                    message: format!("the console log is gone (was the VM removed?): {e}"),
                    data: None,
                };
                let _ = out
                    .send(frame(
                        ERROR,
                        &serde_json::to_vec(&error).unwrap_or_default(),
                    ))
                    .await;
                return;
            }
        }
        tokio::select! {
            _ = &mut client_gone => return,
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let mut bytes = frame(STDOUT, b"hello");
        bytes.extend(frame(EXIT, b"{\"code\":0}"));
        let mut reader = &bytes[..];
        assert_eq!(
            read_frame(&mut reader).expect("read"),
            Some(Frame {
                kind: STDOUT,
                payload: b"hello".to_vec()
            })
        );
        assert_eq!(
            read_frame(&mut reader).expect("read").map(|f| f.kind),
            Some(EXIT)
        );
        assert_eq!(read_frame(&mut reader).expect("read"), None);
        let huge = [STDOUT, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut &huge[..]).is_err());
    }
}
