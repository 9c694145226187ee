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

pub use banger_agent::protocol::{ExitStatus as MainExit, ShutdownAction};

/// What the guest agent announced before the exit: its shutdown action,
/// and the main process's exit when that is why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    pub action: ShutdownAction,
    pub main_exit: Option<MainExit>,
}

impl Announcement {
    pub fn poweroff() -> Announcement {
        Announcement {
            action: ShutdownAction::Poweroff,
            main_exit: None,
        }
    }
}

/// A main process that failed makes its poweroff a failure, as a crash is.
pub fn classify(intent: StopIntent, announced: Option<Announcement>) -> ExitKind {
    match (intent, announced.map(|a| (a.action, a.main_exit))) {
        (StopIntent::Kill | StopIntent::StopEscalated, _) => ExitKind::Killed,
        (StopIntent::Stop, _) => ExitKind::Clean,
        (StopIntent::None, Some((ShutdownAction::Poweroff, Some(main))))
            if main.code != Some(0) =>
        {
            ExitKind::Crash
        }
        (StopIntent::None, Some((ShutdownAction::Poweroff, _))) => ExitKind::Clean,
        (StopIntent::None, Some((ShutdownAction::Reboot, _))) => ExitKind::Reboot,
        (StopIntent::None, None) => ExitKind::Crash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announced(action: ShutdownAction, code: Option<i32>) -> Option<Announcement> {
        Some(Announcement {
            action,
            main_exit: code.map(|code| MainExit {
                code: Some(code),
                signal: None,
            }),
        })
    }

    #[test]
    fn exits_are_classified_by_intent_then_announcement() {
        use ShutdownAction::{Poweroff, Reboot};
        assert_eq!(classify(StopIntent::Kill, None), ExitKind::Killed);
        assert_eq!(classify(StopIntent::StopEscalated, None), ExitKind::Killed);
        assert_eq!(classify(StopIntent::Stop, None), ExitKind::Clean);
        assert_eq!(
            classify(StopIntent::Stop, announced(Reboot, None)),
            ExitKind::Clean
        );
        assert_eq!(
            classify(StopIntent::None, announced(Poweroff, None)),
            ExitKind::Clean
        );
        assert_eq!(
            classify(StopIntent::None, announced(Reboot, None)),
            ExitKind::Reboot
        );
        assert_eq!(classify(StopIntent::None, None), ExitKind::Crash);
        // The main process's exit decides its poweroff.
        assert_eq!(
            classify(StopIntent::None, announced(Poweroff, Some(0))),
            ExitKind::Clean
        );
        assert_eq!(
            classify(StopIntent::None, announced(Poweroff, Some(3))),
            ExitKind::Crash
        );
        assert_eq!(
            classify(StopIntent::Kill, announced(Poweroff, Some(3))),
            ExitKind::Killed
        );
    }
}
