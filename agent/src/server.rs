//! Serving the protocol on one byte stream. One reader per connection
//! routes frames to sessions; every exec session has a thread that pumps
//! its output (then sends its exit) and one that feeds its stdin; whole
//! frames are written under one lock per connection. With a version-2
//! host both directions are flow-controlled (`flow`): output waits for the
//! host's credit, and stdin is granted back as the process reads it.
//! Output from pipes is spliced into the connection (no guest copies). A
//! session that fails ends with an error answer, a connection that fails
//! ends alone; nothing here ends the agent.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, SpliceFFlags, splice};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::children::DEFAULT_PATH;
use crate::flow::{Credit, StdinQueue};
use crate::protocol::{
    self, EVENT_SESSION, Event, ExecRequest, ExitStatus, Frame, FrameKind, HEADER_LEN, MAX_PAYLOAD,
    OLDEST_VERSION, PROTOCOL_VERSION, Request, Response, ShutdownAction, WINDOW, cost,
};
use crate::{children, spawn_thread, system};

/// Facts the hello reports, fixed once the agent serves.
pub struct Identity {
    pub boot: protocol::BootTimes,
    /// PID 1 may shut the guest down; a `--listen` agent may not.
    pub init: bool,
}

/// The outgoing half of a stream; its lock keeps whole frames whole.
type Sink = Arc<Mutex<File>>;

/// One host connection's way out. The serial port's sink outlives its
/// hosts, so `open` drops what a former host's sessions still write.
/// `version` is what the host's hello chose.
#[derive(Clone)]
struct Writer {
    sink: Sink,
    open: Arc<AtomicBool>,
    version: Arc<AtomicU32>,
}

impl Writer {
    fn send(&self, frame: &Frame) -> io::Result<()> {
        self.send_parts(frame.kind, frame.session, &frame.payload)
    }

    /// The sink, locked for a whole frame, while this host is connected.
    fn open_sink(&self) -> io::Result<std::sync::MutexGuard<'_, File>> {
        let sink = self
            .sink
            .lock()
            .map_err(|_| io::Error::other("writer poisoned"))?;
        if !self.open.load(Ordering::Acquire) {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        }
        Ok(sink)
    }

    /// A frame from its parts: output goes out of the read buffer as it is.
    fn send_parts(&self, kind: FrameKind, session: u32, payload: &[u8]) -> io::Result<()> {
        let mut sink = self.open_sink()?;
        protocol::write_parts(&mut *sink, kind, session, payload)
    }

    /// The frame the relay holds (`len` bytes, header and all) spliced
    /// into the sink whole, then `rest`, what did not fit the relay, under
    /// one lock. Once a byte is out the frame must be completed: a sink
    /// that refuses splice gets the relay copied; bytes a failed splice
    /// swallowed go as zeros and are said (`Ok(false)`), so the caller ends
    /// the session rather than let it go on corrupt.
    fn send_relayed(&self, relay: &File, len: usize, rest: &[u8]) -> io::Result<bool> {
        let mut sink = self.open_sink()?;
        let mut left = len;
        let mut whole = true;
        while left > 0 {
            match splice(relay, None, &*sink, None, left, SpliceFFlags::empty()) {
                Ok(n) if n > 0 => left -= n,
                Err(Errno::EINTR) => {}
                Ok(_) | Err(_) => {
                    let held = waiting_bytes(relay).unwrap_or(0).min(left);
                    let mut copy = vec![0u8; left];
                    whole = (&*relay).read_exact(&mut copy[..held]).is_ok() && held == left;
                    sink.write_all(&copy)?;
                    break;
                }
            }
        }
        sink.write_all(rest)?;
        Ok(whole)
    }

    fn respond(&self, session: u32, response: &Response) {
        let _ = self.send(&Frame::json(FrameKind::Response, session, response));
    }

    /// Whether the host speaks flow control (version 2 on).
    fn flow_controlled(&self) -> bool {
        self.version.load(Ordering::Acquire) >= 2
    }
}

