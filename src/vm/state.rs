//! How a VMM's exit is classified. Pure; `vm::machine` applies it.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitKind {
    /// A stop the guest completed, or a poweroff the guest announced.
    Clean,
    /// A reboot the guest announced: the VM starts again at once.
    Reboot,
    /// Anything nobody asked for, including an unexplained exit status 0
    /// (Firecracker turns a guest panic into a reset and exits 0).
    Crash,
    /// banger's own SIGKILL, from `vm kill` or a stop that timed out.
    Killed,
}

/// How a VMM process ended, as `vm ls --json` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    pub kind: ExitKind,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub at: Timestamp,
}

/// What banger asked of the VM before its process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopIntent {
    None,
    /// A graceful stop is under way.
    Stop,
    /// The graceful stop timed out and banger sent SIGKILL.
    StopEscalated,
    Kill,
}

/// What the guest agent announced before the exit: its own shutdown action.
pub use banger_agent::protocol::ShutdownAction as Announcement;

pub fn classify(intent: StopIntent, announced: Option<Announcement>) -> ExitKind {
    match (intent, announced) {
        (StopIntent::Kill | StopIntent::StopEscalated, _) => ExitKind::Killed,
        (StopIntent::Stop, _) => ExitKind::Clean,
        (StopIntent::None, Some(Announcement::Poweroff)) => ExitKind::Clean,
        (StopIntent::None, Some(Announcement::Reboot)) => ExitKind::Reboot,
        (StopIntent::None, None) => ExitKind::Crash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_classified_by_intent_then_announcement() {
        assert_eq!(classify(StopIntent::Kill, None), ExitKind::Killed);
        assert_eq!(classify(StopIntent::StopEscalated, None), ExitKind::Killed);
        assert_eq!(classify(StopIntent::Stop, None), ExitKind::Clean);
        assert_eq!(
            classify(StopIntent::Stop, Some(Announcement::Reboot)),
            ExitKind::Clean
        );
        assert_eq!(
            classify(StopIntent::None, Some(Announcement::Poweroff)),
            ExitKind::Clean
        );
        assert_eq!(
            classify(StopIntent::None, Some(Announcement::Reboot)),
            ExitKind::Reboot
        );
        assert_eq!(classify(StopIntent::None, None), ExitKind::Crash);
    }
}
