//! Write-back's PostgreSQL side: a batch of dirty conversations from the cache written in one
//! statement, and what happened to each (docs/design.md, "Write-back").

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use postgres::types::{ToSql, Type};

use super::sql::{flush_sql, message_count, MessageColumns, LOCK_IDS_FOR_FLUSH};
use super::store::PostgresStore;
use crate::error::Result;
use crate::model::Conversation;

impl PostgresStore {
    /// Writes a batch of dirty conversations in one statement (one transaction) and says what
    /// happened to each. Ids must be unique within the batch.
    pub fn flush_batch(&self, batch: &[WriteBack<'_>]) -> Result<Vec<FlushOutcome>> {
        static SQL: LazyLock<String> = LazyLock::new(flush_sql);
        let ids: Vec<&str> = batch.iter().map(|w| w.conversation_id).collect();
        let users: Vec<&str> = batch.iter().map(|w| w.user_id).collect();
        let titles: Vec<&str> = batch.iter().map(|w| w.conversation.title.as_str()).collect();
        let models: Vec<&str> = batch.iter().map(|w| w.conversation.model.as_str()).collect();
        let created: Vec<DateTime<Utc>> = batch.iter().map(|w| w.conversation.created_at.as_datetime()).collect();
        let modified: Vec<DateTime<Utc>> = batch.iter().map(|w| w.conversation.last_modified.as_datetime()).collect();
        let versions: Vec<i64> = batch.iter().map(|w| w.version).collect();
        let counts = batch.iter().map(|w| message_count(w.conversation)).collect::<Result<Vec<i32>>>()?;
        let bases: Vec<Option<i64>> = batch.iter().map(|w| w.extends.map(|(_, version)| version)).collect();
        let firsts: Vec<i32> =
            batch.iter().map(|w| w.extends.map_or(0, |(n, _)| i32::try_from(n).unwrap_or(i32::MAX))).collect();
        let known: Vec<Option<i64>> = batch.iter().map(|w| w.known).collect();
        let mut columns = MessageColumns::default();
        for w in batch {
            columns.push(w.conversation_id, w.conversation, w.extends.map_or(0, |(n, _)| n));
        }
        let params: [(&(dyn ToSql + Sync), Type); 16] = [
            (&ids, Type::TEXT_ARRAY),
            (&users, Type::TEXT_ARRAY),
            (&titles, Type::TEXT_ARRAY),
            (&models, Type::TEXT_ARRAY),
            (&created, Type::TIMESTAMPTZ_ARRAY),
            (&modified, Type::TIMESTAMPTZ_ARRAY),
            (&versions, Type::INT8_ARRAY),
            (&counts, Type::INT4_ARRAY),
            (&bases, Type::INT8_ARRAY),
            (&firsts, Type::INT4_ARRAY),
            (&columns.id, Type::TEXT_ARRAY),
            (&columns.sequence, Type::INT4_ARRAY),
            (&columns.role, Type::TEXT_ARRAY),
            (&columns.content, Type::TEXT_ARRAY),
            (&columns.time, Type::TIMESTAMPTZ_ARRAY),
            (&known, Type::INT8_ARRAY),
        ];
        let rows = self.run(|conn| conn.locked_query(LOCK_IDS_FOR_FLUSH, &ids, &SQL, &params))?;
        let mut outcomes = vec![FlushOutcome::Stale; batch.len()];
        for row in rows {
            let id: &str = row.get(0);
            let outcome = match row.get::<_, &str>(1) {
                "written" => FlushOutcome::Written,
                "current" => FlushOutcome::Current,
                "owner" => FlushOutcome::OtherOwner,
                "deleted" => FlushOutcome::Deleted,
                "rebase" => FlushOutcome::Rebase,
                "diverged" => FlushOutcome::Diverged,
                _ => FlushOutcome::Stale,
            };
            if let Some(i) = ids.iter().position(|candidate| *candidate == id) {
                outcomes[i] = outcome;
            }
        }
        Ok(outcomes)
    }
}

/// One dirty conversation to write back, at the version Redis gave its last save.
#[derive(Debug)]
pub struct WriteBack<'a> {
    /// The conversation id.
    pub conversation_id: &'a str,
    /// Its owner.
    pub user_id: &'a str,
    /// The content.
    pub conversation: &'a Conversation,
    /// Redis's version of this content; PostgreSQL keeps the newest.
    pub version: i64,
    /// `Some((n, version))`: PostgreSQL holds the first `n` messages at `version`, so only the
    /// messages after them are sent (written only if PostgreSQL is still at that version).
    pub extends: Option<(usize, i64)>,
    /// The version of the PostgreSQL row this copy was derived from, when the cache knows it. A
    /// whole copy replaces only that row; any other is a divergence ([`FlushOutcome::Diverged`]).
    pub known: Option<i64>,
}

/// What a write-back did to one conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Written now.
    Written,
    /// PostgreSQL already had exactly this version (an earlier or concurrent flush wrote it).
    Current,
    /// PostgreSQL has a newer version (written while Redis was unreachable): the cached copy is stale.
    Stale,
    /// Deleted after this version was saved: must not come back.
    Deleted,
    /// The id belongs to another user in PostgreSQL.
    OtherOwner,
    /// Only new messages were sent, but PostgreSQL no longer holds the version they extend:
    /// send the whole conversation.
    Rebase,
    /// PostgreSQL holds a row this copy was not derived from (a write that bypassed the cache, a
    /// lost settle): nothing was written; the two are compared and resolved one by one.
    Diverged,
}
