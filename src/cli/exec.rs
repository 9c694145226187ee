//! The byte streams of `vm exec` and `vm logs --follow`: stdin in frames
//! within the daemon's window, signals passed to the guest process, output
//! and exit status back.

use super::*;

/// The failure an error frame ends a stream with.
fn stream_error(payload: &[u8]) -> Failure {
    let message = serde_json::from_slice::<ErrorObject>(payload)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned());
    Failure::Daemon(message)
}

/// banger's own failure in `vm exec`, as docker and podman report theirs.
pub(super) const EXEC_FAILED: u8 = 125;

/// How much stdin the daemon still takes (None: an older daemon that sets
/// no window). The stdin thread waits on it; the frame reader grants.
struct StdinCredit {
    available: Mutex<Option<u64>>,
    granted: Condvar,
}

impl StdinCredit {
    /// Waits for some credit; answers how much (`u64::MAX` with no window).
    fn wait(&self) -> u64 {
        let available = self.available.lock().unwrap_or_else(|p| p.into_inner());
        let available = self
            .granted
            .wait_while(available, |a| *a == Some(0))
            .unwrap_or_else(|p| p.into_inner());
        available.unwrap_or(u64::MAX)
    }

    fn spend(&self, n: usize) {
        if let Some(a) = self
            .available
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            *a = a.saturating_sub(n as u64);
        }
    }

    fn grant(&self, n: u32) {
        if let Some(a) = self
            .available
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            *a += u64::from(n);
        }
        self.granted.notify_all();
    }
}

/// The signals `vm exec` hands to the guest process rather than dying of.
fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Runs a command in a VM: stdin goes to it in frames from a thread of its
/// own, within the daemon's window; SIGINT, SIGTERM and SIGHUP go to the
/// guest process from another; its output comes back until the exit frame.
pub(super) fn exec(
    client: Client,
    name: &str,
    env: &[String],
    workdir: Option<String>,
    wait: f64,
    command: Vec<String>,
) -> Result<(), Failure> {
    let mut variables = serde_json::Map::new();
    for pair in env {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(Failure::Daemon(format!("--env {pair:?} is not K=V")));
        };
        variables.insert(key.to_string(), json!(value));
    }
    let params =
        json!({"name": name, "argv": command, "env": variables, "cwd": workdir, "wait_secs": wait});
    // Blocked before any thread starts, so every thread inherits it and
    // only the forwarding thread takes these signals. Until the process
    // runs, a signal ends banger as it would have without the blocking.
    let signals = forwarded_signals();
    signals
        .thread_block()
        .map_err(|e| Failure::Daemon(format!("cannot block signals: {e}")))?;
    let stream_writer: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    {
        let writer = stream_writer.clone();
        std::thread::spawn(move || {
            while let Ok(signal) = signals.wait() {
                let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
                let Some(writer) = writer.as_mut() else {
                    std::process::exit(128 + signal as i32);
                };
                let frame = stream::frame(stream::SIGNAL, &[signal as u8]);
                if writer.write_all(&frame).is_err() {
                    return;
                }
            }
        });
    }
    let Stream {
        info,
        reader: mut frames,
        writer,
        silence,
    } = client.stream("vm.exec", params)?;
    let writer = {
        let mut slot = stream_writer.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(writer);
        stream_writer.clone()
    };
    let credit = Arc::new(StdinCredit {
        available: Mutex::new(info.stdin_window.map(u64::from)),
        granted: Condvar::new(),
    });
    {
        let (writer, credit) = (writer.clone(), credit.clone());
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let most = usize::try_from(credit.wait())
                    .unwrap_or(usize::MAX)
                    .min(buffer.len());
                let read = std::io::Read::read(&mut stdin, &mut buffer[..most]);
                let frame = match read {
                    Ok(0) | Err(_) => stream::frame(stream::STDIN_EOF, &[]),
                    Ok(n) => {
                        credit.spend(n);
                        stream::frame(stream::STDIN, &buffer[..n])
                    }
                };
                let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
                let Some(writer) = writer.as_mut() else {
                    return;
                };
                if writer.write_all(&frame).is_err() || matches!(read, Ok(0) | Err(_)) {
                    return;
                }
            }
        });
    }
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    loop {
        let frame = stream::read_frame(&mut frames).map_err(|e| match silence.error(e) {
            ClientError::Io(e) => Failure::Daemon(format!("the exec stream broke: {e}")),
            silent => Failure::from(silent),
        })?;
        let Some(frame) = frame else {
            return Err(Failure::Daemon(
                "bangerd ended the exec stream without an exit status".into(),
            ));
        };
        match frame.kind {
            stream::STDOUT => {
                let written = stdout
                    .write_all(&frame.payload)
                    .and_then(|()| stdout.flush());
                // Whoever read our output is gone: end as a pipeline's
                // writer does (128 + SIGPIPE); the daemon hangs the process up.
                if written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
                    return Err(Failure::Status(128 + Signal::SIGPIPE as u8));
                }
            }
            stream::STDERR => {
                let _ = stderr
                    .write_all(&frame.payload)
                    .and_then(|()| stderr.flush());
            }
            stream::CREDIT => {
                if let Ok(grant) = <[u8; 4]>::try_from(frame.payload.as_slice()) {
                    credit.grant(u32::from_be_bytes(grant));
                }
            }
            stream::EXIT => {
                let status: banger_agent::protocol::ExitStatus =
                    serde_json::from_slice(&frame.payload).map_err(|e| {
                        Failure::Daemon(format!("bad exit status from bangerd: {e}"))
                    })?;
                // A signal reads as 128 + its number, as in a shell.
                let code = match (status.code, status.signal) {
                    (Some(code), _) => code,
                    (None, Some(signal)) => 128 + signal,
                    (None, None) => i32::from(EXEC_FAILED),
                };
                return match u8::try_from(code) {
                    Ok(0) => Ok(()),
                    Ok(code) => Err(Failure::Status(code)),
                    Err(_) => Err(Failure::Status(EXEC_FAILED)),
                };
            }
            stream::ERROR => {
                return Err(stream_error(&frame.payload));
            }
            _ => {}
        }
    }
}

/// Copies the console stream to stdout until the daemon ends it.
pub(super) fn follow_logs(client: Client, name: &str, tail: Option<usize>) -> Result<(), Failure> {
    let Stream {
        reader: mut frames,
        silence,
        ..
    } = client.stream(
        "vm.logs",
        json!({"name": name, "tail": tail, "follow": true}),
    )?;
    let mut stdout = std::io::stdout();
    loop {
        let frame = stream::read_frame(&mut frames).map_err(|e| match silence.error(e) {
            ClientError::Io(e) => Failure::Daemon(format!("the log stream broke: {e}")),
            silent => Failure::from(silent),
        })?;
        match frame {
            None => return Ok(()),
            Some(frame) if frame.kind == stream::STDOUT => {
                stdout
                    .write_all(&frame.payload)
                    .and_then(|()| stdout.flush())
                    .map_err(|e| Failure::Daemon(format!("cannot write to stdout: {e}")))?;
            }
            Some(frame) if frame.kind == stream::ERROR => {
                return Err(stream_error(&frame.payload));
            }
            Some(_) => {}
        }
    }
}
