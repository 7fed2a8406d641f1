//! A job's kind, its states and the only transitions between them.

use serde::{Deserialize, Serialize};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Continued pretraining from a [`crate::JobSpec`].
    Train,
    /// Dataset preparation from a [`crate::prepare::PrepareSpec`].
    Prepare,
    /// Vocabulary extension from a [`crate::vocabulary::VocabularySpec`].
    ExtendVocab,
}

impl JobKind {
    pub const ALL: [JobKind; 3] = [JobKind::Train, JobKind::Prepare, JobKind::ExtendVocab];

    /// The name stored in the database and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Train => "train",
            JobKind::Prepare => "prepare",
            JobKind::ExtendVocab => "extend_vocab",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

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
    /// Stopped at a checkpoint by a forgetting budget; waits for a resume (or a cancel).
    Paused,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Running,
        JobState::Cancelling,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Paused,
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
            JobState::Paused => "paused",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// No transition leaves it except an explicit resume.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// No worker holds it or will lease it until a user acts: it ended, or it is paused.
    pub fn is_at_rest(self) -> bool {
        self.is_terminal() || self == JobState::Paused
    }

    /// A resume queues it again, to continue from its newest checkpoint.
    pub fn is_resumable(self) -> bool {
        matches!(self, JobState::Failed | JobState::Cancelled | JobState::Paused)
    }

    /// A worker holds the job's lease.
    pub fn is_leased(self) -> bool {
        matches!(self, JobState::Running | JobState::Cancelling)
    }
}

/// Whether a job may go from `from` to `to`:
///
/// - `queued → running` (a worker leases it) or `→ cancelled` (cancelled before it ran);
/// - `running → succeeded | failed | cancelled`, `→ cancelling` (cancel requested; the worker
///   checkpoints first), `→ queued` (its lease expired, or its worker released it: it is
///   retried from its last checkpoint) or `→ paused` (a forgetting budget paused it);
/// - `cancelling → cancelled | succeeded | failed` as the worker reports, `→ queued` never (an
///   expired lease while cancelling ends in `cancelled`; a release or pause, too);
/// - `paused → cancelled` (cancel);
/// - `failed | cancelled | paused → queued` (resume). `succeeded` is final.
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
            | (Running, Paused)
            | (Cancelling, Cancelled)
            | (Cancelling, Succeeded)
            | (Cancelling, Failed)
            | (Failed, Queued)
            | (Cancelled, Queued)
            | (Paused, Queued)
            | (Paused, Cancelled)
    )
}

/// The states a job may be in for a move to `to`: the guard of the SQL statement that moves it.
pub fn sources_of(to: JobState) -> Vec<JobState> {
    JobState::ALL.into_iter().filter(|&from| can_transition(from, to)).collect()
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
            (Running, Paused),
            (Paused, Queued),
            (Paused, Cancelled),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(can_transition(from, to), allowed.contains(&(from, to)), "{from:?} → {to:?}");
            }
        }
        assert_eq!(sources_of(Queued), vec![Running, Failed, Cancelled, Paused]);
        let resumable: Vec<JobState> = sources_of(Queued).into_iter().filter(|s| s.is_resumable()).collect();
        assert_eq!(resumable, vec![Failed, Cancelled, Paused]);
    }

    #[test]
    fn states_and_kinds_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert_eq!(JobState::parse("pausing"), None);
        for kind in JobKind::ALL {
            assert_eq!(JobKind::parse(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
