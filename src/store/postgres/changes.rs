//! The change feed's PostgreSQL side (docs/design.md, "Every cache follows PostgreSQL"): the
//! changes `schema.sql`'s triggers recorded in `conversation_changes`, read in the order of their
//! transactions' ids, each with what PostgreSQL holds for the conversation now.

use super::store::PostgresStore;
use crate::error::{Error, Result};

/// Where a reader stands: every change at or below `(txid, change_id)` was applied, and every
/// change of a transaction with an id below `txid` was too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// A transaction id (`xid8`, so it never wraps around).
    pub txid: i64,
    /// The change's row in `conversation_changes`; -1 before a transaction's first.
    pub change_id: i64,
}

/// One recorded change, with the conversation as PostgreSQL holds it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where it stands in the feed.
    pub at: Position,
    /// The conversation.
    pub conversation_id: String,
    /// The user the change was made for (the owner before it, for a row given to another user).
    pub user_id: Option<String>,
    /// The row's owner and version now; `None` when there is no row (deleted).
    pub row: Option<(String, Option<i64>)>,
    /// The id's tombstone version, if it has one.
    pub tombstone: Option<i64>,
}

/// A page of changes and the horizon they were read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePage {
    /// The oldest transaction still running when the page was read (`pg_snapshot_xmin`): every
    /// change of a transaction with a lower id was committed (and is in this page or before it)
    /// or rolled back.
    pub horizon: i64,
    /// PostgreSQL's timeline (the first part of the current WAL file's name): a promoted replica
    /// or a restore starts a new one.
    pub timeline: i64,
    /// The changes after the position asked for, in `(txid, change_id)` order, at most the limit.
    pub changes: Vec<Change>,
}

/// The page and its horizon from one snapshot, so the two agree, with the timeline.
const CHANGES_AFTER: &str = "
WITH horizon AS (
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS xmin,
           substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) AS timeline
)
SELECT h.xmin, h.timeline, ch.txid, ch.change_id, ch.conversation_id, ch.user_client_id,
       c.user_client_id, c.cache_version, t.deleted_version
FROM horizon h
LEFT JOIN LATERAL (
    SELECT txid, change_id, conversation_id, user_client_id FROM conversation_changes
    WHERE (txid, change_id) > ($1, $2)
    ORDER BY txid, change_id
    LIMIT $3
) ch ON true
-- One primary-key lookup per change: as plain joins the planner hashed the whole of `conversations`
-- (a sequential scan per page) whenever it expected a full page; LIMIT 1 keeps these nested lookups.
LEFT JOIN LATERAL (
    SELECT user_client_id, cache_version FROM conversations WHERE conversation_id = ch.conversation_id LIMIT 1
) c ON true
LEFT JOIN LATERAL (
    SELECT deleted_version FROM conversation_tombstones WHERE conversation_id = ch.conversation_id LIMIT 1
) t ON true
ORDER BY ch.txid, ch.change_id";

/// Where to follow from to see again every change recorded in the last $1 seconds: the oldest of
/// their transactions, or the horizon if that is older (a transaction still running may commit a
/// change later). Walked back from the newest change through the primary key, at most $2 rows.
const RECENT: &str = "
SELECT LEAST(
    (SELECT min(txid) FROM (
        SELECT txid, changed_at FROM conversation_changes ORDER BY change_id DESC LIMIT $2
    ) recent WHERE changed_at >= NOW() - make_interval(secs => $1)),
    pg_snapshot_xmin(pg_current_snapshot())::text::int8)";

/// Old changes go, a bounded number per statement so no statement runs long. Walked in change id
/// order through the primary key (no index on `changed_at`, which every write would pay for): the
/// oldest changes come first, so each statement reads little more than what it deletes.
const PRUNE: &str = "
DELETE FROM conversation_changes WHERE change_id = ANY (ARRAY(
    SELECT change_id FROM conversation_changes WHERE changed_at < NOW() - make_interval(secs => $1)
    ORDER BY change_id LIMIT $2))";

impl PostgresStore {
    /// The changes after `after` (at most `limit`) and the horizon they were read at.
    pub fn changes_after(&self, after: Position, limit: i64) -> Result<ChangePage> {
        let rows = self.run(|conn| conn.client.query(CHANGES_AFTER, &[&after.txid, &after.change_id, &limit]))?;
        let mut horizon = 0;
        let mut timeline = String::new();
        let mut changes = Vec::with_capacity(rows.len());
        for row in rows {
            horizon = row.get(0);
            timeline = row.get(1);
            let (Some(txid), Some(change_id), Some(conversation_id)) =
                (row.get::<_, Option<i64>>(2), row.get::<_, Option<i64>>(3), row.get::<_, Option<String>>(4))
            else {
                continue; // the horizon's row alone: no change after `after`
            };
            let owner: Option<String> = row.get(6);
            changes.push(Change {
                at: Position { txid, change_id },
                conversation_id,
                user_id: row.get(5),
                row: owner.map(|owner| (owner, row.get(7))),
                tombstone: row.get(8),
            });
        }
        let timeline = i64::from_str_radix(&timeline, 16)
            .map_err(|_| Error::config(format!("PostgreSQL named its timeline {timeline:?}, not a hex number")))?;
        Ok(ChangePage { horizon, timeline, changes })
    }

    /// A position from which every change recorded in the last `window` is read again (at most
    /// `limit` of the newest changes are looked at).
    pub fn position_since(&self, window: std::time::Duration, limit: i64) -> Result<Position> {
        let seconds = window.as_secs_f64();
        let rows = self.run(|conn| conn.client.query(RECENT, &[&seconds, &limit]))?;
        let txid: i64 = rows.first().map_or(0, |row| row.get(0));
        Ok(Position { txid, change_id: -1 })
    }

    /// Deletes changes recorded more than `retention` ago, `batch` rows per statement; returns how
    /// many went.
    pub fn prune_changes(&self, retention: std::time::Duration, batch: i64) -> Result<u64> {
        let seconds = retention.as_secs_f64();
        let mut pruned = 0;
        loop {
            let n = self.run(|conn| conn.client.execute(PRUNE, &[&seconds, &batch]))?;
            pruned += n;
            if i64::try_from(n).unwrap_or(i64::MAX) < batch {
                return Ok(pruned);
            }
        }
    }
}
