//! The host end of a VM's agent channel: one byte stream (a QEMU
//! virtio-serial chardev socket, or Firecracker's hybrid vsock) carrying
//! many sessions in banger-agent's frames. A reader task routes frames to
//! sessions by id; a writer task keeps whole frames from interleaving.
//!
//! A serial port keeps what the guest wrote while no host was connected,
//! so a new connection may start mid-frame: until the hello is answered,
//! the reader skips bytes until a frame decodes.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_agent::protocol::{
    self, EVENT_SESSION, Event, ExecRequest, Frame, FrameKind, MAX_PAYLOAD, PROTOCOL_VERSION,
    ProtocolError, Request, Response, ShutdownAction,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::vm::record::AgentEndpoint;

/// How often an unanswered hello is sent again while the guest boots.
const HELLO_INTERVAL: Duration = Duration::from_millis(500);
/// How long one request may wait for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a missing socket is looked for again (the VMM creates it).
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// The longest wait between vsock connection attempts: a guest without an
/// agent must not cost the host a busy loop.
const VSOCK_RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent speaks protocol version {agent}, banger {PROTOCOL_VERSION}")]
    Version { agent: u32 },
    #[error("the agent connection is closed")]
    Closed,
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent refused: {0}")]
    Refused(String),
    #[error("the agent answered {0}, which was not expected")]
    Unexpected(String),
    #[error("bad frame from the agent")]
    Protocol(#[from] ProtocolError),
}

/// What the agent said in its hello.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub agent_version: String,
    pub kernel: String,
    pub hostname: String,
    pub boot: protocol::BootTimes,
}

type Sessions = Mutex<HashMap<u32, mpsc::UnboundedSender<Frame>>>;

/// Where the guest's shutdown announcements go: one slot, the latest.
pub type Announcements = watch::Sender<Option<ShutdownAction>>;

struct Inner {
    writer: mpsc::UnboundedSender<Vec<u8>>,
    sessions: Sessions,
    next_session: AtomicU32,
    closed: CancellationToken,
}

impl Inner {
    fn new_session(&self) -> u32 {
        // Session 0 is the agent's events; ids wrap long after any session ends.
        loop {
            let id = self.next_session.fetch_add(1, Ordering::Relaxed);
            if id != EVENT_SESSION {
                return id;
            }
        }
    }

    fn send(&self, frame: &Frame) -> Result<(), AgentError> {
        self.writer
            .send(frame.encode())
            .map_err(|_| AgentError::Closed)
    }
}

/// A connected agent. Cheap to clone; the connection ends when the stream
/// does (the guest went away) or [`AgentLink::close`] is called.
#[derive(Clone)]
pub struct AgentLink {
    inner: Arc<Inner>,
    hello: Arc<Hello>,
}

