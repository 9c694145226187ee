//! The built agent, not as PID 1, serving `--listen` on a Unix socket: the
//! protocol as the host sees it. Every wait is for a frame or a line; the
//! read timeout only bounds a hung agent.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use banger_agent::protocol::{
    ExecRequest, ExitStatus, Frame, FrameKind, MAGIC, PROTOCOL_VERSION, Request, Response, WINDOW,
    cost, read_frame, write_frame,
};

/// A running `banger-agent --listen`, killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Agent {
        let socket = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("agent-{}-{name}.sock", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_banger-agent"))
            .arg("--listen")
            .arg(&socket)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let mut log = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        log.read_line(&mut line).expect("the agent's first line");
        assert!(line.contains("listening on"), "agent said {line:?}");
        // Keep draining the log so the agent never blocks on it.
        std::thread::spawn(move || {
            for line in log.lines().map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
        Agent { child, socket }
    }

    fn connect(&self) -> Client {
        let stream = UnixStream::connect(&self.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Client { stream }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

struct Client {
    stream: UnixStream,
}

impl Client {
    fn send(&mut self, frame: &Frame) {
        write_frame(&mut self.stream, frame).expect("send");
    }

    fn request(&mut self, session: u32, request: &Request) {
        self.send(&Frame::json(FrameKind::Request, session, request));
    }

    fn frame(&mut self) -> Frame {
        read_frame(&mut self.stream)
            .expect("read a frame")
            .expect("the agent closed the connection")
    }

    fn response(&mut self, session: u32) -> Response {
        let frame = self.frame();
        assert_eq!((frame.kind, frame.session), (FrameKind::Response, session));
        frame.parse().expect("a response")
    }

    /// Runs one exec session to its end: stdout, stderr and the exit.
    fn exec(&mut self, session: u32, argv: &[&str]) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        self.request(session, &exec(argv));
        assert!(matches!(self.response(session), Response::Started { .. }));
        self.finish(session)
    }

    /// Reads the session to its exit, granting back the credit of what
    /// it reads, as the host does.
    fn finish(&mut self, session: u32) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let frame = self.frame();
            assert_eq!(frame.session, session);
            if matches!(frame.kind, FrameKind::Stdout | FrameKind::Stderr) {
                self.send(&Frame::credit(session, cost(frame.payload.len())));
            }
            match frame.kind {
                FrameKind::Stdout => stdout.extend(frame.payload),
                FrameKind::Stderr => stderr.extend(frame.payload),
                FrameKind::Exit => return (stdout, stderr, frame.parse().expect("exit")),
                // The agent's stdin credit: nothing here waits for it.
                FrameKind::Credit => {}
                other => panic!("unexpected {other:?} frame"),
            }
        }
    }

    fn hello(&mut self, session: u32, version: u32) -> u32 {
        self.request(session, &Request::Hello { version });
        match self.response(session) {
            Response::Hello { version, .. } => version,
            other => panic!("hello answered {other:?}"),
        }
    }
}

fn exec(argv: &[&str]) -> Request {
    Request::Exec(ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        pty: false,
    })
}

fn code(code: i32) -> ExitStatus {
    ExitStatus {
        code: Some(code),
        signal: None,
    }
}

#[test]
fn hello_ping_and_what_a_listener_refuses() {
    let agent = Agent::start("hello");
    let mut client = agent.connect();
    client.request(
        1,
        &Request::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    match client.response(1) {
        Response::Hello {
            version,
            agent_version,
            kernel,
            boot,
            ..
        } => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
            assert!(!kernel.is_empty());
            assert!(boot.stage2_ms <= boot.ready_ms);
        }
        other => panic!("hello answered {other:?}"),
    }
    client.request(2, &Request::Ping);
    assert_eq!(client.response(2), Response::Pong);
    client.request(
        3,
        &Request::Shutdown {
            action: banger_agent::protocol::ShutdownAction::Poweroff,
        },
    );
    assert!(matches!(client.response(3), Response::Error { .. }));
    client.request(4, &Request::Ports);
    assert!(matches!(client.response(4), Response::Ports { .. }));
    client.request(0, &Request::Ping);
    assert!(matches!(client.response(0), Response::Error { .. }));
}

