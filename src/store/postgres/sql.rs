//! The statements, one per operation so each is atomic and costs one round trip, with what goes in
//! and out of them: the message columns `unnest` takes and the conversation a row holds.

use chrono::{DateTime, Utc};

use crate::error::{Backend, Error, ErrorKind, Result};
use crate::model::{Conversation, Message, Role};

/// Microseconds since the epoch on PostgreSQL's clock: the version of a write that did not come
/// through Redis. Versions from Redis use Redis's clock (`TIME`), so the two tiers order writes
/// by wall-clock time, each bumped past the version it replaces.
const NOW_MICROS: &str = "(extract(epoch from clock_timestamp()) * 1000000)::int8";

/// The conversation (with `$extra` columns) and its messages as arrays in sequence order, for the
/// rows `$filter` picks: the one statement shape [`GET`] and [`GET_ANY`] share.
macro_rules! conversation_row {
    ($extra:literal, $filter:literal) => {
        concat!(
            "
SELECT c.title, c.model, c.created_at, c.last_modified, c.cache_version, m.seqs, m.roles, m.contents, m.times",
            $extra,
            "
FROM conversations c
CROSS JOIN LATERAL (
    SELECT array_agg(sequence_number) AS seqs, array_agg(role) AS roles,
           array_agg(content) AS contents, array_agg(timestamp) AS times
    FROM (
        SELECT sequence_number, role, content, timestamp FROM messages
        WHERE conversation_id = c.conversation_id ORDER BY sequence_number
    ) ordered
) m
WHERE ",
            $filter
        )
    };
}

/// One round trip, one row: the conversation and its messages as arrays in sequence order.
/// One row rather than one per message: each row repeated the conversation's columns and cost the
/// client a row's decoding, and a 20-message reply no longer overflows PostgreSQL's 8 KB send buffer.
/// The messages are sorted once in the subquery and aggregated in that order, rather than by an
/// `ORDER BY` in each aggregate (PostgreSQL 15 sorts once per such aggregate); the sequence numbers
/// come along so the order is checked, not assumed (see [`in_sequence`]).
pub(super) const GET: &str = conversation_row!("", "c.conversation_id = $1 AND c.user_client_id = $2");

/// A [`GET`] row as the conversation and its version.
pub(super) fn conversation_of(row: &postgres::Row) -> Result<(Conversation, Option<i64>)> {
    let seqs: Vec<i32> = row.get::<_, Option<_>>(5).unwrap_or_default();
    let roles: Vec<&str> = row.get::<_, Option<_>>(6).unwrap_or_default();
    let contents: Vec<String> = row.get::<_, Option<_>>(7).unwrap_or_default();
    let times: Vec<DateTime<Utc>> = row.get::<_, Option<_>>(8).unwrap_or_default();
    let mut messages = Vec::with_capacity(roles.len());
    for ((role, content), time) in roles.into_iter().zip(contents).zip(times) {
        let role = Role::parse(role).ok_or_else(|| {
            Error::new(ErrorKind::Database(Backend::Postgres), format!("message with unknown role {role:?}"))
        })?;
        messages.push(Message { role, content, time: time.into() });
    }
    in_sequence(&seqs, &mut messages);
    let conv = Conversation {
        title: row.get(0),
        model: row.get(1),
        messages,
        created_at: row.get::<_, DateTime<Utc>>(2).into(),
        last_modified: row.get::<_, DateTime<Utc>>(3).into(),
    };
    Ok((conv, row.get(4)))
}

/// Puts `messages` in the order of their sequence numbers `seqs`. PostgreSQL aggregates rows in the
/// order its sorted subquery returns them, which its docs say "will usually work" rather than
/// promise; when it did not, this sorts.
fn in_sequence(seqs: &[i32], messages: &mut Vec<Message>) {
    if seqs.len() != messages.len() || seqs.is_sorted() {
        return;
    }
    let mut numbered: Vec<(i32, Message)> = seqs.iter().copied().zip(messages.drain(..)).collect();
    numbered.sort_by_key(|(seq, _)| *seq);
    messages.extend(numbered.into_iter().map(|(_, m)| m));
}

pub(super) const LIST: &str = "
SELECT conversation_id, title, model, created_at, last_modified
FROM conversations
WHERE user_client_id = $1 AND created_at >= NOW() - make_interval(days => $2)
ORDER BY last_modified DESC, conversation_id";

