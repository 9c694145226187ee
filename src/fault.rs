//! Fault injection for the crash-safety tests: with the `fault-injection`
//! feature (never in release builds), `BANGER_FAULT_KILL=NAME:N[,NAME:N]`
//! makes the daemon SIGKILL itself just before the N-th time it reaches the
//! boundary NAME (an effect of a VM's lifecycle, e.g. `persist`, `spawn`,
//! `configure`, `reply`, or `spawned`: right after a VMM is spawned,
//! before the machine has heard of it). Without the feature this is empty.

#[cfg(feature = "fault-injection")]
pub fn boundary(name: &str) {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    static PLAN: OnceLock<Vec<(String, u32)>> = OnceLock::new();
    static SEEN: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    let plan = PLAN.get_or_init(|| {
        std::env::var("BANGER_FAULT_KILL")
            .unwrap_or_default()
            .split(',')
            .filter_map(|entry| {
                let (name, n) = entry.split_once(':')?;
                Some((name.to_string(), n.parse().ok()?))
            })
            .collect()
    });
    if plan.is_empty() {
        return;
    }
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let count = seen.entry(name.to_string()).or_default();
    *count += 1;
    if plan.iter().any(|(n, at)| n == name && at == count) {
        tracing::warn!(
            boundary = name,
            count = *count,
            "fault injection: killing the daemon"
        );
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn boundary(_: &str) {}