#[test]
fn exec_streams_stdout_and_stderr_then_the_exit_code() {
    let agent = Agent::start("exec");
    let mut client = agent.connect();
    let (stdout, stderr, status) = client.exec(1, &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(stdout, b"out\n");
    assert_eq!(stderr, b"err\n");
    assert_eq!(status, code(7));
    client.request(2, &exec(&["/nonexistent/program"]));
    assert!(matches!(client.response(2), Response::Error { .. }));
    client.request(3, &exec(&[]));
    assert!(matches!(client.response(3), Response::Error { .. }));
}

#[test]
fn stdin_streams_to_the_process_and_empty_stdin_ends_it() {
    let agent = Agent::start("stdin");
    let mut client = agent.connect();
    client.request(5, &exec(&["cat"]));
    assert!(matches!(client.response(5), Response::Started { .. }));
    for chunk in [&b"hello "[..], b"world\n", b""] {
        client.send(&Frame {
            kind: FrameKind::Stdin,
            session: 5,
            payload: chunk.to_vec(),
        });
    }
    let (stdout, stderr, status) = client.finish(5);
    assert_eq!(stdout, b"hello world\n");
    assert!(stderr.is_empty());
    assert_eq!(status, code(0));
}

#[test]
fn kill_ends_the_session_with_sigkill() {
    let agent = Agent::start("kill");
    let mut client = agent.connect();
    client.request(9, &exec(&["sleep", "60"]));
    assert!(matches!(client.response(9), Response::Started { .. }));
    client.send(&Frame {
        kind: FrameKind::Kill,
        session: 9,
        payload: Vec::new(),
    });
    let (_, _, status) = client.finish(9);
    assert_eq!(
        status,
        ExitStatus {
            code: None,
            signal: Some(9)
        }
    );
}

#[test]
fn a_pty_session_runs_on_a_terminal() {
    let agent = Agent::start("pty");
    let mut client = agent.connect();
    client.request(
        1,
        &Request::Exec(ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "test -t 0 && test -t 1 && tty".into(),
            ],
            env: Vec::new(),
            cwd: None,
            pty: true,
        }),
    );
    assert!(matches!(client.response(1), Response::Started { .. }));
    let (stdout, stderr, status) = client.finish(1);
    assert_eq!(status, code(0));
    assert!(String::from_utf8_lossy(&stdout).starts_with("/dev/pts/"));
    assert!(stderr.is_empty(), "a terminal's output is all stdout");
}

#[test]
fn a_malformed_request_is_answered_and_the_connection_carries_on() {
    let agent = Agent::start("malformed");
    let mut client = agent.connect();
    client.send(&Frame {
        kind: FrameKind::Request,
        session: 1,
        payload: b"{\"type\":\"exec\",".to_vec(),
    });
    assert!(matches!(client.response(1), Response::Error { .. }));
    client.send(&Frame {
        kind: FrameKind::Request,
        session: 2,
        payload: br#"{"type":"no_such_request"}"#.to_vec(),
    });
    assert!(matches!(client.response(2), Response::Error { .. }));
    client.request(3, &Request::Ping);
    assert_eq!(client.response(3), Response::Pong);
}

#[test]
fn a_framing_error_closes_only_its_connection() {
    let mut agent = Agent::start("framing");
    let mut bystander = agent.connect();
    let mut bad = agent.connect();
    bad.stream.write_all(&[0x00; 32]).expect("write garbage");
    assert!(
        read_frame(&mut bad.stream)
            .expect("a clean close")
            .is_none()
    );
    let mut oversize = agent.connect();
    let mut header = vec![MAGIC, FrameKind::Request as u8, 0, 0, 0, 1];
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    oversize.stream.write_all(&header).expect("write header");
    assert!(
        read_frame(&mut oversize.stream)
            .expect("a clean close")
            .is_none()
    );
    assert!(agent.is_running());
    let mut fresh = agent.connect();
    fresh.request(1, &Request::Ping);
    assert_eq!(fresh.response(1), Response::Pong);
    bystander.request(1, &Request::Ping);
    assert_eq!(bystander.response(1), Response::Pong);
}

#[test]
fn twenty_exec_sessions_share_one_connection() {
    let agent = Agent::start("concurrent");
    let mut client = agent.connect();
    let sessions: Vec<u32> = (1..=20).collect();
    for &session in &sessions {
        let script = "echo out $1; echo err $1 >&2; exit $1";
        client.request(
            session,
            &exec(&["sh", "-c", script, "sh", &session.to_string()]),
        );
    }
    #[derive(Default)]
    struct Seen {
        started: bool,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        exit: Option<ExitStatus>,
    }
    let mut seen: HashMap<u32, Seen> = HashMap::new();
    while seen.values().filter(|s| s.exit.is_some()).count() < sessions.len() {
        let frame = client.frame();
        let state = seen.entry(frame.session).or_default();
        assert!(
            state.exit.is_none(),
            "a frame after session {}'s exit",
            frame.session
        );
        match frame.kind {
            FrameKind::Response => {
                assert!(matches!(
                    frame.parse::<Response>().expect("response"),
                    Response::Started { .. }
                ));
                state.started = true;
            }
            kind => {
                assert!(state.started, "{kind:?} before Started");
                match kind {
                    FrameKind::Stdout => state.stdout.extend(frame.payload),
                    FrameKind::Stderr => state.stderr.extend(frame.payload),
                    FrameKind::Exit => state.exit = Some(frame.parse().expect("exit")),
                    other => panic!("unexpected {other:?} frame"),
                }
            }
        }
    }
    for session in sessions {
        let state = &seen[&session];
        assert_eq!(state.stdout, format!("out {session}\n").as_bytes());
        assert_eq!(state.stderr, format!("err {session}\n").as_bytes());
        assert_eq!(state.exit, Some(code(session as i32)));
    }
}

