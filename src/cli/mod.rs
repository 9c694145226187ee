//! The `banger` command line: parses arguments, talks to bangerd through
//! the blocking [`Client`], prints tables or `--json`.
//!
//! Exit codes: 0 success; 1 the daemon reported an error; 2 usage error;
//! 3 the daemon cannot be reached.

pub mod output;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use jiff::Timestamp;
use nix::sys::signal::{SigSet, Signal};
use serde_json::json;

use crate::actors::catalog::ImagesRemoved;
use crate::config::{self, Mode, Overrides};
use crate::daemon::VERSION;
use crate::operations::{OperationOutcome, OperationRecord};
use crate::rpc::client::{Client, ClientError, Stream};
use crate::rpc::daemon::{BackupResult, MethodsResult, StatusResult};
use crate::rpc::image::{ImageResult, ImagesResult};
use crate::rpc::kernel::{KernelResult, KernelsResult};
use crate::rpc::network::{NetworkResult, NetworksResult, ReconcileResult, RemovedResult};
use crate::rpc::ops::{OperationResult, OperationsResult};
use crate::rpc::protocol::ErrorObject;
use crate::rpc::stream;
use crate::rpc::vm::{ForgetResult, LogsResult, PingResult, VmResult, VmsResult};
use crate::vm::record::VmmKind;
use crate::vm::restart::RestartMode;

#[derive(Parser)]
#[command(name = "banger", version = VERSION, about = "Run and supervise microVMs made from OCI images")]
pub struct Cli {
    /// The daemon's socket [default: the mode's, or the configuration's].
    #[arg(long, global = true, env = "BANGER_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Talk to the system daemon (the default for root).
    #[arg(long, global = true, conflicts_with = "user")]
    system: bool,
    /// Talk to your own user-mode daemon (the default for other users).
    #[arg(long, global = true)]
    user: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon itself: status, backups, methods.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Operations: state-changing requests in flight or finished.
    #[command(subcommand)]
    Ops(OpsCommand),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// The kernel catalog.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// The image catalog: OCI images as ext4 root disks.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Networks: bridges, leases and NAT for VMs.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Print a shell completion script.
    Completions { shell: Shell },
}

