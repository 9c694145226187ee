//! The RPC surface against a real daemon: conformance (every error code,
//! bad input of every kind, many clients), operations (progress, watch,
//! cancel, shutdown and crash in the middle of one) and the CLI.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use serde_json::{Value, json};

/// Records seeded before a backup test: enough for many progress reports.
const SEEDED: usize = 640;

fn code(response: &Value) -> i64 {
    response["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {response}"))
}

fn message(response: &Value) -> &str {
    response["error"]["message"].as_str().unwrap_or_default()
}

fn new_op_id() -> String {
    banger::operations::new_op_id()
}

#[test]
fn malformed_input_gets_errors_and_the_connection_keeps_serving() {
    let tmp = state_dir();
    let _daemon = Daemon::start(tmp.path());
    let mut conn = Conn::open(tmp.path());

    conn.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\n");
    let parse = conn.recv().expect("answer");
    assert_eq!((code(&parse), &parse["id"]), (-32700, &Value::Null));
    assert!(
        parse["error"]["data"]["op_id"].is_string(),
        "errors carry an op_id: {parse}"
    );

    conn.send_raw(b"\xff\xfe\xfd not utf-8\n");
    assert_eq!(code(&conn.recv().expect("answer")), -32700);

    conn.send(&json!([1, 2]));
    assert_eq!(code(&conn.recv().expect("answer")), -32600);
    conn.send(&json!({"jsonrpc": "2.0", "method": "daemon.status"}));
    assert_eq!(code(&conn.recv().expect("answer")), -32600);
    conn.send(&json!({"jsonrpc": "1.0", "id": 2, "method": "daemon.status"}));
    let invalid = conn.recv().expect("answer");
    assert_eq!((code(&invalid), &invalid["id"]), (-32600, &json!(2)));

    let unknown = conn.call(3, "vm.explode", json!({}));
    assert_eq!(code(&unknown), -32601);
    assert!(message(&unknown).contains("vm.explode"));

    let params = conn.call(4, "daemon.backup", json!({"path": 17}));
    assert_eq!(code(&params), -32602);
    assert!(
        message(&params).starts_with("invalid params: path: "),
        "{params}"
    );
    let params = conn.call(5, "daemon.operations.list", json!({"everything": true}));
    assert!(message(&params).contains("everything"), "{params}");

    conn.send_raw(b"\n\r\n");
    let status = conn.call(6, "daemon.status", json!({}));
    assert!(status["result"]["op_id"].is_string(), "{status}");
    assert_eq!(status["result"]["store"]["tables"]["vms"], 2);
}

#[test]
fn domain_errors_have_stable_codes() {
    let tmp = state_dir();
    let dir = tmp.path();
    let _daemon = Daemon::start(dir);
    let mut conn = Conn::open(dir);

    let mismatch = conn.call(1, "daemon.hello", json!({"protocol_version": 99}));
    assert_eq!(code(&mismatch), -32007);
    assert!(message(&mismatch).contains("v99"), "{mismatch}");
    let hello = conn.call(2, "daemon.hello", json!({"protocol_version": 1}));
    assert_eq!(hello["result"]["protocol_version"], 1);

    let missing = conn.call(3, "daemon.operations.get", json!({"op_id": new_op_id()}));
    assert_eq!(code(&missing), -32001);

    let target = dir.join("backups/copy.redb");
    let done = conn.call(4, "daemon.backup", json!({"path": target}));
    let op_id = done["result"]["op_id"].as_str().expect("op_id").to_string();
    assert!(target.exists());

    let exists = conn.call(5, "daemon.backup", json!({"path": target}));
    assert_eq!(code(&exists), -32002);

    let finished = conn.call(6, "daemon.operations.cancel", json!({"op_id": op_id}));
    assert_eq!(code(&finished), -32003);
    assert!(message(&finished).contains("already ended"), "{finished}");

    // The daemon writes backups into its own directory, nowhere else.
    let outside = conn.call(
        7,
        "daemon.backup",
        json!({"path": dir.join("no/such/dir/x.redb")}),
    );
    assert_eq!(code(&outside), -32602);
    assert!(
        message(&outside).contains("outside the daemon's backup directory"),
        "{outside}"
    );

    let listed = conn.call(8, "daemon.operations.list", json!({"all": true}));
    let outcomes: Vec<&str> = listed["result"]["operations"]
        .as_array()
        .expect("operations")
        .iter()
        .map(|op| op["outcome"].as_str().unwrap_or_default())
        .collect();
    // The refused path never became an operation.
    assert_eq!(outcomes, ["succeeded", "failed"]);
}