/// Every connection's writer, for the shutdown announcement.
static CONNECTIONS: LazyLock<Mutex<Vec<(u64, Writer)>>> = LazyLock::new(|| Mutex::new(Vec::new()));
/// Whether a host acknowledged the shutdown announcement.
static ACKED: LazyLock<(Mutex<bool>, Condvar)> =
    LazyLock::new(|| (Mutex::new(false), Condvar::new()));

/// A running exec: the stdin its feeder writes, the credit its output
/// pump spends, and its process group.
struct Session {
    stdin: Arc<StdinQueue>,
    output: Arc<Credit>,
    group: Pid,
}

impl Session {
    /// Nobody reads this session any more: the process goes, its output
    /// is drained and dropped.
    fn abandon(&self) {
        let _ = kill(self.group, Signal::SIGKILL);
        self.output.abandon();
        self.stdin.close();
    }
}

type Sessions = Arc<Mutex<HashMap<u32, Session>>>;

/// How a connection treats bytes that are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A socket: a framing error ends the connection.
    Socket,
    /// The serial port outlives its hosts: skip a byte and look again.
    Serial,
}

/// Serves one connection until its stream ends. Answers why it ended.
pub fn serve(
    reader: impl Read,
    writer: File,
    transport: Transport,
    identity: &Identity,
) -> io::Result<()> {
    serve_on(reader, Arc::new(Mutex::new(writer)), transport, identity)
}

