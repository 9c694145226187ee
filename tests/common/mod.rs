//! Helpers shared by the integration tests: a real `bangerd` process per
//! test, on a private state directory, stopped and removed even when the
//! test fails.
#![allow(dead_code)] // each test binary uses a different subset

pub mod guest;
pub mod halt;
pub mod oci;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const BANGERD: &str = env!("CARGO_BIN_EXE_bangerd");

/// A filesystem mounted at `.0` by a test; unmounted on drop.
pub struct Mounted(pub PathBuf);

impl Mounted {
    /// A tmpfs of `size` (e.g. `64m`) at `dir`, made if missing.
    pub fn tmpfs(dir: &Path, size: &str) -> Mounted {
        std::fs::create_dir_all(dir).expect("mount point");
        run_ok(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().expect("utf-8"),
            ],
        );
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(&self.0).status();
    }
}

/// Writes `path` until its filesystem is full; answers the bytes written.
pub fn fill_disk(path: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create the filler");
    let zeros = vec![0u8; 1 << 20];
    let (mut chunk, mut written) = (zeros.len(), 0u64);
    while chunk >= 512 {
        match file.write(&zeros[..chunk]) {
            Ok(n) => written += n as u64,
            Err(_) => chunk /= 2,
        }
    }
    written
}

/// Upper bound on how long any single event is awaited; a test that hits
/// it has found a hang.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("banger-test-")
        .tempdir()
        .expect("create a temporary state dir")
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("banger.redb")
}

/// Each test's daemon listens beside its state directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("bangerd.sock")
}

/// The probe's exit code and its one line of output.
pub fn probe(dir: &Path) -> (i32, String) {
    let out = Command::new(BANGERD)
        .args(["--user", "--check-migrations", "--state-dir"])
        .arg(dir)
        .arg("--socket")
        .arg(socket_path(dir))
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .expect("run bangerd --check-migrations");
    let stdout = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
    assert_eq!(
        stdout.lines().count(),
        1,
        "the probe prints one line: {stdout:?}"
    );
    (out.status.code().expect("probe exit code"), stdout)
}

/// A file's bytes and modification time, to prove it was not touched.
#[derive(Debug, PartialEq)]
pub struct Fingerprint {
    bytes: Vec<u8>,
    modified: SystemTime,
}

pub fn fingerprint(path: &Path) -> Fingerprint {
    Fingerprint {
        bytes: std::fs::read(path).expect("read file"),
        modified: std::fs::metadata(path)
            .and_then(|m| m.modified())
            .expect("mtime"),
    }
}

/// A running bangerd; killed on drop if the test did not stop it.
pub struct Daemon {
    child: Child,
    stderr: mpsc::Receiver<String>,
    /// Every stderr line received so far.
    log: Vec<String>,
    /// Where the next `wait_for_line` starts looking.
    cursor: usize,
}

impl Daemon {
    pub fn spawn(dir: &Path) -> Daemon {
        Daemon::spawn_with(dir, &["--user"])
    }

    /// Spawns bangerd on `dir` with extra arguments (mode, config).
    pub fn spawn_with(dir: &Path, args: &[&str]) -> Daemon {
        Daemon::spawn_with_env(dir, args, &[])
    }

