//! bangerd: the banger daemon. Owns the store and, as they land, every VM,
//! network and image on this host.

use std::fs::DirBuilder;
use std::io::IsTerminal;
use std::os::unix::fs::DirBuilderExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use banger::cli::args::{DaemonArgs, LogFormat};
use banger::config::{self, Config, Mode, Overrides};
use banger::daemon::SystemSupervisor;
use banger::rpc::client::Client;
use banger::rpc::daemon::StoreSchemaResult;
use banger::store::lifecycle::database_path;
use banger::store::lock::StateLock;
use banger::store::plan::plan;
use banger::store::{self, Observed, Schema, StoreError};

/// Exit code for a store this binary must not open (newer schema).
const EXIT_INCOMPATIBLE: u8 = 2;

fn main() -> ExitCode {
    let args: DaemonArgs = banger::cli::parse();
    let mode = Mode::select(args.system, args.user);
    let overrides = Overrides {
        config: args.config.clone(),
        state_dir: args.state_dir.clone(),
        socket: args.socket.clone(),
    };
    let config = config::load(mode, overrides);

    if args.check_migrations {
        let outcome = match &config {
            Ok(config) => check_migrations(config),
            Err(e) => store::ProbeOutcome::CannotTell(format!("{e:#}")),
        };
        println!("{outcome}");
        return ExitCode::from(outcome.exit_code());
    }

    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("bangerd: {:#}", anyhow::Error::from(e));
            return ExitCode::FAILURE;
        }
    };
    init_tracing(args.log_format, &config.log_level);
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bangerd: {e:#}");
            let incompatible = matches!(
                e.downcast_ref::<StoreError>(),
                Some(StoreError::Incompatible { .. })
            );
            if incompatible {
                ExitCode::from(EXIT_INCOMPATIBLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The migration probe: asks a running daemon for its store's schema when
/// one answers on the socket within a few seconds, else reads the file
/// read-only; it always prints its one line.
fn check_migrations(config: &Config) -> store::ProbeOutcome {
    let schema = Schema::production();
    let online = Client::connect_within(&config.socket, PROBE_ANSWER).and_then(|mut client| {
        client.call::<StoreSchemaResult>("daemon.store.schema", serde_json::json!({}))
    });
    match online {
        Ok(answer) => {
            let observed = Observed {
                tables: answer.result.tables,
                applied: answer.result.applied_migrations.into_iter().collect(),
                unrecorded: Default::default(),
            };
            store::ProbeOutcome::from_plan(plan(&schema, &observed))
        }
        Err(_) => store::probe(&database_path(&config.state_dir), &schema),
    }
}

/// How long the online probe waits for a daemon before reading the file.
const PROBE_ANSWER: std::time::Duration = std::time::Duration::from_secs(3);

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(config: &Config) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .with_context(|| {
            format!(
                "cannot create the state directory {}",
                config.state_dir.display()
            )
        })?;
    let lock = match StateLock::acquire(&config.state_dir) {
        // The daemon that holds it is gone, yet its lock is held: by a
        // launch's child it forked and that never exec'd.
        Err(store::StoreError::Locked { pid: Some(pid), .. })
            if !std::path::Path::new(&format!("/proc/{pid}")).exists()
                && banger::daemon::end_launch_children(config) > 0 =>
        {
            StateLock::acquire(&config.state_dir)?
        }
        lock => lock?,
    };
    let opened = store::open(&config.state_dir, Schema::production())?;
    if opened.created {
        info!(path = %opened.store.path().display(), "created the store");
    } else if !opened.applied.is_empty() {
        info!(
            path = %opened.store.path().display(),
            applied = ?opened.applied,
            backup = ?opened.backup,
            "migrated the store"
        );
    }

    raise_fd_limit();
    let system = actix::System::new();
    let closed = system.block_on(async {
        // Watch the signals before saying ready: a SIGTERM sent the moment
        // the daemon is ready must stop it cleanly, not kill it.
        let shutdown = ShutdownSignals::install()?;
        let supervisor = SystemSupervisor::start(config, opened.store).await?;
        info!(
            state_dir = %config.state_dir.display(),
            socket = %config.socket.display(),
            lock = %lock.path().display(),
            pid = std::process::id(),
            version = %banger::daemon::VERSION,
            "daemon ready"
        );
        notify_systemd(NotifyState::Ready);
        // The watchdog is fed from the actor system's own thread: if that
        // thread hangs, systemd notices and restarts the daemon.
        if let Some(period) = sd_notify::watchdog_enabled() {
            actix::spawn(async move {
                let mut ticks = tokio::time::interval(period / 2);
                loop {
                    ticks.tick().await;
                    notify_systemd(NotifyState::Watchdog);
                }
            });
        }
        shutdown.recv().await;
        info!("shutting down");
        notify_systemd(NotifyState::Stopping);
        anyhow::Ok(supervisor.shutdown().await)
    })?;
    drop(system);
    if !closed.wait(Duration::from_secs(10)) {
        warn!("the store did not close within 10 s; it will be repaired on the next start");
    }
    Ok(())
}

/// Tells systemd (Type=notify) about the daemon's state; a no-op outside
/// systemd. VMMs never inherit NOTIFY_SOCKET: the spawn removes it.
fn notify_systemd(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Each client connection is a file descriptor: allow as many as the hard
/// limit permits, so a thousand clients do not exhaust the default 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, "cannot raise the open-file limit");
            }
        }
        _ => {}
    }
}

/// SIGTERM and SIGINT both ask for a clean shutdown.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<ShutdownSignals> {
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