fn serve_on(
    mut reader: impl Read,
    sink: Sink,
    transport: Transport,
    identity: &Identity,
) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let writer = Writer {
        sink,
        open: Arc::new(AtomicBool::new(true)),
        version: Arc::new(AtomicU32::new(PROTOCOL_VERSION)),
    };
    if let Ok(mut connections) = CONNECTIONS.lock() {
        connections.push((id, writer.clone()));
    }
    let sessions: Sessions = Arc::new(Mutex::new(HashMap::new()));
    // Decoded from a cursor, compacted once per read: linear in bytes.
    let mut buffer = Vec::new();
    let mut start = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    let ended = loop {
        match protocol::decode(&buffer[start..]) {
            Ok(Some((frame, used))) => {
                start += used;
                handle(frame, &writer, &sessions, identity);
                continue;
            }
            Ok(None) => {}
            Err(e) if transport == Transport::Serial => {
                crate::log!("skipping a byte: {e}");
                start += 1;
                continue;
            }
            Err(e) => break Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
        buffer.drain(..start);
        start = 0;
        match reader.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    // Nobody is left to read what these sessions write.
    writer.open.store(false, Ordering::Release);
    if let Ok(mut sessions) = sessions.lock() {
        for (_, session) in sessions.drain() {
            session.abandon();
        }
    }
    if let Ok(mut connections) = CONNECTIONS.lock() {
        connections.retain(|(other, _)| *other != id);
    }
    ended
}

fn handle(frame: Frame, writer: &Writer, sessions: &Sessions, identity: &Identity) {
    match frame.kind {
        FrameKind::Request if frame.session == EVENT_SESSION => writer.respond(
            EVENT_SESSION,
            &Response::Error {
                message: "session 0 carries events; a request needs a nonzero session id".into(),
            },
        ),
        FrameKind::Request => match frame.parse::<Request>() {
            Ok(request) => answer_request(request, frame.session, writer, sessions, identity),
            Err(e) => writer.respond(
                frame.session,
                &Response::Error {
                    message: format!("bad request: {e}"),
                },
            ),
        },
        FrameKind::Stdin => {
            // Queued outside the sessions lock: a full queue (a host that
            // ignores its window) waits here, and the feeder must be able
            // to take the lock meanwhile.
            let stdin = sessions
                .lock()
                .ok()
                .and_then(|sessions| sessions.get(&frame.session).map(|s| s.stdin.clone()));
            if let Some(stdin) = stdin {
                if frame.payload.is_empty() {
                    stdin.end();
                } else {
                    stdin.push(frame.payload);
                }
            }
        }
        FrameKind::Kill => {
            if let Ok(sessions) = sessions.lock()
                && let Some(session) = sessions.get(&frame.session)
            {
                session.abandon();
            }
        }
        FrameKind::Signal => {
            let signal = frame
                .payload
                .first()
                .and_then(|&n| Signal::try_from(i32::from(n)).ok());
            if let (Some(signal), Ok(sessions)) = (signal, sessions.lock())
                && let Some(session) = sessions.get(&frame.session)
            {
                let _ = kill(session.group, signal);
            }
        }
        FrameKind::Credit => {
            if let (Some(amount), Ok(sessions)) = (frame.credit_amount(), sessions.lock())
                && let Some(session) = sessions.get(&frame.session)
            {
                session.output.grant(amount);
            }
        }
        FrameKind::Event if frame.session == EVENT_SESSION => {
            if let Ok(Event::ShutdownAck) = frame.parse::<Event>() {
                let (acked, changed) = &*ACKED;
                if let Ok(mut acked) = acked.lock() {
                    *acked = true;
                    changed.notify_all();
                }
            }
        }
        // Frames only the agent sends, or for sessions that ended.
        _ => {}
    }
}

fn answer_request(
    request: Request,
    session: u32,
    writer: &Writer,
    sessions: &Sessions,
    identity: &Identity,
) {
    let response = match request {
        Request::Hello { version } => {
            // The host's version if this agent speaks it: an older host
            // gets the older protocol on this connection.
            let chosen = version.clamp(OLDEST_VERSION, PROTOCOL_VERSION);
            writer.version.store(chosen, Ordering::Release);
            hello(chosen, identity)
        }
        Request::Ping => Response::Pong,
        Request::Ports => Response::Ports {
            ports: system::listening_ports(),
        },
        Request::HostKeys => Response::HostKeys {
            keys: system::host_keys(),
        },
        Request::Shutdown { action } if identity.init => {
            writer.respond(session, &Response::ShuttingDown);
            // PID 1's signal loop runs the shutdown, as for busybox's
            // poweroff (SIGUSR2) and reboot (SIGTERM).
            let signal = match action {
                ShutdownAction::Poweroff => Signal::SIGUSR2,
                ShutdownAction::Reboot => Signal::SIGTERM,
            };
            let _ = kill(Pid::this(), signal);
            return;
        }
        Request::Shutdown { .. } => Response::Error {
            message: "not PID 1: this agent cannot shut the guest down".into(),
        },
        Request::RunMain(main) if identity.init => match crate::main_process::run(main) {
            Ok(pid) => Response::Started { pid },
            Err(e) => Response::Error {
                message: format!("cannot start the main process: {e}"),
            },
        },
        Request::RunMain(_) => Response::Error {
            message: "not PID 1: this agent runs no main process".into(),
        },
        // A started session answers itself, ahead of its first output.
        Request::Exec(exec) => match start(exec, session, writer, sessions) {
            Ok(()) => return,
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
    };
    writer.respond(session, &response);
}

fn hello(version: u32, identity: &Identity) -> Response {
    Response::Hello {
        version,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        boot: identity.boot,
    }
}

/// A started exec process and its ends.
struct Spawned {
    pid: u32,
    exited: Receiver<ExitStatus>,
    stdin: File,
    /// What to write for end of input, when closing is not enough.
    end_of_input: Option<&'static [u8]>,
    outputs: Vec<(File, FrameKind)>,
}

/// Stdin, stdout and stderr as pipes; the process in a group of its own,
/// so a kill takes its children too.
fn spawn_piped(command: &mut Command) -> io::Result<Spawned> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut child, exited) = children::spawn(command)?;
    let missing = || io::Error::other("the child has no pipes");
    let stdin = OwnedFd::from(child.stdin.take().ok_or_else(missing)?);
    let stdout = OwnedFd::from(child.stdout.take().ok_or_else(missing)?);
    let stderr = OwnedFd::from(child.stderr.take().ok_or_else(missing)?);
    Ok(Spawned {
        pid: child.id(),
        exited,
        stdin: File::from(stdin),
        end_of_input: None,
        outputs: vec![
            (File::from(stdout), FrameKind::Stdout),
            (File::from(stderr), FrameKind::Stderr),
        ],
    })
}