impl AgentLink {
    /// Connects to the agent and waits for it to answer a hello, resending
    /// the hello while the guest boots. Runs until it succeeds or fails
    /// for good; callers bound it with a timeout or cancel it when the VMM
    /// exits.
    pub async fn connect(
        endpoint: &AgentEndpoint,
        events: Announcements,
    ) -> Result<AgentLink, AgentError> {
        let mut retry = CONNECT_RETRY;
        loop {
            let stream = match endpoint {
                AgentEndpoint::Serial { socket } => connect_socket(socket).await?,
                AgentEndpoint::Vsock { socket, port } => {
                    match connect_vsock(socket, *port).await {
                        Ok(Some(stream)) => stream,
                        // The guest is not listening yet.
                        Ok(None) => {
                            tokio::time::sleep(retry).await;
                            retry = (retry * 2).min(VSOCK_RETRY_MAX);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            match AgentLink::handshake(stream, events.clone()).await {
                Ok(link) => return Ok(link),
                // A vsock connection the guest dropped: try again.
                Err(AgentError::Closed) if matches!(endpoint, AgentEndpoint::Vsock { .. }) => {
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(VSOCK_RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn handshake(stream: UnixStream, events: Announcements) -> Result<AgentLink, AgentError> {
        let (read, mut write) = stream.into_split();
        let (writer, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
        let inner = Arc::new(Inner {
            writer,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU32::new(1),
            closed: CancellationToken::new(),
        });
        {
            let closed = inner.closed.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        frame = queue.recv() => match frame {
                            Some(bytes) => if write.write_all(&bytes).await.is_err() { break },
                            None => break,
                        },
                        _ = closed.cancelled() => break,
                    }
                }
                closed.cancel();
            });
        }
        let (hellos, mut answered) = mpsc::unbounded_channel();
        {
            let inner = inner.clone();
            tokio::spawn(async move {
                read_frames(read, &inner, hellos, events).await;
                inner.closed.cancel();
                // Dropping the senders tells every open session.
                if let Ok(mut sessions) = inner.sessions.lock() {
                    sessions.clear();
                }
            });
        }
        loop {
            inner.send(&Frame::json(
                FrameKind::Request,
                inner.new_session(),
                &Request::Hello {
                    version: PROTOCOL_VERSION,
                },
            ))?;
            tokio::select! {
                hello = answered.recv() => match hello {
                    Some((version, _)) if version != PROTOCOL_VERSION => {
                        inner.closed.cancel();
                        return Err(AgentError::Version { agent: version });
                    }
                    Some((_, hello)) => {
                        return Ok(AgentLink { inner, hello: Arc::new(hello) });
                    }
                    None => return Err(AgentError::Closed),
                },
                _ = tokio::time::sleep(HELLO_INTERVAL) => {}
            }
        }
    }

    /// What the agent said when this connection began.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await
    }

    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    fn send(&self, frame: &Frame) -> Result<(), AgentError> {
        self.inner.send(frame)
    }

    /// Opens a session: its frames arrive on the receiver.
    fn open(&self, request: &Request) -> Result<(u32, mpsc::UnboundedReceiver<Frame>), AgentError> {
        let session = self.inner.new_session();
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .sessions
            .lock()
            .map_err(|_| AgentError::Closed)?
            .insert(session, tx);
        self.send(&Frame::json(FrameKind::Request, session, request))?;
        Ok((session, rx))
    }

    fn forget(&self, session: u32) {
        if let Ok(mut sessions) = self.inner.sessions.lock() {
            sessions.remove(&session);
        }
    }

    /// One request, one answer.
    pub async fn request(&self, request: &Request) -> Result<Response, AgentError> {
        let (session, mut frames) = self.open(request)?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, frames.recv()).await;
        self.forget(session);
        let frame = answer
            .map_err(|_| AgentError::Timeout(REQUEST_TIMEOUT))?
            .ok_or(AgentError::Closed)?;
        match frame.parse::<Response>()? {
            Response::Error { message } => Err(AgentError::Refused(message)),
            response => Ok(response),
        }
    }

    /// Round trip of a ping.
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let started = Instant::now();
        match self.request(&Request::Ping).await? {
            Response::Pong => Ok(started.elapsed()),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks the guest to power off or reboot.
    pub async fn shutdown(&self, action: ShutdownAction) -> Result<(), AgentError> {
        match self.request(&Request::Shutdown { action }).await? {
            Response::ShuttingDown => Ok(()),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Tells the agent its shutdown announcement was heard.
    pub fn ack_shutdown(&self) {
        let _ = self.send(&Frame::json(
            FrameKind::Event,
            EVENT_SESSION,
            &Event::ShutdownAck,
        ));
    }

    /// Starts a process in the guest.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, AgentError> {
        let (session, mut frames) = self.open(&Request::Exec(request))?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, frames.recv()).await;
        let started = match answer {
            Err(_) => Err(AgentError::Timeout(REQUEST_TIMEOUT)),
            Ok(None) => Err(AgentError::Closed),
            Ok(Some(frame)) => match frame.parse::<Response>() {
                Ok(Response::Started { pid }) => Ok(pid),
                Ok(Response::Error { message }) => Err(AgentError::Refused(message)),
                Ok(other) => Err(AgentError::Unexpected(format!("{other:?}"))),
                Err(e) => Err(e.into()),
            },
        };
        match started {
            Ok(pid) => Ok(ExecSession {
                pid,
                session,
                link: self.clone(),
                output: frames,
            }),
            Err(e) => {
                self.forget(session);
                Err(e)
            }
        }
    }
}

/// A process started by `exec`: its output, stderr and exit arrive as
/// frames; stdin goes the other way.
pub struct ExecSession {
    pub pid: u32,
    session: u32,
    link: AgentLink,
    /// Stdout, Stderr, then one Exit frame; closed if the connection ends.
    pub output: mpsc::UnboundedReceiver<Frame>,
}

impl ExecSession {
    /// Sends stdin bytes, in frames the agent accepts.
    pub fn stdin(&self, bytes: &[u8]) -> Result<(), AgentError> {
        for chunk in bytes.chunks(MAX_PAYLOAD) {
            self.link.send(&Frame {
                kind: FrameKind::Stdin,
                session: self.session,
                payload: chunk.to_vec(),
            })?;
        }
        Ok(())
    }

    /// Closes the process's stdin (an empty stdin frame).
    pub fn stdin_eof(&self) -> Result<(), AgentError> {
        self.link.send(&Frame {
            kind: FrameKind::Stdin,
            session: self.session,
            payload: Vec::new(),
        })
    }

    pub fn kill(&self) -> Result<(), AgentError> {
        self.link.send(&Frame {
            kind: FrameKind::Kill,
            session: self.session,
            payload: Vec::new(),
        })
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        self.link.forget(self.session);
    }
}

async fn connect_socket(socket: &Path) -> Result<UnixStream, AgentError> {
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                tokio::time::sleep(CONNECT_RETRY).await;
            }
            Err(source) => {
                return Err(AgentError::Connect {
                    socket: socket.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Firecracker's hybrid vsock: `CONNECT <port>\n`, answered `OK <n>\n`; a
/// closed connection instead means nothing listens on the port yet.
async fn connect_vsock(socket: &Path, port: u32) -> Result<Option<UnixStream>, AgentError> {
    let mut stream = connect_socket(socket).await?;
    let failed = |source| AgentError::Connect {
        socket: socket.to_path_buf(),
        source,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(failed)?;
    // Read the answer byte by byte so no frame byte is taken with it.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(0) => return Ok(None),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if answer.len() < 64 => answer.push(byte[0]),
            Ok(_) => {
                return Err(failed(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "over-long vsock handshake answer",
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(failed(e)),
        }
    }
    if answer.starts_with(b"OK ") {
        Ok(Some(stream))
    } else {
        Ok(None)
    }
}

/// Reads frames until the stream ends or breaks, routing each to its
/// session; hello answers (with their protocol version) go to `hellos`,
/// shutdown announcements to `events`.
async fn read_frames(
    read: tokio::net::unix::OwnedReadHalf,
    inner: &Inner,
    hellos: mpsc::UnboundedSender<(u32, Hello)>,
    events: Announcements,
) {
    let mut reader = BufReader::with_capacity(128 * 1024, read);
    // Decoded from a cursor, compacted once per read: linear in bytes.
    let mut buffer: Vec<u8> = Vec::new();
    let mut start = 0;
    let mut synced = false;
    loop {
        // Decode whatever is buffered.
        loop {
            match protocol::decode(&buffer[start..]) {
                Ok(Some((frame, used))) => {
                    start += used;
                    if !synced {
                        if frame.kind != FrameKind::Response {
                            continue;
                        }
                        if let Ok(Response::Hello {
                            version,
                            agent_version,
                            kernel,
                            hostname,
                            boot,
                        }) = frame.parse()
                        {
                            synced = true;
                            let hello = Hello {
                                agent_version,
                                kernel,
                                hostname,
                                boot,
                            };
                            let _ = hellos.send((version, hello));
                        }
                        continue;
                    }
                    route(frame, inner, &events);
                }
                Ok(None) => break,
                // Before the hello, stale bytes: skip one and look again.
                Err(_) if !synced => start += 1,
                Err(_) => return,
            }
        }
        buffer.drain(..start);
        start = 0;
        let chunk = tokio::select! {
            chunk = reader.fill_buf() => chunk,
            _ = inner.closed.cancelled() => return,
        };
        match chunk {
            Ok([]) | Err(_) => return,
            Ok(bytes) => {
                let n = bytes.len();
                buffer.extend_from_slice(bytes);
                reader.consume(n);
            }
        }
    }
}

fn route(frame: Frame, inner: &Inner, events: &Announcements) {
    if frame.session == EVENT_SESSION {
        if let Ok(Event::Shutdown { action }) = frame.parse::<Event>() {
            // Coalesced: a guest that floods announcements overwrites one
            // slot, and the VM's actor sees the latest.
            events.send_replace(Some(action));
        }
        return;
    }
    let Ok(mut sessions) = inner.sessions.lock() else {
        return;
    };
    let ends = matches!(frame.kind, FrameKind::Exit);
    let session = frame.session;
    if let Some(tx) = sessions.get(&session) {
        let _ = tx.send(frame);
    }
    if ends {
        sessions.remove(&session);
    }
}
