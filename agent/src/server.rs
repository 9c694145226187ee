//! Serving the protocol on one byte stream: a reader that routes frames to
//! sessions, whole frames written under one lock, a thread per exec pump.
//! A session that fails ends with an error answer; a connection that fails
//! ends alone; nothing here ends the agent.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::children;
use crate::protocol::{
    self, EVENT_SESSION, Event, ExecRequest, ExitStatus, Frame, FrameKind, MAX_PAYLOAD,
    PROTOCOL_VERSION, Request, Response, ShutdownAction,
};
use crate::system;

/// PATH for commands when the request sets none (PID 1 starts with none).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Facts the hello reports, fixed once the agent serves.
pub struct Identity {
    pub boot: protocol::BootTimes,
    /// PID 1 may shut the guest down; a `--listen` agent may not.
    pub init: bool,
}

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

/// Every connection's writer, for the shutdown announcement.
static CONNECTIONS: LazyLock<Mutex<Vec<(u64, Writer)>>> = LazyLock::new(|| Mutex::new(Vec::new()));
/// Whether a host acknowledged the shutdown announcement.
static ACKED: LazyLock<(Mutex<bool>, Condvar)> =
    LazyLock::new(|| (Mutex::new(false), Condvar::new()));

fn send(writer: &Writer, frame: &Frame) -> io::Result<()> {
    let mut writer = writer
        .lock()
        .map_err(|_| io::Error::other("writer poisoned"))?;
    protocol::write_frame(&mut *writer, frame)
}

fn respond(writer: &Writer, session: u32, response: &Response) {
    let _ = send(writer, &Frame::json(FrameKind::Response, session, response));
}

