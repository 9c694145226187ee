//! The Firecracker backend: the process's command line, a small typed
//! client for its HTTP API on a Unix socket (types follow Firecracker's
//! swagger file, v1.12), and the launch sequence. Supported range: 1.8
//! (ACPI descriptions for virtio-mmio) to 1.12.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustix::process::Signal;
use serde::{Deserialize, Serialize};

use super::process::{ProcessHandle, read_stat};

/// How long one API call may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How long firecracker may take to create its API socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("firecracker exited before its API socket appeared; see {log}")]
    ExitedEarly { log: PathBuf },
    #[error("firecracker did not create {socket} within {SOCKET_TIMEOUT:?}")]
    NoSocket { socket: PathBuf },
    #[error("firecracker API {method} {path} failed ({status}): {fault}")]
    Api {
        method: Method,
        path: String,
        status: StatusCode,
        fault: String,
    },
    #[error("firecracker API {method} {path} did not answer")]
    Unreachable {
        method: Method,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("firecracker reports the instance {0:?} after InstanceStart, not Running")]
    NotRunning(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u8,
    pub mem_size_mib: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

#[derive(Deserialize)]
struct Fault {
    fault_message: String,
}

/// A client for one firecracker's API socket; one connection per call.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient {
            socket: socket.into(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), FirecrackerError> {
        let unreachable =
            |source: Box<dyn std::error::Error + Send + Sync>| FirecrackerError::Unreachable {
                method: method.clone(),
                path: path.to_string(),
                source,
            };
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(&self.socket).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let request = Request::builder()
                .method(method.clone())
                .uri(format!("http://localhost{path}"))
                .header(header::HOST, "localhost")
                .header(header::ACCEPT, "application/json")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, bytes))
        };
        match tokio::time::timeout(API_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(source)) => Err(unreachable(source)),
            Err(elapsed) => Err(unreachable(Box::new(elapsed))),
        }
    }

    pub async fn put(&self, path: &str, body: &impl Serialize) -> Result<(), FirecrackerError> {
        let body = serde_json::to_vec(body).map_err(|e| FirecrackerError::Unreachable {
            method: Method::PUT,
            path: path.to_string(),
            source: Box::new(e),
        })?;
        let (status, bytes) = self.call(Method::PUT, path, body).await?;
        if status.is_success() {
            return Ok(());
        }
        let fault = serde_json::from_slice::<Fault>(&bytes)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(FirecrackerError::Api {
            method: Method::PUT,
            path: path.to_string(),
            status,
            fault,
        })
    }

    pub async fn instance_info(&self) -> Result<InstanceInfo, FirecrackerError> {
        let (status, bytes) = self.call(Method::GET, "/", Vec::new()).await?;
        serde_json::from_slice(&bytes).map_err(|e| FirecrackerError::Api {
            method: Method::GET,
            path: "/".into(),
            status,
            fault: format!("unexpected answer: {e}"),
        })
    }

    pub async fn action(&self, action_type: ActionType) -> Result<(), FirecrackerError> {
        self.put("/actions", &InstanceActionInfo { action_type })
            .await
    }
}

/// Where a VM's firecracker keeps its files, all under the VM's directory
/// (named by the VM's short id, so paths stay short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("firecracker.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("firecracker.log")
    }
}

/// Everything a launch needs.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub binary: PathBuf,
    pub id: String,
    pub paths: VmPaths,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
}

impl LaunchSpec {
    /// The firecracker command line; the rest is configured over the API.
    pub fn argv(&self) -> Vec<String> {
        vec![
            "--api-sock".into(),
            self.paths.api_socket().display().to_string(),
            "--id".into(),
            self.id.clone(),
            "--log-path".into(),
            self.paths.vmm_log().display().to_string(),
            "--level".into(),
            "Info".into(),
        ]
    }
}

/// A running VM's process, as the launch leaves it.
pub struct Launched {
    pub process: ProcessHandle,
    pub start_time: u64,
}

fn append_file(path: &Path) -> Result<File, FirecrackerError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| FirecrackerError::Io {
            action: "open",
            path: path.to_path_buf(),
            source,
        })
}