    /// Spawns bangerd with extra arguments and environment variables.
    pub fn spawn_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_binary(Path::new(BANGERD), dir, args, env)
    }

    /// Spawns another build of bangerd (a benchmark's baseline).
    pub fn spawn_binary(binary: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_in(None, binary, dir, args, env)
    }

    /// Spawns bangerd in a network namespace: the named one (`/run/netns/
    /// NAME`, a network test's world), or else a new one of its own, so
    /// that no test's bridges, taps or rules ever reach the host's.
    pub fn spawn_in(
        netns: Option<&Path>,
        binary: &Path,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net={}", netns.display()));
                command
            }
            None => {
                let mut command = Command::new("unshare");
                command.arg("--net");
                command
            }
        };
        let mut child = command
            .arg(binary)
            .envs(env.iter().copied())
            .args(args)
            .arg("--state-dir")
            .arg(dir)
            .arg("--socket")
            .arg(socket_path(dir))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bangerd");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[bangerd] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            stderr: rx,
            log: Vec::new(),
            cursor: 0,
        }
    }

    /// Starts bangerd and waits for its `daemon ready` line.
    pub fn start(dir: &Path) -> Daemon {
        Daemon::ready(Daemon::spawn(dir))
    }

    /// Waits for the daemon's exit (after a line that says it is coming).
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for bangerd")
    }

    /// Waits for a spawned daemon's `daemon ready` line.
    pub fn ready(mut daemon: Daemon) -> Daemon {
        daemon
            .wait_for_line("daemon ready")
            .unwrap_or_else(|| panic!("bangerd never became ready: {:?}", daemon.child.try_wait()));
        daemon
    }

    /// Waits for a stderr line containing `needle` that came after the line
    /// the previous wait returned; None if stderr closed.
    pub fn wait_for_line(&mut self, needle: &str) -> Option<String> {
        let (index, line) = self.wait_for_line_from(&[needle], self.cursor)?;
        self.cursor = index + 1;
        Some(line)
    }

    /// How many stderr lines have arrived: a mark for `wait_for_line_from`.
    pub fn mark(&mut self) -> usize {
        self.log.extend(self.stderr.try_iter());
        self.log.len()
    }

    /// Waits for a line containing every one of `needles` among the lines
    /// from index `from` on, those already received included.
    pub fn wait_for_line_from(&mut self, needles: &[&str], from: usize) -> Option<(usize, String)> {
        let matches = |line: &str| needles.iter().all(|n| line.contains(n));
        if let Some(index) = (from..self.log.len()).find(|&i| matches(&self.log[i])) {
            return Some((index, self.log[index].clone()));
        }
        loop {
            match self.stderr.recv_timeout(EVENT_TIMEOUT) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if self.log.len() > from && matches(&line) {
                        return Some((self.log.len() - 1, line));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("no line with {needles:?} within {EVENT_TIMEOUT:?}")
                }
            }
        }
    }

    /// Every remaining stderr line, after the process has exited.
    pub fn wait_output(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().expect("wait for bangerd");
        let mut lines = std::mem::take(&mut self.log);
        lines.extend(self.stderr.try_iter());
        let mut rest = lines.join("\n");
        while let Ok(line) = self.stderr.recv_timeout(EVENT_TIMEOUT) {
            rest.push('\n');
            rest.push_str(&line);
        }
        (status, rest)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) -> ExitStatus {
        kill(self.pid(), Signal::SIGTERM).expect("send SIGTERM");
        self.child.wait().expect("wait for bangerd")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a bangerd that must refuse to start; returns its exit code and stderr.
pub fn refused(dir: &Path) -> (i32, String) {
    let (status, stderr) = Daemon::spawn(dir).wait_output();
    (status.code().expect("exit code"), stderr)
}

/// A VM record with predictable fields, keyed `vm-<i>`.
pub fn vm_record(i: usize) -> banger::vm::record::VmRecord {
    use banger::vm::phase::Phase;
    use banger::vm::record::{VmRecord, VmmKind};
    VmRecord {
        id: format!("vm-{i}"),
        name: format!("test-vm-{i}"),
        phase: Phase::Stopped,
        vmm: VmmKind::Qemu,
        vcpus: 1,
        memory_mib: 256,
        kernel: "default".into(),
        rootfs: PathBuf::from(format!("/var/lib/banger/vms/vm-{i}/rootfs.ext4")),
        created_at: jiff::Timestamp::now(),
        started_at: None,
        restart_policy: Default::default(),
        restart_count: 0,
        restart_history: Default::default(),
        last_exit: None,
        process: None,
        error: None,
        degraded: None,
        network: None,
        image: None,
        disk_bytes: None,
        main: None,
        resources: vec![banger::vm::ledger::Resource::VmDirectory],
    }
}

/// Environment variable that turns an `#[ignore]`d test into the body of a
/// child process (see `spawn_child`).
pub const CHILD_ENV: &str = "BANGER_TEST_CHILD_DIR";

/// Re-runs this test binary as a child process executing only the ignored
/// test `name`, with `CHILD_ENV` naming `dir`. Its stdout is piped.
pub fn spawn_child(name: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test process")
}

/// The state directory a child process was given, or None in the parent.
pub fn child_dir() -> Option<PathBuf> {
    std::env::var_os(CHILD_ENV).map(PathBuf::from)
}

pub const BANGER: &str = env!("CARGO_BIN_EXE_banger");

/// Writes `n` VM records into a fresh store under `dir` (before a daemon
/// starts), so a backup has something to copy.
pub fn seed_store(dir: &Path, n: usize) {
    let opened =
        banger::store::open(dir, banger::store::Schema::production()).expect("create store");
    for i in 0..n {
        opened.store.put(&vm_record(i)).expect("seed record");
    }
}

/// A JSON-RPC request object.
pub fn request(id: u64, method: &str, params: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// A raw line-level connection to a daemon, for protocol tests.
pub struct Conn {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    /// Messages read while looking for another request's answer.
    backlog: std::collections::VecDeque<serde_json::Value>,
}

impl Conn {
    pub fn open(dir: &Path) -> Conn {
        let stream =
            std::os::unix::net::UnixStream::connect(socket_path(dir)).expect("connect to bangerd");
        stream
            .set_read_timeout(Some(EVENT_TIMEOUT))
            .expect("read timeout");
        Conn {
            reader: BufReader::new(stream.try_clone().expect("clone stream")),
            writer: stream,
            backlog: Default::default(),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.writer.write_all(bytes).expect("write to bangerd");
    }

    pub fn send(&mut self, message: &serde_json::Value) {
        let mut line = serde_json::to_vec(message).expect("encode");
        line.push(b'\n');
        self.send_raw(&line);
    }

    /// The next line as JSON; None when the daemon closed the connection.
    pub fn recv(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line).expect("read from bangerd") {
            0 => None,
            _ => Some(serde_json::from_str(&line).expect("bangerd sent JSON")),
        }
    }

    /// Reads until the response to `id`, returning it and the progress
    /// notifications seen for `id` on the way.
    pub fn response(&mut self, id: u64) -> (serde_json::Value, Vec<serde_json::Value>) {
        let mut progress = Vec::new();
        let mut backlog = std::mem::take(&mut self.backlog);
        loop {
            let message = match backlog.pop_front() {
                Some(message) => message,
                None => self.recv().expect("connection closed before the response"),
            };
            if message["method"] == "progress" && message["params"]["id"] == id {
                progress.push(message["params"].clone());
            } else if message["method"].is_null() && message["id"] == id {
                self.backlog.extend(backlog);
                return (message, progress);
            } else {
                self.backlog.push_back(message);
            }
        }
    }

    pub fn call(&mut self, id: u64, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.send(&request(id, method, params));
        self.response(id).0
    }
}

/// Runs the banger CLI against the daemon of `dir`.
pub fn banger(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BANGER)
        .arg("--socket")
        .arg(socket_path(dir))
        .args(args)
        .env_remove("BANGER_SOCKET")
        .output()
        .expect("run banger")
}

/// Whether every one of `tools` is on PATH; the first missing one skips
/// `test`, saying so.
pub fn tools_installed(test: &str, tools: &[&str]) -> bool {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            skip(
                test,
                &format!("{tool} is not installed (scripts/test.sh installs it)"),
            );
            return false;
        }
    }
    true
}

