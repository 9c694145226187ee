//! A VM's lifecycle phase as its record persists it, and the stable
//! `state` derived from it for `vm ls`. `vm::machine` moves between them.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Where a VM is in its life; persisted in its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Being created: the record (and its ledger) is written before its
    /// disk is cloned. Found at start-up, the create is undone.
    Creating,
    /// Never started.
    Created,
    /// A VMM is being spawned and configured. `restart`: an automatic
    /// restart (its failure counts as a crash); `retry`: the VMM found at
    /// recovery is being killed and a fresh one follows.
    Launching {
        restart: bool,
        retry: bool,
        deadline: Timestamp,
    },
    Running,
    /// Banger asked the VM to go; `killed` once SIGKILL was sent.
    Stopping {
        intent: Intent,
        killed: bool,
        deadline: Timestamp,
    },
    /// Crashed; the restart policy starts it again at `until`.
    BackingOff {
        until: Timestamp,
        crash_loop: bool,
    },
    Stopped,
    /// Crashed, and the policy does not restart it.
    Crashed,
    /// A user's start failed; `error` in the record says why.
    Failed,
    /// Being removed: the VMM is killed, then files, then the record.
    Removing {
        deadline: Timestamp,
    },
}

/// Why a VM is stopping, and so what follows the exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Intent {
    Stop,
    Restart,
    Kill,
}

impl Phase {
    /// The stable `state` of `vm ls --json`, which scripts read.
    pub fn state(&self) -> VmState {
        match self {
            Phase::Creating => VmState::Creating,
            Phase::Created => VmState::Created,
            Phase::Launching { .. } => VmState::Starting,
            Phase::Running => VmState::Running,
            Phase::Stopping { .. } => VmState::Stopping,
            Phase::BackingOff {
                crash_loop: true, ..
            } => VmState::CrashLoop,
            Phase::BackingOff { .. } | Phase::Crashed => VmState::Crashed,
            Phase::Stopped => VmState::Stopped,
            Phase::Failed => VmState::Failed,
            Phase::Removing { .. } => VmState::Removing,
        }
    }

    /// No VMM, and none coming: the VM stopped for good (a crash that
    /// waits for its restart is not at rest).
    pub fn at_rest(&self) -> bool {
        matches!(
            self,
            Phase::Created | Phase::Stopped | Phase::Crashed | Phase::Failed
        )
    }

    /// The phase's deadline or next timer, as `vm inspect` shows it.
    pub fn deadline(&self) -> Option<Timestamp> {
        match *self {
            Phase::Launching { deadline, .. }
            | Phase::Stopping { deadline, .. }
            | Phase::Removing { deadline } => Some(deadline),
            Phase::BackingOff { until, .. } => Some(until),
            _ => None,
        }
    }
}

/// A VM's state as `vm ls` shows it: a stable view derived from its
/// [`Phase`], which scripts depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Creating,
    Created,
    Starting,
    Running,
    Stopping,
    Stopped,
    Crashed,
    CrashLoop,
    Failed,
    Removing,
}

/// The state's words in a conflict (`VM web is being removed`).
pub fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Creating => "being created",
        VmState::Created => "created",
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Stopping => "stopping",
        VmState::Stopped => "stopped",
        VmState::Crashed => "crashed",
        VmState::CrashLoop => "crash-loop",
        VmState::Failed => "failed",
        VmState::Removing => "being removed",
    }
}