/// Spawns firecracker in its own session (so a daemon restart or a signal
/// to the daemon's process group never reaches it), with its serial console
/// appended to `console.log`, then configures and starts the instance.
/// On any failure the process is killed before this returns.
pub async fn launch(spec: &LaunchSpec) -> Result<Launched, FirecrackerError> {
    let socket = spec.paths.api_socket();
    // Firecracker refuses to bind over a stale socket.
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(FirecrackerError::Io {
                action: "remove the stale socket",
                path: socket,
                source: e,
            });
        }
        _ => {}
    }
    let console = append_file(&spec.paths.console_log())?;
    let vmm_log = append_file(&spec.paths.vmm_log())?;
    let errors = vmm_log.try_clone().map_err(|source| FirecrackerError::Io {
        action: "duplicate",
        path: spec.paths.vmm_log(),
        source,
    })?;
    let mut command = Command::new(&spec.binary);
    command
        .args(spec.argv())
        .current_dir(&spec.paths.dir)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(errors);
    #[allow(unsafe_code)]
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| rustix::process::setsid().map(drop).map_err(io::Error::from));
    }
    let child = command.spawn().map_err(|source| FirecrackerError::Spawn {
        binary: spec.binary.clone(),
        source,
    })?;
    // The pidfd is the handle from here on: the pid cannot be recycled
    // before we reap it, and we reap through the pidfd.
    let pid = child.id() as i32;
    drop(child);
    let process = ProcessHandle::open(pid).map_err(|source| FirecrackerError::Io {
        action: "watch the process of",
        path: spec.binary.clone(),
        source,
    })?;
    match configure(spec, &process).await {
        Ok(()) => {
            let start_time = read_stat(pid)
                .ok()
                .flatten()
                .map(|s| s.start_time)
                .unwrap_or(0);
            Ok(Launched {
                process,
                start_time,
            })
        }
        Err(e) => {
            let _ = process.signal(Signal::KILL);
            process.exited().await;
            Err(e)
        }
    }
}

async fn configure(spec: &LaunchSpec, process: &ProcessHandle) -> Result<(), FirecrackerError> {
    let socket = spec.paths.api_socket();
    wait_for_socket(&socket, process, &spec.paths.vmm_log()).await?;
    let api = ApiClient::new(&socket);
    api.put(
        "/boot-source",
        &BootSource {
            kernel_image_path: spec.kernel.clone(),
            initrd_path: spec.initrd.clone(),
            boot_args: Some(spec.boot_args.clone()),
        },
    )
    .await?;
    api.put(
        "/machine-config",
        &MachineConfiguration {
            vcpu_count: spec.vcpus,
            mem_size_mib: spec.memory_mib,
        },
    )
    .await?;
    api.put(
        "/drives/rootfs",
        &Drive {
            drive_id: "rootfs".into(),
            path_on_host: spec.rootfs.clone(),
            is_root_device: true,
            is_read_only: false,
        },
    )
    .await?;
    api.action(ActionType::InstanceStart).await?;
    let info = api.instance_info().await?;
    if info.state != "Running" {
        return Err(FirecrackerError::NotRunning(info.state));
    }
    Ok(())
}

/// Firecracker binds its socket a few milliseconds after exec; poll for it,
/// giving up early if the process dies.
async fn wait_for_socket(
    socket: &Path,
    process: &ProcessHandle,
    log: &Path,
) -> Result<(), FirecrackerError> {
    let deadline = tokio::time::Instant::now() + SOCKET_TIMEOUT;
    let exited = process.exited();
    tokio::pin!(exited);
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(FirecrackerError::NoSocket {
                socket: socket.to_path_buf(),
            });
        }
        tokio::select! {
            _ = &mut exited => return Err(FirecrackerError::ExitedEarly { log: log.to_path_buf() }),
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            binary: "/usr/bin/firecracker".into(),
            id: "k3j9x2m4qa".into(),
            paths: VmPaths {
                dir: "/var/lib/banger/vms/k3j9x2m4qa".into(),
            },
            kernel: "/k".into(),
            initrd: None,
            boot_args: "console=ttyS0".into(),
            rootfs: "/r".into(),
            vcpus: 1,
            memory_mib: 128,
        }
    }

    #[test]
    fn the_command_line_names_the_socket_id_and_log() {
        assert_eq!(
            spec().argv(),
            [
                "--api-sock",
                "/var/lib/banger/vms/k3j9x2m4qa/firecracker.sock",
                "--id",
                "k3j9x2m4qa",
                "--log-path",
                "/var/lib/banger/vms/k3j9x2m4qa/firecracker.log",
                "--level",
                "Info"
            ]
        );
    }

    #[test]
    fn api_bodies_follow_the_swagger_names() {
        let boot = BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some("a=b".into()),
        };
        assert_eq!(
            serde_json::to_value(&boot).expect("json"),
            serde_json::json!({"kernel_image_path": "/k", "boot_args": "a=b"})
        );
        let action = InstanceActionInfo {
            action_type: ActionType::SendCtrlAltDel,
        };
        assert_eq!(
            serde_json::to_string(&action).expect("json"),
            r#"{"action_type":"SendCtrlAltDel"}"#
        );
        let info: InstanceInfo = serde_json::from_str(
            r#"{"id":"anonymous-instance","state":"Running","vmm_version":"1.12.1","app_name":"Firecracker"}"#,
        )
        .expect("parse");
        assert_eq!(info.state, "Running");
    }
}