/// A pseudo-terminal for all three, as the controlling terminal of a new
/// session (whose id is the pid, so a kill of the group takes it all);
/// everything it prints arrives as stdout. Both ends are close-on-exec from
/// the start, so concurrent sessions' children never hold this terminal.
fn spawn_on_pty(command: &mut Command) -> io::Result<Spawned> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let terminal = File::options()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(nix::pty::ptsname_r(&master)?)?;
    command
        .stdin(Stdio::from(terminal.try_clone()?))
        .stdout(Stdio::from(terminal.try_clone()?))
        .stderr(Stdio::from(terminal));
    #[allow(unsafe_code)]
    // SAFETY: setsid and ioctl are async-signal-safe and touch no memory of
    // the parent; stdin is the terminal the child is to control.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (child, exited) = children::spawn(command)?;
    let master = File::from(OwnedFd::from(master));
    Ok(Spawned {
        pid: child.id(),
        exited,
        stdin: master.try_clone()?,
        end_of_input: Some(b"\x04"),
        outputs: vec![(master, FrameKind::Stdout)],
    })
}

/// Starts an exec session: the process (on pipes or a pty), a thread that
/// feeds its stdin, and one that answers Started, pumps its output and
/// sends its exit once the output is drained.
fn start(exec: ExecRequest, session: u32, writer: &Writer, sessions: &Sessions) -> io::Result<()> {
    let Some((program, args)) = exec.argv.split_first() else {
        return Err(io::Error::other("argv is empty"));
    };
    if sessions.lock().is_ok_and(|s| s.contains_key(&session)) {
        return Err(io::Error::other(format!(
            "session {session} is already running a process"
        )));
    }
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(exec.cwd.as_deref().unwrap_or("/"));
    if std::env::var_os("PATH").is_none() && !exec.env.iter().any(|(k, _)| k == "PATH") {
        command.env("PATH", DEFAULT_PATH);
    }
    command.envs(exec.env);
    let spawned = if exec.pty {
        spawn_on_pty(&mut command)
    } else {
        spawn_piped(&mut command)
    };
    let spawned = spawned.map_err(|e| io::Error::new(e.kind(), format!("{program}: {e}")))?;
    let group = Pid::from_raw(-(spawned.pid as i32));
    let queue = Arc::new(StdinQueue::new(WINDOW));
    let output = Arc::new(if writer.flow_controlled() {
        Credit::new(WINDOW)
    } else {
        Credit::unlimited()
    });
    let (mut stdin, end_of_input) = (spawned.stdin, spawned.end_of_input);
    let feeder = {
        let (queue, writer) = (queue.clone(), writer.clone());
        spawn_thread("exec-stdin", move || {
            while let Some(bytes) = queue.pop() {
                if stdin.write_all(&bytes).is_err() {
                    // The process stopped reading: what comes is dropped.
                    queue.close();
                    return;
                }
                queue.release(bytes.len());
                if writer.flow_controlled() {
                    let _ = writer.send(&Frame::credit(session, cost(bytes.len())));
                }
            }
            // Pipes close when dropped; a terminal hears its EOF character.
            if let Some(eof) = end_of_input {
                let _ = stdin.write_all(eof);
            }
        })
    };
    // Registered before the output thread exists, which removes it once
    // the process is gone; the reader routes this session's next frame
    // only after this returns.
    if let Ok(mut sessions) = sessions.lock() {
        sessions.insert(
            session,
            Session {
                stdin: queue.clone(),
                output: output.clone(),
                group,
            },
        );
    }
    let output = feeder.and_then(|_| {
        let (writer, sessions) = (writer.clone(), sessions.clone());
        let (pid, outputs, exited) = (spawned.pid, spawned.outputs, spawned.exited);
        spawn_thread("exec-output", move || {
            writer.respond(session, &Response::Started { pid });
            pump(outputs, session, group, &writer, &output);
            // A feeder still waiting for input ends with the process.
            queue.close();
            let status = exited.recv().unwrap_or(ExitStatus {
                code: None,
                signal: None,
            });
            if let Ok(mut sessions) = sessions.lock() {
                sessions.remove(&session);
            }
            let _ = writer.send(&Frame::json(FrameKind::Exit, session, &status));
        })
    });
    if let Err(e) = output {
        if let Ok(mut sessions) = sessions.lock() {
            sessions.remove(&session);
        }
        // The reaper collects it; nobody waits for its status.
        let _ = kill(group, Signal::SIGKILL);
        return Err(io::Error::new(
            e.kind(),
            format!("cannot serve {program}: {e}"),
        ));
    }
    Ok(())
}

