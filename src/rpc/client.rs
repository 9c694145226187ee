//! A blocking client for the daemon's socket, used by the CLI, by
//! `bangerd --check-migrations` (the online probe) and by tests. One
//! request at a time; `progress` notifications go to a callback. It asks
//! for heartbeats and gives up on a daemon silent for [`SILENCE_BEATS`] of
//! them, in calls and on byte streams alike.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::daemon::{HelloParams, HelloResult};
use super::protocol::{
    ErrorCode, Incoming, PROTOCOL_VERSION, Progress, RpcError, StreamAccepted, StreamInfo, WithOpId,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach bangerd at {socket}; start it (`bangerd`, or `systemctl start bangerd`) or name its socket with --socket or BANGER_SOCKET"
    )]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "bangerd at {socket} accepted the connection but did not answer within {:.1}s; is it stopped or overloaded?",
        after.as_secs_f64()
    )]
    NotAnswering { socket: PathBuf, after: Duration },
    #[error("the connection to bangerd failed")]
    Io(#[from] io::Error),
    #[error("bangerd sent something this client does not understand: {0}")]
    Protocol(String),
    #[error("{error}")]
    Rpc {
        error: RpcError,
        op_id: Option<String>,
    },
}

impl ClientError {
    /// Whether the daemon answered with this error code.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Rpc { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

/// How long the daemon may take to answer the hello: a daemon that takes
/// longer (stopped, wedged) is reported instead of waited for forever.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Heartbeats missed in a row before the daemon counts as not answering.
pub const SILENCE_BEATS: u32 = 3;

/// An accepted byte stream (`Client::stream`).
pub struct Stream {
    pub info: StreamInfo,
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
    pub silence: Silence,
}

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    pub daemon_version: String,
    silence: Silence,
}

/// How long the daemon may stay silent on a connection (no limit: it sends
/// no heartbeats), and what a read that waited longer means.
#[derive(Debug, Clone)]
pub struct Silence {
    socket: PathBuf,
    pub limit: Option<Duration>,
}

impl Silence {
    /// A read that timed out: the daemon stopped answering.
    pub fn error(&self, e: io::Error) -> ClientError {
        match (e.kind(), self.limit) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(after)) => {
                ClientError::NotAnswering {
                    socket: self.socket.clone(),
                    after,
                }
            }
            _ => ClientError::Io(e),
        }
    }
}

impl Client {
    /// Connects and says hello, waiting at most [`HELLO_TIMEOUT`] for the
    /// answer; fails if the daemon speaks another protocol.
    pub fn connect(socket: &Path) -> Result<Client, ClientError> {
        Client::connect_within(socket, HELLO_TIMEOUT)
    }

    /// Connects and says hello, waiting at most `timeout` for the answer.
    /// Later calls wait as long as their request takes.
    pub fn connect_within(socket: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
            socket: socket.to_path_buf(),
            source,
        })?;
        let mut client = Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: 1,
            daemon_version: String::new(),
            silence: Silence {
                socket: socket.to_path_buf(),
                limit: Some(timeout),
            },
        };
        let hello = HelloParams {
            protocol_version: PROTOCOL_VERSION,
            client_version: Some(env!("CARGO_PKG_VERSION").into()),
            heartbeats: true,
        };
        client.writer.set_read_timeout(Some(timeout))?;
        let hello: WithOpId<HelloResult> = client.call("daemon.hello", json!(hello))?;
        // The socket's timeout holds for its byte stream too.
        client.silence.limit = hello
            .result
            .heartbeat_secs
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| Duration::from_secs_f64(s) * SILENCE_BEATS);
        client.writer.set_read_timeout(client.silence.limit)?;
        client.daemon_version = hello.result.daemon_version;
        Ok(client)
    }

    /// Sends a streaming request; once accepted, the connection carries
    /// frames (see `rpc::stream`) both ways: this answers what the daemon
    /// said of the stream, its reader (whose reads time out past the
    /// silence limit: `Silence::error` says so), its writer and that limit.
    pub fn stream(mut self, method: &str, params: Value) -> Result<Stream, ClientError> {
        let accepted = self.call::<StreamAccepted>(method, params)?;
        Ok(Stream {
            info: accepted.result.stream,
            reader: self.reader,
            writer: self.writer,
            silence: self.silence,
        })
    }

    pub fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<WithOpId<T>, ClientError> {
        self.call_with_progress(method, params, |_| {})
    }

    /// Sends one request and reads until its response, handing each
    /// `progress` notification to `on_progress`.
    pub fn call_with_progress<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: Value,
        on_progress: impl FnMut(&Progress),
    ) -> Result<WithOpId<T>, ClientError> {
        let result = self.call_raw(method, params, on_progress)?;
        serde_json::from_str(result.get()).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Like `call_with_progress`, answering the result as the daemon wrote
    /// it, for output that passes JSON through untouched.
    pub fn call_raw(
        &mut self,
        method: &str,
        params: Value,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<Box<RawValue>, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let mut bytes =
            serde_json::to_vec(&request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        // A daemon that refuses a client answers and closes at once, so the
        // write may fail while its explanation waits to be read.
        let written = self.writer.write_all(&bytes);
        let mut line = String::new();
        loop {
            line.clear();
            let read = self.reader.read_line(&mut line);
            if read.map_err(|e| self.silence.error(e))? == 0 {
                return Err(ClientError::Io(written.err().unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "bangerd closed the connection",
                    )
                })));
            }
            match Incoming::parse(&line).map_err(|e| ClientError::Protocol(e.to_string()))? {
                Incoming::Notification(n) if n.method == "progress" => {
                    if let Ok(progress) = serde_json::from_value::<Progress>(n.params) {
                        on_progress(&progress);
                    }
                }
                Incoming::Notification(_) => {}
                Incoming::Response(response)
                    if response.id != json!(id) && response.id != Value::Null => {}
                Incoming::Response(response) => {
                    if let Some(error) = response.error {
                        let code = ErrorCode::from_code(error.code).unwrap_or(ErrorCode::Internal);
                        return Err(ClientError::Rpc {
                            error: RpcError::new(code, error.message),
                            op_id: error.data.and_then(|d| d.op_id),
                        });
                    }
                    return Ok(response.result.unwrap_or_else(|| RawValue::NULL.to_owned()));
                }
            }
        }
    }
}
