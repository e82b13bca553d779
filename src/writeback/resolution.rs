//! What a flush decides for one cached copy, and what it sends, without the servers: the
//! resolution of a divergence against PostgreSQL's row (docs/design.md, "Divergence"), the checks
//! PostgreSQL would otherwise refuse, and the version and prefix a write carries.

use crate::cache::{split_member, CacheResult, Cached};
use crate::model::{is_prefix, messages_fingerprint, Message};
use crate::store::postgres::WriteBack;
use crate::validate;

/// Why a copy was kept aside (the `reason` column).
pub const REASON_OLDER: &str = "was older than the copy PostgreSQL holds";
/// See [`REASON_OLDER`].
pub const REASON_REPLACED: &str = "was replaced by a newer copy from Redis";
/// See [`REASON_OLDER`].
pub const REASON_OWNER: &str = "was saved under an id PostgreSQL gives to another user";
/// See [`REASON_OLDER`].
pub const REASON_LATE: &str =
    "reached Redis after its writer had given up on it (a late delivery), over a newer write that lacks its messages";
/// See [`REASON_OLDER`].
pub const REASON_OVERWRITTEN: &str = "was replaced in Redis by a save read from an older copy";
/// See [`REASON_OLDER`].
pub const REASON_SAVED_OVER: &str =
    "was replaced by a postgres-mode save that lacks its messages (read before them, or a regenerate)";

/// How a flush resolves a copy PostgreSQL would not take as is, against the row PostgreSQL holds
/// (docs/design.md, "Divergence").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resolution {
    /// PostgreSQL gives the id to another user.
    OtherOwner,
    /// PostgreSQL already holds this version.
    Current,
    /// PostgreSQL's row is newer: the copy is dropped, kept aside first when `keep` (the row lacks
    /// some of its messages).
    Older { keep: bool },
    /// The copy is newer: it is written over the row at `known` (none: no row), the row kept aside
    /// first when `keep_row` (the copy lacks some of its messages).
    Newer { keep_row: bool, known: Option<i64> },
}

/// PostgreSQL's row as [`resolution`] sees it: owner, messages, version.
pub(super) type RowView<'a> = (&'a str, &'a [Message], Option<i64>);

/// The decision of `Flusher::resolve`, without the servers: the copy (its user, version and
/// messages) against PostgreSQL's row, if there is one.
pub(super) fn resolution(user_id: &str, version: i64, messages: &[Message], row: Option<RowView<'_>>) -> Resolution {
    match row {
        None => Resolution::Newer { keep_row: false, known: None },
        Some((owner, _, _)) if owner != user_id => Resolution::OtherOwner,
        Some((_, _, row_version)) if row_version == Some(version) => Resolution::Current,
        Some((_, stored, row_version)) if row_version.is_some_and(|v| v > version) => {
            Resolution::Older { keep: !is_prefix(messages, stored) }
        }
        Some((_, stored, row_version)) => {
            Resolution::Newer { keep_row: !is_prefix(stored, messages), known: row_version }
        }
    }
}

/// Whether the copy a flush read (at version `read`) was replaced in Redis since by a newer save of
/// the app (Redis now holds version `now`): then it is history, not a divergence. A hash that is gone,
/// one without a version, or a Redis that did not answer (`None`) is not that.
pub(super) fn is_superseded(read: Option<i64>, now: &CacheResult<Option<i64>>) -> bool {
    matches!((read, now), (Some(read), Ok(Some(now))) if *now > read)
}

/// The write-back of a cached copy; `full` sends every message, `known` is the row it replaces.
pub(super) fn write_back<'a>(member: &'a str, cached: &'a Cached, full: bool, known: Option<i64>) -> WriteBack<'a> {
    let (user_id, conversation_id) = split_member(member).expect("checked members split");
    WriteBack {
        conversation_id,
        user_id,
        conversation: &cached.conversation,
        version: version_of(cached),
        extends: if full { None } else { stored_prefix(cached) },
        known,
    }
}

/// `Some((n, version))` when PostgreSQL is known to hold this conversation's first `n` messages
/// (the fingerprint of the current first `n` still matches), so only the rest need sending.
fn stored_prefix(cached: &Cached) -> Option<(usize, i64)> {
    let p = cached.stored?;
    let messages = &cached.conversation.messages;
    (p.messages > 0 && p.messages <= messages.len() && messages_fingerprint(&messages[..p.messages]) == p.fingerprint)
        .then_some((p.messages, p.version))
}