/// Sends a process's output as frames until every stream ends, never more
/// than the host's credit allows: without credit the pipes fill and the
/// process waits. Once nobody reads (the credit is abandoned), output is
/// drained and dropped, so the process never blocks on a full pipe.
fn pump(
    mut outputs: Vec<(File, FrameKind)>,
    session: u32,
    group: Pid,
    writer: &Writer,
    credit: &Credit,
) {
    let relay = Relay::new();
    let mut buffer = vec![0u8; MAX_PAYLOAD];
    while !outputs.is_empty() {
        let mut fds: Vec<PollFd> = outputs
            .iter()
            .map(|(stream, _)| PollFd::new(stream.as_fd(), PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                crate::log!("session {session}: poll: {e}");
                return;
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        for index in (0..outputs.len()).rev() {
            if !ready[index] {
                continue;
            }
            let room = credit.wait(cost(1));
            let most = usize::try_from(room)
                .unwrap_or(usize::MAX)
                .saturating_sub(HEADER_LEN)
                .min(MAX_PAYLOAD);
            let (stream, kind) = &mut outputs[index];
            if let Some(relay) = &relay
                && !credit.abandoned()
            {
                // Not a pipe, or nothing waiting (its end): read below.
                match relay.fill(stream, *kind, session, most) {
                    Ok(Some((n, rest))) => {
                        credit.spend(cost(n));
                        let relayed = HEADER_LEN + n - rest.len();
                        match writer.send_relayed(&relay.read, relayed, &rest) {
                            Ok(true) => {}
                            Ok(false) => lose(session, group, credit, "in splice"),
                            // The host is gone, and with it what the relay holds.
                            Err(_) => relay.clear(&mut buffer),
                        }
                        continue;
                    }
                    Ok(None) => {}
                    // Part of the output is in the relay and cannot go.
                    Err(e) => {
                        relay.clear(&mut buffer);
                        lose(session, group, credit, &e.to_string());
                        continue;
                    }
                }
            }
            match stream.read(&mut buffer[..most]) {
                Ok(0) => {
                    outputs.remove(index);
                }
                // Killed: read only so nothing blocks on the pipe.
                Ok(_) if credit.abandoned() => {}
                Ok(n) => {
                    credit.spend(cost(n));
                    let _ = writer.send_parts(*kind, session, &buffer[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A terminal whose last holder closed reads EIO: its end.
                Err(_) => {
                    outputs.remove(index);
                }
            }
        }
    }
}

/// A pipe of the pump's own, where each output frame is assembled before
/// it goes out whole: the header written, then the process's output moved
/// in by splice(2) (pipe to pipe: pages, not bytes), then all of it into
/// the sink, one buffer and one notification of the VMM a frame. Always
/// drained whole, because Linux's virtio console queues zero-length
/// buffers when a splice leaves part of a pipe behind, and QEMU then
/// stops the device.
struct Relay {
    read: File,
    write: File,
}

impl Relay {
    /// Room for a whole frame in any pipe buffers; None when the kernel
    /// gives no pipe: output is read and copied.
    fn new() -> Option<Relay> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ok()?;
        let room = nix::libc::c_int::try_from(4 * MAX_PAYLOAD).ok()?;
        nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(room)).ok()?;
        Some(Relay {
            read: File::from(read),
            write: File::from(write),
        })
    }

    /// A frame of up to `most` of the bytes waiting in `stream`: its
    /// header and as much as the relay takes go into the empty relay, the
    /// rest is read (it is waiting) and answered, with the payload length;
    /// None when `stream` is no pipe or has nothing waiting (its end).
    fn fill(
        &self,
        stream: &File,
        kind: FrameKind,
        session: u32,
        most: usize,
    ) -> io::Result<Option<(usize, Vec<u8>)>> {
        let waiting = waiting_bytes(stream)?;
        if waiting == 0 {
            return Ok(None);
        }
        let len = waiting.min(most);
        (&self.write).write_all(&protocol::encode_header(kind, session, len))?;
        let mut moved = 0;
        while moved < len {
            // Never blocks: a full relay (a process that wrote many tiny
            // buffers) or anything else leaves the rest to a read.
            match splice(
                stream,
                None,
                &self.write,
                None,
                len - moved,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(n) if n > 0 => moved += n,
                Err(Errno::EINTR) => {}
                Ok(_) | Err(_) => break,
            }
        }
        let mut rest = vec![0u8; len - moved];
        (&*stream).read_exact(&mut rest)?;
        Ok(Some((len, rest)))
    }

    /// Empties the relay, so the next frame drains it whole again.
    fn clear(&self, buffer: &mut [u8]) {
        while waiting_bytes(&self.read).is_ok_and(|n| n > 0) {
            if (&self.read).read(buffer).is_err() {
                return;
            }
        }
    }
}

/// Output that could not go whole: the session ends (the process is
/// killed) rather than go on with a stream out of step.
fn lose(session: u32, group: Pid, credit: &Credit, why: &str) {
    crate::log!("session {session}: output lost ({why}); ending it");
    let _ = kill(group, Signal::SIGKILL);
    credit.abandon();
}

nix::ioctl_read_bad!(fionread, nix::libc::FIONREAD, nix::libc::c_int);

/// How many bytes a pipe holds (FIONREAD).
fn waiting_bytes(pipe: &File) -> io::Result<usize> {
    let mut count: nix::libc::c_int = 0;
    #[allow(unsafe_code)]
    // SAFETY: FIONREAD writes one int through the pointer, which is ours.
    unsafe { fionread(pipe.as_raw_fd(), &mut count) }?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Tells every connected host the guest is going down (and how its main
/// process ended, when that is why) and waits, up to `timeout`, for one of
/// them to acknowledge.
pub fn announce_shutdown(action: ShutdownAction, main_exit: Option<ExitStatus>, timeout: Duration) {
    let writers: Vec<Writer> = CONNECTIONS
        .lock()
        .map(|c| c.iter().map(|(_, w)| w.clone()).collect())
        .unwrap_or_default();
    if writers.is_empty() {
        return;
    }
    let event = Event::Shutdown { action, main_exit };
    let frame = Frame::json(FrameKind::Event, EVENT_SESSION, &event);
    // A write blocked on a port with no host must not hold the reset.
    for writer in writers {
        let frame = frame.clone();
        let _ = spawn_thread("announce", move || {
            let _ = writer.send(&frame);
        });
    }
    let (acked, changed) = &*ACKED;
    if let Ok(guard) = acked.lock() {
        let _ = changed.wait_timeout_while(guard, timeout, |acked| !*acked);
    }
}

/// The virtio-serial port QEMU gives the agent. The host names a port a
/// moment after the guest sees it, so while unnamed ports exist this looks
/// again for up to `wait`.
pub fn find_serial_port(wait: Duration) -> Option<PathBuf> {
    let deadline = Instant::now() + wait;
    loop {
        let entries: Vec<_> = std::fs::read_dir("/sys/class/virtio-ports")
            .ok()?
            .filter_map(|e| e.ok())
            .collect();
        if let Some(entry) = entries.iter().find(|entry| {
            std::fs::read_to_string(entry.path().join("name"))
                .is_ok_and(|name| name.trim() == protocol::SERIAL_PORT_NAME)
        }) {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
        if entries.is_empty() || Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serves the serial port for the guest's life. With no host connected a
/// read answers 0 at once: the host is gone, its sessions are killed, and
/// the port is read again shortly. The port is opened once (it allows one
/// opener) and its one writer lock spans every host, so a write that was
/// blocked while no host was connected cannot interleave with a new one's.
pub fn serve_serial(path: PathBuf, identity: Arc<Identity>) {
    let port = loop {
        match File::options().read(true).write(true).open(&path) {
            Ok(port) => break port,
            Err(e) => {
                crate::log!("cannot open {}: {e}", path.display());
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let sink: Sink = match port.try_clone() {
        Ok(writer) => Arc::new(Mutex::new(writer)),
        Err(e) => {
            crate::log!("{}: {e}", path.display());
            return;
        }
    };
    loop {
        if let Err(e) = serve_on(&port, sink.clone(), Transport::Serial, &identity) {
            crate::log!("{}: {e}", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