/// A running exec: its stdin feeder and its process group.
struct Session {
    stdin: Option<Sender<Vec<u8>>>,
    pid: i32,
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
    mut reader: impl Read,
    writer: Box<dyn Write + Send>,
    transport: Transport,
    identity: &Identity,
) -> io::Result<()> {
    static NEXT: LazyLock<Mutex<u64>> = LazyLock::new(|| Mutex::new(0));
    let id = NEXT
        .lock()
        .map(|mut n| {
            *n += 1;
            *n
        })
        .unwrap_or(0);
    let writer: Writer = Arc::new(Mutex::new(writer));
    if let Ok(mut connections) = CONNECTIONS.lock() {
        connections.push((id, writer.clone()));
    }
    let sessions: Sessions = Arc::new(Mutex::new(HashMap::new()));
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let ended = loop {
        match protocol::decode(&buffer) {
            Ok(Some((frame, used))) => {
                buffer.drain(..used);
                handle(frame, &writer, &sessions, identity);
                continue;
            }
            Ok(None) => {}
            Err(e) if transport == Transport::Serial => {
                eprintln!("banger-agent: skipping a byte: {e}");
                buffer.drain(..1);
                continue;
            }
            Err(e) => break Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
        match reader.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    // Nobody is left to read what these sessions write.
    if let Ok(mut sessions) = sessions.lock() {
        for (_, session) in sessions.drain() {
            let _ = kill(Pid::from_raw(-session.pid), Signal::SIGKILL);
        }
    }
    if let Ok(mut connections) = CONNECTIONS.lock() {
        connections.retain(|(other, _)| *other != id);
    }
    ended
}

fn handle(frame: Frame, writer: &Writer, sessions: &Sessions, identity: &Identity) {
    match frame.kind {
        FrameKind::Request => match frame.parse::<Request>() {
            Ok(request) => request_(request, frame.session, writer, sessions, identity),
            Err(e) => respond(
                writer,
                frame.session,
                &Response::Error {
                    message: format!("bad request: {e}"),
                },
            ),
        },
        FrameKind::Stdin => {
            let Ok(mut sessions) = sessions.lock() else {
                return;
            };
            if let Some(session) = sessions.get_mut(&frame.session) {
                if frame.payload.is_empty() {
                    // Dropping the feeder closes the child's stdin.
                    session.stdin = None;
                } else if let Some(stdin) = &session.stdin {
                    let _ = stdin.send(frame.payload);
                }
            }
        }
        FrameKind::Kill => {
            if let Ok(sessions) = sessions.lock()
                && let Some(session) = sessions.get(&frame.session)
            {
                let _ = kill(Pid::from_raw(-session.pid), Signal::SIGKILL);
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

fn request_(
    request: Request,
    session: u32,
    writer: &Writer,
    sessions: &Sessions,
    identity: &Identity,
) {
    let response = match request {
        Request::Hello { .. } => Response::Hello {
            version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            boot: identity.boot,
        },
        Request::Ping => Response::Pong,
        Request::Ports => Response::Ports {
            ports: system::listening_ports(),
        },
        Request::HostKeys => Response::HostKeys {
            keys: system::host_keys(),
        },
        Request::Shutdown { action } if identity.init => {
            respond(writer, session, &Response::ShuttingDown);
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
            message: "this agent is not PID 1; it cannot shut the guest down".into(),
        },
        // A started session answers itself, ahead of its first output.
        Request::Exec(exec) => match start(exec, session, writer, sessions) {
            Ok(()) => return,
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
    };
    respond(writer, session, &response);
}

/// A started exec process and its ends.
struct Spawned {
    pid: u32,
    exited: mpsc::Receiver<ExitStatus>,
    stdin: Box<dyn Write + Send>,
    /// What to write for end of input, when closing is not enough.
    end_of_input: Option<&'static [u8]>,
    outputs: Vec<(Box<dyn Read + Send>, FrameKind)>,
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
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok(Spawned {
        pid: child.id(),
        exited,
        stdin: Box::new(stdin),
        end_of_input: None,
        outputs: vec![
            (Box::new(stdout), FrameKind::Stdout),
            (Box::new(stderr), FrameKind::Stderr),
        ],
    })
}

/// A pseudo-terminal for all three, as the controlling terminal of a new
/// session (whose id is the pid, so a kill of the group takes it all);
/// everything it prints arrives as stdout.
fn spawn_on_pty(command: &mut Command) -> io::Result<Spawned> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    let terminal = File::from(pty.slave);
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
    let master = File::from(pty.master);
    Ok(Spawned {
        pid: child.id(),
        exited,
        stdin: Box::new(master.try_clone()?),
        end_of_input: Some(b"\x04"),
        outputs: vec![(Box::new(master), FrameKind::Stdout)],
    })
}

/// Starts an exec session: the process (on pipes or a pty), a feeder for
/// its stdin, pumps for its output, and a waiter that sends the exit once
/// the output is drained.
fn start(exec: ExecRequest, session: u32, writer: &Writer, sessions: &Sessions) -> io::Result<()> {
    let Some((program, args)) = exec.argv.split_first() else {
        return Err(io::Error::other("argv is empty"));
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(exec.cwd.as_deref().unwrap_or("/"));
    if std::env::var_os("PATH").is_none() && !exec.env.iter().any(|(k, _)| k == "PATH") {
        command.env("PATH", DEFAULT_PATH);
    }
    command.env_remove(crate::init::STAGE1_ENV).envs(exec.env);
    let spawned = if exec.pty {
        spawn_on_pty(&mut command)
    } else {
        spawn_piped(&mut command)
    };
    let Spawned {
        pid,
        exited,
        stdin,
        end_of_input,
        outputs,
    } = spawned.map_err(|e| io::Error::new(e.kind(), format!("{program}: {e}")))?;
    respond(writer, session, &Response::Started { pid });
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut stdin = stdin;
        for bytes in stdin_rx {
            if stdin.write_all(&bytes).is_err() {
                return;
            }
        }
        // Pipes close when dropped; a terminal hears its EOF character.
        if let Some(eof) = end_of_input {
            let _ = stdin.write_all(eof);
        }
    });
    let pumps: Vec<_> = outputs
        .into_iter()
        .map(|(mut stream, kind)| {
            let writer = writer.clone();
            std::thread::spawn(move || {
                let mut buffer = vec![0u8; MAX_PAYLOAD];
                // A terminal whose last holder closed reads EIO: its end.
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    let frame = Frame {
                        kind,
                        session,
                        payload: buffer[..n].to_vec(),
                    };
                    if send(&writer, &frame).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    if let Ok(mut sessions) = sessions.lock() {
        sessions.insert(
            session,
            Session {
                stdin: Some(stdin_tx),
                pid: pid as i32,
            },
        );
    }
    let (writer, sessions) = (writer.clone(), sessions.clone());
    std::thread::spawn(move || {
        let status = exited.recv().unwrap_or(ExitStatus {
            code: None,
            signal: None,
        });
        for pump in pumps {
            let _ = pump.join();
        }
        if let Ok(mut sessions) = sessions.lock() {
            sessions.remove(&session);
        }
        let _ = send(&writer, &Frame::json(FrameKind::Exit, session, &status));
    });
    Ok(())
}

/// Tells every connected host the guest is going down and waits, up to
/// `timeout`, for one of them to acknowledge.
pub fn announce_shutdown(action: ShutdownAction, timeout: Duration) {
    let writers: Vec<Writer> = CONNECTIONS
        .lock()
        .map(|c| c.iter().map(|(_, w)| w.clone()).collect())
        .unwrap_or_default();
    let frame = Frame::json(FrameKind::Event, EVENT_SESSION, &Event::Shutdown { action });
    // A writer blocked on a host that went away must not hold the reset.
    for writer in writers {
        let frame = frame.clone();
        std::thread::spawn(move || send(&writer, &frame));
    }
    let (acked, changed) = &*ACKED;
    if let Ok(guard) = acked.lock() {
        let _ = changed.wait_timeout_while(guard, timeout, |acked| !*acked);
    }
}

/// The virtio-serial port QEMU gives the agent, if this guest has one.
pub fn serial_port() -> Option<std::path::PathBuf> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .filter_map(|e| e.ok())
        .find(|entry| {
            std::fs::read_to_string(entry.path().join("name"))
                .is_ok_and(|name| name.trim() == protocol::SERIAL_PORT_NAME)
        })
        .map(|entry| std::path::Path::new("/dev").join(entry.file_name()))
}

/// Serves the serial port for the guest's life: a host that goes away
/// (read answers 0 while no host is connected) is waited for again. The
/// port is opened once (it allows one opener); each host gets duplicates.
pub fn serve_serial(path: std::path::PathBuf, identity: Arc<Identity>) {
    let port = loop {
        match File::options().read(true).write(true).open(&path) {
            Ok(port) => break port,
            Err(e) => {
                eprintln!("banger-agent: cannot open {}: {e}", path.display());
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    loop {
        let served = port
            .try_clone()
            .and_then(|reader| Ok((reader, port.try_clone()?)))
            .and_then(|(reader, writer)| {
                serve(reader, Box::new(writer), Transport::Serial, &identity)
            });
        if let Err(e) = served {
            eprintln!("banger-agent: {}: {e}", path.display());
        }
        // No host connected: the port reads as ended until one connects.
        std::thread::sleep(Duration::from_millis(100));
    }
}