/// The whole save in one statement, hence one transaction and one round trip:
/// - upsert the row, keeping `created_at`, and only when the id is the caller's (docs/design.md, "Ownership":
///   `conv` is empty for another user's id, and then nothing else below runs);
/// - drop messages past the new end;
/// - upsert messages 0..n-1, rewriting only rows whose values changed, so a conversation that
///   gained two messages costs two row writes.
///
/// A direct save is the newest write by definition: its version is bumped past whatever the row
/// had. The foreign key sees the new conversation row: constraint triggers fire at the end of
/// the statement, after every CTE ran.
pub(super) fn save_sql() -> String {
    format!(
        "
WITH extended AS (
    -- $13 = 3: the user's row, when the new messages extend its own (none of them left out or
    -- changed), with the version that was read.
    SELECT c.cache_version AS version FROM conversations c
    -- The new messages' columns hold sequence numbers 0.. in order, so message n is element n + 1.
    WHERE $13 = 3 AND c.conversation_id = $1 AND c.user_client_id = $2 AND NOT EXISTS (
        SELECT 1 FROM messages m
        WHERE m.conversation_id = $1
          AND (m.sequence_number >= $7 OR (m.role, m.content, m.timestamp) IS DISTINCT FROM
               (($9::text[])[m.sequence_number + 1], ($10::text[])[m.sequence_number + 1],
                ($11::timestamptz[])[m.sequence_number + 1])))
), conv AS (
    INSERT INTO conversations AS c (conversation_id, user_client_id, title, model, created_at, last_modified, cache_version)
    SELECT $1, $2, $3, $4, $5, $6, {NOW_MICROS}
    -- Not an id another user claimed through Redis and has not written back yet.
    WHERE NOT EXISTS (SELECT 1 FROM conversation_claims k WHERE k.conversation_id = $1 AND k.user_client_id <> $2)
    ON CONFLICT (conversation_id) DO UPDATE
        SET title = EXCLUDED.title, model = EXCLUDED.model, last_modified = EXCLUDED.last_modified,
            cache_version = GREATEST(COALESCE(c.cache_version, 0) + 1, EXCLUDED.cache_version)
        WHERE c.user_client_id = EXCLUDED.user_client_id
        -- $13: 1 only the row at version $12 (the one the caller read, NULL for a Phase 1 row); 2 only
        -- when there is none (the caller read none); 3 only a row the new messages extend, and only as
        -- it was read (a row another writer changed in between is checked again, on the next try,
        -- against what it holds then). No save replaces whatever row is there.
        AND (($13 = 1 AND c.cache_version IS NOT DISTINCT FROM $12)
             OR ($13 = 3 AND EXISTS (SELECT 1 FROM extended e WHERE c.cache_version IS NOT DISTINCT FROM e.version)))
    RETURNING c.conversation_id, c.cache_version
), trimmed AS (
    DELETE FROM messages
    WHERE conversation_id IN (SELECT conversation_id FROM conv) AND sequence_number >= $7
), written AS (
    {WRITE_MESSAGES}
    FROM conv, unnest($8::int4[], $9::text[], $10::text[], $11::timestamptz[]) AS new(seq, role, content, ts)
    {UPSERT_MESSAGES}
)
SELECT (SELECT cache_version FROM conv)"
    )
}

const WRITE_MESSAGES: &str = "INSERT INTO messages AS m (conversation_id, sequence_number, role, content, timestamp)
    SELECT conv.conversation_id, new.seq, new.role, new.content, new.ts";

const UPSERT_MESSAGES: &str = "ON CONFLICT (conversation_id, sequence_number) DO UPDATE
        SET role = EXCLUDED.role, content = EXCLUDED.content, timestamp = EXCLUDED.timestamp
        WHERE (m.role, m.content, m.timestamp) IS DISTINCT FROM (EXCLUDED.role, EXCLUDED.content, EXCLUDED.timestamp)";

