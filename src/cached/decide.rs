//! The cached tier's decisions, as functions of what the servers answered: tested without servers.

use crate::cache::{CacheError, SaveOutcome};

/// Times a save keeps a copy aside and tries to replace it, when other saves keep replacing it.
pub(crate) const OVERWRITE_ATTEMPTS: usize = 3;

/// What a save does next, given Redis's answer to its last attempt (`None`: Redis was not tried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SaveStep {
    /// Stored.
    Done,
    /// Redis does not hold the conversation: ask PostgreSQL who owns the id, then claim it.
    AskOwner,
    /// A guarded save met a copy its messages do not extend: keep that copy aside, then replace it.
    KeepAside,
    /// Another user's id.
    RefuseOwnership,
    /// The copy kept changing while the save tried to replace it.
    RefuseChanging,
    /// Redis did not answer (or is backing off), or refused (`refused`, out of memory say):
    /// PostgreSQL takes the save.
    ToPostgres { refused: bool },
}

/// The cached tier's decision after each attempt of a save, without the servers: `asked_owner` once
/// PostgreSQL was asked who owns the id, `kept_aside` copies kept aside so far.
pub(crate) fn save_step(
    answer: Option<&Result<SaveOutcome, CacheError>>,
    asked_owner: bool,
    kept_aside: usize,
) -> SaveStep {
    match answer {
        None | Some(Err(CacheError::Unavailable(_))) => SaveStep::ToPostgres { refused: false },
        Some(Err(_)) => SaveStep::ToPostgres { refused: true },
        Some(Ok(SaveOutcome::Saved(_))) => SaveStep::Done,
        Some(Ok(SaveOutcome::OwnerUnknown)) if !asked_owner => SaveStep::AskOwner,
        Some(Ok(SaveOutcome::OtherOwner | SaveOutcome::OwnerUnknown)) => SaveStep::RefuseOwnership,
        Some(Ok(SaveOutcome::Diverged)) if kept_aside < OVERWRITE_ATTEMPTS => SaveStep::KeepAside,
        Some(Ok(SaveOutcome::Diverged)) => SaveStep::RefuseChanging,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_save_steps_through_redis_postgresql_and_the_overwrite_guard() {
        let ok = |o| Some(Ok(o));
        let down: Option<Result<SaveOutcome, CacheError>> = Some(Err(CacheError::Unavailable("timed out".into())));
        let oom: Option<Result<SaveOutcome, CacheError>> = Some(Err(CacheError::Other("OOM".into())));
        let cases = [
            ("saved", ok(SaveOutcome::Saved(7)), false, 0, SaveStep::Done),
            ("backing off: Redis not tried", None, false, 0, SaveStep::ToPostgres { refused: false }),
            ("timed out (a late delivery too)", down, false, 0, SaveStep::ToPostgres { refused: false }),
            ("refused (out of memory)", oom, false, 0, SaveStep::ToPostgres { refused: true }),
            ("not in Redis: ask PostgreSQL", ok(SaveOutcome::OwnerUnknown), false, 0, SaveStep::AskOwner),
            ("still unknown after a claim", ok(SaveOutcome::OwnerUnknown), true, 0, SaveStep::RefuseOwnership),
            ("another user's id", ok(SaveOutcome::OtherOwner), false, 0, SaveStep::RefuseOwnership),
            ("a copy the save does not extend", ok(SaveOutcome::Diverged), true, 0, SaveStep::KeepAside),
            ("replaced again meanwhile", ok(SaveOutcome::Diverged), true, 1, SaveStep::KeepAside),
            ("kept changing", ok(SaveOutcome::Diverged), true, OVERWRITE_ATTEMPTS, SaveStep::RefuseChanging),
        ];
        for (what, answer, asked_owner, kept_aside, want) in cases {
            assert_eq!(save_step(answer.as_ref(), asked_owner, kept_aside), want, "{what}");
        }
    }
}
