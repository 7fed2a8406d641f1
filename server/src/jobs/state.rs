//! A job's life: its states and the only transitions between them.

use serde::{Deserialize, Serialize};

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Cancelling,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Cancelling,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name stored in the database and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Cancelling => "cancelling",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// No transition leaves it except an explicit resume.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// Whether a job may go from `from` to `to`:
///
/// - `queued → running` (a worker leases it) or `→ cancelled` (cancelled before it ran);
/// - `running → succeeded | failed | cancelled`, `→ cancelling` (cancel requested; the worker
///   checkpoints first) or `→ queued` (its lease expired: it is retried from its last checkpoint);
/// - `cancelling → cancelled | succeeded | failed` as the worker reports, `→ queued` never (an
///   expired lease while cancelling ends in `cancelled`);
/// - `failed | cancelled → queued` (resume). `succeeded` is final.
pub fn can_transition(from: JobState, to: JobState) -> bool {
    use JobState::*;
    matches!(
        (from, to),
        (Queued, Running)
            | (Queued, Cancelled)
            | (Running, Succeeded)
            | (Running, Failed)
            | (Running, Cancelled)
            | (Running, Cancelling)
            | (Running, Queued)
            | (Cancelling, Cancelled)
            | (Cancelling, Succeeded)
            | (Cancelling, Failed)
            | (Failed, Queued)
            | (Cancelled, Queued)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair_of_states_is_allowed_or_refused_as_documented() {
        use JobState::*;
        let allowed = [
            (Queued, Running),
            (Queued, Cancelled),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Cancelled),
            (Running, Cancelling),
            (Running, Queued),
            (Cancelling, Cancelled),
            (Cancelling, Succeeded),
            (Cancelling, Failed),
            (Failed, Queued),
            (Cancelled, Queued),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(can_transition(from, to), allowed.contains(&(from, to)), "{from:?} → {to:?}");
            }
        }
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert_eq!(JobState::parse("paused"), None);
    }
}
