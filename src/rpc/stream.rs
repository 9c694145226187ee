//! The framed byte stream a connection switches to after a streaming
//! request is accepted (docs/rpc.md, "Byte streams"): a 1-byte type, a
//! 4-byte big-endian length, the payload. `vm logs --follow` and `vm exec`
//! use it.

use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

use banger_agent::protocol::{ExitStatus, FrameKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::protocol::{ErrorCode, ErrorObject, MAX_LINE_BYTES};
use crate::guest::link::ExecSession;

pub const STDIN: u8 = 0x01;
pub const STDIN_EOF: u8 = 0x02;
pub const RESIZE: u8 = 0x03;
pub const SIGNAL: u8 = 0x04;
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

/// The payload length a frame header announces, if within the limit.
fn payload_len(header: &[u8; 5]) -> io::Result<usize> {
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit"),
        ));
    }
    Ok(len)
}

/// Reads one frame; None at a clean end of stream.
pub fn read_frame(reader: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    match reader.read_exact(&mut header[..1]) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    reader.read_exact(&mut header[1..])?;
    let mut payload = vec![0u8; payload_len(&header)?];
    reader.read_exact(&mut payload)?;
    Ok(Some(Frame {
        kind: header[0],
        payload,
    }))
}

/// Reads one frame from the client; None when it closed its end.
async fn read_client_frame(reader: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    match reader.read_exact(&mut header[..1]).await {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    };
    reader.read_exact(&mut header[1..]).await?;
    let mut payload = vec![0u8; payload_len(&header)?];
    reader.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: header[0],
        payload,
    }))
}

fn error_frame(code: ErrorCode, message: String) -> Vec<u8> {
    let error = ErrorObject {
        code: code.code(),
        message,
        data: None,
    };
    frame(ERROR, &serde_json::to_vec(&error).unwrap_or_default())
}

/// Relays a process in a guest: the client's stdin frames to the agent,
/// its output and exit status back. A client that goes away takes the
/// process with it (SIGKILL); an agent that goes away ends the stream with
/// an error frame.
pub async fn relay_exec(
    mut session: ExecSession,
    client: impl AsyncRead + Unpin + 'static,
    out: &mpsc::Sender<Vec<u8>>,
) {
    let (frames_tx, mut frames) = mpsc::channel(16);
    // A reader of its own: a frame half read must not be lost when output
    // wins the select.
    let reader = actix::spawn(async move {
        let mut client = client;
        loop {
            let frame = read_client_frame(&mut client).await;
            let done = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || done {
                return;
            }
        }
    });
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(Some(Frame { kind: STDIN, payload }))) => {
                    if !payload.is_empty() {
                        let _ = session.stdin(&payload);
                    }
                }
                Some(Ok(Some(Frame { kind: STDIN_EOF, .. }))) => {
                    let _ = session.stdin_eof();
                }
                // One signal the agent delivers: SIGKILL; a terminal size
                // has no pty to go to yet.
                Some(Ok(Some(Frame { kind: SIGNAL, .. }))) => {
                    let _ = session.kill();
                }
                Some(Ok(Some(Frame { kind: RESIZE, .. }))) => {}
                Some(Ok(Some(Frame { kind, .. }))) => {
                    let _ = session.kill();
                    let _ = out
                        .send(error_frame(
                            ErrorCode::InvalidRequest,
                            format!("unknown frame type {kind:#04x}"),
                        ))
                        .await;
                    break;
                }
                Some(Ok(None)) | Some(Err(_)) | None => {
                    // The client is gone: nobody reads the output any more.
                    let _ = session.kill();
                    break;
                }
            },
            output = session.output.recv() => match output {
                Some(frame) => match frame.kind {
                    // Agent payloads (64 KiB at most) fit a client frame.
                    FrameKind::Stdout | FrameKind::Stderr => {
                        let kind = if frame.kind == FrameKind::Stdout { STDOUT } else { STDERR };
                        if out.send(self::frame(kind, &frame.payload)).await.is_err() {
                            let _ = session.kill();
                            break;
                        }
                    }
                    FrameKind::Exit => {
                        let status = frame.parse::<ExitStatus>().unwrap_or(ExitStatus {
                            code: None,
                            signal: None,
                        });
                        let _ = out
                            .send(self::frame(EXIT, &serde_json::to_vec(&status).unwrap_or_default()))
                            .await;
                        break;
                    }
                    _ => {}
                },
                None => {
                    let _ = out
                        .send(error_frame(
                            ErrorCode::Unavailable,
                            "the connection to the guest agent was lost (did the VM stop?)".into(),
                        ))
                        .await;
                    break;
                }
            },
        }
    }
    reader.abort();
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
                let _ = out
                    .send(error_frame(
                        ErrorCode::NotFound,
                        format!("the console log is gone (was the VM removed?): {e}"),
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