#[test]
fn oversized_and_half_written_requests_never_hurt_the_daemon() {
    let tmp = state_dir();
    let _daemon = Daemon::start(tmp.path());

    let mut conn = Conn::open(tmp.path());
    let mut huge = vec![b' '; (1 << 20) + 16];
    huge.push(b'\n');
    conn.send_raw(&huge);
    let refused = conn.recv().expect("an error before closing");
    assert_eq!(code(&refused), -32600);
    assert!(message(&refused).contains("longer than"), "{refused}");
    assert!(
        conn.recv().is_none(),
        "the connection is closed after an oversized line"
    );

    let mut half = Conn::open(tmp.path());
    half.send_raw(br#"{"jsonrpc":"2.0","id":1,"meth"#);
    drop(half);

    let mut status = Conn::open(tmp.path());
    assert!(status.call(1, "daemon.status", json!({}))["result"].is_object());
}

#[test]
fn hundreds_of_concurrent_clients_are_all_served() {
    const CLIENTS: usize = 200;
    const CONNECTIONS: usize = 1_000;
    let tmp = state_dir();
    let dir = tmp.path().to_path_buf();
    let _daemon = Daemon::start(&dir);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::open(&dir);
                for i in 0..5 {
                    let id = (c * 10 + i) as u64;
                    let answer = conn.call(id, "daemon.status", json!({}));
                    assert!(answer["result"]["pid"].is_number(), "{answer}");
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }

    // A thousand connections open at once, each asking before any reads.
    raise_fd_limit();
    let mut conns: Vec<Conn> = (0..CONNECTIONS).map(|_| Conn::open(&dir)).collect();
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.send(&request(
            i as u64,
            "daemon.hello",
            json!({"protocol_version": 1}),
        ));
    }
    for (i, conn) in conns.iter_mut().enumerate() {
        let (answer, _) = conn.response(i as u64);
        assert_eq!(answer["result"]["protocol_version"], 1, "{answer}");
    }
    drop(conns);

    let mut last = Conn::open(&dir);
    assert!(last.call(1, "daemon.status", json!({}))["result"].is_object());
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}

/// Starts a backup slowed by a rate limit and waits for its first
/// progress report; returns the op_id.
fn start_slow_backup(conn: &mut Conn, id: u64, target: &Path, rate_limit: u64) -> String {
    conn.send(&request(
        id,
        "daemon.backup",
        json!({"path": target, "rate_limit": rate_limit}),
    ));
    loop {
        let message = conn.recv().expect("progress");
        if message["method"] == "progress" && message["params"]["phase"] == "copying" {
            return message["params"]["op_id"]
                .as_str()
                .expect("op_id")
                .to_string();
        }
        assert!(
            message["method"] == "progress" || message["method"] == "heartbeat",
            "backup ended early: {message}"
        );
    }
}

fn partial(target: &Path) -> std::path::PathBuf {
    banger::store::backup::partial_path(target)
}

#[test]
fn a_backup_streams_progress_to_watchers_and_can_be_cancelled() {
    let tmp = state_dir();
    let dir = tmp.path();
    seed_store(dir, SEEDED);
    let _daemon = Daemon::start(dir);
    let target = dir.join("backups/slow.redb");
    let mut owner = Conn::open(dir);
    let op_id = start_slow_backup(&mut owner, 1, &target, 20_000);
    assert!(
        partial(&target).exists(),
        "the copy is built beside the target"
    );

    // A second connection fills its in-flight budget with watches; the
    // next request on it is refused as unavailable.
    let mut watcher = Conn::open(dir);
    let limit = banger::config::MAX_IN_FLIGHT as u64;
    for id in 0..limit {
        watcher.send(&request(
            id,
            "daemon.operations.watch",
            json!({"op_id": op_id}),
        ));
    }
    watcher.send(&request(limit, "daemon.status", json!({})));
    let (refused, _) = watcher.response(limit);
    assert_eq!(code(&refused), -32004, "{refused}");

    let shown = banger(dir, &["ops", "ls", "--json"]);
    let running: Value = serde_json::from_slice(&shown.stdout).expect("ops ls --json");
    assert_eq!(running[0]["op_id"], op_id.as_str());
    assert_eq!(running[0]["outcome"], "running");
    assert_eq!(running[0]["phase"], "copying");

    let cancel = banger(dir, &["ops", "cancel", &op_id]);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );

    let (cancelled, _) = owner.response(1);
    assert_eq!(code(&cancelled), -32005, "{cancelled}");
    assert_eq!(cancelled["error"]["data"]["op_id"], op_id.as_str());
    let (watched, progress) = watcher.response(0);
    assert_eq!(watched["result"]["operation"]["outcome"], "cancelled");
    assert!(!progress.is_empty(), "the watcher saw progress");
    assert!(
        !target.exists() && !partial(&target).exists(),
        "nothing left behind"
    );
}

