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
use serde::{Deserialize, Serialize};

use futures_util::future::BoxFuture;

use super::process::ProcessHandle;
use super::{LaunchSpec, Prepared, SocketWait, Vmm, VmmError, wait_for_socket};
use crate::vm::record::{AgentEndpoint, VmmProcess};
use crate::vmm::host::{HostOps, JailFile, VmmCommand};

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

/// A network interface backed by a host tap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// The guest's vsock device; firecracker serves its host side as a Unix
/// socket (hybrid vsock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
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

    /// A GET whose answer is JSON of type `T`.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, FirecrackerError> {
        let (status, bytes) = self.call(Method::GET, path, Vec::new()).await?;
        serde_json::from_slice(&bytes).map_err(|e| FirecrackerError::Api {
            method: Method::GET,
            path: path.into(),
            status,
            fault: format!("unexpected answer: {e}"),
        })
    }

    pub async fn instance_info(&self) -> Result<InstanceInfo, FirecrackerError> {
        self.get("/").await
    }

    pub async fn action(&self, action_type: ActionType) -> Result<(), FirecrackerError> {
        self.put("/actions", &InstanceActionInfo { action_type })
            .await
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
/// The vsock's host socket, in the VM's directory or the jail's root.
const VSOCK_SOCKET: &str = "agent.vsock";
/// The guest's vsock context id (2 is the host; every VM has its own device).
const GUEST_CID: u32 = 3;

/// Where the jailer puts a VM's chroot under a jail base, whether or not a
/// jailer is configured now (the start-up sweep and removal need it).
pub fn jail_dir(base: &Path, id: &str) -> PathBuf {
    base.join("firecracker").join(id)
}

impl JailSpec {
    /// `<base>/firecracker/<id>`: the jailer's directory for this VM.
    pub fn dir(&self, id: &str) -> PathBuf {
        jail_dir(&self.base, id)
    }

    pub fn root(&self, id: &str) -> PathBuf {
        self.dir(id).join("root")
    }
}

/// The Firecracker backend: its binary and, optionally, its jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firecracker {
    pub binary: PathBuf,
    pub jail: Option<JailSpec>,
}

/// Firecracker's kernel command line when the kernel record has none.
/// Firecracker adds `root=/dev/vda` for the root drive itself.
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

impl Firecracker {
    /// The API socket, as the host reaches it.
    pub fn api_socket(&self, spec: &LaunchSpec) -> PathBuf {
        match &self.jail {
            Some(jail) => jail.root(&spec.id).join(JAIL_SOCKET),
            None => spec.paths.dir.join("firecracker.sock"),
        }
    }

    /// Firecracker's own log, as the host sees it.
    pub fn vmm_log(&self, spec: &LaunchSpec) -> PathBuf {
        match &self.jail {
            Some(jail) => jail.root(&spec.id).join(JAIL_LOG),
            None => spec.paths.dir.join("firecracker.log"),
        }
    }

    /// The program and arguments that start the VMM; the rest is
    /// configured over the API.
    /// The vsock's host socket, as the host reaches it.
    pub fn vsock_socket(&self, spec: &LaunchSpec) -> PathBuf {
        match &self.jail {
            Some(jail) => jail.root(&spec.id).join(VSOCK_SOCKET),
            None => spec.paths.dir.join(VSOCK_SOCKET),
        }
    }

