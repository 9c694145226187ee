//! A process the agent runs for `exec`: its input (stdin, signals, the
//! credit its output may use) and its output (chunks and the exit), each
//! a side of one session on the link.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use banger_agent::protocol::{Frame, FrameKind, HEADER_LEN, MAX_PAYLOAD, WINDOW, cost};
use tokio::sync::mpsc;

use super::{AgentError, Flow, Inner};

/// A process started by `exec`: its output and exit come on `output`,
/// stdin and signals go on `input` (which may move to a task of its own).
pub struct ExecSession {
    pub pid: u32,
    pub input: ExecInput,
    pub output: ExecOutput,
}

impl ExecSession {
    /// The two sides of a session the agent started as `pid`.
    pub(super) fn new(
        pid: u32,
        session: u32,
        inner: Arc<Inner>,
        frames: mpsc::Receiver<Frame>,
        flow: Arc<Flow>,
    ) -> ExecSession {
        ExecSession {
            pid,
            input: ExecInput {
                session,
                inner: inner.clone(),
                flow: flow.clone(),
            },
            output: ExecOutput {
                session,
                inner,
                frames,
                flow,
                exited: false,
            },
        }
    }
}

/// What the host sends an exec session. Cheap to clone.
#[derive(Clone)]
pub struct ExecInput {
    session: u32,
    inner: Arc<Inner>,
    flow: Arc<Flow>,
}

impl ExecInput {
    /// Sends stdin bytes in frames the agent accepts, each within the
    /// agent's credit: waits while the process is not reading.
    pub async fn stdin(&self, mut bytes: &[u8]) -> Result<(), AgentError> {
        let mut granted = self.flow.granted.subscribe();
        while !bytes.is_empty() {
            let mut most = MAX_PAYLOAD;
            if self.inner.flow_controlled() {
                loop {
                    let credit = u64::from(WINDOW) + *granted.borrow_and_update();
                    let room = credit.saturating_sub(self.flow.spent.load(Ordering::Acquire));
                    if room > HEADER_LEN as u64 {
                        most = most.min((room - HEADER_LEN as u64) as usize);
                        break;
                    }
                    tokio::select! {
                        _ = granted.changed() => {}
                        _ = self.inner.closed.cancelled() => return Err(AgentError::Closed),
                    }
                }
            }
            let (chunk, rest) = bytes.split_at(most.min(bytes.len()));
            self.flow
                .spent
                .fetch_add(u64::from(cost(chunk.len())), Ordering::AcqRel);
            self.inner
                .send(&Frame {
                    kind: FrameKind::Stdin,
                    session: self.session,
                    payload: chunk.to_vec(),
                })
                .await?;
            bytes = rest;
        }
        Ok(())
    }

    /// Closes the process's stdin (an empty stdin frame).
    pub async fn stdin_eof(&self) -> Result<(), AgentError> {
        self.control(FrameKind::Stdin, Vec::new()).await
    }

    /// Delivers `signal` to the process group. A version-1 agent knows only
    /// SIGKILL, so there every signal kills.
    pub async fn signal(&self, signal: nix::sys::signal::Signal) -> Result<(), AgentError> {
        if self.inner.flow_controlled() {
            self.control(FrameKind::Signal, vec![signal as u8]).await
        } else {
            self.kill().await
        }
    }

    /// SIGKILL to the process group; its output is dropped from now on.
    pub async fn kill(&self) -> Result<(), AgentError> {
        self.control(FrameKind::Kill, Vec::new()).await
    }

    async fn control(&self, kind: FrameKind, payload: Vec<u8>) -> Result<(), AgentError> {
        self.inner
            .send(&Frame {
                kind,
                session: self.session,
                payload,
            })
            .await
    }
}

/// What an exec session sends the host: stdout, stderr, then one exit.
pub struct ExecOutput {
    session: u32,
    inner: Arc<Inner>,
    frames: mpsc::Receiver<Frame>,
    flow: Arc<Flow>,
    /// The exit frame came: nothing is left to kill.
    exited: bool,
}

impl ExecOutput {
    /// The next frame; None once the connection ended or this end dropped
    /// the session ([`ExecOutput::dropped`]).
    pub async fn next(&mut self) -> Option<Frame> {
        let frame = self.frames.recv().await?;
        self.exited |= frame.kind == FrameKind::Exit;
        if self.inner.flow_controlled() {
            self.flow
                .queued
                .fetch_sub(u64::from(cost(frame.payload.len())), Ordering::AcqRel);
        }
        Some(frame)
    }

    /// Why this end dropped the session (the agent sent past its window,
    /// or a version-1 session's reader stalled the link), if it did.
    pub fn dropped(&self) -> Option<&'static str> {
        self.flow.dropped.get().copied()
    }

    /// `frame`'s output reached its reader: the agent may send as much
    /// again. Call it once the bytes have left this process, so a reader
    /// that does not read holds the guest's process, not host memory.
    pub async fn delivered(&self, frame: &Frame) -> Result<(), AgentError> {
        if !self.inner.flow_controlled()
            || !matches!(frame.kind, FrameKind::Stdout | FrameKind::Stderr)
        {
            return Ok(());
        }
        let charge = u64::from(cost(frame.payload.len()));
        let _ = self
            .flow
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(charge))
            });
        self.inner
            .send(&Frame::credit(self.session, charge as u32))
            .await
    }
}

impl Drop for ExecOutput {
    /// A session nobody reads any more is killed: without credit its
    /// process would wait on its pipe for good.
    fn drop(&mut self) {
        if self.exited {
            self.inner.forget(self.session);
        } else {
            self.inner
                .drop_session(self.session, &self.flow, "nobody reads the session");
        }
    }
}
