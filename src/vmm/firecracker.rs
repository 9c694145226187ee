//! The Firecracker backend: the process's command line, a small typed
//! client for its HTTP API on a Unix socket (types follow Firecracker's
//! swagger file, v1.12), and the launch sequence. Supported range: 1.8
//! (ACPI descriptions for virtio-mmio) to 1.12.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustix::process::Signal;
use serde::{Deserialize, Serialize};

use super::process::{ProcessHandle, read_stat};
use crate::host::{HostOps, JailFile, VmmCommand};

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

/// Running firecracker under its jailer: a chroot per VM under `base`,
/// dropping to `uid:gid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    pub jailer: PathBuf,
    pub base: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// Paths inside a jail, as firecracker sees them from its chroot.
const JAIL_SOCKET: &str = "run/firecracker.socket";
const JAIL_LOG: &str = "firecracker.log";

impl JailSpec {
    /// `<base>/firecracker/<id>`: the jailer's directory for this VM.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.base.join("firecracker").join(id)
    }

    pub fn root(&self, id: &str) -> PathBuf {
        self.dir(id).join("root")
    }
}

/// Everything a launch needs.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub firecracker: PathBuf,
    pub jail: Option<JailSpec>,
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
    /// The API socket, as the host reaches it.
    pub fn api_socket(&self) -> PathBuf {
        match &self.jail {
            Some(jail) => jail.root(&self.id).join(JAIL_SOCKET),
            None => self.paths.api_socket(),
        }
    }

    /// Firecracker's own log, as the host sees it.
    pub fn vmm_log(&self) -> PathBuf {
        match &self.jail {
            Some(jail) => jail.root(&self.id).join(JAIL_LOG),
            None => self.paths.vmm_log(),
        }
    }

    /// The program and arguments that start the VMM; the rest is
    /// configured over the API.
    pub fn command(&self) -> (PathBuf, Vec<String>) {
        let level = ["--level".to_string(), "Info".to_string()];
        match &self.jail {
            None => {
                let mut args = vec![
                    "--api-sock".into(),
                    self.paths.api_socket().display().to_string(),
                    "--id".into(),
                    self.id.clone(),
                    "--log-path".into(),
                    self.paths.vmm_log().display().to_string(),
                ];
                args.extend(level);
                (self.firecracker.clone(), args)
            }
            Some(jail) => {
                // No --daemonize and no --new-pid-ns: the jailer execs
                // firecracker in place, so the child we spawn is the VMM.
                let mut args = vec![
                    "--id".into(),
                    self.id.clone(),
                    "--exec-file".into(),
                    self.firecracker.display().to_string(),
                    "--uid".into(),
                    jail.uid.to_string(),
                    "--gid".into(),
                    jail.gid.to_string(),
                    "--chroot-base-dir".into(),
                    jail.base.display().to_string(),
                    "--cgroup-version".into(),
                    "2".into(),
                    "--".into(),
                    "--api-sock".into(),
                    format!("/{JAIL_SOCKET}"),
                    "--log-path".into(),
                    format!("/{JAIL_LOG}"),
                ];
                args.extend(level);
                (jail.jailer.clone(), args)
            }
        }
    }

    /// Kernel, initrd and root disk as firecracker opens them: host paths,
    /// or names in the jail's root.
    fn guest_files(&self) -> (PathBuf, Option<PathBuf>, PathBuf) {
        match &self.jail {
            None => (
                self.kernel.clone(),
                self.initrd.clone(),
                self.rootfs.clone(),
            ),
            Some(_) => (
                PathBuf::from("/vmlinux"),
                self.initrd.as_ref().map(|_| PathBuf::from("/initrd")),
                PathBuf::from("/rootfs.ext4"),
            ),
        }
    }

    /// What goes into the jail's root before the jailer starts.
    pub fn jail_files(&self) -> Vec<JailFile> {
        let mut files = vec![
            JailFile {
                source: self.kernel.clone(),
                name: "vmlinux".into(),
                writable: false,
            },
            JailFile {
                source: self.rootfs.clone(),
                name: "rootfs.ext4".into(),
                writable: true,
            },
        ];
        if let Some(initrd) = &self.initrd {
            files.push(JailFile {
                source: initrd.clone(),
                name: "initrd".into(),
                writable: false,
            });
        }
        files
    }
}