/// The row a copy may be written over whole, as its marks name it (its version): only when the copy
/// starts with what that row holds, or the marks say the copy replaces the row whole (`messages`
/// 0: a save that shared nothing with the copy before it). Otherwise `None`, and PostgreSQL's row
/// is a divergence the flush resolves: kept aside unless the copy holds its messages. (Found by the
/// randomized checker: a save that did not extend the copy raced a flush, whose settle recorded
/// the row it had written on the newer copy; the next flush wrote that copy over the row.)
pub(super) fn known_row(cached: &Cached) -> Option<i64> {
    let p = cached.stored?;
    if p.messages == 0 {
        return Some(p.version);
    }
    stored_prefix(cached).map(|(_, version)| version)
}

/// The version a flush writes: Redis's, or for a hash the Python seed wrote (no version), the
/// instant of its `last_modified`.
pub(super) fn version_of(cached: &Cached) -> i64 {
    cached.version.unwrap_or_else(|| cached.conversation.last_modified.as_datetime().timestamp_micros())
}

/// What PostgreSQL would refuse, found before a batch is sent (a hash the seed's Python wrote is
/// not validated on its way in).
pub(super) fn check(member: &str, cached: &Cached) -> std::result::Result<(), String> {
    let (user_id, conversation_id) =
        split_member(member).ok_or_else(|| format!("{member:?} is not '<user>:<conversation>'"))?;
    validate::user_id(user_id).map_err(|e| e.to_string())?;
    validate::conversation_id(conversation_id).map_err(|e| e.to_string())?;
    validate::conversation(conversation_id, &cached.conversation).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheError;
    use crate::model::{Role, Timestamp};

    fn messages(contents: &[&str]) -> Vec<Message> {
        let time = Timestamp::parse("2026-01-01T00:00:00+00:00").expect("a valid time");
        contents
            .iter()
            .enumerate()
            .map(|(i, c)| Message {
                role: if i % 2 == 0 { Role::User } else { Role::Assistant },
                content: (*c).to_owned(),
                time,
            })
            .collect()
    }

    #[test]
    fn resolution_table() {
        let ab = messages(&["a", "b"]);
        let abc = messages(&["a", "b", "c"]);
        let ax = messages(&["a", "x"]);
        let cases: [(&str, Option<RowView<'_>>, &[Message], Resolution); 9] = [
            ("no row: write", None, &ab, Resolution::Newer { keep_row: false, known: None }),
            ("another user's row", Some(("other", &ab, Some(5))), &ab, Resolution::OtherOwner),
            ("the same version", Some(("u", &ab, Some(10))), &ab, Resolution::Current),
            ("newer row holding the copy: drop", Some(("u", &abc, Some(11))), &ab, Resolution::Older { keep: false }),
            (
                "newer row lacking some: keep the copy",
                Some(("u", &ax, Some(11))),
                &ab,
                Resolution::Older { keep: true },
            ),
            (
                "older row the copy extends",
                Some(("u", &ab, Some(9))),
                &abc,
                Resolution::Newer { keep_row: false, known: Some(9) },
            ),
            (
                "older row the copy lacks",
                Some(("u", &ax, Some(9))),
                &abc,
                Resolution::Newer { keep_row: true, known: Some(9) },
            ),
            (
                "a Phase 1 row (no version) the copy lacks",
                Some(("u", &ax, None)),
                &ab,
                Resolution::Newer { keep_row: true, known: None },
            ),
            (
                "a shorter newer copy keeps the longer row",
                Some(("u", &abc, Some(9))),
                &ab,
                Resolution::Newer { keep_row: true, known: Some(9) },
            ),
        ];
        for (what, row, copy, want) in cases {
            assert_eq!(resolution("u", 10, copy, row), want, "{what}");
        }
    }

    #[test]
    fn superseded_only_by_a_newer_version_redis_reports() {
        let no_answer = Err(CacheError::Unavailable("timed out".into()));
        assert!(is_superseded(Some(10), &Ok(Some(11))));
        assert!(!is_superseded(Some(10), &Ok(Some(10))), "the copy read is still there");
        assert!(!is_superseded(Some(10), &Ok(None)), "gone: the copy read may be the only one left");
        assert!(!is_superseded(Some(10), &no_answer), "Redis did not answer");
        assert!(!is_superseded(None, &Ok(Some(11))), "a seed-written copy has no version to compare");
    }
}