/// A batch of write-backs in one statement. A conversation is written only when its version is
/// newer than the row's and no tombstone at least as new exists (a delete that raced the flush
/// wins). The last SELECT says, per input, what happened; `conversations` there is the snapshot
/// from before the statement.
pub(super) fn flush_sql() -> String {
    format!(
        "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                         $7::int8[], $8::int4[], $9::int8[], $10::int4[], $16::int8[])
        AS i(id, user_id, title, model, created_at, last_modified, version, n, base, first, known)
), allowed AS (
    -- Not deleted since this version; when only new messages were sent (first > 0), only if
    -- PostgreSQL still holds the version they extend; and a whole copy only over the row it was
    -- derived from (`known`): any other row is a divergence, resolved one by one (docs/design.md).
    -- A tombstone of any user: once an id was deleted, a copy saved before that never comes back,
    -- even after another user claimed the id and deleted it in turn (its tombstone replaced ours).
    SELECT i.* FROM input i
    WHERE NOT EXISTS (
        SELECT 1 FROM conversation_tombstones t WHERE t.conversation_id = i.id AND t.deleted_version >= i.version)
    -- A scalar subquery, so each row is one primary-key lookup; as EXISTS the planner turned it
    -- into a scan of the whole table per batch.
    AND NOT EXISTS (
        SELECT 1 FROM conversation_claims k WHERE k.conversation_id = i.id AND k.user_client_id <> i.user_id)
    AND (i.first = 0 OR (SELECT c.cache_version FROM conversations c WHERE c.conversation_id = i.id) = i.base)
    AND (i.first > 0 OR (
        SELECT c.cache_version IS DISTINCT FROM i.known FROM conversations c WHERE c.conversation_id = i.id
    ) IS NOT TRUE)
), conv AS (
    INSERT INTO conversations AS c (conversation_id, user_client_id, title, model, created_at, last_modified, cache_version)
    SELECT id, user_id, title, model, created_at, last_modified, version FROM allowed
    ON CONFLICT (conversation_id) DO UPDATE
        SET title = EXCLUDED.title, model = EXCLUDED.model, last_modified = EXCLUDED.last_modified,
            cache_version = EXCLUDED.cache_version
        WHERE c.user_client_id = EXCLUDED.user_client_id
          AND (c.cache_version IS NULL OR c.cache_version < EXCLUDED.cache_version)
    RETURNING c.conversation_id, c.user_client_id
), recorded AS (
    -- The change feed's outbox row of each conversation written: the transaction set
    -- `chat_history.flush`, so the conversations trigger is not called (schema.sql). One row each,
    -- where the trigger left two for an upsert over an existing row (its BEFORE INSERT and UPDATE).
    INSERT INTO conversation_changes (conversation_id, user_client_id) SELECT conversation_id, user_client_id FROM conv
), trimmed AS (
    -- By id through the index: a join here let the planner scan the whole messages table.
    DELETE FROM messages WHERE message_id = ANY (ARRAY(
        SELECT old.message_id
        FROM conv JOIN input i ON i.id = conv.conversation_id
        CROSS JOIN LATERAL (
            SELECT message_id FROM messages m
            WHERE m.conversation_id = conv.conversation_id AND m.sequence_number >= i.n
        ) AS old
    ))
), written AS (
    {WRITE_MESSAGES}
    FROM unnest($11::text[], $12::int4[], $13::text[], $14::text[], $15::timestamptz[]) AS new(id, seq, role, content, ts)
    JOIN conv ON conv.conversation_id = new.id
    {UPSERT_MESSAGES}
)
SELECT i.id,
    CASE WHEN EXISTS (SELECT 1 FROM conv WHERE conv.conversation_id = i.id) THEN 'written'
    -- The reason, looked up only for what was not written (in the snapshot from before the statement).
    ELSE (
        SELECT CASE
            WHEN c.conversation_id IS NOT NULL AND c.user_client_id <> i.user_id THEN 'owner'
            WHEN EXISTS (
                SELECT 1 FROM conversation_claims k WHERE k.conversation_id = i.id AND k.user_client_id <> i.user_id)
                THEN 'owner'
            WHEN EXISTS (
                SELECT 1 FROM conversation_tombstones t WHERE t.conversation_id = i.id AND t.deleted_version >= i.version)
                THEN 'deleted'
            WHEN c.cache_version = i.version THEN 'current'
            WHEN i.first = 0 AND c.conversation_id IS NOT NULL AND c.cache_version IS DISTINCT FROM i.known
                THEN 'diverged'
            WHEN c.cache_version > i.version THEN 'stale'
            WHEN i.first > 0 THEN 'rebase'
            ELSE 'stale'
        END
        FROM (SELECT) AS one
        LEFT JOIN LATERAL (
            -- LIMIT keeps the planner from flattening this into a hash join over the whole table.
            SELECT conversation_id, user_client_id, cache_version FROM conversations WHERE conversation_id = i.id LIMIT 1
        ) AS c ON true
    ) END
FROM input i"
    )
}

