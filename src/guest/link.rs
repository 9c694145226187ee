//! The host end of a VM's agent channel: one byte stream (a QEMU
//! virtio-serial chardev socket, or Firecracker's hybrid vsock) carrying
//! many sessions in banger-agent's frames. A reader task routes frames to
//! sessions by id; a writer task keeps whole frames from interleaving.
//!
//! Memory stays bounded whatever the guest does. With a version-2 agent
//! each exec session is flow-controlled both ways (docs/agent.md): the
//! agent sends output only within the credit this end grants as the
//! session's reader takes it, and an agent that overruns loses the session,
//! never the host's memory; stdin goes out only within the agent's credit.
//! A version-1 agent (a VM started before an upgrade) has no credit: its
//! sessions' queues are short and a full one holds back the whole link.
//! Frames to the agent wait in a short queue; its producers wait for room.
//!
//! A serial port keeps what the guest wrote while no host was connected,
//! so a new connection may start mid-frame: until the hello is answered,
//! the reader skips bytes until a frame decodes.

mod exec;

pub use exec::{ExecInput, ExecOutput, ExecSession};

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_agent::protocol::{
    self, EVENT_SESSION, Event, ExecRequest, Frame, FrameKind, HEADER_LEN, MAX_PAYLOAD,
    MainRequest, OLDEST_VERSION, PROTOCOL_VERSION, ProtocolError, Request, Response,
    ShutdownAction, WINDOW, cost,
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
/// Frames waiting for the writer task.
const WRITE_QUEUE: usize = 64;
/// What a version-2 session may have queued on this end: its output window
/// and room for its answer and exit frames.
const SESSION_LIMIT: u64 = WINDOW as u64 + 2 * (HEADER_LEN + MAX_PAYLOAD) as u64;
/// Frames a version-1 session may have queued before the link waits.
const V1_SESSION_QUEUE: usize = 16;
/// How long the link waits for a version-1 session's reader before it
/// drops the session, so one stalled reader cannot hold every session.
const V1_STALL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the agent speaks protocol version {agent}; banger speaks {OLDEST_VERSION} to {PROTOCOL_VERSION}"
    )]
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
    /// The protocol version this connection speaks.
    pub protocol: u32,
    pub agent_version: String,
    pub kernel: String,
    pub hostname: String,
    pub boot: protocol::BootTimes,
}

/// Where a session's frames go, and its flow control.
struct Route {
    frames: mpsc::Sender<Frame>,
    flow: Arc<Flow>,
}

/// One session's flow control on this end (version 2).
struct Flow {
    /// What the session's frames waiting for its reader cost.
    queued: AtomicU64,
    /// Output the agent sent that this end has not granted back yet: past
    /// the window, the agent ignored its credit.
    outstanding: AtomicU64,
    /// Stdin credit the agent granted, in total; the window comes on top.
    granted: watch::Sender<u64>,
    /// Stdin credit spent, in total.
    spent: AtomicU64,
    /// Why this end dropped the session, if it did.
    dropped: std::sync::OnceLock<&'static str>,
}

impl Flow {
    fn new() -> Flow {
        Flow {
            queued: AtomicU64::new(0),
            outstanding: AtomicU64::new(0),
            granted: watch::Sender::new(0),
            spent: AtomicU64::new(0),
            dropped: std::sync::OnceLock::new(),
        }
    }
}

type Sessions = Mutex<HashMap<u32, Route>>;

/// Where the guest's shutdown announcements go: one slot, the latest.
pub type Announcements = watch::Sender<Option<crate::vm::state::Announcement>>;

struct Inner {
    writer: mpsc::Sender<Vec<u8>>,
    sessions: Sessions,
    next_session: AtomicU32,
    closed: CancellationToken,
    /// What the hello chose (0 until it is answered).
    version: AtomicU32,
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

    /// Queues a frame for the agent, waiting while the queue is full.
    async fn send(&self, frame: &Frame) -> Result<(), AgentError> {
        self.writer
            .send(frame.encode())
            .await
            .map_err(|_| AgentError::Closed)
    }

    /// Queues a frame if there is room, else drops it.
    fn try_send(&self, frame: &Frame) {
        let _ = self.writer.try_send(frame.encode());
    }

