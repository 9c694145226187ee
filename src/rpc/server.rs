//! `RpcServer`: accepts connections on the daemon's Unix socket and runs
//! one session per connection.
//!
//! Concurrency: sessions and requests are tasks on the actor system's
//! runtime. Bounds ([`Limits`], `[rpc]` in bangerd.toml): connections
//! (more are told `unavailable` and closed), requests in flight per
//! connection and in the whole daemon (more are answered `unavailable`,
//! naming the limit), so the unbounded store queue behind them never grows
//! without limit; and a connection that sends no request within a few
//! seconds is closed. A session writes through one bounded
//! channel, so a client that stops reading only slows itself; once it
//! streams, the stream writes to the socket itself, and what it holds is
//! bounded by its flow control (`stream`).

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::access::{AccessPolicy, peer_groups};
use super::daemon::Request as DaemonRequest;
use super::dispatch::{Services, handle, open_stream};
use super::protocol::{
    ErrorCode, MAX_LINE_BYTES, Notification, Response, RpcError, StreamAccepted, StreamInfo,
    WithOpId,
};
use super::request::{Request, parse_line};
use super::stream::{STDIN_WINDOW, follow_log, relay_exec};
use super::vm::Opened;
use super::wire::{Reply, line};
use crate::caller::Caller;
use crate::config::RpcLimits as Limits;
use crate::operations::new_op_id;
use nix::unistd::{Gid, Uid};

/// Lines queued for a client before its requests wait.
const OUTBOX: usize = 256;