/// Deletes the user's row (messages go by cascade) and leaves a tombstone, so a flush that read
/// the conversation before the delete can never bring it back. No tombstone for an id that is
/// another user's, by its row or by a claim made through Redis (docs/design.md, "Ownership"): their
/// conversation must stay writable, and a claimed one waiting in Redis would be dropped by its
/// write-back as deleted.
pub(super) fn delete_sql() -> String {
    format!(
        "
WITH gone AS (
    DELETE FROM conversations WHERE conversation_id = $1 AND user_client_id = $2 RETURNING cache_version
), unclaimed AS (
    DELETE FROM conversation_claims WHERE conversation_id = $1 AND user_client_id = $2
), tomb AS (
    INSERT INTO conversation_tombstones AS t (conversation_id, user_client_id, deleted_version)
    SELECT $1, $2, GREATEST({NOW_MICROS}, COALESCE((SELECT max(cache_version) FROM gone), 0) + 1, $3)
    WHERE NOT EXISTS (SELECT 1 FROM conversations WHERE conversation_id = $1 AND user_client_id <> $2)
    -- Nor for an id another user claimed through Redis, whose new conversation may wait there for
    -- its write-back, unless this user had a row to delete (a Phase 1 writer never checks claims).
    AND (EXISTS (SELECT 1 FROM gone)
         OR NOT EXISTS (SELECT 1 FROM conversation_claims WHERE conversation_id = $1 AND user_client_id <> $2))
    ON CONFLICT (conversation_id) DO UPDATE
        SET user_client_id = EXCLUDED.user_client_id, deleted_at = NOW(),
            deleted_version = GREATEST(t.deleted_version, EXCLUDED.deleted_version)
        -- Another user's tombstone is taken over only by a user who had something to delete (a row,
        -- or a copy in the cache): a delete of an id one never had must not lift its owner's
        -- tombstone, or the owner's stale cached copy could be flushed back.
        WHERE t.user_client_id = EXCLUDED.user_client_id OR EXISTS (SELECT 1 FROM gone) OR $4
    RETURNING deleted_version
)
SELECT (SELECT count(*) FROM gone), (SELECT deleted_version FROM tomb)"
    )
}

/// Serialises a delete and a flush of the same id. The lock is taken in its own statement, so the
/// statement after it runs on a snapshot taken once the other side committed: a flush then sees the
/// tombstone of a delete that raced it, and a delete sees the row a racing flush wrote. Ids are
/// locked in sorted order, so two flushers never deadlock. The first key names this library's
/// lock space.
pub(super) const LOCK_IDS: &str = "
SELECT pg_advisory_xact_lock(1667786866, k)
FROM (SELECT DISTINCT hashtext(id) AS k FROM unnest($1::text[]) AS id ORDER BY 1) AS keys";

/// [`LOCK_IDS`] for a flush, which also tells the change feed's triggers (schema.sql) that its
/// statement records every conversation it writes itself ([`flush_sql`]'s `recorded`):
/// - `chat_history.flush` = `on`: the conversations trigger is not called (its `WHEN`). Nothing is
///   left for it: the statement writes only rows of the same owner at a newer version, inserts none
///   without one, deletes none, and writes the outbox rows;
/// - `chat_history.written` = `*`: the flush writes messages only of conversations whose row it
///   writes in the same statement, so the messages triggers skip each row without a string search.
///   It also keeps a conversations trigger without that `WHEN` (a database not upgraded yet, which
///   the next start of this version does) recording each row as it is written: such a flush leaves
///   its outbox rows twice or three times, which the follower applies once.
pub(super) const LOCK_IDS_FOR_FLUSH: &str = "
SELECT pg_advisory_xact_lock(1667786866, k), set_config('chat_history.written', '*', true),
       set_config('chat_history.flush', 'on', true)
FROM (SELECT DISTINCT hashtext(id) AS k FROM unnest($1::text[]) AS id ORDER BY 1) AS keys";

