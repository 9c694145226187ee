//! The host's agent link against the real banger-agent, serving on a Unix
//! socket (`--listen`), no VM needed: hello, ping, exec with streamed
//! stdio and exit codes, concurrent sessions on one stream, refusals that
//! end one session and not the agent, and a stream that starts mid-frame.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use banger::guest::link::{AgentError, AgentLink, ExecSession};
use banger::vm::record::AgentEndpoint;
use banger_agent::protocol::{
    self, ExecRequest, ExitStatus, Frame, FrameKind, Request, Response, ShutdownAction,
};

struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(test: &str) -> Option<Agent> {
    let Some(binary) = std::env::var_os("BANGER_TEST_AGENT").map(PathBuf::from) else {
        common::skip(
            test,
            "BANGER_TEST_AGENT is not set (scripts/test.sh builds the static agent)",
        );
        return None;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let child = Command::new(binary)
        .arg("--listen")
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn banger-agent --listen");
    // The socket appears once the agent listens; connecting retries.
    Some(Agent {
        child,
        socket,
        _dir: dir,
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn connect(socket: &Path) -> AgentLink {
    let (events, _) = tokio::sync::watch::channel(None);
    tokio::time::timeout(
        Duration::from_secs(10),
        AgentLink::connect(
            &AgentEndpoint::Serial {
                socket: socket.to_path_buf(),
            },
            events,
        ),
    )
    .await
    .expect("hello in time")
    .expect("connect")
}

fn exec_request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("GREETING".into(), "hello".into())],
        cwd: Some("/tmp".into()),
        pty: false,
    }
}

/// Everything a session sends until its exit.
async fn collect(mut session: ExecSession) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(frame) = session.output.next().await {
        session.output.delivered(&frame).await.expect("credit");
        match frame.kind {
            FrameKind::Stdout => out.extend(frame.payload),
            FrameKind::Stderr => err.extend(frame.payload),
            FrameKind::Exit => return (out, err, frame.parse().expect("exit status")),
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the session ended without an exit frame")
}

#[test]
fn hello_ping_and_exec_with_streamed_stdio_and_exit_codes() {
    let Some(agent) = agent("hello_ping_and_exec_with_streamed_stdio_and_exit_codes") else {
        return;
    };
    runtime().block_on(async {
        let link = connect(&agent.socket).await;
        let hello = link.hello();
        assert!(!hello.kernel.is_empty());
        assert_eq!(hello.boot.stage1_ms, None);
        link.ping().await.expect("ping");
        // This host's own sockets and keys: the answers' shape is the point.
        assert!(matches!(
            link.request(&Request::Ports).await,
            Ok(Response::Ports { .. })
        ));
        assert!(matches!(
            link.request(&Request::HostKeys).await,
            Ok(Response::HostKeys { .. })
        ));

        let session = link
            .exec(exec_request(&[
                "sh",
                "-c",
                "echo $GREETING from $(pwd); echo err >&2; exit 7",
            ]))
            .await
            .expect("exec");
        let (out, err, status) = collect(session).await;
        assert_eq!(String::from_utf8_lossy(&out), "hello from /tmp\n");
        assert_eq!(String::from_utf8_lossy(&err), "err\n");
        assert_eq!(status.code, Some(7));

        let cat = link.exec(exec_request(&["cat"])).await.expect("cat");
        let big = vec![b'x'; 200_000];
        cat.input.stdin(&big).await.expect("stdin");
        cat.input.stdin(b"\nend\n").await.expect("stdin");
        cat.input.stdin_eof().await.expect("eof");
        let (out, _, status) = collect(cat).await;
        assert_eq!(out.len(), big.len() + 5);
        assert_eq!(status.code, Some(0));

        let sleeper = link
            .exec(exec_request(&["sleep", "60"]))
            .await
            .expect("sleep");
        sleeper.input.kill().await.expect("kill");
        let (_, _, status) = collect(sleeper).await;
        assert_eq!(status.signal, Some(9));

        match link.exec(exec_request(&["/no/such/program"])).await {
            Err(AgentError::Refused(message)) => assert!(message.contains("/no/such/program")),
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(_) => panic!("expected a refusal, got a session"),
        }
        assert!(matches!(
            link.shutdown(ShutdownAction::Poweroff).await,
            Err(AgentError::Refused(_))
        ));
        link.ping().await.expect("still answering");
    });
}

#[test]
fn a_pty_session_gets_a_controlling_terminal_and_its_end_of_input() {
    let Some(agent) = agent("a_pty_session_gets_a_controlling_terminal_and_its_end_of_input")
    else {
        return;
    };
    runtime().block_on(async {
        let link = connect(&agent.socket).await;
        let mut request = exec_request(&["sh", "-c", "tty; test -t 0 && echo interactive; cat"]);
        request.pty = true;
        let session = link.exec(request).await.expect("exec on a pty");
        session.input.stdin(b"typed\n").await.expect("stdin");
        session.input.stdin_eof().await.expect("eof");
        let (out, err, status) = collect(session).await;
        let out = String::from_utf8_lossy(&out);
        // The terminal echoes what was typed, wherever it lands.
        assert!(out.contains("/dev/pts/"), "{out}");
        assert!(out.contains("interactive"), "{out}");
        assert!(out.contains("typed"), "{out}");
        assert!(err.is_empty(), "a terminal has one output stream");
        assert_eq!(status.code, Some(0));
    });
}

#[test]
fn twenty_sessions_share_one_stream() {
    let Some(agent) = agent("twenty_sessions_share_one_stream") else {
        return;
    };
    runtime().block_on(async {
        let link = connect(&agent.socket).await;
        let mut sessions = Vec::new();
        for i in 0..20 {
            let script = format!("for n in 1 2 3; do echo {i}-$n; done; exit {i}");
            sessions.push(
                link.exec(exec_request(&["sh", "-c", &script]))
                    .await
                    .expect("exec"),
            );
        }
        for (i, session) in sessions.into_iter().enumerate() {
            let (out, _, status) = collect(session).await;
            assert_eq!(
                String::from_utf8_lossy(&out),
                format!("{i}-1\n{i}-2\n{i}-3\n")
            );
            assert_eq!(status.code, Some(i as i32));
        }
    });
}

#[test]
fn a_malformed_request_ends_its_session_and_bad_framing_only_its_connection() {
    let Some(agent) =
        agent("a_malformed_request_ends_its_session_and_bad_framing_only_its_connection")
    else {
        return;
    };
    let mut stream = loop {
        match UnixStream::connect(&agent.socket) {
            Ok(stream) => break stream,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let bad = Frame {
        kind: FrameKind::Request,
        session: 5,
        payload: b"{\"type\":\"exec\",\"argv\":".to_vec(),
    };
    protocol::write_frame(&mut stream, &bad).expect("write");
    let answer = protocol::read_frame(&mut stream)
        .expect("read")
        .expect("an answer");
    assert_eq!(answer.session, 5);
    assert!(matches!(
        answer.parse::<Response>().expect("json"),
        Response::Error { .. }
    ));
    protocol::write_frame(
        &mut stream,
        &Frame::json(FrameKind::Request, 6, &Request::Ping),
    )
    .expect("write");
    let pong = protocol::read_frame(&mut stream)
        .expect("read")
        .expect("pong");
    assert_eq!(pong.parse::<Response>().expect("json"), Response::Pong);
    // Bad magic: this connection ends, the agent does not.
    stream.write_all(b"GARBAGE!!!").expect("write");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    runtime().block_on(async {
        connect(&agent.socket)
            .await
            .ping()
            .await
            .expect("a new connection works");
    });
}

#[test]
fn a_stream_that_starts_mid_frame_is_resynchronised_by_the_hello() {
    let Some(agent) = agent("a_stream_that_starts_mid_frame_is_resynchronised_by_the_hello") else {
        return;
    };
    // A relay that puts the tail of an older frame ahead of the agent's
    // bytes, as a serial port can after a daemon restart.
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = dir.path().join("relay.sock");
    let listener = UnixListener::bind(&relay).expect("bind");
    let upstream = agent.socket.clone();
    std::thread::spawn(move || {
        let (mut host, _) = listener.accept().expect("accept");
        let mut guest = loop {
            match UnixStream::connect(&upstream) {
                Ok(stream) => break stream,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let stale = Frame::json(FrameKind::Stdout, 9, &"old output").encode();
        host.write_all(&stale[3..]).expect("stale bytes");
        let (mut host_in, mut guest_out) = (
            host.try_clone().expect("clone"),
            guest.try_clone().expect("clone"),
        );
        std::thread::spawn(move || std::io::copy(&mut host_in, &mut guest_out));
        let _ = std::io::copy(&mut guest, &mut host);
    });
    runtime().block_on(async {
        let link = connect(&relay).await;
        link.ping().await.expect("ping through the relay");
    });
}

#[test]
fn firecrackers_hybrid_vsock_handshake_is_retried_until_the_guest_listens() {
    let Some(agent) =
        agent("firecrackers_hybrid_vsock_handshake_is_retried_until_the_guest_listens")
    else {
        return;
    };
    // Firecracker's side of a hybrid vsock: `CONNECT <port>\n`, answered
    // `OK <n>\n` once the guest listens; closed before that.
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("agent.vsock");
    let listener = UnixListener::bind(&uds).expect("bind");
    let upstream = agent.socket.clone();
    let handshakes = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for attempt in 0.. {
            let (mut host, _) = listener.accept().expect("accept");
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while host.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            requests.push(String::from_utf8_lossy(&line).into_owned());
            if attempt < 2 {
                continue; // not listening yet: the connection closes
            }
            host.write_all(b"OK 1073741824\n").expect("ok");
            let mut guest = loop {
                match UnixStream::connect(&upstream) {
                    Ok(stream) => break stream,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            let (mut host_in, mut guest_out) = (
                host.try_clone().expect("clone"),
                guest.try_clone().expect("clone"),
            );
            std::thread::spawn(move || std::io::copy(&mut host_in, &mut guest_out));
            std::thread::spawn(move || std::io::copy(&mut guest, &mut host));
            return requests;
        }
        requests
    });
    runtime().block_on(async {
        let (events, _) = tokio::sync::watch::channel(None);
        let link = tokio::time::timeout(
            Duration::from_secs(10),
            AgentLink::connect(
                &AgentEndpoint::Vsock {
                    socket: uds.clone(),
                    port: protocol::VSOCK_PORT,
                },
                events,
            ),
        )
        .await
        .expect("connected in time")
        .expect("connect");
        link.ping().await.expect("ping over the vsock");
    });
    let requests = handshakes.join().expect("handshake thread");
    assert_eq!(requests, ["CONNECT 1024"; 3]);
}

/// A hand-written agent on a Unix socket, for what the real one never
/// does: it answers the hello with `version`, then runs `script` on the
/// stream.
fn fake_agent(
    version: u32,
    script: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let serving = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let hello = protocol::read_frame(&mut stream)
            .expect("read")
            .expect("a hello");
        let answer = Response::Hello {
            version,
            agent_version: "fake".into(),
            kernel: "fake".into(),
            hostname: "fake".into(),
            boot: protocol::BootTimes {
                stage1_ms: None,
                stage2_ms: 0,
                ready_ms: 0,
            },
        };
        protocol::write_frame(
            &mut stream,
            &Frame::json(FrameKind::Response, hello.session, &answer),
        )
        .expect("answer the hello");
        script(&mut stream);
    });
    (dir, socket, serving)
}

/// Reads frames until a request; answers its session.
fn next_request(stream: &mut UnixStream) -> (u32, Request) {
    loop {
        let frame = protocol::read_frame(stream)
            .expect("read")
            .expect("a frame");
        if frame.kind == FrameKind::Request {
            return (frame.session, frame.parse().expect("a request"));
        }
    }
}

fn respond(stream: &mut UnixStream, session: u32, response: &Response) {
    protocol::write_frame(stream, &Frame::json(FrameKind::Response, session, response))
        .expect("respond");
}

#[test]
fn an_agent_that_overruns_its_window_loses_the_session_not_the_link() {
    let (_dir, socket, serving) = fake_agent(protocol::PROTOCOL_VERSION, |stream| {
        let (exec, _) = next_request(stream);
        respond(stream, exec, &Response::Started { pid: 1 });
        // 100 full frames, 6.4 MB, with no credit asked for.
        let chunk = Frame {
            kind: FrameKind::Stdout,
            session: exec,
            payload: vec![b'x'; protocol::MAX_PAYLOAD],
        };
        for _ in 0..100 {
            protocol::write_frame(stream, &chunk).expect("flood");
        }
        // The host answers the overrun with a kill; pings go on.
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let (mut killed, mut answered) = (false, false);
        while !(killed && answered) {
            let frame = protocol::read_frame(stream)
                .expect("read")
                .expect("a frame");
            match frame.kind {
                FrameKind::Kill => {
                    assert_eq!(frame.session, exec);
                    killed = true;
                }
                FrameKind::Request => {
                    respond(stream, frame.session, &Response::Pong);
                    answered = true;
                }
                _ => {}
            }
        }
    });
    runtime().block_on(async {
        let link = connect(&socket).await;
        let mut session = link.exec(exec_request(&["flood"])).await.expect("exec");
        link.ping().await.expect("the link answers after the flood");
        let mut taken = 0;
        while let Some(frame) = session.output.next().await {
            taken += frame.payload.len();
        }
        assert!(
            session
                .output
                .dropped()
                .is_some_and(|why| why.contains("window")),
            "the session ended for overrunning"
        );
        assert!(
            taken <= protocol::WINDOW as usize + 2 * protocol::MAX_PAYLOAD,
            "{taken} bytes queued past the window"
        );
    });
    serving.join().expect("fake agent");
}

#[test]
fn a_guest_that_floods_events_and_stray_frames_grows_nothing() {
    const FLOOD: usize = 200_000;
    let (_dir, socket, serving) = fake_agent(protocol::PROTOCOL_VERSION, |stream| {
        let mut out = std::io::BufWriter::new(stream.try_clone().expect("clone"));
        let event = Frame::json(
            FrameKind::Event,
            protocol::EVENT_SESSION,
            &protocol::Event::Shutdown {
                action: ShutdownAction::Reboot,
                main_exit: None,
            },
        );
        let stray = Frame {
            kind: FrameKind::Stdout,
            session: 999,
            payload: vec![b'z'; 200],
        };
        for _ in 0..FLOOD {
            protocol::write_frame(&mut out, &event).expect("event");
            protocol::write_frame(&mut out, &stray).expect("stray");
        }
        out.flush().expect("flush");
        let (ping, _) = next_request(stream);
        respond(stream, ping, &Response::Pong);
    });
    runtime().block_on(async {
        let (events, heard) = tokio::sync::watch::channel(None);
        let baseline = common::reset_peak_rss("self");
        let link = tokio::time::timeout(
            Duration::from_secs(10),
            AgentLink::connect(
                &AgentEndpoint::Serial {
                    socket: socket.clone(),
                },
                events,
            ),
        )
        .await
        .expect("hello in time")
        .expect("connect");
        // The pong comes after the whole flood on the stream.
        link.ping().await.expect("ping after the flood");
        let grown = common::process_kib("self", "VmHWM").saturating_sub(baseline);
        eprintln!("figure: {FLOOD} events and {FLOOD} stray frames: peak RSS +{grown} KiB");
        assert!(grown <= 16 * 1024, "the flood grew the host by {grown} KiB");
        // One slot holds the latest announcement.
        assert_eq!(
            heard.borrow().map(|heard| heard.action),
            Some(ShutdownAction::Reboot)
        );
    });
    serving.join().expect("fake agent");
}

#[test]
fn a_version_1_agent_gets_no_credit_and_signals_become_kills() {
    let (_dir, socket, serving) = fake_agent(1, |stream| {
        let (exec, _) = next_request(stream);
        respond(stream, exec, &Response::Started { pid: 1 });
        let frame = protocol::read_frame(stream)
            .expect("read")
            .expect("a frame");
        assert_eq!(
            (frame.kind, frame.session),
            (FrameKind::Kill, exec),
            "a signal reaches a version-1 agent as a kill"
        );
        let out = Frame {
            kind: FrameKind::Stdout,
            session: exec,
            payload: b"bye".to_vec(),
        };
        protocol::write_frame(stream, &out).expect("output");
        let exit = ExitStatus {
            code: None,
            signal: Some(9),
        };
        protocol::write_frame(stream, &Frame::json(FrameKind::Exit, exec, &exit)).expect("exit");
        // No credit frame comes for the output: the next is the ping.
        let ping = protocol::read_frame(stream)
            .expect("read")
            .expect("a frame");
        assert_eq!(ping.kind, FrameKind::Request, "{ping:?}");
        assert_eq!(ping.parse::<Request>().expect("request"), Request::Ping);
        respond(stream, ping.session, &Response::Pong);
    });
    runtime().block_on(async {
        let link = connect(&socket).await;
        assert_eq!(link.hello().protocol, 1);
        let session = link.exec(exec_request(&["sleep"])).await.expect("exec");
        session
            .input
            .signal(nix::sys::signal::Signal::SIGINT)
            .await
            .expect("signal");
        let (out, _, status) = collect(session).await;
        assert_eq!(out, b"bye");
        assert_eq!(status.signal, Some(9));
        link.ping().await.expect("ping");
    });
    serving.join().expect("fake agent");
}