/// A running VM's process, as the launch leaves it.
pub struct Launched {
    pub process: ProcessHandle,
    pub start_time: u64,
}

/// Starts firecracker (under its jailer when configured), with its serial
/// console appended to `console.log`, then configures and starts the
/// instance. On any failure the process is killed before this returns.
pub async fn launch(
    host: &Arc<dyn HostOps>,
    spec: &LaunchSpec,
) -> Result<Launched, FirecrackerError> {
    let socket = spec.api_socket();
    let io_err = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| FirecrackerError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(jail) = &spec.jail {
        // Links, copies and chowns: file work, off the caller's thread.
        let (host, root, files, uid, gid) = (
            host.clone(),
            jail.root(&spec.id),
            spec.jail_files(),
            jail.uid,
            jail.gid,
        );
        let prepared = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || {
                host.prepare_jail(&root, &files, &[JAIL_LOG], uid, gid)
            })
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
        };
        prepared.map_err(io_err("prepare the jail", &root))?;
    } else {
        // Firecracker refuses to bind over a stale socket.
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove the stale socket", &socket)(e));
            }
            _ => {}
        }
    }
    let (program, args) = spec.command();
    let command = VmmCommand {
        program: program.clone(),
        args,
        cwd: spec.paths.dir.clone(),
        console: spec.paths.console_log(),
        errors: spec.paths.vmm_log(),
    };
    let pid = host
        .spawn_vmm(&command)
        .map_err(|source| FirecrackerError::Spawn {
            binary: program.clone(),
            source,
        })? as i32;
    // The pidfd is the handle from here on: the pid cannot be recycled
    // before we reap it, and we reap through the pidfd.
    let process = ProcessHandle::open(pid).map_err(io_err("watch the process of", &program))?;
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
    let socket = spec.api_socket();
    wait_for_socket(&socket, process, &spec.vmm_log()).await?;
    let api = ApiClient::new(&socket);
    let (kernel, initrd, rootfs) = spec.guest_files();
    api.put(
        "/boot-source",
        &BootSource {
            kernel_image_path: kernel,
            initrd_path: initrd,
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
            path_on_host: rootfs,
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

    fn spec(jail: bool) -> LaunchSpec {
        LaunchSpec {
            firecracker: "/usr/bin/firecracker".into(),
            jail: jail.then(|| JailSpec {
                jailer: "/usr/bin/jailer".into(),
                base: "/var/lib/banger/jail".into(),
                uid: 65534,
                gid: 65534,
            }),
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
    fn without_a_jail_the_command_names_the_socket_id_and_log() {
        let (program, args) = spec(false).command();
        assert_eq!(program, PathBuf::from("/usr/bin/firecracker"));
        assert_eq!(
            args,
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
    fn in_a_jail_paths_are_chroot_relative_and_the_jailer_execs_in_place() {
        let spec = spec(true);
        let (program, args) = spec.command();
        assert_eq!(program, PathBuf::from("/usr/bin/jailer"));
        assert!(
            !args.contains(&"--daemonize".to_string())
                && !args.contains(&"--new-pid-ns".to_string())
        );
        let tail: Vec<&str> = args
            .iter()
            .skip_while(|a| *a != "--")
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            [
                "--",
                "--api-sock",
                "/run/firecracker.socket",
                "--log-path",
                "/firecracker.log",
                "--level",
                "Info"
            ]
        );
        assert_eq!(
            spec.api_socket(),
            PathBuf::from(
                "/var/lib/banger/jail/firecracker/k3j9x2m4qa/root/run/firecracker.socket"
            )
        );
        assert_eq!(spec.guest_files().2, PathBuf::from("/rootfs.ext4"));
        assert_eq!(spec.jail_files().len(), 2);
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
