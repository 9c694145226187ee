//! The framed byte stream a connection switches to after a streaming
//! request is accepted (docs/rpc.md, "Byte streams"): a 1-byte type, a
//! 4-byte big-endian length, the payload. `vm logs --follow` and `vm exec`
//! use it.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_agent::protocol::{ExitStatus, FrameKind, MAX_PAYLOAD, WINDOW};
use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, watch};

use super::protocol::{ErrorCode, ErrorObject, MAX_LINE_BYTES};
use crate::guest::link::{ExecInput, ExecSession};

pub const STDIN: u8 = 0x01;
pub const STDIN_EOF: u8 = 0x02;
pub const RESIZE: u8 = 0x03;
pub const SIGNAL: u8 = 0x04;
pub const STDOUT: u8 = 0x11;
pub const STDERR: u8 = 0x12;
pub const EXIT: u8 = 0x13;
pub const ERROR: u8 = 0x14;
pub const CREDIT: u8 = 0x15;
/// Daemon to client, empty: the daemon lives (clients that asked in their
/// hello get one every `rpc.heartbeat_secs`).
pub const HEARTBEAT: u8 = 0x16;

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

/// Stdin a client may send before the daemon grants more: what the daemon
/// holds for it while the agent's credit is spent.
pub const STDIN_WINDOW: u32 = WINDOW;
/// How long a process whose client went away has after SIGHUP to end,
/// before SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// How the client's half of an exec stream ended.
enum ClientEnd {
    /// It closed its end, or its connection broke.
    Gone,
    /// It sent what the stream does not carry; named in the message.
    Bad(String),
}

/// Stdin the client sent ahead of the agent's credit: at most
/// [`STDIN_WINDOW`] bytes from a client that keeps to its window; one that
/// does not waits (its reader stops reading).
struct PendingStdin {
    state: Mutex<PendingState>,
    changed: Notify,
}

#[derive(Default)]
struct PendingState {
    bytes: VecDeque<u8>,
    ended: bool,
    gone: bool,
}

enum Taken {
    Bytes(Vec<u8>),
    End,
    Gone,
}