    /// Queues a frame without waiting: at once if there is room, else
    /// from a task of its own, for callers that cannot wait (a drop, the
    /// reader) and frames that must not be lost: a session's kill, at most
    /// one per session.
    fn send_soon(&self, frame: &Frame) {
        let bytes = frame.encode();
        if let Err(mpsc::error::TrySendError::Full(bytes)) = self.writer.try_send(bytes)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let writer = self.writer.clone();
            runtime.spawn(async move {
                let _ = writer.send(bytes).await;
            });
        }
    }

    /// Ends a session from this end: its process is killed, what it still
    /// sends is dropped.
    fn drop_session(&self, session: u32, flow: &Flow, why: &'static str) {
        let _ = flow.dropped.set(why);
        self.forget(session);
        self.send_soon(&Frame {
            kind: FrameKind::Kill,
            session,
            payload: Vec::new(),
        });
    }

    fn flow_controlled(&self) -> bool {
        self.version.load(Ordering::Acquire) >= 2
    }

    fn forget(&self, session: u32) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(&session);
        }
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
        let (writer, mut queue) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
        let inner = Arc::new(Inner {
            writer,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU32::new(1),
            closed: CancellationToken::new(),
            version: AtomicU32::new(0),
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
        // The reader hands over one hello and stops looking for more.
        let (hellos, mut answered) = mpsc::channel(1);
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
            inner
                .send(&Frame::json(
                    FrameKind::Request,
                    inner.new_session(),
                    &Request::Hello {
                        version: PROTOCOL_VERSION,
                    },
                ))
                .await?;
            tokio::select! {
                hello = answered.recv() => match hello {
                    Some(Hello { protocol, .. })
                        if !(OLDEST_VERSION..=PROTOCOL_VERSION).contains(&protocol) =>
                    {
                        inner.closed.cancel();
                        return Err(AgentError::Version { agent: protocol });
                    }
                    Some(hello) => {
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

    /// Opens a session: its frames arrive on the receiver.
    async fn open(
        &self,
        request: &Request,
    ) -> Result<(u32, mpsc::Receiver<Frame>, Arc<Flow>), AgentError> {
        let session = self.inner.new_session();
        // Version 2 bounds a queue by what it costs (each frame at least
        // its header); version 1 by frames.
        let depth = if self.inner.flow_controlled() {
            (SESSION_LIMIT / HEADER_LEN as u64) as usize + 1
        } else {
            V1_SESSION_QUEUE
        };
        let (tx, rx) = mpsc::channel(depth);
        let flow = Arc::new(Flow::new());
        self.inner
            .sessions
            .lock()
            .map_err(|_| AgentError::Closed)?
            .insert(
                session,
                Route {
                    frames: tx,
                    flow: flow.clone(),
                },
            );
        let sent = self
            .inner
            .send(&Frame::json(FrameKind::Request, session, request))
            .await;
        if let Err(e) = sent {
            self.inner.forget(session);
            return Err(e);
        }
        Ok((session, rx, flow))
    }

    /// One request, one answer.
    pub async fn request(&self, request: &Request) -> Result<Response, AgentError> {
        let (session, mut frames, _) = self.open(request).await?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, frames.recv()).await;
        self.inner.forget(session);
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

    /// Starts the VM's main process (or hears the pid of the one this boot
    /// started); answers its pid.
    pub async fn run_main(&self, main: MainRequest) -> Result<u32, AgentError> {
        match self.request(&Request::RunMain(main)).await? {
            Response::Started { pid } => Ok(pid),
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

    /// Tells the agent its shutdown announcement was heard. Lost when the
    /// writer queue is full (the guest then waits out its 2 s): an ack per
    /// announcement must not pile up behind a guest that does not read.
    pub fn ack_shutdown(&self) {
        self.inner.try_send(&Frame::json(
            FrameKind::Event,
            EVENT_SESSION,
            &Event::ShutdownAck,
        ));
    }

    /// Starts a process in the guest.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, AgentError> {
        let (session, mut frames, flow) = self.open(&Request::Exec(request)).await?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, frames.recv()).await;
        if let Ok(Some(frame)) = &answer
            && self.inner.flow_controlled()
        {
            flow.queued
                .fetch_sub(u64::from(cost(frame.payload.len())), Ordering::AcqRel);
        }
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
            Ok(pid) => Ok(ExecSession::new(
                pid,
                session,
                self.inner.clone(),
                frames,
                flow,
            )),
            Err(e) => {
                // A process that started late must not run unread.
                self.inner
                    .drop_session(session, &flow, "the agent did not answer in time");
                Err(e)
            }
        }
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
    hellos: mpsc::Sender<Hello>,
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
                            inner.version.store(version, Ordering::Release);
                            let hello = Hello {
                                protocol: version,
                                agent_version,
                                kernel,
                                hostname,
                                boot,
                            };
                            let _ = hellos.try_send(hello);
                        }
                        continue;
                    }
                    route(frame, inner, &events).await;
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

async fn route(frame: Frame, inner: &Inner, events: &Announcements) {
    if frame.session == EVENT_SESSION {
        if let Ok(Event::Shutdown { action, main_exit }) = frame.parse::<Event>() {
            // Coalesced: a guest that floods announcements overwrites one
            // slot, and the VM's actor sees the latest.
            events.send_replace(Some(crate::vm::state::Announcement { action, main_exit }));
        }
        return;
    }
    let session = frame.session;
    let route = inner.sessions.lock().ok().and_then(|sessions| {
        sessions
            .get(&session)
            .map(|route| (route.frames.clone(), route.flow.clone()))
    });
    // Frames of sessions that ended are dropped.
    let Some((frames, flow)) = route else {
        return;
    };
    let ends = frame.kind == FrameKind::Exit;
    if !inner.flow_controlled() {
        // No credit to enforce: the link waits for the session's reader,
        // for a while.
        if tokio::time::timeout(V1_STALL, frames.send(frame))
            .await
            .is_err()
        {
            inner.drop_session(session, &flow, "its reader stalled the agent's connection");
            return;
        }
    } else if frame.kind == FrameKind::Credit {
        if let Some(amount) = frame.credit_amount() {
            flow.granted
                .send_modify(|total| *total = total.saturating_add(u64::from(amount)));
        }
        return;
    } else {
        let charge = u64::from(cost(frame.payload.len()));
        let output = matches!(frame.kind, FrameKind::Stdout | FrameKind::Stderr);
        let outstanding = if output {
            flow.outstanding.fetch_add(charge, Ordering::AcqRel) + charge
        } else {
            0
        };
        let queued = flow.queued.fetch_add(charge, Ordering::AcqRel) + charge;
        if outstanding > u64::from(WINDOW)
            || queued > SESSION_LIMIT
            || frames.try_send(frame).is_err()
        {
            // Past its window: the session ends, the link and host do not.
            inner.drop_session(
                session,
                &flow,
                "the guest agent sent past its flow-control window",
            );
            return;
        }
    }
    if ends {
        inner.forget(session);
    }
}