#[derive(Subcommand)]
enum DaemonCommand {
    /// Version, uptime, store schema and counts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent copy of the store to PATH, a file name in the
    /// daemon's backup directory (<state-dir>/backups) or a path there;
    /// it must not exist.
    Backup {
        path: PathBuf,
        /// Copy at most this many bytes per second.
        #[arg(long, value_name = "BYTES")]
        rate_limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Every RPC method the daemon serves.
    Methods {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Create a VM; prints its name (with --json, the whole VM).
    Create {
        /// Generated (adjective-noun) when absent.
        name: Option<String>,
        /// A kernel from the catalog (`banger kernel ls`) [default:
        /// vm.default_kernel, else the only kernel there is].
        #[arg(long)]
        kernel: Option<String>,
        /// An ext4 file as the root disk; the VM gets its own copy, the file
        /// is never changed.
        #[arg(long, required_unless_present = "image", conflicts_with = "image")]
        rootfs: Option<PathBuf>,
        /// An image from the catalog (name or digest, `banger image ls`):
        /// the VM's root disk is a copy-on-write clone of its disk.
        #[arg(long)]
        image: Option<String>,
        /// The root disk's size, such as 1G or 512M: the clone is grown
        /// (file and filesystem) before the first boot [default: as its
        /// source].
        #[arg(long, value_name = "SIZE")]
        disk: Option<String>,
        /// Run the image's Entrypoint and Cmd (with its Env, WorkingDir and
        /// User) as the VM's main process: its exit is the VM's, with its
        /// code, and the restart policy applies. Its output is in `vm logs`.
        #[arg(long)]
        run_image_cmd: bool,
        /// Virtual CPUs, 1 to 32.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// MiB, or a size such as 512M or 2G.
        #[arg(long, default_value = "512")]
        memory: String,
        #[arg(long, value_enum)]
        restart: Option<RestartMode>,
        /// Seconds before the first restart after a crash (doubles each time).
        #[arg(long, value_name = "SECS")]
        restart_delay: Option<f64>,
        /// The longest wait between restarts.
        #[arg(long, value_name = "SECS")]
        restart_max_delay: Option<f64>,
        #[arg(long, value_enum)]
        vmm: Option<VmmKind>,
        /// The network to join [default: default].
        #[arg(long, value_name = "NAME")]
        network: Option<String>,
        /// No network interface at all.
        #[arg(long, conflicts_with = "network")]
        no_network: bool,
        /// Start it right away.
        #[arg(long)]
        start: bool,
        #[arg(long)]
        json: bool,
    },
    /// Start a VM (a no-op when it is running).
    Start { name: String },
    /// Stop a VM: ask the guest, then SIGKILL after the timeout.
    Stop {
        name: String,
        #[arg(long, value_name = "SECS", default_value_t = 30.0)]
        timeout: f64,
    },
    /// SIGKILL a VM's VMM at once.
    Kill { name: String },
    /// Stop, then start a VM.
    Restart {
        name: String,
        #[arg(long, value_name = "SECS", default_value_t = 30.0)]
        timeout: f64,
    },
    /// Remove a VM and its files.
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Kill it first if it is running.
        #[arg(long, short)]
        force: bool,
    },
    /// Remove a quarantined VM record (one that does not decode, listed
    /// by `daemon status`) and the files it could own.
    Forget {
        /// The record's key: the VM's id.
        id: String,
    },
    /// Every VM.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One VM in detail.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in the VM through its agent; banger exits with the
    /// command's status (125 when banger itself fails).
    Exec {
        name: String,
        /// Set an environment variable (repeatable).
        #[arg(long = "env", short = 'e', value_name = "K=V")]
        env: Vec<String>,
        /// The command's working directory in the guest.
        #[arg(long, short = 'w', value_name = "DIR")]
        workdir: Option<String>,
        /// Seconds to wait for a booting VM's agent.
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        wait: f64,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Ping the VM's agent: round trip, kernel, boot times.
    Ping {
        name: String,
        /// Seconds to wait for a booting VM's agent.
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        wait: f64,
        #[arg(long)]
        json: bool,
    },
    /// The VM's serial console output.
    Logs {
        name: String,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Keep printing new output until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import an OCI image layout directory, an OCI archive or a
    /// docker-archive tarball (`docker save`) as an ext4 image.
    Import {
        path: PathBuf,
        /// [default: the image's own ref name or repo tag]
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every image in the catalog.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One image in detail, by name or digest: its config and layers.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (by name or digest), its disk and the blobs no other
    /// image uses. Refused while a VM holds it.
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Remove it even while VMs hold it: they keep their own disks.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove every image no VM holds, with the disks and blobs no image
    /// left uses; prints what it freed.
    Prune {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KernelCommand {
    /// Copy a vmlinux (and initrd) into the catalog under NAME.
    Import {
        name: String,
        #[arg(long)]
        vmlinux: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line [default: the backend's, see docs/cli.md].
        #[arg(long)]
        cmdline: Option<String>,
    },
    /// Import a Debian kernel package (linux-image-*.deb) under NAME: its
    /// bzImage, the vmlinux inside it, and an initramfs of the virtio and
    /// vsock modules (banger-agent joins it at boot).
    ImportDeb {
        name: String,
        /// The .deb file (`apt-get download linux-image-<version>-cloud-amd64`).
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Every kernel in the catalog.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One kernel in detail: its files, notes and boot image.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a kernel no VM uses.
    #[command(alias = "remove")]
    Rm { name: String },
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Create a network: a bridge, its gateway (the subnet's first
    /// address), leases for VMs, and NAT to the outside.
    Create {
        name: String,
        /// An IPv4 network for its VMs, e.g. 10.10.0.0/24 [default: the
        /// first free /24 that clashes with nothing on the host].
        #[arg(long)]
        subnet: Option<String>,
        /// Guests reach only each other (and the gateway's DNS), not the outside.
        #[arg(long)]
        no_nat: bool,
        /// Guests reach every service of the host, not only banger's.
        #[arg(long)]
        host_access: bool,
        /// The DNS server its guests are given [default: the daemon's].
        #[arg(long, value_name = "IP")]
        dns: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every network.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One network in detail, with its leases.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a network no VM uses.
    #[command(alias = "remove")]
    Rm { name: String },
    /// Remove the taps, bridges, rules and leases no record claims; make
    /// again what records claim and the host lacks.
    Reconcile {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OpsCommand {
    /// Operations in flight (with --all, finished ones too).
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// One operation in detail.
    Show {
        op_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Ask an operation in flight to stop.
    Cancel { op_id: String },
    /// Follow an operation's progress until it ends.
    Watch {
        op_id: String,
        #[arg(long)]
        json: bool,
    },
}

/// What a command failed with, and the exit code that says so.
enum Failure {
    Daemon(String),
    Unreachable(String),
    /// `vm exec`: the command's own exit status.
    Status(u8),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let message = crate::error_chain(&e);
        match e {
            ClientError::Unreachable { .. } | ClientError::NotAnswering { .. } => {
                Failure::Unreachable(message)
            }
            _ => Failure::Daemon(message),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "banger", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    // `vm exec` keeps 0-124 for the command's status.
    let exec = matches!(cli.command, Command::Vm(VmCommand::Exec { .. }));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Status(code)) => ExitCode::from(code),
        Err(Failure::Daemon(message) | Failure::Unreachable(message)) if exec => {
            eprintln!("error: {message}");
            ExitCode::from(EXEC_FAILED)
        }
        Err(Failure::Daemon(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(3)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    // Only the daemon's socket is needed; the configuration names it when
    // neither --socket nor BANGER_SOCKET does.
    let socket = match cli.socket {
        Some(socket) => socket,
        None => {
            let mode = Mode::select(cli.system, cli.user);
            config::load(mode, Overrides::default())
                .map_err(|e| Failure::Daemon(crate::error_chain(&e)))?
                .socket
        }
    };
    let mut client = Client::connect(&socket)?;
    let now = Timestamp::now();
    match cli.command {
        Command::Daemon(DaemonCommand::Status { json }) => {
            let status = client.call::<StatusResult>("daemon.status", json!({}))?;
            show(json, &status, |s| status_view(&s.result));
        }
        Command::Daemon(DaemonCommand::Backup {
            path,
            rate_limit,
            json,
        }) => {
            // A bare name is the daemon's to place in its backup directory.
            let path = if path.components().count() == 1 {
                path
            } else {
                absolute(&path)?
            };
            let params = json!({"path": path, "rate_limit": rate_limit});
            let mut stderr = std::io::stderr();
            let result =
                client.call_with_progress::<BackupResult>("daemon.backup", params, |p| {
                    let _ = writeln!(stderr, "{}", output::progress(&p.phase, p.current, p.total));
                })?;
            if json {
                println!("{}", output::json(&result));
            } else {
                let r = result.result;
                println!(
                    "backup written to {} ({} records, {} bytes)",
                    r.path.display(),
                    r.records,
                    r.bytes
                );
            }
        }
        Command::Daemon(DaemonCommand::Methods { json }) => {
            let methods = client.call::<MethodsResult>("daemon.methods", json!({}))?;
            if json {
                println!("{}", output::json(&methods.result.methods));
            } else {
                let mut rows = vec![vec!["METHOD".to_string(), "DESCRIPTION".to_string()]];
                rows.extend(
                    methods
                        .result
                        .methods
                        .into_iter()
                        .map(|m| vec![m.name, m.summary]),
                );
                print!("{}", output::table(&rows));
            }
        }
        Command::Ops(OpsCommand::Ls { all, json }) => {
            let ops =
                client.call::<OperationsResult>("daemon.operations.list", json!({"all": all}))?;
            show(json, &ops.result.operations, |v| {
                output::operations_table(v, now)
            });
        }
        Command::Ops(OpsCommand::Show { op_id, json }) => {
            let op =
                client.call::<OperationResult>("daemon.operations.get", json!({"op_id": op_id}))?;
            show(json, &op.result.operation, |v| {
                output::operation_details(v, now)
            });
        }
        Command::Ops(OpsCommand::Cancel { op_id }) => {
            client.call::<OperationResult>("daemon.operations.cancel", json!({"op_id": op_id}))?;
            println!("cancel requested for {op_id}");
        }
        Command::Ops(OpsCommand::Watch { op_id, json }) => {
            let mut stdout = std::io::stdout();
            let op = client.call_with_progress::<OperationResult>(
                "daemon.operations.watch",
                json!({"op_id": op_id}),
                |p| {
                    let line = if json {
                        serde_json::to_string(p).unwrap_or_default()
                    } else {
                        output::progress(&p.phase, p.current, p.total)
                    };
                    let _ = writeln!(stdout, "{line}");
                },
            )?;
            let op = op.result.operation;
            if json {
                println!("{}", serde_json::to_string(&op).unwrap_or_default());
            } else {
                println!("{} {}", op.op_id, crate::wire_name(&op.outcome));
            }
            return ended(&op);
        }
        Command::Vm(VmCommand::Logs {
            name,
            tail,
            follow: true,
        }) => follow_logs(client, &name, tail)?,
        Command::Vm(VmCommand::Exec {
            name,
            env,
            workdir,
            wait,
            command,
        }) => exec(client, &name, &env, workdir, wait, command)?,
        Command::Vm(command) => vm(&mut client, command, now)?,
        Command::Kernel(command) => kernel(&mut client, command, now)?,
        Command::Image(command) => image(&mut client, command, now)?,
        Command::Network(command) => network(&mut client, command, now)?,
        Command::Completions { .. } => {}
    }
    Ok(())
}

fn absolute(path: &std::path::Path) -> Result<PathBuf, Failure> {
    std::path::absolute(path)
        .map_err(|e| Failure::Daemon(format!("cannot resolve {}: {e}", path.display())))
}

fn vm(client: &mut Client, command: VmCommand, now: Timestamp) -> Result<(), Failure> {
    let simple =
        |client: &mut Client, method: &str, params: serde_json::Value| -> Result<(), Failure> {
            let vm = client.call::<VmResult>(method, params)?;
            println!("{} {}", vm.result.vm.name, output::vm_state(&vm.result.vm));
            Ok(())
        };
    match command {
        VmCommand::Create {
            name,
            kernel,
            rootfs,
            image,
            disk,
            run_image_cmd,
            vcpus,
            memory,
            restart,
            restart_delay,
            restart_max_delay,
            vmm,
            network,
            no_network,
            start,
            json,
        } => {
            let params = json!({
                "name": name, "kernel": kernel, "rootfs": rootfs.as_deref().map(absolute).transpose()?,
                "image": image, "disk": disk, "run_image_cmd": run_image_cmd, "vcpus": vcpus, "memory": memory,
                "restart": restart, "restart_delay_secs": restart_delay, "restart_max_delay_secs": restart_max_delay,
                "vmm": vmm, "network": network, "no_network": no_network, "start": start,
            });
            let vm = client.call::<VmResult>("vm.create", params)?;
            if json {
                println!("{}", output::json(&vm.result.vm));
            } else {
                println!("{}", vm.result.vm.name);
            }
        }
        VmCommand::Start { name } => simple(client, "vm.start", json!({"name": name}))?,
        VmCommand::Stop { name, timeout } => simple(
            client,
            "vm.stop",
            json!({"name": name, "timeout_secs": timeout}),
        )?,
        VmCommand::Kill { name } => simple(client, "vm.kill", json!({"name": name}))?,
        VmCommand::Restart { name, timeout } => simple(
            client,
            "vm.restart",
            json!({"name": name, "timeout_secs": timeout}),
        )?,
        VmCommand::Rm { name, force } => {
            client.call::<VmResult>("vm.remove", json!({"name": name, "force": force}))?;
            println!("{name} removed");
        }
        VmCommand::Forget { id } => {
            client.call::<ForgetResult>("vm.forget", json!({"id": id}))?;
            println!("{id} forgotten");
        }
        VmCommand::Ls { json: true } => {
            // Passed through as the daemon wrote it: no parse of every VM.
            #[derive(serde::Deserialize)]
            struct RawVms<'a> {
                #[serde(borrow)]
                vms: &'a serde_json::value::RawValue,
                store_unavailable: Option<String>,
            }
            let raw = client.call_raw("vm.list", json!({}), |_| {})?;
            let vms: RawVms<'_> = serde_json::from_str(raw.get())
                .map_err(|e| Failure::Daemon(format!("bangerd sent an unexpected answer: {e}")))?;
            warn_from_memory(vms.store_unavailable.as_deref());
            println!("{}", vms.vms.get());
        }
        VmCommand::Ls { json: false } => {
            let vms = client.call::<VmsResult>("vm.list", json!({}))?;
            warn_from_memory(vms.result.store_unavailable.as_deref());
            print!("{}", output::vms_table(&vms.result.vms, now));
        }
        VmCommand::Inspect { name, json } => {
            let vm = client.call::<VmResult>("vm.get", json!({"name": name}))?;
            warn_from_memory(vm.result.store_unavailable.as_deref());
            show(json, &vm.result.vm, |v| output::vm_details(v, now));
        }
        // Taken by `run`: it needs the connection to itself.
        VmCommand::Exec { .. } => {}
        VmCommand::Ping { name, wait, json } => {
            let ping =
                client.call::<PingResult>("vm.ping", json!({"name": name, "wait_secs": wait}))?;
            if json {
                println!("{}", output::json(&ping));
            } else {
                let p = ping.result;
                println!(
                    "{name}: agent {} answered in {:.2} ms; kernel {}, hostname {}, ready {} ms after boot",
                    p.agent_version, p.round_trip_ms, p.kernel, p.hostname, p.boot.ready_ms
                );
            }
        }
        // `--follow` was taken by `run`: it needs the connection to itself.
        VmCommand::Logs { name, tail, .. } => {
            let logs = client.call::<LogsResult>("vm.logs", json!({"name": name, "tail": tail}))?;
            print!("{}", logs.result.text);
        }
    }
    Ok(())
}

/// The failure an error frame ends a stream with.
fn stream_error(payload: &[u8]) -> Failure {
    let message = serde_json::from_slice::<ErrorObject>(payload)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned());
    Failure::Daemon(message)
}

/// banger's own failure in `vm exec`, as docker and podman report theirs.
const EXEC_FAILED: u8 = 125;

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
fn exec(
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
fn follow_logs(client: Client, name: &str, tail: Option<usize>) -> Result<(), Failure> {
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

/// Prints `value` as JSON with `--json`, else as `human` renders it.
fn show<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) {
    if json {
        println!("{}", output::json(value));
    } else {
        print!("{}", human(value));
    }
}

fn image(client: &mut Client, command: ImageCommand, now: Timestamp) -> Result<(), Failure> {
    match command {
        ImageCommand::Import { path, name, json } => {
            let params = json!({"path": absolute(&path)?, "name": name});
            let mut stderr = std::io::stderr();
            let mut shown = String::new();
            let image = client.call_with_progress::<ImageResult>("image.import", params, |p| {
                // One line per phase and tenth, not per notification.
                let line = output::progress(&p.phase, p.current, p.total);
                let tenth = match (p.current, p.total) {
                    (Some(c), Some(t)) if t > 0 => c * 10 / t,
                    _ => 0,
                };
                let key = format!("{} {tenth}", p.phase);
                if key != shown {
                    let _ = writeln!(stderr, "{line}");
                    shown = key;
                }
            })?;
            let image = image.result.image;
            if json {
                println!("{}", output::json(&image));
            } else {
                println!(
                    "{} {} ({} layers, {})",
                    image.name,
                    output::short_digest(&image.digest),
                    image.layers.len(),
                    output::mib(image.disk_bytes)
                );
            }
        }
        ImageCommand::Ls { json } => {
            let images = client.call::<ImagesResult>("image.list", json!({}))?;
            show(json, &images.result.images, |v| {
                output::images_table(v, now)
            });
        }
        ImageCommand::Inspect { name, json } => {
            let image = client
                .call::<ImageResult>("image.inspect", json!({"name": name}))?
                .result
                .image;
            show(json, &image, |v| output::image_details(v, now));
        }
        ImageCommand::Rm { name, force, json } => {
            let removed = client
                .call::<ImagesRemoved>("image.remove", json!({"name": name, "force": force}))?
                .result;
            show(json, &removed, output::images_removed);
        }
        ImageCommand::Prune { json } => {
            let pruned = client
                .call::<ImagesRemoved>("image.prune", json!({}))?
                .result;
            show(json, &pruned, output::images_removed);
        }
    }
    Ok(())
}

fn kernel(client: &mut Client, command: KernelCommand, now: Timestamp) -> Result<(), Failure> {
    match command {
        KernelCommand::Import {
            name,
            vmlinux,
            initrd,
            cmdline,
        } => {
            let initrd = initrd.as_deref().map(absolute).transpose()?;
            let params = json!({"name": name, "vmlinux": absolute(&vmlinux)?, "initrd": initrd, "cmdline": cmdline});
            let kernel = client
                .call::<KernelResult>("kernel.import", params)?
                .result
                .kernel;
            if let Some(note) = &kernel.note {
                eprintln!("note: {}: {note}", kernel.name);
            }
            println!("{}", kernel.name);
        }
        KernelCommand::ImportDeb { name, path, json } => {
            let params = json!({"name": name, "path": absolute(&path)?});
            let mut stderr = std::io::stderr();
            let kernel =
                client.call_with_progress::<KernelResult>("kernel.import_deb", params, |p| {
                    let _ = writeln!(stderr, "{}", output::progress(&p.phase, p.current, p.total));
                })?;
            let kernel = kernel.result.kernel;
            if json {
                println!("{}", output::json(&kernel));
            } else {
                println!(
                    "{} {} ({} modules in the initramfs)",
                    kernel.name,
                    kernel.version.as_deref().unwrap_or("?"),
                    kernel.modules.len()
                );
            }
        }
        KernelCommand::Ls { json } => {
            let kernels = client.call::<KernelsResult>("kernel.list", json!({}))?;
            show(json, &kernels.result.kernels, |v| {
                output::kernels_table(v, now)
            });
        }
        KernelCommand::Inspect { name, json } => {
            let kernels = client.call::<KernelsResult>("kernel.list", json!({}))?;
            let Some(kernel) = kernels.result.kernels.into_iter().find(|k| k.name == name) else {
                return Err(Failure::Daemon(format!(
                    "no kernel named {name}; `banger kernel ls` lists them"
                )));
            };
            show(json, &kernel, |v| output::kernel_details(v, now));
        }
        KernelCommand::Rm { name } => {
            client.call::<KernelResult>("kernel.remove", json!({"name": name}))?;
            println!("{name} removed");
        }
    }
    Ok(())
}

fn network(client: &mut Client, command: NetworkCommand, now: Timestamp) -> Result<(), Failure> {
    match command {
        NetworkCommand::Create {
            name,
            subnet,
            no_nat,
            host_access,
            dns,
            json,
        } => {
            let params = json!({
                "name": name, "subnet": subnet, "no_nat": no_nat,
                "host_access": host_access, "dns": dns,
            });
            let network = client
                .call::<NetworkResult>("network.create", params)?
                .result
                .network;
            if json {
                println!("{}", output::json(&network));
            } else {
                println!(
                    "{} {} (bridge {}, gateway {})",
                    network.record.name,
                    network.record.subnet,
                    network.record.bridge,
                    network.gateway
                );
            }
        }
        NetworkCommand::Ls { json } => {
            let networks = client.call::<NetworksResult>("network.list", json!({}))?;
            show(json, &networks.result.networks, |v| {
                output::networks_table(v, now)
            });
        }
        NetworkCommand::Inspect { name, json } => {
            let network = client
                .call::<NetworkResult>("network.get", json!({"name": name}))?
                .result
                .network;
            show(json, &network, |v| output::network_details(v, now));
        }
        NetworkCommand::Rm { name } => {
            client.call::<RemovedResult>("network.remove", json!({"name": name}))?;
            println!("{name} removed");
        }
        NetworkCommand::Reconcile { json } => {
            let report = client
                .call::<ReconcileResult>("network.reconcile", json!({}))?
                .result
                .reconciled;
            for failure in &report.failed {
                eprintln!("could not reconcile {failure}");
            }
            if json {
                println!("{}", output::json(&report));
            } else {
                println!(
                    "removed {} links, {} nft elements, {} leases; recreated {} links, {} nft elements, {} leases",
                    report.removed_links.len(),
                    report.removed_elements,
                    report.removed_leases,
                    report.recreated_links.len(),
                    report.recreated_elements,
                    report.recreated_leases
                );
            }
        }
    }
    Ok(())
}

/// An operation that ended in anything but success fails the command.
fn ended(op: &OperationRecord) -> Result<(), Failure> {
    match op.outcome {
        OperationOutcome::Succeeded => Ok(()),
        outcome => Err(Failure::Daemon(format!(
            "operation {} {}{}",
            op.op_id,
            crate::wire_name(&outcome),
            op.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ))),
    }
}

/// Says, on stderr, that what follows is the daemon's memory, not the store.
fn warn_from_memory(unavailable: Option<&str>) {
    if let Some(why) = unavailable {
        eprintln!("warning: {why}; shown from the daemon's memory of the VMs");
    }
}

fn status_view(status: &StatusResult) -> String {
    let list = |items: Vec<String>| items.join(", ");
    let mut rows = vec![
        vec!["version:".into(), status.version.clone()],
        vec!["pid:".into(), status.pid.to_string()],
        vec!["mode:".into(), status.mode.clone()],
        vec![
            "uptime:".into(),
            format!(
                "{} (since {})",
                output::duration(status.uptime_seconds),
                status.started_at
            ),
        ],
        vec!["state dir:".into(), status.state_dir.display().to_string()],
        vec!["socket:".into(), status.socket.display().to_string()],
        vec!["store:".into(), status.store.path.display().to_string()],
        vec![
            "writes:".into(),
            status
                .store
                .unavailable
                .clone()
                .unwrap_or_else(|| "ok".into()),
        ],
        vec![
            "schema:".into(),
            list(
                status
                    .store
                    .tables
                    .iter()
                    .map(|(t, v)| format!("{t} v{v}"))
                    .collect(),
            ),
        ],
        vec![
            "records:".into(),
            list(
                status
                    .store
                    .records
                    .iter()
                    .map(|(t, n)| format!("{t} {n}"))
                    .collect(),
            ),
        ],
        vec![
            "operations:".into(),
            format!("{} running", status.operations_running),
        ],
    ];
    for bad in &status.quarantined {
        rows.push(vec![
            "quarantined:".into(),
            format!("{} {}: {}", bad.table, bad.key, bad.reason),
        ]);
    }
    output::table(&rows)
}