#[test]
fn ops_watch_follows_a_backup_to_its_end() {
    let tmp = state_dir();
    let dir = tmp.path();
    seed_store(dir, SEEDED);
    let _daemon = Daemon::start(dir);
    let target = dir.join("backups").join("banger.redb");
    let mut owner = Conn::open(dir);
    let op_id = start_slow_backup(&mut owner, 1, &target, 100_000);

    let watch = banger(dir, &["ops", "watch", &op_id]);
    let stdout = String::from_utf8_lossy(&watch.stdout);
    assert!(
        watch.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let copying: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("copying "))
        .collect();
    assert!(copying.len() >= 2, "progress streamed: {stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some(format!("{op_id} succeeded").as_str())
    );

    let (done, _) = owner.response(1);
    assert_eq!(
        done["result"]["records"].as_u64(),
        Some(SEEDED as u64 + 7 + 1 + 1),
        "the VMs, 7 table versions, this operation, the default network: {done}"
    );
    // The backup is a store in its own right.
    assert_eq!(probe(&dir.join("backups")), (0, "compatible".to_string()));
    let copy = banger::store::open(&dir.join("backups"), banger::store::Schema::production())
        .expect("open copy");
    assert_eq!(
        copy.store.record_counts().expect("counts")["vms"],
        SEEDED as u64
    );
}

/// A daemon over a seeded store with a slow backup under way; answers the
/// daemon, the backup's connection, its target and its op_id.
fn backup_in_flight(dir: &Path) -> (Daemon, Conn, std::path::PathBuf, String) {
    seed_store(dir, SEEDED);
    let daemon = Daemon::start(dir);
    let target = dir.join("backups/b.redb");
    let mut owner = Conn::open(dir);
    let op_id = start_slow_backup(&mut owner, 1, &target, 20_000);
    (daemon, owner, target, op_id)
}

#[test]
fn sigterm_mid_backup_cancels_it_records_it_and_removes_the_socket() {
    let tmp = state_dir();
    let dir = tmp.path();
    let (daemon, _owner, target, op_id) = backup_in_flight(dir);

    let status = daemon.stop();
    assert!(status.success(), "{status}");
    assert!(!socket_path(dir).exists(), "the socket is removed");
    assert!(!partial(&target).exists());

    let _daemon = Daemon::start(dir);
    let mut conn = Conn::open(dir);
    let op = conn.call(1, "daemon.operations.get", json!({"op_id": op_id}));
    let outcome = op["result"]["operation"]["outcome"]
        .as_str()
        .unwrap_or_default();
    assert!(outcome == "cancelled" || outcome == "succeeded", "{op}");
}

#[test]
fn sigkill_mid_backup_shows_interrupted_and_its_partial_file_is_removed() {
    let tmp = state_dir();
    let dir = tmp.path();
    let (daemon, _owner, target, op_id) = backup_in_flight(dir);
    kill(daemon.pid(), Signal::SIGKILL).expect("SIGKILL");
    let (status, _) = daemon.wait_output();
    assert_eq!(status.code(), None, "killed by a signal");
    assert!(
        partial(&target).exists(),
        "the killed daemon left a partial copy"
    );

    let _daemon = Daemon::start(dir);
    let shown = banger(dir, &["ops", "show", &op_id, "--json"]);
    let op: Value = serde_json::from_slice(&shown.stdout).expect("ops show --json");
    assert_eq!(op["outcome"], "interrupted", "{op}");
    assert!(op["finished_at"].is_string());
    assert!(!partial(&target).exists(), "reconciled at start-up");
    assert!(!target.exists());
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    let tmp = state_dir();
    let dir = tmp.path();
    let notify = dir.join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind notify socket");
    listener
        .set_read_timeout(Some(EVENT_TIMEOUT))
        .expect("timeout");
    let notify_path = notify.to_str().expect("utf-8");
    let env = [("NOTIFY_SOCKET", notify_path), ("WATCHDOG_USEC", "200000")];
    let daemon = Daemon::ready(Daemon::spawn_with_env(dir, &["--user"], &env));
    let next = || {
        let mut buffer = [0u8; 256];
        let n = listener.recv(&mut buffer).expect("a notification");
        String::from_utf8_lossy(&buffer[..n]).trim().to_string()
    };
    assert_eq!(next(), "READY=1");
    assert_eq!(next(), "WATCHDOG=1", "the watchdog is fed");
    assert!(daemon.stop().success());
    let mut seen = next();
    while seen == "WATCHDOG=1" {
        seen = next();
    }
    assert_eq!(seen, "STOPPING=1");
}