/// Where skipped tests leave their reasons; scripts/test.sh prints them
/// after the run, since the runner hides the output of tests that pass.
pub const SKIPPED_LOG: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/skipped-tests.txt");

/// Records why the calling test cannot run here; the test then returns.
/// An agent binary for VMs that never run it (the halt kernel stops
/// before init): every boot image carries the daemon's agent.
pub fn stub_agent(dir: &Path) -> PathBuf {
    let path = dir.join("stub-agent");
    std::fs::write(&path, b"not run: the halt kernel has no init\n").expect("write the stub agent");
    path
}

/// What the previous release's daemon did before every boot, and what its
/// agent's stage 1 needs: that agent at `/sbin/banger-agent` in the ext4
/// root disk (written by debugfs, no mount).
pub fn install_previous_agent(disk: &Path, agent: &Path) {
    let script = format!(
        "mkdir /sbin\nwrite {} /sbin/banger-agent\nsif /sbin/banger-agent mode 0100755\n",
        agent.display()
    );
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run debugfs");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), script.as_bytes())
        .expect("debugfs script");
    assert!(
        child.wait().expect("debugfs").success(),
        "debugfs failed on {}",
        disk.display()
    );
}

/// A child process killed (and reaped) when the test ends, passing or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What `child` printed once it exits, or None if it is still running
/// after [`EVENT_TIMEOUT`] (it is then left to its own end).
pub fn output_within_timeout(child: Child) -> Option<std::process::Output> {
    let (done, exited) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    exited.recv_timeout(EVENT_TIMEOUT).ok()?.ok()
}

pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    eprintln!("SKIPPED {test}: {reason}");
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(SKIPPED_LOG)
    {
        let _ = writeln!(log, "{test}: {reason}");
    }
}

/// The firecracker fixture (real binary, v1.12.1), or None with the reason
/// recorded: scripts/test.sh installs it and sets BANGER_TEST_FIRECRACKER.
pub fn firecracker_fixture(test: &str) -> Option<PathBuf> {
    let Some(path) = std::env::var_os("BANGER_TEST_FIRECRACKER").map(PathBuf::from) else {
        skip(
            test,
            "BANGER_TEST_FIRECRACKER is not set (scripts/test.sh installs the firecracker fixture)",
        );
        return None;
    };
    if !path.is_file() {
        skip(test, &format!("{} does not exist", path.display()));
        return None;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        skip(
            test,
            "/dev/kvm is not usable here; firecracker cannot start VMs",
        );
        return None;
    }
    Some(path)
}

