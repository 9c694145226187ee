//! banger-agent: PID 1 in every banger VM (stage 1 in the initramfs, stage
//! 2 on the root disk), or, not as PID 1, `--listen PATH` to serve the
//! protocol on a Unix socket (for tests of the host side).

// PID 1 never panics on I/O: no print macros (they panic when stdio fails).
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_agent::cmdline::Cmdline;
use banger_agent::protocol::{BootTimes, SERIAL_PORT_NAME, ShutdownAction, VSOCK_PORT};
use banger_agent::server::{self, Identity, Transport};
use banger_agent::{children, init, log, spawn_thread, system};
use nix::sys::signal::{SigSet, Signal};

const USAGE: &str =
    "usage: banger-agent (as PID 1) | banger-agent --listen PATH | banger-agent --version";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--version"] => {
            let _ = writeln!(
                std::io::stdout(),
                "banger-agent {}",
                env!("CARGO_PKG_VERSION")
            );
        }
        ["--listen", path] => listen(PathBuf::from(path)),
        [] if std::process::id() == 1 && Path::new(init::STAGE1_MARKER).exists() => {
            let stage1_ms = init::stage1();
            stage2(Some(stage1_ms))
        }
        // The agent as the root disk's own init: no stage 1.
        [] if std::process::id() == 1 => stage2(None),
        _ => {
            let _ = writeln!(std::io::stderr(), "{USAGE}");
            std::process::exit(2);
        }
    }
}

/// The signals PID 1 handles in its one loop; blocked in every thread.
fn signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPWR,
    ] {
        set.add(signal);
    }
    set
}

fn stage2(stage1_ms: Option<u64>) -> ! {
    let stage2_ms = system::boot_ms();
    let set = signals();
    if let Err(e) = set.thread_block() {
        init::fatal(&format!("cannot block signals: {e}"));
    }
    // Set-up runs helpers whose exit the signal loop reaps, so it has a
    // thread of its own.
    let setup = spawn_thread("setup", move || {
        let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
        init::stage2_setup(&cmdline);
        let identity = Arc::new(Identity {
            boot: BootTimes {
                stage1_ms,
                stage2_ms,
                ready_ms: system::boot_ms(),
            },
            init: true,
        });
        serve_guest(identity);
        // Slow (host keys under TCG take seconds): only once serving.
        init::start_sshd();
    });
    if let Err(e) = setup {
        init::fatal(&format!("cannot start the set-up: {e}"));
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                children::reap();
            }
            Ok(Signal::SIGTERM) => init::shutdown(ShutdownAction::Reboot),
            Ok(_) => init::shutdown(ShutdownAction::Poweroff),
            Err(e) => log!("sigwait: {e}"),
        }
    }
}

/// Serves the host on whatever channel the VMM gave: QEMU's virtio-serial
/// port, Firecracker's vsock.
fn serve_guest(identity: Arc<Identity>) {
    let serial = identity.clone();
    let started = spawn_thread("serial", move || {
        match server::find_serial_port(Duration::from_secs(5)) {
            Some(port) => server::serve_serial(port, serial),
            None => log!("no virtio-serial port {SERIAL_PORT_NAME}"),
        }
    })
    .and_then(|_| {
        spawn_thread("vsock", move || {
            if let Err(e) = serve_vsock(&identity) {
                log!("no vsock: {e}");
            }
        })
    });
    match started {
        Ok(_) => log!("ready"),
        Err(e) => init::fatal(&format!("cannot start serving: {e}")),
    }
}

/// Listens on vsock; answers only if vsock is unavailable.
fn serve_vsock(identity: &Arc<Identity>) -> nix::Result<()> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept4, bind, listen, socket,
    };
    const VMADDR_CID_ANY: u32 = u32::MAX;
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        listener.as_raw_fd(),
        &VsockAddr::new(VMADDR_CID_ANY, VSOCK_PORT),
    )?;
    listen(&listener, Backlog::new(16)?)?;
    loop {
        // Close-on-exec, or exec'd processes would hold the host's
        // connection open after the agent let it go.
        match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => {
                #[allow(unsafe_code)]
                // SAFETY: accept4(2) just returned this descriptor; nothing
                // else owns it.
                let connection = unsafe { OwnedFd::from_raw_fd(fd) };
                serve_connection(connection, identity.clone());
            }
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => {}
            Err(e) => {
                // Out of descriptors or memory: a later accept may work.
                log!("vsock accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves one socket connection (vsock, or `--listen`'s Unix socket) on a
/// thread of its own.
fn serve_connection(connection: OwnedFd, identity: Arc<Identity>) {
    let stream = std::fs::File::from(connection);
    let started = spawn_thread("connection", move || {
        let served = stream
            .try_clone()
            .and_then(|reader| server::serve(reader, stream, Transport::Socket, &identity));
        if let Err(e) = served {
            log!("connection: {e}");
        }
    });
    if let Err(e) = started {
        log!("cannot serve a connection: {e}");
    }
}

/// `--listen PATH`: the protocol on a Unix socket, one multiplexed stream
/// per connection; no guest set-up and no shutdown.
fn listen(path: PathBuf) {
    let set = signals();
    if let Err(e) = set.thread_block() {
        log!("cannot block signals: {e}");
        std::process::exit(1);
    }
    let _ = std::fs::remove_file(&path);
    let listener = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            log!("cannot listen on {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    let identity = Arc::new(Identity {
        boot: BootTimes {
            stage1_ms: None,
            stage2_ms: system::boot_ms(),
            ready_ms: system::boot_ms(),
        },
        init: false,
    });
    let accepting = spawn_thread("listen", move || {
        for stream in listener.incoming().filter_map(Result::ok) {
            serve_connection(OwnedFd::from(stream), identity.clone());
        }
    });
    if let Err(e) = accepting {
        log!("{e}");
        std::process::exit(1);
    }
    // Tests wait for this line rather than for time to pass.
    log!("listening on {}", path.display());
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                children::reap();
            }
            Ok(_) => std::process::exit(0),
            Err(e) => log!("sigwait: {e}"),
        }
    }
}
