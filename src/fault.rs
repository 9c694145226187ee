//! Fault injection for the crash-safety tests: with the `fault-injection`
//! feature (never in release builds), `BANGER_FAULT_KILL=NAME:N[,NAME:N]`
//! makes the daemon SIGKILL itself just before the N-th time it reaches the
//! boundary NAME (an effect of a VM's lifecycle, e.g. `persist`, `spawn`,
//! `configure`, `reply`, or `spawned`: right after a VMM is spawned,
//! before the machine has heard of it); `BANGER_FAULT_FILL=NAME:N:PATH`
//! fills PATH's filesystem there instead; a request can be paused at a
//! point ([`pause`]); and it fails store writes on demand ([`store_write`]). Without the feature this is empty.

/// `NAME:N[:ARG]` entries of a variable.
#[cfg(feature = "fault-injection")]
fn plan(var: &str) -> Vec<(String, u32, String)> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .filter_map(|entry| {
            let mut parts = entry.splitn(3, ':');
            let name = parts.next()?.to_string();
            let n = parts.next()?.parse().ok()?;
            Some((name, n, parts.next().unwrap_or_default().to_string()))
        })
        .collect()
}

/// How many times the point NAME has been reached, this one included.
#[cfg(feature = "fault-injection")]
fn reached(name: &str) -> u32 {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    static SEEN: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let count = seen.entry(name.to_string()).or_default();
    *count += 1;
    *count
}

/// The ARGs of a plan's entries for the `count`-th time at NAME.
#[cfg(feature = "fault-injection")]
fn due<'a>(
    plan: &'a [(String, u32, String)],
    name: &'a str,
    count: u32,
) -> impl Iterator<Item = &'a str> {
    plan.iter()
        .filter(move |(n, at, _)| n == name && *at == count)
        .map(|(_, _, arg)| arg.as_str())
}

#[cfg(feature = "fault-injection")]
pub fn boundary(name: &str) {
    use std::sync::OnceLock;

    static KILLS: OnceLock<Vec<(String, u32, String)>> = OnceLock::new();
    static FILLS: OnceLock<Vec<(String, u32, String)>> = OnceLock::new();
    let kills = KILLS.get_or_init(|| plan("BANGER_FAULT_KILL"));
    let fills = FILLS.get_or_init(|| plan("BANGER_FAULT_FILL"));
    if kills.is_empty() && fills.is_empty() {
        return;
    }
    let count = reached(name);
    for path in due(fills, name, count) {
        fill(std::path::Path::new(path));
    }
    if due(kills, name, count).next().is_some() {
        tracing::warn!(
            boundary = name,
            count,
            "fault injection: killing the daemon"
        );
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Writes `path` until its filesystem is full: a disk that fills up at
/// this instant (`BANGER_FAULT_FILL=NAME:N:PATH`).
#[cfg(feature = "fault-injection")]
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        tracing::warn!(path = %path.display(), "fault injection: cannot create the filler");
        return;
    };
    let mut chunk = 1 << 20;
    let zeros = vec![0u8; chunk];
    while chunk >= 512 {
        if file.write_all(&zeros[..chunk]).is_err() {
            chunk /= 2;
        }
    }
    tracing::warn!(path = %path.display(), "fault injection: filled the disk");
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn boundary(_: &str) {}

/// With `BANGER_FAULT_PAUSE=NAME:N:FILE`: the N-th time the request path
/// reaches NAME it waits, logging so, until FILE exists; a test does what
/// should race with it meanwhile.
#[cfg(feature = "fault-injection")]
pub async fn pause(name: &str) {
    use std::sync::OnceLock;

    static PAUSES: OnceLock<Vec<(String, u32, String)>> = OnceLock::new();
    let pauses = PAUSES.get_or_init(|| plan("BANGER_FAULT_PAUSE"));
    if pauses.is_empty() {
        return;
    }
    let count = reached(name);
    let Some(file) = due(pauses, name, count).next() else {
        return;
    };
    tracing::warn!(boundary = name, count, "fault injection: paused");
    while !std::path::Path::new(file).exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub async fn pause(_: &str) {}

/// With `BANGER_FAULT_STOP_CHILD=N`: the N-th VMM the daemon spawns stops
/// itself (SIGSTOP) between fork and exec, where a daemon killed then
/// leaves it.
#[cfg(feature = "fault-injection")]
pub fn stop_before_exec() -> bool {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SPAWNED: AtomicU32 = AtomicU32::new(0);
    let Some(at) = std::env::var("BANGER_FAULT_STOP_CHILD")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return false;
    };
    let stop = SPAWNED.fetch_add(1, Ordering::Relaxed) + 1 == at;
    if stop {
        tracing::warn!("fault injection: the VMM's child stops before exec");
    }
    stop
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn stop_before_exec() -> bool {
    false
}

/// With `BANGER_FAULT_STORE_FAIL=FILE`: while FILE holds a number N > 0,
/// the next store write fails as on a full disk and N goes down by one.
/// A test writes the file to fail the next N writes of a running daemon.
#[cfg(feature = "fault-injection")]
pub fn store_write() -> Option<std::io::Error> {
    static TAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let path = std::env::var_os("BANGER_FAULT_STORE_FAIL")?;
    // One store thread at a time reads and rewrites the count.
    let _taking = TAKING.lock().unwrap_or_else(|e| e.into_inner());
    let left: u32 = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    if left == 0 {
        return None;
    }
    let _ = std::fs::write(&path, (left - 1).to_string());
    tracing::warn!(left = left - 1, "fault injection: failing a store write");
    Some(std::io::Error::from_raw_os_error(nix::libc::ENOSPC))
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn store_write() -> Option<std::io::Error> {
    None
}
