//! The agent protocol (docs/agent.md): frames over one byte stream, many
//! sessions multiplexed by id, JSON payloads for requests, answers and
//! events, raw bytes for stdio. The host (`banger`) reuses these types.
//!
//! Frame: magic (1 byte), kind (1), session id (u32 BE), payload length
//! (u32 BE), payload (at most [`MAX_PAYLOAD`] bytes).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version 2 added flow control (credit frames) and signal frames.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest version either end still speaks (no flow control, no signals).
pub const OLDEST_VERSION: u32 = 1;
pub const MAGIC: u8 = 0xB4;
pub const HEADER_LEN: usize = 10;
/// Larger lengths are a framing error.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The agent listens here on Firecracker (hybrid vsock).
pub const VSOCK_PORT: u32 = 1024;
/// The QEMU virtserialport the agent serves.
pub const SERIAL_PORT_NAME: &str = "org.banger.agent";
/// Session of the agent's unsolicited events and the host's acks.
pub const EVENT_SESSION: u32 = 0;
/// Version 2: the credit each direction of an exec session starts with,
/// in [`cost`] units. A sender never has more unacknowledged.
pub const WINDOW: u32 = 256 * 1024;

/// What a stdin, stdout or stderr frame costs against a window: its payload
/// plus its header, so a flood of tiny frames is bounded too.
pub fn cost(payload_len: usize) -> u32 {
    (payload_len + HEADER_LEN) as u32
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
    Stdin = 3,
    Stdout = 4,
    Stderr = 5,
    Exit = 6,
    Event = 7,
    Kill = 8,
    /// Version 2, both ways: a u32 (BE) of credit granted on the session.
    Credit = 9,
    /// Version 2, host to agent: one byte, a signal for the process group.
    Signal = 10,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Request,
            2 => FrameKind::Response,
            3 => FrameKind::Stdin,
            4 => FrameKind::Stdout,
            5 => FrameKind::Stderr,
            6 => FrameKind::Exit,
            7 => FrameKind::Event,
            8 => FrameKind::Kill,
            9 => FrameKind::Credit,
            10 => FrameKind::Signal,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub session: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame carrying `value` as JSON.
    pub fn json<T: Serialize>(kind: FrameKind, session: u32, value: &T) -> Frame {
        Frame {
            kind,
            session,
            // Our own payload types always serialize.
            payload: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// A credit frame granting `amount` on `session`.
    pub fn credit(session: u32, amount: u32) -> Frame {
        Frame {
            kind: FrameKind::Credit,
            session,
            payload: amount.to_be_bytes().to_vec(),
        }
    }

    /// The amount a credit frame grants; None if malformed.
    pub fn credit_amount(&self) -> Option<u32> {
        let bytes: [u8; 4] = self.payload.as_slice().try_into().ok()?;
        Some(u32::from_be_bytes(bytes))
    }

    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(ProtocolError::Json)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.payload.len());
        bytes.extend_from_slice(&encode_header(self.kind, self.session, self.payload.len()));
        bytes.extend_from_slice(&self.payload);
        bytes
    }
}

/// The header of a frame of `kind` on `session` carrying `len` bytes.
pub fn encode_header(kind: FrameKind, session: u32, len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0] = MAGIC;
    header[1] = kind as u8;
    header[2..6].copy_from_slice(&session.to_be_bytes());
    header[6..].copy_from_slice(&(len as u32).to_be_bytes());
    header
}

#[derive(Debug)]
pub enum ProtocolError {
    Io(io::Error),
    BadMagic(u8),
    UnknownKind(u8),
    TooLarge(usize),
    Json(serde_json::Error),
    UnexpectedEof,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Io(e) => write!(f, "i/o error: {e}"),
            ProtocolError::BadMagic(b) => write!(f, "bad frame magic {b:#04x}"),
            ProtocolError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            ProtocolError::TooLarge(n) => {
                write!(f, "frame payload of {n} bytes is over {MAX_PAYLOAD}")
            }
            ProtocolError::Json(e) => write!(f, "bad JSON payload: {e}"),
            ProtocolError::UnexpectedEof => write!(f, "stream ended inside a frame"),
        }
    }
}

impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtocolError::Io(e) => Some(e),
            ProtocolError::Json(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> ProtocolError {
        ProtocolError::Io(e)
    }
}

/// Checks a header; answers the kind, session and payload length.
fn header(bytes: &[u8; HEADER_LEN]) -> Result<(FrameKind, u32, usize), ProtocolError> {
    if bytes[0] != MAGIC {
        return Err(ProtocolError::BadMagic(bytes[0]));
    }
    let kind = FrameKind::from_byte(bytes[1]).ok_or(ProtocolError::UnknownKind(bytes[1]))?;
    let session = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
    let len = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok((kind, session, len))
}

/// Decodes one frame from the front of `buf`: the frame and the bytes it
/// took, or None while it is incomplete.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        // Fail early on a bad first byte, so resynchronising is quick.
        if let Some(&first) = buf.first()
            && first != MAGIC
        {
            return Err(ProtocolError::BadMagic(first));
        }
        return Ok(None);
    };
    let (kind, session, len) = header(head)?;
    let end = HEADER_LEN + len;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            kind,
            session,
            payload: buf[HEADER_LEN..end].to_vec(),
        },
        end,
    )))
}

/// Reads one frame; None on a clean end of stream at a frame boundary.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut head[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::UnexpectedEof),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, session, len) = header(&head)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::UnexpectedEof,
        _ => ProtocolError::Io(e),
    })?;
    Ok(Some(Frame {
        kind,
        session,
        payload,
    }))
}

