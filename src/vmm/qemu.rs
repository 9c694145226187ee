//! The QEMU backend: `qemu-system-x86_64 -M q35` with virtio-pci disk and
//! agent port, direct kernel boot, `-no-reboot` (a guest reset ends the
//! process, as with Firecracker), and a QMP socket for control. KVM where
//! it can boot stock guests, TCG otherwise.
//!
//! QMP is three commands here (`qmp_capabilities`, `query-status`,
//! `send-key`), spoken over a line-based JSON exchange; a generated QAPI
//! client would be a heavy build for that.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::process::ProcessHandle;
use super::{LaunchSpec, Prepared, SocketWait, Vmm, VmmError, wait_for_socket};
use crate::vm::record::{Accel, AgentEndpoint, VmmProcess};
use crate::vmm::host::{HostOps, VmmCommand};

/// How long QEMU may take to create its QMP socket, and one QMP exchange.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Kernel arguments when the catalog sets none: the root disk is the first
/// virtio disk, and the agent is PID 1 (an initramfs's `/init` hands over
/// to the same binary).
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("qemu exited before its QMP socket appeared; see {log}")]
    ExitedEarly { log: PathBuf },
    #[error("QMP on {socket} did not answer {command}")]
    Unreachable {
        socket: PathBuf,
        command: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("QMP {command} failed: {message}")]
    Command {
        command: &'static str,
        message: String,
    },
    #[error("qemu reports the guest {0:?}, not running")]
    NotRunning(String),
}

/// `qemu.accel` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl AccelChoice {
    /// KVM when `/dev/kvm` exists and is not nested PVM (`kvm_pvm` starts
    /// VMs but stock kernels do not finish booting on it, and `-accel kvm`
    /// hangs there), TCG otherwise.
    pub fn resolve(self, dev_kvm: &Path, sys_module: &Path) -> Accel {
        match self {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto if dev_kvm.exists() && !sys_module.join("kvm_pvm").exists() => {
                Accel::Kvm
            }
            AccelChoice::Auto => Accel::Tcg,
        }
    }
}

/// The QEMU backend: its binary and the accelerator it runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    pub binary: PathBuf,
    pub accel: Accel,
}

fn qmp_socket(spec: &LaunchSpec) -> PathBuf {
    spec.paths.dir.join("qmp.sock")
}

fn agent_socket(spec: &LaunchSpec) -> PathBuf {
    spec.paths.dir.join("agent.sock")
}

impl Qemu {
    pub fn command(&self, spec: &LaunchSpec) -> (PathBuf, Vec<String>) {
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let kernel = spec.boot.bzimage.as_ref().unwrap_or(&spec.boot.vmlinux);
        let mut args: Vec<String> = [
            "-name",
            &format!("banger-{}", spec.id),
            "-M",
            "q35",
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-smp",
            &spec.vcpus.to_string(),
            "-m",
            &format!("{}M", spec.memory_mib),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            &kernel.display().to_string(),
            "-append",
            &spec.boot.args,
            "-drive",
            &format!("file={},format=raw,if=none,id=root", spec.rootfs.display()),
            "-device",
            "virtio-blk-pci,drive=root",
            // The serial console is QEMU's stdout, appended to the console
            // log by the host, as Firecracker's is.
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent_socket(spec).display()
            ),
            "-device",
            "virtio-serial-pci,id=agentbus",
            "-device",
            &format!(
                "virtserialport,bus=agentbus.0,chardev=agent,name={}",
                banger_agent::protocol::SERIAL_PORT_NAME
            ),
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_socket(spec).display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(initrd) = &spec.boot.initrd {
            args.extend(["-initrd".to_string(), initrd.display().to_string()]);
        }
        if let Some(nic) = &spec.nic {
            args.extend([
                "-netdev".to_string(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", nic.tap),
                "-device".to_string(),
                format!("virtio-net-pci,netdev=net0,mac={}", nic.mac),
            ]);
        }
        (self.binary.clone(), args)
    }

    /// Waits for QMP and checks that the guest runs.
    async fn configure_instance(
        &self,
        spec: &LaunchSpec,
        process: &ProcessHandle,
    ) -> Result<(), QemuError> {
        let socket = qmp_socket(spec);
        wait_for_socket(&socket, process, QMP_TIMEOUT)
            .await
            .map_err(|wait| match wait {
                SocketWait::Exited => QemuError::ExitedEarly {
                    log: spec.paths.dir.join("qemu.log"),
                },
                SocketWait::TimedOut => QemuError::Unreachable {
                    socket: socket.clone(),
                    command: "connect",
                    source: io::ErrorKind::TimedOut.into(),
                },
            })?;
        match Qmp::connect(&socket).await?.status().await?.as_str() {
            "running" => Ok(()),
            other => Err(QemuError::NotRunning(other.to_string())),
        }
    }
}

impl Vmm for Qemu {
    fn default_boot_args(&self) -> &'static str {
        BOOT_ARGS
    }