/// The halt kernel: an ELF64 whose one PT_LOAD segment at 0x1000000 holds
/// `cli; hlt; jmp back`. Firecracker boots it to Running and it idles.
pub fn halt_kernel(path: &Path) {
    const LOAD: u64 = 0x100_0000;
    const OFFSET: usize = 0x1000;
    let code = [0xfa, 0xf4, 0xeb, 0xfd];
    let mut elf = Vec::with_capacity(OFFSET + code.len());
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after this header
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 0, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, sh*
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R + X
    for word in [
        OFFSET as u64,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.resize(OFFSET, 0);
    elf.extend_from_slice(&code);
    std::fs::write(path, elf).expect("write the halt kernel");
}

/// Kills, on drop, every process whose command line or mounts mention
/// `dir`: the VMMs a test's daemon started outlive the daemon by design.
pub struct ProcessReaper(pub PathBuf);

impl ProcessReaper {
    pub fn pids(&self) -> Vec<i32> {
        let needle = self.0.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let in_cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false);
                // A jailed VMM's command line names only paths in its jail,
                // which the source of its root mount reveals. Only the root
                // mount: a filesystem mounted under the state directory is
                // in every process's mountinfo.
                let in_jail = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                    .map(|m| {
                        m.lines().any(|line| {
                            line.split(' ').nth(4) == Some("/") && line.contains(&needle)
                        })
                    })
                    .unwrap_or(false);
                in_cmdline || in_jail
            })
            .collect()
    }
}

impl Drop for ProcessReaper {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Whether `pid` runs (a zombie is dead: PID 1 here reaps orphans late).
pub fn pid_alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// The `p` quantile (0 to 1) of some latencies, for the benchmarks.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(rank.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// One benchmark line: the count, p50 and p99 of some latencies.
pub fn summary(name: &str, samples: &[Duration]) -> String {
    format!(
        "{name}: n={} p50={:?} p99={:?}\n",
        samples.len(),
        percentile(samples, 0.50),
        percentile(samples, 0.99)
    )
}

/// Seconds as the benchmarks report them: the median, and the line
/// "median M s (min A, max B)".
pub fn spread(mut samples: Vec<f64>) -> (f64, String) {
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    (
        median,
        format!(
            "median {median:.3} s (min {:.3}, max {:.3})",
            samples[0],
            samples[samples.len() - 1]
        ),
    )
}

/// A field of a /proc status text (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// A memory field of process `pid` (a pid, or `self`), in KiB.
pub fn process_kib(pid: impl std::fmt::Display, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status_kib(&status, field)
}

/// Resets process `pid`'s peak RSS (VmHWM) to its RSS now, and answers
/// that RSS: what a later VmHWM is measured against.
pub fn reset_peak_rss(pid: impl std::fmt::Display + Copy) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("reset the peak RSS of {pid}: {e}"));
    process_kib(pid, "VmRSS")
}

/// Runs `program`, which must succeed; its standard output.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names in `dir`; none if it does not exist.
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// `e2fsck -fn` finds nothing to fix in `disk`.
pub fn assert_fsck_clean(disk: &Path, what: &str) {
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn {what}: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// Bytes the file's blocks take.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// An XFS with reflinks on a loop device of `bytes` (a sparse file under
/// `dir`), mounted at `dir/xfs`; unmounted on drop. Needs root.
pub struct LoopXfs(pub PathBuf);

impl LoopXfs {
    pub fn mount(dir: &Path, bytes: u64) -> LoopXfs {
        let file = dir.join("xfs.img");
        let backing = std::fs::File::create(&file).expect("backing file");
        backing.set_len(bytes).expect("size");
        let file = file.to_str().expect("utf-8");
        run_ok("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", file]);
        let at = dir.join("xfs");
        std::fs::create_dir_all(&at).expect("mount point");
        run_ok("mount", &["-o", "loop", file, at.to_str().expect("utf-8")]);
        LoopXfs(at)
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(&self.0).status();
    }
}

/// A daemon for image tests: no networking, `image` under `[image]`.
pub fn image_daemon(state: &Path, image: &str, env: &[(&str, &str)]) -> Daemon {
    let config = state.join("bangerd.toml");
    std::fs::write(
        &config,
        format!("[network]\nenabled = false\n[image]\n{image}"),
    )
    .expect("config");
    Daemon::ready(Daemon::spawn_with_env(
        state,
        &["--config", &config.to_string_lossy()],
        env,
    ))
}