/// Writes one frame.
pub fn write_frame(w: &mut (impl Write + ?Sized), frame: &Frame) -> io::Result<()> {
    write_parts(w, frame.kind, frame.session, &frame.payload)
}

/// Writes a frame from its parts, header and payload in one vectored
/// write where the stream takes it: output is framed without a copy.
pub fn write_parts(
    w: &mut (impl Write + ?Sized),
    kind: FrameKind,
    session: u32,
    payload: &[u8],
) -> io::Result<()> {
    let header = encode_header(kind, session, payload.len());
    let mut parts = [IoSlice::new(&header), IoSlice::new(payload)];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        match w.write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.flush()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello {
        version: u32,
    },
    Ping,
    Exec(ExecRequest),
    /// Start the VM's main process (the image's command), once per boot:
    /// its output goes to the console, and its exit powers the guest off.
    RunMain(MainRequest),
    Ports,
    HostKeys,
    Shutdown {
        action: ShutdownAction,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub pty: bool,
}

/// The main process, as an OCI image config describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainRequest {
    /// Entrypoint then Cmd.
    pub argv: Vec<String>,
    /// `KEY=value` entries; PATH is the agent's default when none sets it.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved in the guest.
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        agent_version: String,
        /// `uname -r`.
        kernel: String,
        hostname: String,
        boot: BootTimes,
    },
    Pong,
    Started {
        pid: u32,
    },
    Ports {
        ports: Vec<ListeningPort>,
    },
    HostKeys {
        keys: Vec<HostKey>,
    },
    ShuttingDown,
    Error {
        message: String,
    },
}

/// The guest's boot clock (CLOCK_BOOTTIME, ms) at the agent's milestones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTimes {
    /// Stage 1 (the initramfs) started; None without an initramfs.
    pub stage1_ms: Option<u64>,
    /// Stage 2 (the root disk) started.
    pub stage2_ms: u64,
    /// The agent began serving.
    pub ready_ms: u64,
}

/// The payload of an Exit frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningPort {
    /// `tcp` or `udp`.
    pub protocol: String,
    pub address: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    pub algorithm: String,
    /// The `.pub` file's line.
    pub public_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownAction {
    Poweroff,
    Reboot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Shutdown {
        action: ShutdownAction,
        /// How the main process ended, when its exit is why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        main_exit: Option<ExitStatus>,
    },
    ShutdownAck,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_bytes_and_streams() {
        let kinds = [
            FrameKind::Request,
            FrameKind::Response,
            FrameKind::Stdin,
            FrameKind::Stdout,
            FrameKind::Stderr,
            FrameKind::Exit,
            FrameKind::Event,
            FrameKind::Kill,
            FrameKind::Credit,
            FrameKind::Signal,
        ];
        let mut stream = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let frame = Frame {
                kind: *kind,
                session: i as u32 * 1000,
                payload: vec![i as u8; i * 3],
            };
            let bytes = frame.encode();
            assert_eq!(
                decode(&bytes).expect("decode"),
                Some((frame.clone(), bytes.len()))
            );
            write_frame(&mut stream, &frame).expect("write");
        }
        let mut reader = &stream[..];
        for kind in kinds {
            let frame = read_frame(&mut reader).expect("read").expect("a frame");
            assert_eq!(frame.kind, kind);
        }
        assert!(read_frame(&mut reader).expect("eof").is_none());
    }

    #[test]
    fn incomplete_input_waits_and_bad_input_is_named() {
        let frame = Frame::json(FrameKind::Request, 7, &Request::Ping);
        let bytes = frame.encode();
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut]).expect("incomplete"),
                None,
                "cut {cut}"
            );
        }
        assert!(matches!(decode(&[0x00]), Err(ProtocolError::BadMagic(0))));
        let mut unknown = bytes.clone();
        unknown[1] = 99;
        assert!(matches!(
            decode(&unknown),
            Err(ProtocolError::UnknownKind(99))
        ));
        let mut huge = bytes.clone();
        huge[6..10].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert!(matches!(decode(&huge), Err(ProtocolError::TooLarge(_))));
        assert!(matches!(
            read_frame(&mut &bytes[..bytes.len() - 1]),
            Err(ProtocolError::UnexpectedEof)
        ));
    }

    #[test]
    fn payloads_are_tagged_snake_case_json() {
        let exec = Request::Exec(ExecRequest {
            argv: vec!["uname".into(), "-r".into()],
            env: vec![("A".into(), "1".into())],
            cwd: None,
            pty: false,
        });
        assert_eq!(
            serde_json::to_value(&exec).expect("json"),
            serde_json::json!({"type": "exec", "argv": ["uname", "-r"], "env": [["A", "1"]], "cwd": null, "pty": false})
        );
        let shutdown = Request::Shutdown {
            action: ShutdownAction::Poweroff,
        };
        assert_eq!(
            serde_json::to_string(&shutdown).expect("json"),
            r#"{"type":"shutdown","action":"poweroff"}"#
        );
        let frame = Frame::json(FrameKind::Event, EVENT_SESSION, &Event::ShutdownAck);
        assert_eq!(frame.parse::<Event>().expect("parse"), Event::ShutdownAck);
        let minimal: Request =
            serde_json::from_str(r#"{"type":"exec","argv":["true"]}"#).expect("defaults");
        assert!(matches!(
            minimal,
            Request::Exec(ExecRequest { pty: false, .. })
        ));
    }
}