/// Open connections by uid (entries go when their count does).
#[derive(Default)]
struct OpenByUid(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// One connection counted against its uid until dropped.
struct UidSlot {
    open: Arc<OpenByUid>,
    uid: u32,
}

impl UidSlot {
    fn take(open: &Arc<OpenByUid>, uid: u32, limit: usize) -> Option<UidSlot> {
        let mut counts = open.0.lock().ok()?;
        let count = counts.entry(uid).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            open: open.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.open.0.lock()
            && let Some(count) = counts.get_mut(&self.uid)
        {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

pub struct RpcServer {
    listener: Arc<UnixListener>,
    socket: PathBuf,
    services: Arc<Services>,
    access: Arc<AccessPolicy>,
    sessions: Arc<Semaphore>,
    limits: Limits,
    /// Requests in flight across every connection.
    in_flight: Arc<Semaphore>,
    accepting: Option<SpawnHandle>,
}

impl RpcServer {
    pub fn new(
        listener: UnixListener,
        socket: PathBuf,
        services: Services,
        access: AccessPolicy,
        limits: Limits,
    ) -> Self {
        RpcServer {
            listener: Arc::new(listener),
            socket,
            services: Arc::new(services),
            access: Arc::new(access),
            sessions: Arc::new(Semaphore::new(limits.connections)),
            in_flight: Arc::new(Semaphore::new(limits.in_flight)),
            limits,
            accepting: None,
        }
    }
}

impl Actor for RpcServer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let listener = self.listener.clone();
        let services = self.services.clone();
        let access = self.access.clone();
        let sessions = self.sessions.clone();
        let (limits, in_flight) = (self.limits, self.in_flight.clone());
        let open_by_uid = Arc::new(OpenByUid::default());
        let accept = async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let permit = sessions.clone().try_acquire_owned().ok();
                        let (services, access) = (services.clone(), access.clone());
                        let (in_flight, open) = (in_flight.clone(), open_by_uid.clone());
                        actix::spawn(async move {
                            match permit {
                                Some(_permit) => {
                                    session(stream, services, access, limits, in_flight, open).await
                                }
                                None => {
                                    let message = format!(
                                        "the daemon has {} connections open, the most rpc.max_connections allows; retry later",
                                        limits.connections
                                    );
                                    refuse(stream, ErrorCode::Unavailable, &message).await
                                }
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: wait for
                        // sessions to end rather than spin.
                        warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        self.accepting = Some(ctx.spawn(accept.into_actor(self)));
    }
}

impl Supervised for RpcServer {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("rpc server restarting");
        self.accepting = None;
    }
}

/// Shutdown: stop accepting and remove the socket; sessions already open
/// keep being served until the daemon exits.
pub struct StopAccepting;

impl Message for StopAccepting {
    type Result = ();
}

impl Handler<StopAccepting> for RpcServer {
    type Result = ();

    fn handle(&mut self, _: StopAccepting, ctx: &mut Context<Self>) {
        if let Some(handle) = self.accepting.take() {
            ctx.cancel_future(handle);
        }
        match std::fs::remove_file(&self.socket) {
            Ok(()) => info!(socket = %self.socket.display(), "removed the socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(socket = %self.socket.display(), error = %e, "cannot remove the socket")
            }
        }
    }
}

async fn refuse(mut stream: UnixStream, code: ErrorCode, message: &str) {
    let response = Response::failure(Value::Null, &RpcError::new(code, message), None);
    let _ = stream.write_all(&line(&response)).await;
    let _ = stream.shutdown().await;
}

/// Waits for a request's answer, telling the client every `heartbeat`
/// meanwhile that the daemon lives (the client gives up on silence).
async fn with_heartbeats<T>(
    work: impl Future<Output = T>,
    heartbeat: Option<Duration>,
    id: &Value,
    out: &mpsc::Sender<Vec<u8>>,
) -> T {
    let Some(every) = heartbeat else {
        return work.await;
    };
    tokio::pin!(work);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticks.tick() => {
                let _ = out.send(line(&Notification::heartbeat(id))).await;
            }
        }
    }
}

async fn session(
    stream: UnixStream,
    services: Arc<Services>,
    access: Arc<AccessPolicy>,
    limits: Limits,
    daemon_in_flight: Arc<Semaphore>,
    open_by_uid: Arc<OpenByUid>,
) {
    let peer = match stream.peer_cred() {
        Ok(peer) => peer,
        Err(e) => {
            warn!(error = %e, "cannot read a client's credentials; closing");
            return;
        }
    };
    let uid = Uid::from_raw(peer.uid());
    let gid = Gid::from_raw(peer.gid());
    let groups = peer_groups(&stream).unwrap_or_else(|e| {
        warn!(uid = peer.uid(), error = %e, "cannot read a client's groups; taking none");
        Vec::new()
    });
    if !access.admits(uid, gid, &groups) {
        warn!(uid = peer.uid(), gid = peer.gid(), pid = ?peer.pid(), "refused a client that is not root, the owner or in the socket group");
        let message = format!(
            "uid {} may not use this daemon; ask an administrator to add you to the banger group",
            peer.uid()
        );
        refuse(stream, ErrorCode::PermissionDenied, &message).await;
        return;
    }
    let Some(_slot) = UidSlot::take(&open_by_uid, peer.uid(), limits.connections_per_uid) else {
        let message = format!(
            "uid {} has {} connections open, the most rpc.max_connections_per_uid allows; close some and retry",
            peer.uid(),
            limits.connections_per_uid
        );
        refuse(stream, ErrorCode::Unavailable, &message).await;
        return;
    };
    debug!(uid = peer.uid(), pid = ?peer.pid(), "client connected");
    let caller = Caller {
        uid,
        gid,
        groups: groups.into(),
    };
    // Set by the client's hello: whether, and how often, it hears them.
    let mut heartbeat: Option<Duration> = None;

    let (read, mut write) = stream.into_split();
    let (out, mut outbox) = mpsc::channel::<Vec<u8>>(OUTBOX);
    // Hands the socket back once the outbox closes, for a stream to use.
    let writer = actix::spawn(async move {
        while let Some(bytes) = outbox.recv().await {
            if write.write_all(&bytes).await.is_err() {
                break;
            }
        }
        write
    });
    let closed = CancellationToken::new();
    let per_connection = limits.in_flight_per_connection;
    let in_flight = Arc::new(Semaphore::new(per_connection));
    let codec =
        AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE_BYTES);
    let mut lines = FramedRead::new(read, codec);

    // An idle connection may not hold a slot for long.
    let first = tokio::time::timeout(limits.first_request, lines.next()).await;
    let mut pending = match first {
        Ok(first) => first,
        Err(_) => {
            debug!(uid = peer.uid(), "no request in time; closing");
            let error = RpcError::new(
                ErrorCode::Unavailable,
                format!(
                    "no request within {}s of connecting (rpc.first_request_secs); closing",
                    limits.first_request.as_secs_f64()
                ),
            );
            let _ = out
                .send(line(&Response::failure(Value::Null, &error, None)))
                .await;
            drop(out);
            let _ = writer.await;
            return;
        }
    };
    while let Some(next) = match pending.take() {
        Some(first) => Some(first),
        None => lines.next().await,
    } {
        let bytes = match next {
            Ok(bytes) => bytes,
            Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => {
                let error = RpcError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "request line longer than {MAX_LINE_BYTES} bytes; closing the connection"
                    ),
                );
                let _ = out
                    .send(line(&Response::failure(Value::Null, &error, None)))
                    .await;
                break;
            }
            Err(e) => {
                debug!(error = %e, "client connection failed");
                break;
            }
        };
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(&bytes);
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let op_id = new_op_id();
        let call = match parse_line(bytes) {
            Ok(call) => call,
            Err((id, error)) => {
                debug!(op_id = %op_id, error = %error, "bad request");
                let _ = out
                    .send(line(&Response::failure(id, &error, Some(&op_id))))
                    .await;
                continue;
            }
        };
        if let Request::Daemon(DaemonRequest::Hello(hello)) = &call.request {
            heartbeat = hello.heartbeats.then_some(limits.heartbeat);
        }
        if call.request.is_streaming() {
            // The connection becomes a byte stream: nothing else may be on it.
            if in_flight.available_permits() != per_connection {
                let error = RpcError::new(
                    ErrorCode::Conflict,
                    "a streaming request needs a connection of its own; other requests are in flight on this one",
                );
                let _ = out
                    .send(line(&Response::failure(call.id, &error, Some(&op_id))))
                    .await;
                continue;
            }
            // Opening may wait for a booting guest's agent (`--wait`).
            let opening = open_stream(&services, call.request);
            match with_heartbeats(opening, heartbeat, &call.id, &out).await {
                Ok(opened) => {
                    let stdin_window = matches!(opened, Opened::Exec(_)).then_some(STDIN_WINDOW);
                    let accepted = WithOpId {
                        op_id: op_id.clone(),
                        result: StreamAccepted {
                            stream: StreamInfo {
                                version: 2,
                                stdin_window,
                            },
                        },
                    };
                    let result = serde_json::value::to_raw_value(&accepted)
                        .unwrap_or_else(|_| RawValue::NULL.to_owned());
                    let _ = out.send(line(&Response::success(call.id, result))).await;
                    closed.cancel();
                    // Nothing else writes now: the stream takes the socket.
                    drop(out);
                    let Ok(write) = writer.await else {
                        return;
                    };
                    match opened {
                        Opened::Logs(follow) => {
                            let client_gone = async { while lines.next().await.is_some() {} };
                            follow_log(follow, write, client_gone, heartbeat).await;
                        }
                        Opened::Exec(session) => {
                            // Frames the client sent right behind its request
                            // are in the line reader's buffer: read them first.
                            let parts = lines.into_parts();
                            let client = std::io::Cursor::new(parts.read_buf).chain(parts.io);
                            relay_exec(session, client, write, heartbeat).await;
                        }
                    }
                    return;
                }
                Err(error) => {
                    let _ = out
                        .send(line(&Response::failure(call.id, &error, Some(&op_id))))
                        .await;
                    continue;
                }
            }
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            let error = RpcError::new(
                ErrorCode::Unavailable,
                format!(
                    "more than {per_connection} requests in flight on this connection (rpc.max_in_flight_per_connection); wait for answers"
                ),
            );
            let _ = out
                .send(line(&Response::failure(call.id, &error, Some(&op_id))))
                .await;
            continue;
        };
        let Ok(daemon_permit) = daemon_in_flight.clone().try_acquire_owned() else {
            let error = RpcError::new(
                ErrorCode::Unavailable,
                format!(
                    "more than {} requests in flight in the daemon (rpc.max_in_flight); retry shortly",
                    limits.in_flight
                ),
            );
            let _ = out
                .send(line(&Response::failure(call.id, &error, Some(&op_id))))
                .await;
            continue;
        };
        let (services, out, closed) = (services.clone(), out.clone(), closed.clone());
        let caller = caller.clone();
        let span = info_span!("request", op_id = %op_id, method = call.request.method());
        actix::spawn(
            async move {
                let reply = Reply {
                    caller,
                    id: &call.id,
                    op_id: &op_id,
                    out: &out,
                    closed: &closed,
                };
                let handled = handle(&services, call.request, &reply);
                let response = match with_heartbeats(handled, heartbeat, &call.id, &out).await {
                    Ok(result) => Response::success(call.id.clone(), result),
                    Err(error) => {
                        debug!(error = %error, "request failed");
                        Response::failure(call.id.clone(), &error, Some(&op_id))
                    }
                };
                let _ = out.send(line(&response)).await;
                drop((permit, daemon_permit));
            }
            .instrument(span),
        );
    }
    closed.cancel();
    drop(out);
    let _ = writer.await;
}