impl PendingStdin {
    fn new() -> PendingStdin {
        PendingStdin {
            state: Mutex::new(PendingState::default()),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn push(&self, bytes: Vec<u8>) {
        loop {
            let changed = self.changed.notified();
            {
                let mut state = self.state();
                if state.gone || state.ended {
                    return;
                }
                let fits = state.bytes.len() + bytes.len() <= STDIN_WINDOW as usize;
                if fits || state.bytes.is_empty() {
                    state.bytes.extend(bytes);
                    self.changed.notify_waiters();
                    return;
                }
            }
            changed.await;
        }
    }

    fn end(&self) {
        self.state().ended = true;
        self.changed.notify_waiters();
    }

    fn gone(&self) {
        let mut state = self.state();
        state.gone = true;
        state.bytes.clear();
        self.changed.notify_waiters();
    }

    /// Up to `most` bytes, waiting for some; the end once all are taken.
    async fn take(&self, most: usize) -> Taken {
        loop {
            let changed = self.changed.notified();
            {
                let mut state = self.state();
                if state.gone {
                    return Taken::Gone;
                }
                if !state.bytes.is_empty() {
                    let n = most.min(state.bytes.len());
                    let bytes = state.bytes.drain(..n).collect();
                    self.changed.notify_waiters();
                    return Taken::Bytes(bytes);
                }
                if state.ended {
                    return Taken::End;
                }
            }
            changed.await;
        }
    }
}

/// Reads the client's frames: stdin into `pending`, signals straight to
/// the process (never behind stdin), until the client ends.
async fn read_client(
    mut client: impl AsyncRead + Unpin,
    pending: Arc<PendingStdin>,
    input: ExecInput,
) -> ClientEnd {
    loop {
        match read_client_frame(&mut client).await {
            Ok(Some(Frame {
                kind: STDIN,
                payload,
            })) => {
                if !payload.is_empty() {
                    pending.push(payload).await;
                }
            }
            Ok(Some(Frame {
                kind: STDIN_EOF, ..
            })) => pending.end(),
            Ok(Some(Frame {
                kind: SIGNAL,
                payload,
            })) => {
                let number = payload.first().copied().unwrap_or(0);
                let Ok(signal) = Signal::try_from(i32::from(number)) else {
                    return ClientEnd::Bad(format!(
                        "signal frame: {number} is not a signal number"
                    ));
                };
                let sent = input.signal(signal).await;
                tracing::debug!(?signal, ?sent, "signal from the client");
            }
            // A terminal size has no pty to go to yet.
            Ok(Some(Frame { kind: RESIZE, .. })) => {}
            Ok(Some(Frame { kind, .. })) => {
                return ClientEnd::Bad(format!("unknown frame type {kind:#04x}"));
            }
            Ok(None) | Err(_) => return ClientEnd::Gone,
        }
    }
}

/// Moves pending stdin to the agent within its credit, and counts in
/// `forwarded` what left, which the client may send again.
async fn forward_stdin(
    pending: Arc<PendingStdin>,
    input: ExecInput,
    forwarded: watch::Sender<u64>,
) {
    loop {
        match pending.take(MAX_PAYLOAD).await {
            Taken::Bytes(bytes) => {
                if input.stdin(&bytes).await.is_err() {
                    return;
                }
                forwarded.send_modify(|total| *total += bytes.len() as u64);
            }
            Taken::End => {
                let _ = input.stdin_eof().await;
                return;
            }
            Taken::Gone => return,
        }
    }
}

/// Relays a process in a guest: the client's stdin and signals to the
/// agent, its output and exit status back, each direction within its
/// credit, so neither a client that does not read nor one that floods
/// grows the daemon. A client that goes away hangs the process up
/// (SIGHUP, then SIGKILL after [`HANGUP_GRACE`]); an agent that goes away
/// ends the stream with an error frame.
pub async fn relay_exec(
    session: ExecSession,
    client: impl AsyncRead + Unpin + 'static,
    mut out: impl AsyncWrite + Unpin,
    heartbeat: Option<Duration>,
) {
    let mut beats = heartbeats(heartbeat);
    let ExecSession {
        input, mut output, ..
    } = session;
    let pending = Arc::new(PendingStdin::new());
    let (forwarded_tx, mut forwarded) = watch::channel(0u64);
    let forwarder = actix::spawn(forward_stdin(pending.clone(), input.clone(), forwarded_tx));
    // A task of its own: a frame half read must not be lost when output
    // wins the select, and signals must pass while output waits.
    let mut reader = actix::spawn(read_client(client, pending.clone(), input.clone()));
    let (mut reading, mut forwarding) = (true, true);
    let mut granted = 0u64;
    // Once the client is gone: when the process gets SIGKILL.
    let mut hangup: Option<tokio::time::Instant> = None;
    loop {
        let deadline = hangup.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            frame = output.next() => match frame {
                Some(frame) => match frame.kind {
                    FrameKind::Stdout | FrameKind::Stderr => {
                        let kind = if frame.kind == FrameKind::Stdout { STDOUT } else { STDERR };
                        // Agent payloads (64 KiB at most) fit a client frame.
                        if hangup.is_none()
                            && out.write_all(&self::frame(kind, &frame.payload)).await.is_err()
                        {
                            hangup = Some(hang_up(&input, &pending).await);
                        }
                        let _ = output.delivered(&frame).await;
                    }
                    FrameKind::Exit => {
                        let status = frame.parse::<ExitStatus>().unwrap_or(ExitStatus {
                            code: None,
                            signal: None,
                        });
                        let exit = self::frame(EXIT, &serde_json::to_vec(&status).unwrap_or_default());
                        let _ = out.write_all(&exit).await;
                        break;
                    }
                    _ => {}
                },
                None => {
                    let message = match output.dropped() {
                        Some(why) => format!("the session was ended: {why}; the process was killed"),
                        None => "the connection to the guest agent was lost (did the VM stop?)".into(),
                    };
                    let _ = out
                        .write_all(&error_frame(ErrorCode::Unavailable, message))
                        .await;
                    break;
                }
            },
            changed = forwarded.changed(), if forwarding && hangup.is_none() => {
                // The forwarder ended (end of input): nothing more to grant.
                forwarding = changed.is_ok();
                if forwarding {
                    let total = *forwarded.borrow_and_update();
                    let grant = u32::try_from(total - granted).unwrap_or(u32::MAX);
                    granted += u64::from(grant);
                    if out.write_all(&self::frame(CREDIT, &grant.to_be_bytes())).await.is_err() {
                        hangup = Some(hang_up(&input, &pending).await);
                    }
                }
            }
            end = &mut reader, if reading => {
                reading = false;
                match end {
                    Ok(ClientEnd::Bad(message)) => {
                        let _ = input.kill().await;
                        let _ = out
                            .write_all(&error_frame(ErrorCode::InvalidRequest, message))
                            .await;
                        break;
                    }
                    Ok(ClientEnd::Gone) | Err(_) => {
                        if hangup.is_none() {
                            hangup = Some(hang_up(&input, &pending).await);
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline), if hangup.is_some() => {
                let _ = input.kill().await;
                break;
            }
            _ = beat(&mut beats), if hangup.is_none() => {
                if out.write_all(&self::frame(HEARTBEAT, &[])).await.is_err() {
                    hangup = Some(hang_up(&input, &pending).await);
                }
            }
        }
    }
    pending.gone();
    reader.abort();
    forwarder.abort();
}

/// A stream's heartbeat ticks, the first one period after it opens.
fn heartbeats(every: Option<Duration>) -> Option<tokio::time::Interval> {
    every.map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every))
}

/// The next heartbeat; never, for a client that did not ask.
async fn beat(beats: &mut Option<tokio::time::Interval>) {
    match beats {
        Some(beats) => {
            beats.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Nobody reads the process any more: SIGHUP, as a terminal's hang-up,
/// and the moment it gets SIGKILL if it is still running.
async fn hang_up(input: &ExecInput, pending: &PendingStdin) -> tokio::time::Instant {
    pending.gone();
    let _ = input.signal(Signal::SIGHUP).await;
    tokio::time::Instant::now() + HANGUP_GRACE
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
    mut out: impl AsyncWrite + Unpin,
    client_gone: impl Future<Output = ()>,
    heartbeat: Option<Duration>,
) {
    tokio::pin!(client_gone);
    let mut beats = heartbeats(heartbeat);
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
                        if out.write_all(&frame(STDOUT, &buffer[..n])).await.is_err() {
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
                    .write_all(&error_frame(
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
            _ = beat(&mut beats) => {
                if out.write_all(&frame(HEARTBEAT, &[])).await.is_err() {
                    return;
                }
            }
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