#[test]
fn the_cli_exit_codes_and_json_are_stable() {
    let tmp = state_dir();
    let dir = tmp.path();

    let unreachable = banger(dir, &["daemon", "status"]);
    assert_eq!(unreachable.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.contains(&socket_path(dir).display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("start it"), "{stderr}");

    assert_eq!(banger(dir, &["ops", "frobnicate"]).status.code(), Some(2));

    let _daemon = Daemon::start(dir);
    let status = banger(dir, &["daemon", "status", "--json"]);
    assert!(status.status.success());
    let status: Value = serde_json::from_slice(&status.stdout).expect("status --json");
    for field in [
        "op_id",
        "version",
        "pid",
        "mode",
        "started_at",
        "uptime_seconds",
        "state_dir",
        "socket",
        "store",
        "operations_running",
    ] {
        assert!(
            status.get(field).is_some(),
            "daemon status --json lacks {field}: {status}"
        );
    }
    let human = banger(dir, &["daemon", "status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("schema:"));

    let missing = banger(dir, &["ops", "show", &new_op_id()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).starts_with("error: no operation"));

    let empty = banger(dir, &["ops", "ls", "--all", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&empty.stdout).expect("json"),
        json!([])
    );
    let table = banger(dir, &["ops", "ls"]);
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("OP ID"));

    let completions = banger(dir, &["completions", "bash"]);
    assert!(completions.status.success() && completions.stdout.len() > 1000);
    let version = banger(dir, &["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).contains("(commit "));

    // The online migration probe answers through the running daemon.
    assert_eq!(probe(dir), (0, "compatible".to_string()));
    let _ = Duration::ZERO;
}

#[test]
fn a_stopped_daemon_never_leaves_a_command_hanging() {
    let tmp = state_dir();
    let dir = tmp.path();
    let daemon = Daemon::start(dir);
    kill(daemon.pid(), Signal::SIGSTOP).expect("SIGSTOP bangerd");
    let started = std::time::Instant::now();
    let status = banger(dir, &["daemon", "status"]);
    let waited = started.elapsed();
    let stderr = String::from_utf8_lossy(&status.stderr).into_owned();
    let socket = socket_path(dir).display().to_string();
    // The probe reads the file while the daemon cannot answer.
    let probed = std::time::Instant::now();
    let (code, line) = probe(dir);
    let probe_took = probed.elapsed();
    kill(daemon.pid(), Signal::SIGCONT).expect("SIGCONT bangerd");
    assert_eq!(status.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&socket) && stderr.contains("did not answer"),
        "{stderr}"
    );
    assert!(
        waited < Duration::from_secs(20),
        "daemon status took {waited:?}"
    );
    assert_eq!(code, 0, "{line}");
    assert!(
        probe_took < Duration::from_secs(15),
        "the probe took {probe_took:?}"
    );
    let again = banger(dir, &["daemon", "status"]);
    assert!(again.status.success(), "after SIGCONT: {again:?}");
}

/// A daemon with `[rpc]` limits set by `rpc`.
fn daemon_with_rpc_limits(dir: &Path, rpc: &str) -> Daemon {
    let config = dir.join("bangerd.toml");
    std::fs::write(&config, format!("[rpc]\n{rpc}\n")).expect("config");
    Daemon::ready(Daemon::spawn_with(
        dir,
        &["--user", "--config", config.to_str().expect("utf-8")],
    ))
}

#[test]
fn an_idle_connection_is_closed_and_a_busy_daemon_names_its_limit() {
    let tmp = state_dir();
    let dir = tmp.path();
    seed_store(dir, 200);
    let _daemon = daemon_with_rpc_limits(dir, "first_request_secs = 0.5\nmax_in_flight = 2");
    // Idle: told why, then closed.
    let mut idle = Conn::open(dir);
    let told = idle.recv().expect("a reason before the close");
    assert!(
        told["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rpc.first_request_secs"),
        "{told}"
    );
    assert!(idle.recv().is_none(), "closed after the reason");
    // Busy: two slow backups hold the daemon's two slots.
    // (Each connection is opened just before its request: an idle one
    // would be closed.)
    let mut first = Conn::open(dir);
    start_slow_backup(&mut first, 1, &dir.join("backups/one.redb"), 2_000);
    let mut second = Conn::open(dir);
    start_slow_backup(&mut second, 1, &dir.join("backups/two.redb"), 2_000);
    let mut third = Conn::open(dir);
    let refused = third.call(1, "daemon.status", json!({}));
    assert_eq!(code(&refused), -32004, "{refused}");
    assert!(message(&refused).contains("rpc.max_in_flight"), "{refused}");
}

#[test]
fn one_uid_cannot_hold_every_connection() {
    let tmp = state_dir();
    let dir = tmp.path();
    let _daemon = daemon_with_rpc_limits(dir, "max_connections_per_uid = 3");
    let mut held: Vec<Conn> = (0..3).map(|_| Conn::open(dir)).collect();
    let mut fourth = Conn::open(dir);
    let told = fourth.recv().expect("a reason before the close");
    assert_eq!(code(&told), -32004, "{told}");
    assert!(
        message(&told).contains("rpc.max_connections_per_uid"),
        "{told}"
    );
    assert!(fourth.recv().is_none(), "closed after the reason");
    // The held connections serve; once one goes, its slot is free again.
    let answer = held[0].call(1, "daemon.status", json!({}));
    assert!(answer["result"].is_object(), "{answer}");
    held.pop();
    // The daemon hears the close on its own time: the first connection
    // after it is admitted.
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let mut conn = Conn::open(dir);
        conn.send(&request(1, "daemon.status", json!({})));
        let answer = conn.recv().expect("an answer or a refusal");
        if answer["result"].is_object() {
            break;
        }
        assert!(
            message(&answer).contains("rpc.max_connections_per_uid"),
            "{answer}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
    }
}

#[test]
fn a_rootfs_that_would_hang_the_daemon_is_refused_at_once() {
    let tmp = state_dir();
    let dir = tmp.path();
    let _daemon = Daemon::start(dir);
    // A FIFO blocks whoever opens it for reading until a writer comes.
    let fifo = dir.join("hang.ext4");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let mut conn = Conn::open(dir);
    let started = std::time::Instant::now();
    let refused = conn.call(
        1,
        "vm.create",
        json!({"name": "hang", "kernel": "k", "rootfs": fifo}),
    );
    assert_eq!(code(&refused), -32602, "{refused}");
    assert!(
        message(&refused).contains("is not a regular file"),
        "{refused}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused without waiting"
    );
    let mut status = Conn::open(dir);
    assert!(status.call(1, "daemon.status", json!({}))["result"].is_object());
}

#[test]
fn requests_in_flight_carry_heartbeats_and_a_daemon_that_stops_ends_them() {
    use std::io::BufRead;
    let tmp = state_dir();
    let dir = tmp.path();
    seed_store(dir, SEEDED);
    let daemon = daemon_with_rpc_limits(dir, "heartbeat_secs = 0.2");
    // On the wire: a client that asks hears heartbeats per request.
    let mut conn = Conn::open(dir);
    let hello = conn.call(
        1,
        "daemon.hello",
        json!({"protocol_version": 1, "heartbeats": true}),
    );
    assert_eq!(hello["result"]["heartbeat_secs"], 0.2, "{hello}");
    let op_id = start_slow_backup(&mut conn, 2, &dir.join("backups/beat.redb"), 20_000);
    loop {
        let message = conn.recv().expect("a heartbeat before the end");
        assert!(message.get("result").is_none(), "ended first: {message}");
        if message["method"] == "heartbeat" {
            assert_eq!(message["params"]["id"], 2, "{message}");
            break;
        }
    }

    // The CLI: following the backup, it hears progress; once the daemon
    // stops, it gives up after three missed heartbeats.
    let mut watch = std::process::Command::new(BANGER)
        .arg("--socket")
        .arg(socket_path(dir))
        .args(["ops", "watch", &op_id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("banger ops watch");
    let mut progress = std::io::BufReader::new(watch.stdout.take().expect("stdout"));
    let mut first = String::new();
    progress.read_line(&mut first).expect("a progress line");
    assert!(first.starts_with("copying"), "{first}");
    kill(daemon.pid(), Signal::SIGSTOP).expect("SIGSTOP bangerd");
    let stopped = std::time::Instant::now();
    let ended = output_within_timeout(watch);
    kill(daemon.pid(), Signal::SIGCONT).expect("SIGCONT bangerd");
    let out = ended.expect("ops watch never gave up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&socket_path(dir).display().to_string())
            && stderr.contains("did not answer"),
        "{stderr}"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "gave up after {:?}",
        stopped.elapsed()
    );
    assert!(banger(dir, &["daemon", "status"]).status.success());
}
