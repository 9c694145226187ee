//! Operation bookkeeping as plain functions: ids, the retention rule for
//! finished operations, and what start-up does with operations a previous
//! daemon left in flight. The actors in `actors::operation` apply them.

use std::path::PathBuf;
use std::time::Duration;

use jiff::Timestamp;

use serde::{Deserialize, Serialize};

use crate::store::Record;
use crate::store::backup;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationOutcome {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// The daemon stopped while the operation was in flight.
    Interrupted,
}

/// A state-changing request: recorded when it starts (an intent record) and
/// again when it ends, so a crash in between is found at the next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub op_id: String,
    pub method: String,
    /// What the operation works on: a VM name, a path, ...
    #[serde(default)]
    pub target: Option<String>,
    pub outcome: OperationOutcome,
    #[serde(default)]
    pub phase: Option<String>,
    /// Every phase it entered, in order (at most [`MAX_PHASES`]): progress
    /// forwarding reads the latest record only, and a short phase must
    /// still reach the client.
    #[serde(default)]
    pub phases: Vec<String>,
    #[serde(default)]
    pub current: Option<u64>,
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub cancellable: bool,
    pub started_at: Timestamp,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Record for OperationRecord {
    const TABLE: &'static str = "operations";
    fn key(&self) -> String {
        self.op_id.clone()
    }
}

/// A new operation id: a ULID, so ids sort by start time.
pub fn new_op_id() -> String {
    ulid::Ulid::new().to_string()
}

/// How many finished operations are kept, and for how long. Both bounds
/// apply: an operation goes when it is older than `max_age` or when more
/// than `max_finished` newer ones have finished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub max_finished: usize,
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_finished: 1_000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

impl Retention {
    /// Ids of the finished operations to delete.
    pub fn expired(&self, records: &[OperationRecord], now: Timestamp) -> Vec<String> {
        let mut finished: Vec<&OperationRecord> = records
            .iter()
            .filter(|r| r.outcome != OperationOutcome::Running)
            .collect();
        // Newest first; ULIDs sort by start time.
        finished.sort_by(|a, b| b.op_id.cmp(&a.op_id));
        let max_age = i64::try_from(self.max_age.as_secs()).unwrap_or(i64::MAX);
        finished
            .into_iter()
            .enumerate()
            .filter(|(rank, r)| {
                let ended = r.finished_at.unwrap_or(r.started_at);
                *rank >= self.max_finished
                    || now.as_second().saturating_sub(ended.as_second()) > max_age
            })
            .map(|(_, r)| r.op_id.clone())
            .collect()
    }
}

/// The most phases an operation's history keeps; later ones still show
/// as its current phase.
pub const MAX_PHASES: usize = 32;

impl OperationRecord {
    /// A progress report: the current phase and count, and a phase not
    /// entered just before joins the history.
    pub fn report(&mut self, phase: String, current: Option<u64>, total: Option<u64>) {
        if self.phase.as_deref() != Some(phase.as_str()) && self.phases.len() < MAX_PHASES {
            self.phases.push(phase.clone());
        }
        self.phase = Some(phase);
        self.current = current;
        self.total = total;
    }

    /// The phases entered after the first `seen` of the history and
    /// before the current one: what a reader of the latest record missed.
    pub fn phases_between(&self, seen: usize) -> &[String] {
        let before_current = self.phases.len().saturating_sub(1);
        self.phases.get(seen..before_current).unwrap_or(&[])
    }
}

/// An operation found in flight at start-up: the daemon that ran it died.
pub fn interrupted(mut record: OperationRecord, now: Timestamp) -> OperationRecord {
    record.outcome = OperationOutcome::Interrupted;
    record.finished_at = Some(now);
    record.error = Some("the daemon stopped while this operation was in flight".into());
    record
}

/// Files an interrupted operation may have left half-made, to remove.
pub fn leftovers(record: &OperationRecord) -> Vec<PathBuf> {
    match (record.method.as_str(), &record.target) {
        ("daemon.backup", Some(target)) => vec![backup::partial_path(target.as_ref())],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        n: u64,
        outcome: OperationOutcome,
        finished_secs_ago: i64,
        now: Timestamp,
    ) -> OperationRecord {
        let at = Timestamp::from_second(now.as_second() - finished_secs_ago).expect("timestamp");
        OperationRecord {
            op_id: ulid::Ulid::from_parts(n, 0).to_string(),
            method: "daemon.backup".into(),
            target: Some("/backups/b.redb".into()),
            outcome,
            phase: None,
            phases: Vec::new(),
            current: None,
            total: None,
            cancellable: true,
            started_at: at,
            finished_at: (outcome != OperationOutcome::Running).then_some(at),
            error: None,
        }
    }

    #[test]
    fn phases_are_recorded_once_each_and_bounded() {
        let mut record = op(1, OperationOutcome::Running, 0, Timestamp::now());
        record.report("reading".into(), None, None);
        record.report("copying".into(), Some(1), Some(4));
        record.report("copying".into(), Some(2), Some(4));
        record.report("writing".into(), None, None);
        assert_eq!(record.phases, ["reading", "copying", "writing"]);
        // A reader that saw only "reading" missed "copying".
        assert_eq!(record.phases_between(1), ["copying"]);
        assert!(record.phases_between(3).is_empty());
        for n in 0..100 {
            record.report(format!("phase {n}"), None, None);
        }
        assert_eq!(record.phases.len(), MAX_PHASES);
        assert_eq!(record.phase.as_deref(), Some("phase 99"));
        assert!(record.phases_between(MAX_PHASES).is_empty());
    }

    #[test]
    fn keeps_the_newest_and_drops_the_rest() {
        let now = Timestamp::now();
        let records: Vec<_> = (1..=5)
            .map(|n| op(n, OperationOutcome::Succeeded, 10, now))
            .collect();
        let policy = Retention {
            max_finished: 3,
            max_age: Duration::from_secs(3600),
        };
        let expired = policy.expired(&records, now);
        assert_eq!(
            expired,
            [records[1].op_id.clone(), records[0].op_id.clone()]
        );
    }

    #[test]
    fn drops_old_ones_and_never_running_ones() {
        let now = Timestamp::now();
        let records = vec![
            op(1, OperationOutcome::Running, 90_000, now),
            op(2, OperationOutcome::Failed, 90_000, now),
            op(3, OperationOutcome::Cancelled, 60, now),
        ];
        let expired = Retention::default().expired(&records, now);
        assert_eq!(expired, [records[1].op_id.clone()]);
    }

    #[test]
    fn an_interrupted_backup_leaves_its_partial_file_to_remove() {
        let now = Timestamp::now();
        let record = interrupted(op(1, OperationOutcome::Running, 5, now), now);
        assert_eq!(record.outcome, OperationOutcome::Interrupted);
        assert_eq!(record.finished_at, Some(now));
        assert_eq!(
            leftovers(&record),
            [PathBuf::from("/backups/b.redb.partial")]
        );
    }
}