    pub fn command(&self, spec: &LaunchSpec) -> (PathBuf, Vec<String>) {
        let level = ["--level".to_string(), "Info".to_string()];
        match &self.jail {
            None => {
                let mut args = vec![
                    "--api-sock".into(),
                    self.api_socket(spec).display().to_string(),
                    "--id".into(),
                    spec.id.clone(),
                    "--log-path".into(),
                    self.vmm_log(spec).display().to_string(),
                ];
                args.extend(level);
                (self.binary.clone(), args)
            }
            Some(jail) => {
                // No --daemonize and no --new-pid-ns: the jailer execs
                // firecracker in place, so the child we spawn is the VMM.
                let mut args = vec![
                    "--id".into(),
                    spec.id.clone(),
                    "--exec-file".into(),
                    self.binary.display().to_string(),
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

    /// Kernel, initrd, root disk and vsock socket as firecracker opens
    /// them: host paths, or names in the jail's root.
    fn guest_files(&self, spec: &LaunchSpec) -> (PathBuf, Option<PathBuf>, PathBuf, PathBuf) {
        match &self.jail {
            None => (
                spec.boot.vmlinux.clone(),
                spec.boot.initrd.clone(),
                spec.rootfs.clone(),
                self.vsock_socket(spec),
            ),
            Some(_) => (
                PathBuf::from("/vmlinux"),
                spec.boot.initrd.as_ref().map(|_| PathBuf::from("/initrd")),
                PathBuf::from("/rootfs.ext4"),
                PathBuf::from("/").join(VSOCK_SOCKET),
            ),
        }
    }

    /// What goes into the jail's root before the jailer starts.
    pub fn jail_files(&self, spec: &LaunchSpec) -> Vec<JailFile> {
        let mut files = vec![
            JailFile {
                source: spec.boot.vmlinux.clone(),
                name: "vmlinux".into(),
                writable: false,
            },
            JailFile {
                source: spec.rootfs.clone(),
                name: "rootfs.ext4".into(),
                writable: true,
            },
        ];
        if let Some(initrd) = &spec.boot.initrd {
            files.push(JailFile {
                source: initrd.clone(),
                name: "initrd".into(),
                writable: false,
            });
        }
        files
    }
}

impl Vmm for Firecracker {
    fn default_boot_args(&self) -> &'static str {
        BOOT_ARGS
    }

    fn tap_owner(&self) -> Option<u32> {
        self.jail.as_ref().map(|jail| jail.uid)
    }

    fn prepare<'a>(
        &'a self,
        host: &'a Arc<dyn HostOps>,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<Prepared, VmmError>> {
        Box::pin(self.prepare_files(host, spec))
    }

    fn configure<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        process: &'a ProcessHandle,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { Ok(self.configure_instance(spec, process).await?) })
    }

    fn probe<'a>(&'a self, process: &'a VmmProcess) -> BoxFuture<'a, Result<bool, VmmError>> {
        let api = ApiClient::new(&process.api_socket);
        Box::pin(async move { Ok(api.instance_info().await?.state == "Running") })
    }

    fn ctrl_alt_del<'a>(&'a self, process: &'a VmmProcess) -> BoxFuture<'a, Result<(), VmmError>> {
        let api = ApiClient::new(&process.api_socket);
        Box::pin(async move { Ok(api.action(ActionType::SendCtrlAltDel).await?) })
    }
}

impl Firecracker {
    /// The jail (when configured) or the VM directory without stale
    /// sockets, and the command that starts firecracker.
    async fn prepare_files(
        &self,
        host: &Arc<dyn HostOps>,
        spec: &LaunchSpec,
    ) -> Result<Prepared, VmmError> {
        if let Some(jail) = &self.jail {
            // Links, copies and chowns: file work, off the caller's thread.
            let (host, root, files, uid, gid) = (
                host.clone(),
                jail.root(&spec.id),
                self.jail_files(spec),
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
            prepared.map_err(|source| VmmError::Io {
                action: "prepare the jail",
                path: root,
                source,
            })?;
        } else {
            super::remove_stale(&[self.api_socket(spec), self.vsock_socket(spec)])?;
        }
        let (program, args) = self.command(spec);
        Ok(Prepared {
            command: VmmCommand {
                program,
                args,
                cwd: spec.paths.dir.clone(),
                errors: spec.paths.dir.join("firecracker.log"),
            },
            api_socket: self.api_socket(spec),
            agent: Some(AgentEndpoint::Vsock {
                socket: self.vsock_socket(spec),
                port: banger_agent::protocol::VSOCK_PORT,
            }),
            accel: None,
        })
    }

    async fn configure_instance(
        &self,
        spec: &LaunchSpec,
        process: &ProcessHandle,
    ) -> Result<(), FirecrackerError> {
        let socket = self.api_socket(spec);
        wait_for_socket(&socket, process, SOCKET_TIMEOUT)
            .await
            .map_err(|wait| match wait {
                SocketWait::Exited => FirecrackerError::ExitedEarly {
                    log: self.vmm_log(spec),
                },
                SocketWait::TimedOut => FirecrackerError::NoSocket {
                    socket: socket.clone(),
                },
            })?;
        let api = ApiClient::new(&socket);
        let (kernel, initrd, rootfs, vsock) = self.guest_files(spec);
        api.put(
            "/boot-source",
            &BootSource {
                kernel_image_path: kernel,
                initrd_path: initrd,
                boot_args: Some(spec.boot.args.clone()),
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
        api.put(
            "/vsock",
            &Vsock {
                guest_cid: GUEST_CID,
                uds_path: vsock,
            },
        )
        .await?;
        if let Some(nic) = &spec.nic {
            api.put(
                "/network-interfaces/eth0",
                &NetworkInterface {
                    iface_id: "eth0".into(),
                    host_dev_name: nic.tap.clone(),
                    guest_mac: nic.mac.clone(),
                },
            )
            .await?;
        }
        api.action(ActionType::InstanceStart).await?;
        let info = api.instance_info().await?;
        if info.state != "Running" {
            return Err(FirecrackerError::NotRunning(info.state));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::vmm::{BootFiles, VmPaths};

    fn backend(jail: bool) -> Firecracker {
        Firecracker {
            binary: "/usr/bin/firecracker".into(),
            jail: jail.then(|| JailSpec {
                jailer: "/usr/bin/jailer".into(),
                base: "/var/lib/banger/jail".into(),
                uid: 65534,
                gid: 65534,
            }),
        }
    }

    fn spec() -> LaunchSpec {
        LaunchSpec {
            nic: None,
            id: "k3j9x2m4qa".into(),
            paths: VmPaths {
                dir: "/var/lib/banger/vms/k3j9x2m4qa".into(),
            },
            boot: BootFiles {
                vmlinux: "/k".into(),
                bzimage: None,
                initrd: None,
                args: "console=ttyS0".into(),
            },
            rootfs: "/r".into(),
            vcpus: 1,
            memory_mib: 128,
        }
    }

    #[test]
    fn without_a_jail_the_command_names_the_socket_id_and_log() {
        let (program, args) = backend(false).command(&spec());
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
        let (backend, spec) = (backend(true), spec());
        let (program, args) = backend.command(&spec);
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
            backend.api_socket(&spec),
            PathBuf::from(
                "/var/lib/banger/jail/firecracker/k3j9x2m4qa/root/run/firecracker.socket"
            )
        );
        let (_, _, rootfs, vsock) = backend.guest_files(&spec);
        assert_eq!(rootfs, PathBuf::from("/rootfs.ext4"));
        assert_eq!(vsock, PathBuf::from("/agent.vsock"));
        assert_eq!(backend.jail_files(&spec).len(), 2);
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
