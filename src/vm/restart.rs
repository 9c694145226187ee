//! Restart policy: whether and when a VM whose VMM exited on its own is
//! started again. Backoff doubles from the policy's delay to its cap and
//! resets after a run of [`RESET_AFTER`]; more than [`LOOP_RESTARTS`]
//! restarts within [`LOOP_WINDOW`] is a crash loop, still retried at the cap.

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::state::ExitKind;

pub const RESET_AFTER: Duration = Duration::from_secs(300);
pub const LOOP_WINDOW: Duration = Duration::from_secs(300);
pub const LOOP_RESTARTS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Never restart.
    No,
    /// Restart after a crash.
    OnFailure,
    /// Restart after a crash or a guest-initiated clean exit.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    pub delay_ms: u64,
    pub max_delay_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            delay_ms: 1_000,
            max_delay_ms: 60_000,
        }
    }
}

/// What the policy remembers between exits (persisted with the VM, so a
/// daemon restart does not forget a crash loop).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartHistory {
    /// Restarts since the backoff last reset.
    pub step: u32,
    /// When recent restarts were decided, within [`LOOP_WINDOW`].
    pub recent: Vec<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Stay,
    RestartAfter { delay: Duration, crash_loop: bool },
}

/// Decides after an exit banger did not ask for. `ran_for` is how long the
/// VMM ran before it exited.
pub fn after_exit(
    policy: &RestartPolicy,
    history: &mut RestartHistory,
    kind: ExitKind,
    ran_for: Duration,
    now: Timestamp,
) -> Decision {
    let wanted = match (kind, policy.mode) {
        (ExitKind::Reboot, _) => {
            return Decision::RestartAfter {
                delay: Duration::ZERO,
                crash_loop: false,
            };
        }
        (ExitKind::Killed, _) | (_, RestartMode::No) => false,
        (ExitKind::Crash, _) => true,
        (ExitKind::Clean, mode) => mode == RestartMode::Always,
    };
    if !wanted {
        return Decision::Stay;
    }
    if ran_for >= RESET_AFTER {
        history.step = 0;
    }
    let window_start = now.as_millisecond() - LOOP_WINDOW.as_millis() as i64;
    history.recent.retain(|t| t.as_millisecond() > window_start);
    history.recent.push(now);
    let crash_loop = history.recent.len() > LOOP_RESTARTS;
    let max = Duration::from_millis(policy.max_delay_ms);
    let delay = if crash_loop {
        max
    } else {
        let factor = 1u64.checked_shl(history.step).unwrap_or(u64::MAX);
        Duration::from_millis(policy.delay_ms.saturating_mul(factor)).min(max)
    };
    history.step = history.step.saturating_add(1).min(63);
    Decision::RestartAfter { delay, crash_loop }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).expect("timestamp")
    }

    fn delays(
        policy: &RestartPolicy,
        history: &mut RestartHistory,
        times: &[i64],
    ) -> Vec<Decision> {
        times
            .iter()
            .map(|&t| {
                after_exit(
                    policy,
                    history,
                    ExitKind::Crash,
                    Duration::from_secs(1),
                    at(t),
                )
            })
            .collect()
    }

    fn after(ms: u64, crash_loop: bool) -> Decision {
        Decision::RestartAfter {
            delay: Duration::from_millis(ms),
            crash_loop,
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_crash_loops_after_five() {
        let policy = RestartPolicy {
            max_delay_ms: 8_000,
            ..RestartPolicy::default()
        };
        let mut history = RestartHistory::default();
        let decisions = delays(&policy, &mut history, &[0, 2, 5, 10, 19, 28, 37]);
        assert_eq!(
            decisions,
            [
                after(1_000, false),
                after(2_000, false),
                after(4_000, false),
                after(8_000, false),
                after(8_000, false),
                after(8_000, true),
                after(8_000, true),
            ]
        );
    }

    #[test]
    fn a_long_run_resets_the_backoff_and_old_restarts_leave_the_window() {
        let policy = RestartPolicy::default();
        let mut history = RestartHistory::default();
        delays(&policy, &mut history, &[0, 1, 2, 3, 4]);
        let decision = after_exit(
            &policy,
            &mut history,
            ExitKind::Crash,
            RESET_AFTER,
            at(1000),
        );
        assert_eq!(decision, after(1_000, false));
        assert_eq!(history.recent, [at(1000)]);
    }

    #[test]
    fn the_mode_decides_which_exits_restart() {
        let mut history = RestartHistory::default();
        let run = Duration::from_secs(1);
        let mode = |mode| RestartPolicy {
            mode,
            ..RestartPolicy::default()
        };
        let no = mode(RestartMode::No);
        let on_failure = mode(RestartMode::OnFailure);
        let always = mode(RestartMode::Always);
        assert_eq!(
            after_exit(&no, &mut history, ExitKind::Crash, run, at(0)),
            Decision::Stay
        );
        assert_eq!(
            after_exit(&on_failure, &mut history, ExitKind::Clean, run, at(0)),
            Decision::Stay
        );
        assert!(matches!(
            after_exit(&always, &mut history, ExitKind::Clean, run, at(0)),
            Decision::RestartAfter { .. }
        ));
        assert_eq!(
            after_exit(&always, &mut history, ExitKind::Killed, run, at(0)),
            Decision::Stay
        );
        assert_eq!(
            after_exit(&no, &mut history, ExitKind::Reboot, run, at(0)),
            Decision::RestartAfter {
                delay: Duration::ZERO,
                crash_loop: false
            }
        );
    }
}