    fn prepare<'a>(
        &'a self,
        _host: &'a Arc<dyn HostOps>,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<Prepared, VmmError>> {
        Box::pin(async move {
            super::remove_stale(&[qmp_socket(spec), agent_socket(spec)])?;
            let (program, args) = self.command(spec);
            Ok(Prepared {
                command: VmmCommand {
                    program,
                    args,
                    cwd: spec.paths.dir.clone(),
                    errors: spec.paths.dir.join("qemu.log"),
                },
                api_socket: qmp_socket(spec),
                agent: Some(AgentEndpoint::Serial {
                    socket: agent_socket(spec),
                }),
                accel: Some(self.accel),
            })
        })
    }

    fn configure<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        process: &'a ProcessHandle,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move { Ok(self.configure_instance(spec, process).await?) })
    }

    fn probe<'a>(&'a self, process: &'a VmmProcess) -> BoxFuture<'a, Result<bool, VmmError>> {
        Box::pin(async move {
            Ok(Qmp::connect(&process.api_socket).await?.status().await? == "running")
        })
    }

    fn ctrl_alt_del<'a>(&'a self, process: &'a VmmProcess) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            let keys: Vec<Value> = ["ctrl", "alt", "delete"]
                .iter()
                .map(|key| json!({"type": "qcode", "data": key}))
                .collect();
            Qmp::connect(&process.api_socket)
                .await?
                .execute("send-key", json!({ "keys": keys }))
                .await?;
            Ok(())
        })
    }
}

