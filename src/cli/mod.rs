//! The `banger` command line: parses arguments, talks to bangerd through
//! the blocking [`Client`], prints tables or `--json`.
//!
//! Exit codes: 0 success; 1 the daemon reported an error; 2 usage error;
//! 3 the daemon cannot be reached.

pub mod args;
pub mod output;

mod daemon;
mod exec;
mod image;
mod kernel;
mod network;
mod ops;
mod vm;

use args::{
    Cli, Command, DaemonCommand, ImageCommand, KernelCommand, NetworkCommand, OpsCommand, VmCommand,
};
use exec::EXEC_FAILED;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};

use clap::{CommandFactory, FromArgMatches};
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

/// Parses the command line of a binary whose definition is `P`, with the
/// version line stamped at build time.
pub fn parse<P: FromArgMatches + CommandFactory>() -> P {
    let matches = P::command().version(VERSION).get_matches();
    P::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut P::command()).exit())
}

pub fn main() -> ExitCode {
    let cli: Cli = parse();
    if let Command::Completions { shell } = cli.command {
        let mut command = Cli::command().version(VERSION);
        clap_complete::generate(shell, &mut command, "banger", &mut std::io::stdout());
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
        Command::Daemon(command) => daemon::run(&mut client, command)?,
        Command::Ops(command) => ops::run(&mut client, command, now)?,
        Command::Vm(VmCommand::Logs {
            name,
            tail,
            follow: true,
        }) => exec::follow_logs(client, &name, tail)?,
        Command::Vm(VmCommand::Exec {
            name,
            env,
            workdir,
            wait,
            command,
        }) => exec::exec(client, &name, &env, workdir, wait, command)?,
        Command::Vm(command) => vm::run(&mut client, command, now)?,
        Command::Kernel(command) => kernel::run(&mut client, command, now)?,
        Command::Image(command) => image::run(&mut client, command, now)?,
        Command::Network(command) => network::run(&mut client, command, now)?,
        Command::Completions { .. } => {}
    }
    Ok(())
}

fn absolute(path: &std::path::Path) -> Result<PathBuf, Failure> {
    std::path::absolute(path)
        .map_err(|e| Failure::Daemon(format!("cannot resolve {}: {e}", path.display())))
}

/// Prints `value` as JSON with `--json`, else as `human` renders it.
fn show<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) {
    if json {
        println!("{}", output::json(value));
    } else {
        print!("{}", human(value));
    }
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