#[test]
fn output_stops_at_the_window_until_the_host_grants_more() {
    let agent = Agent::start("window");
    let mut client = agent.connect();
    assert_eq!(client.hello(1, PROTOCOL_VERSION), PROTOCOL_VERSION);
    client.request(2, &exec(&["head", "-c", "2000000", "/dev/zero"]));
    assert!(matches!(client.response(2), Response::Started { .. }));
    // Read a window's worth without granting anything back.
    let (mut spent, mut read) = (0u32, 0usize);
    while WINDOW - spent > cost(0) {
        let frame = client.frame();
        assert_eq!((frame.kind, frame.session), (FrameKind::Stdout, 2));
        spent += cost(frame.payload.len());
        read += frame.payload.len();
    }
    assert!(spent <= WINDOW, "{spent} past the window");
    // The next frame is the pong: no output passes without credit.
    client.request(3, &Request::Ping);
    assert_eq!(client.response(3), Response::Pong);
    client.send(&Frame::credit(2, spent));
    let (stdout, _, status) = client.finish(2);
    assert_eq!(read + stdout.len(), 2_000_000);
    assert_eq!(status, code(0));
}

#[test]
fn a_version_1_host_gets_version_1_without_flow_control() {
    let agent = Agent::start("v1");
    let mut client = agent.connect();
    assert_eq!(client.hello(1, 1), 1);
    client.request(2, &exec(&["head", "-c", "2000000", "/dev/zero"]));
    assert!(matches!(client.response(2), Response::Started { .. }));
    let mut read = 0;
    loop {
        let frame = client.frame();
        match frame.kind {
            FrameKind::Stdout => read += frame.payload.len(),
            FrameKind::Exit => break,
            other => panic!("a version-1 host sees no {other:?} frame"),
        }
    }
    assert_eq!(read, 2_000_000);
}

#[test]
fn stdin_is_granted_back_as_the_process_reads_it() {
    let agent = Agent::start("stdin-credit");
    let mut client = agent.connect();
    client.request(1, &exec(&["cat"]));
    assert!(matches!(client.response(1), Response::Started { .. }));
    client.send(&Frame {
        kind: FrameKind::Stdin,
        session: 1,
        payload: vec![b'x'; 1000],
    });
    let mut granted = 0;
    let mut echoed = 0;
    while granted < cost(1000) || echoed < 1000 {
        let frame = client.frame();
        match frame.kind {
            FrameKind::Credit => granted += frame.credit_amount().expect("a credit amount"),
            FrameKind::Stdout => {
                echoed += frame.payload.len();
                client.send(&Frame::credit(1, cost(frame.payload.len())));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(granted, cost(1000));
    client.send(&Frame {
        kind: FrameKind::Stdin,
        session: 1,
        payload: Vec::new(),
    });
    assert_eq!(client.finish(1).2, code(0));
}

#[test]
fn a_signal_frame_reaches_the_process_group() {
    let agent = Agent::start("signal");
    let mut client = agent.connect();
    // The shell runs its trap after the foreground sleep, whenever the
    // signal lands.
    let script = "trap 'echo caught; exit 130' INT; echo ready; while :; do sleep 1; done";
    client.request(1, &exec(&["sh", "-c", script]));
    assert!(matches!(client.response(1), Response::Started { .. }));
    let ready = client.frame();
    assert_eq!(ready.payload, b"ready\n");
    client.send(&Frame::credit(1, cost(ready.payload.len())));
    client.send(&Frame {
        kind: FrameKind::Signal,
        session: 1,
        payload: vec![nix::sys::signal::Signal::SIGINT as u8],
    });
    let (stdout, _, status) = client.finish(1);
    assert_eq!(stdout, b"caught\n");
    assert_eq!(status, code(130));
}