/// Claims the id for the user ($2) unless it has a row or a claim already, then says who owns it
/// (the row's user, else the claim's) and the newest version its row or its tombstone has.
pub(super) const CLAIM: &str = "
WITH claimed AS (
    INSERT INTO conversation_claims (conversation_id, user_client_id)
    SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM conversations WHERE conversation_id = $1)
    ON CONFLICT (conversation_id) DO NOTHING
    RETURNING user_client_id
)
SELECT COALESCE((SELECT user_client_id FROM conversations WHERE conversation_id = $1),
                (SELECT user_client_id FROM claimed),
                (SELECT user_client_id FROM conversation_claims WHERE conversation_id = $1)),
       GREATEST((SELECT cache_version FROM conversations WHERE conversation_id = $1),
                (SELECT deleted_version FROM conversation_tombstones WHERE conversation_id = $1))";

/// [`GET`] for whoever owns the id, with the owner: what a divergence is resolved against.
pub(super) const GET_ANY: &str = conversation_row!(", c.user_client_id", "c.conversation_id = $1");

/// Keeps a copy that lost a divergence. The same copy kept twice (a flush retried) is one row.
pub(super) const KEEP_CONFLICT: &str = "
INSERT INTO conversation_conflicts
    (conversation_id, user_client_id, title, model, created_at, last_modified, messages, version, fingerprint, reason)
VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9, $10)
ON CONFLICT (conversation_id, user_client_id, fingerprint) DO NOTHING
RETURNING conflict_id";

pub(super) const LIST_CONFLICTS: &str = "
SELECT conflict_id, conversation_id, user_client_id, title, model, created_at, last_modified, messages::text,
       version, reason, kept_at, restored_at
FROM conversation_conflicts
WHERE ($1::text IS NULL OR user_client_id = $1) AND ($2::int8 IS NULL OR conflict_id = $2)
ORDER BY kept_at DESC, conflict_id DESC
LIMIT $3";

pub(super) const MARK_RESTORED: &str = "UPDATE conversation_conflicts SET restored_at = NOW() WHERE conflict_id = $1";

/// The number of messages, as the `int4` the statements take.
pub(super) fn message_count(conv: &Conversation) -> Result<i32> {
    i32::try_from(conv.messages.len()).map_err(|_| Error::validation("too many messages"))
}

/// The messages of one or more conversations as the column arrays `unnest` takes.
#[derive(Default)]
pub(super) struct MessageColumns<'a> {
    pub(super) id: Vec<&'a str>,
    pub(super) sequence: Vec<i32>,
    pub(super) role: Vec<&'static str>,
    pub(super) content: Vec<&'a str>,
    pub(super) time: Vec<DateTime<Utc>>,
}

impl<'a> MessageColumns<'a> {
    /// Room for `n` messages.
    pub(super) fn with_capacity(n: usize) -> Self {
        MessageColumns {
            id: Vec::with_capacity(n),
            sequence: Vec::with_capacity(n),
            role: Vec::with_capacity(n),
            content: Vec::with_capacity(n),
            time: Vec::with_capacity(n),
        }
    }

    /// Adds the messages of `conv` from its `first` on, under `id`, numbered from 0 at the first
    /// message of the conversation.
    pub(super) fn push(&mut self, id: &'a str, conv: &'a Conversation, first: usize) {
        for (seq, message) in (0..).zip(&conv.messages).skip(first) {
            self.id.push(id);
            self.sequence.push(seq);
            self.role.push(message.role.as_str());
            self.content.push(&message.content);
            self.time.push(message.time.as_datetime());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timestamp;

    #[test]
    fn in_sequence_puts_messages_in_sequence_order_and_leaves_ordered_ones_alone() {
        let t = Timestamp::now();
        let message = |content: &str| Message { role: Role::User, content: content.to_owned(), time: t };
        let contents = |messages: &[Message]| messages.iter().map(|m| m.content.clone()).collect::<Vec<_>>();

        let mut shuffled = vec![message("c"), message("a"), message("b")];
        in_sequence(&[2, 0, 1], &mut shuffled);
        assert_eq!(contents(&shuffled), ["a", "b", "c"]);

        let mut ordered = vec![message("a"), message("b")];
        in_sequence(&[0, 5], &mut ordered);
        assert_eq!(contents(&ordered), ["a", "b"]);
    }
}