/// One QMP session: greeting read, capabilities negotiated.
struct Qmp {
    socket: PathBuf,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(socket: &Path) -> Result<Qmp, QemuError> {
        let unreachable = |source| QemuError::Unreachable {
            socket: socket.to_path_buf(),
            command: "connect",
            source,
        };
        let stream = tokio::time::timeout(QMP_TIMEOUT, UnixStream::connect(socket))
            .await
            .map_err(|_| unreachable(io::ErrorKind::TimedOut.into()))?
            .map_err(unreachable)?;
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            socket: socket.to_path_buf(),
            reader: BufReader::new(read),
            writer,
        };
        qmp.read_message("greeting").await?;
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self, command: &'static str) -> Result<Value, QemuError> {
        let mut line = String::new();
        let read = tokio::time::timeout(QMP_TIMEOUT, self.reader.read_line(&mut line)).await;
        let unreachable = |source| QemuError::Unreachable {
            socket: self.socket.clone(),
            command,
            source,
        };
        match read {
            Err(_) => Err(unreachable(io::ErrorKind::TimedOut.into())),
            Ok(Err(e)) => Err(unreachable(e)),
            Ok(Ok(0)) => Err(unreachable(io::ErrorKind::UnexpectedEof.into())),
            Ok(Ok(_)) => serde_json::from_str(&line)
                .map_err(|e| unreachable(io::Error::new(io::ErrorKind::InvalidData, e))),
        }
    }

    /// Runs a command and answers its `return` value; events that arrive
    /// meanwhile are skipped.
    async fn execute(
        &mut self,
        command: &'static str,
        arguments: Value,
    ) -> Result<Value, QemuError> {
        let mut request = json!({ "execute": command, "arguments": arguments }).to_string();
        request.push('\n');
        self.writer
            .write_all(request.as_bytes())
            .await
            .map_err(|source| QemuError::Unreachable {
                socket: self.socket.clone(),
                command,
                source,
            })?;
        loop {
            let mut message = self.read_message(command).await?;
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = message.get("error") {
                let message = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string();
                return Err(QemuError::Command { command, message });
            }
        }
    }

    /// The guest's run state (`running`, `paused`, `shutdown`, ...).
    async fn status(&mut self) -> Result<String, QemuError> {
        let status = self.execute("query-status", json!({})).await?;
        Ok(status
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{BootFiles, VmPaths};

    fn spec(initrd: bool) -> LaunchSpec {
        LaunchSpec {
            nic: None,
            id: "k3j9x2m4qa".into(),
            paths: VmPaths {
                dir: "/var/lib/banger/vms/k3j9x2m4qa".into(),
            },
            boot: BootFiles {
                vmlinux: "/k/vmlinux".into(),
                bzimage: Some("/k/bzImage".into()),
                initrd: initrd.then(|| PathBuf::from("/k/initrd.img")),
                args: BOOT_ARGS.into(),
            },
            rootfs: "/var/lib/banger/vms/k3j9x2m4qa/rootfs.ext4".into(),
            vcpus: 2,
            memory_mib: 256,
        }
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_command_boots_the_bzimage_on_q35_without_rebooting() {
        let qemu = Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
        };
        let (program, args) = qemu.command(&spec(true));
        assert_eq!(program, PathBuf::from("qemu-system-x86_64"));
        assert_eq!(value_of(&args, "-M"), ["q35"]);
        assert_eq!(value_of(&args, "-accel"), ["tcg"]);
        assert_eq!(value_of(&args, "-kernel"), ["/k/bzImage"]);
        assert_eq!(value_of(&args, "-initrd"), ["/k/initrd.img"]);
        assert_eq!(value_of(&args, "-m"), ["256M"]);
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert_eq!(
            value_of(&args, "-qmp"),
            ["unix:/var/lib/banger/vms/k3j9x2m4qa/qmp.sock,server=on,wait=off"]
        );
        assert!(
            value_of(&args, "-device")
                .contains(&"virtserialport,bus=agentbus.0,chardev=agent,name=org.banger.agent")
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_initrd_means_no_initrd_flag() {
        let qemu = Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Kvm,
        };
        let (_, args) = qemu.command(&spec(false));
        assert_eq!(value_of(&args, "-accel"), ["kvm"]);
        assert_eq!(value_of(&args, "-cpu"), ["host"]);
        assert!(value_of(&args, "-initrd").is_empty());
    }

    #[test]
    fn auto_accel_avoids_kvm_without_a_device_or_on_nested_pvm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kvm, modules) = (dir.path().join("kvm"), dir.path().join("module"));
        std::fs::create_dir(&modules).expect("mkdir");
        assert_eq!(AccelChoice::Auto.resolve(&kvm, &modules), Accel::Tcg);
        std::fs::write(&kvm, b"").expect("write");
        assert_eq!(AccelChoice::Auto.resolve(&kvm, &modules), Accel::Kvm);
        std::fs::create_dir(modules.join("kvm_pvm")).expect("mkdir");
        assert_eq!(AccelChoice::Auto.resolve(&kvm, &modules), Accel::Tcg);
        assert_eq!(AccelChoice::Kvm.resolve(&kvm, &modules), Accel::Kvm);
    }
}
