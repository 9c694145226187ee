//! bangerd: the banger daemon. Owns the store and, as they land, every VM,
//! network and image on this host.

use std::fs::DirBuilder;
use std::io::IsTerminal;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use banger::actors::store::StoreActor;
use banger::config::{self, Config, Mode, Overrides};
use banger::store::lifecycle::database_path;
use banger::store::lock::StateLock;
use banger::store::{self, Schema, StoreError};

/// Exit code for a store this binary must not open (newer schema).
const EXIT_INCOMPATIBLE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "bangerd",
    version,
    about = "The banger daemon: owns and supervises the microVMs of this host"
)]
struct Args {
    /// Run in system mode (the default for root): /etc/banger, /var/lib/banger, /run/banger.
    #[arg(long, conflicts_with = "user")]
    system: bool,
    /// Run in user mode (the default for other users): XDG directories.
    #[arg(long)]
    user: bool,
    /// Configuration file [default: the mode's bangerd.toml].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// State directory holding the store [default: from the configuration].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Dry run: say whether this binary can open the store, change nothing,
    /// and exit 0 (compatible), 1 (migrations needed), 2 (incompatible) or 3
    /// (cannot tell). Safe while a daemon is running.
    #[arg(long)]
    check_migrations: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mode = Mode::select(args.system, args.user);
    let overrides = Overrides {
        config: args.config.clone(),
        state_dir: args.state_dir.clone(),
        socket: None,
    };
    let config = config::load(mode, overrides);

    if args.check_migrations {
        let outcome = match &config {
            Ok(config) => store::probe(&database_path(&config.state_dir), &Schema::production()),
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
    let lock = StateLock::acquire(&config.state_dir)?;
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

    let system = actix::System::new();
    let closed = system.block_on(async {
        // Watch the signals before saying ready: a SIGTERM sent the moment
        // the daemon is ready must stop it cleanly, not kill it.
        let shutdown = ShutdownSignals::install()?;
        let (_store, closed) = StoreActor::start(opened.store, 2);
        info!(
            state_dir = %config.state_dir.display(),
            lock = %lock.path().display(),
            pid = std::process::id(),
            "daemon ready"
        );
        shutdown.recv().await;
        info!("shutting down");
        anyhow::Ok(closed)
    })?;
    drop(system);
    if !closed.wait(Duration::from_secs(10)) {
        warn!("the store did not close within 10 s; it will be repaired on the next start");
    }
    Ok(())
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
