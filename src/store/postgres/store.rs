//! [`PostgresStore`]: the pool and the operations the tiers call, each one statement (see `sql`)
//! run by [`PostgresStore::run`], which retries on a fresh connection when its connection died.

use std::sync::{LazyLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use postgres::types::{ToSql, Type};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::connection::{pg_error, session_ended, Connection, Connector, Pool, PoolErrorLog, PooledClient};
use super::schema;
use super::sql::{
    conversation_of, delete_sql, message_count, save_sql, MessageColumns, CLAIM, GET, GET_ANY, KEEP_CONFLICT, LIST,
    LIST_CONFLICTS, LOCK_IDS, MARK_RESTORED,
};
use crate::config::PostgresSettings;
use crate::error::{Backend, Error, ErrorKind, Result};
use crate::model::{Conversation, Message};
use crate::pool::PoolError;

/// The PostgreSQL store. Cheap to share: the pool is reference-counted inside.
pub struct PostgresStore {
    pool: Pool,
    redacted: String,
    connect_errors: PoolErrorLog,
    connect_timeout: Duration,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("url", &self.redacted).finish_non_exhaustive()
    }
}

/// Which row a save may replace ([`PostgresStore::save_expecting`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Only the row at this version (`None`: a Phase 1 row, without one).
    Version(Option<i64>),
    /// Only when there is no row.
    Absent,
    /// Only when the new messages extend the row's (its messages are the first of the new ones),
    /// or there is no row: a save that replaces nothing a reader could miss.
    Extending,
}

impl PostgresStore {
    /// Builds the pool without connecting; [`PostgresStore::ensure_schema`] is the first contact.
    pub fn new(settings: &PostgresSettings) -> Result<Self> {
        let tls = MakeRustlsConnect::new(settings.tls_config()?);
        let connect_errors = PoolErrorLog::default();
        let session = format!(
            "SET statement_timeout = {}; SET lock_timeout = {}; SET idle_in_transaction_session_timeout = {}",
            settings.statement_timeout.as_millis(),
            settings.lock_timeout.as_millis(),
            // A transaction left open by a client that vanished mid-call must not hold its locks.
            (settings.statement_timeout * 2).as_millis(),
        );
        let manager =
            Connector { config: settings.config.clone(), tls, session, credentials: settings.credentials.clone() };
        // No checkout test (a round trip on every call): a dead connection is instead detected by
        // the failed statement and replaced (see `run`).
        let pool = Pool::builder()
            .max_size(settings.pool_size)
            .connection_timeout(settings.connect_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .error_handler(Box::new(connect_errors.clone()))
            .build(manager);
        Ok(PostgresStore {
            pool,
            redacted: settings.redacted(),
            connect_errors,
            connect_timeout: settings.connect_timeout,
        })
    }

    /// The connection string without its password.
    #[must_use]
    pub fn redacted_url(&self) -> &str {
        &self.redacted
    }

    /// Creates the tables and indexes when the catalog says something is missing; otherwise reads
    /// the catalog and takes no lock a reader would wait for.
    pub fn ensure_schema(&self) -> Result<()> {
        let created = self.run(schema::ensure)?;
        log::info!("PostgreSQL schema {} at {}", if created { "created" } else { "ready" }, self.redacted);
        Ok(())
    }

    /// Runs `op` on a pooled client. A statement that fails because its connection died (a server
    /// restart, a dropped socket) is run again on a fresh connection: every operation here is
    /// idempotent, so a retry after an unacknowledged commit lands in the same state.
    pub(super) fn run<T>(&self, mut op: impl FnMut(&mut Connection) -> Result<T, postgres::Error>) -> Result<T> {
        let attempts = self.pool.max_size() + 1;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = self.checkout()?;
            match op(&mut client) {
                Ok(value) => return Ok(value),
                Err(e) if (client.client.is_closed() || session_ended(&e)) && attempt < attempts => {
                    client.ending = true;
                    log::info!("PostgreSQL connection lost ({e}); retrying on a fresh connection");
                }
                Err(e) => return Err(pg_error(&e)),
            }
        }
    }

    /// A pooled connection. Waits at most the connect timeout for one to be handed back; a
    /// connection that cannot be opened (refused, login rejected) fails the call at once.
    fn checkout(&self) -> Result<PooledClient> {
        let deadline = Instant::now() + self.connect_timeout;
        let mut retired = 0;
        loop {
            let why = match self.pool.get_timeout(deadline.saturating_duration_since(Instant::now())) {
                // Dropped, it is closed rather than pooled (`has_broken`), and the next one tried.
                // Bounded, so credentials that are due as soon as they are handed out (an expiry in
                // the past) still reach the server, which says whether it takes them.
                Ok(client) if client.lease.due(SystemTime::now()) && retired < self.pool.max_size() => {
                    retired += 1;
                    log::debug!("PostgreSQL connection retired before its credentials expire");
                    continue;
                }
                Ok(client) => return Ok(client),
                // The error handler kept the whole chain of causes, not only the driver's first line.
                Err(PoolError::Connect(first)) => {
                    self.connect_errors.last.lock().unwrap_or_else(PoisonError::into_inner).take().unwrap_or(first)
                }
                Err(e @ PoolError::Timeout(_)) => e.to_string(),
            };
            return Err(Error::new(
                ErrorKind::Unavailable(Backend::Postgres),
                format!("PostgreSQL is unavailable at {}", self.redacted),
            )
            .with_source(why));
        }
    }

    /// The user's conversation with its messages, or `None` when there is none of that id for
    /// that user (another user's id reads as missing).
    pub fn get(&self, conversation_id: &str, user_id: &str) -> Result<Option<Conversation>> {
        Ok(self.get_versioned(conversation_id, user_id)?.map(|(conv, _)| conv))
    }

    /// [`PostgresStore::get`] with the row's write-back version (`None` for rows written by Phase 1).
    pub fn get_versioned(&self, conversation_id: &str, user_id: &str) -> Result<Option<(Conversation, Option<i64>)>> {
        let rows = self.run(|conn| conn.query(GET, &[(&conversation_id, Type::VARCHAR), (&user_id, Type::VARCHAR)]))?;
        rows.first().map(conversation_of).transpose()
    }

    /// The user's conversations created in the last `days` days, newest `last_modified` first,
    /// without messages.
    pub fn list(&self, user_id: &str, days: i32) -> Result<Vec<(String, Conversation)>> {
        let rows = self.run(|conn| conn.query(LIST, &[(&user_id, Type::VARCHAR), (&days, Type::INT4)]))?;
        Ok(rows
            .iter()
            .map(|row| {
                let conv = Conversation {
                    title: row.get(1),
                    model: row.get(2),
                    messages: Vec::new(),
                    created_at: row.get::<_, DateTime<Utc>>(3).into(),
                    last_modified: row.get::<_, DateTime<Utc>>(4).into(),
                };
                (row.get(0), conv)
            })
            .collect())
    }

    /// Claims the id for `user_id` when PostgreSQL has no row of it (a claim already made stays),
    /// then says who owns it (the row's user, else the claim's) and how new its row or tombstone
    /// is; `None` when PostgreSQL has none of these. Safe to run twice.
    pub fn claim(&self, conversation_id: &str, user_id: &str) -> Result<Option<OwnerRow>> {
        let rows =
            self.run(|conn| conn.query(CLAIM, &[(&conversation_id, Type::VARCHAR), (&user_id, Type::VARCHAR)]))?;
        Ok(rows
            .first()
            .map(|row| OwnerRow { owner: row.get(0), version: row.get(1) })
            .filter(|r| r.owner.is_some() || r.version.is_some()))
    }

    /// The row of the id whoever owns it: (owner, conversation, version).
    pub fn get_any(&self, conversation_id: &str) -> Result<Option<(String, Conversation, Option<i64>)>> {
        let rows = self.run(|conn| conn.query(GET_ANY, &[(&conversation_id, Type::VARCHAR)]))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let (conv, version) = conversation_of(row)?;
        Ok(Some((row.get(9), conv, version)))
    }

    /// Keeps `conv` aside as a copy that lost a divergence; returns whether it was new (the same
    /// messages already kept for this id and user are not kept twice).
    pub fn keep_conflict(
        &self,
        conversation_id: &str,
        user_id: &str,
        conv: &Conversation,
        version: Option<i64>,
        reason: &str,
    ) -> Result<bool> {
        let messages = serde_json::to_string(&conv.messages).expect("messages always serialise");
        let created_at = conv.created_at.as_datetime();
        let last_modified = conv.last_modified.as_datetime();
        // The fingerprint's bits, as PostgreSQL's signed bigint.
        #[allow(clippy::cast_possible_wrap)]
        let fingerprint = crate::model::messages_fingerprint(&conv.messages) as i64;
        let params: [(&(dyn ToSql + Sync), Type); 10] = [
            (&conversation_id, Type::VARCHAR),
            (&user_id, Type::VARCHAR),
            (&conv.title, Type::TEXT),
            (&conv.model, Type::VARCHAR),
            (&created_at, Type::TIMESTAMPTZ),
            (&last_modified, Type::TIMESTAMPTZ),
            (&messages, Type::TEXT),
            (&version, Type::INT8),
            (&fingerprint, Type::INT8),
            (&reason, Type::TEXT),
        ];
        let rows = self.run(|conn| conn.query(KEEP_CONFLICT, &params))?;
        Ok(!rows.is_empty())
    }

    /// Kept conflict copies, newest first: all, one user's, or the one with `conflict_id`.
    pub fn conflicts(&self, user_id: Option<&str>, conflict_id: Option<i64>, limit: i64) -> Result<Vec<Conflict>> {
        let rows = self.run(|conn| {
            conn.query(LIST_CONFLICTS, &[(&user_id, Type::TEXT), (&conflict_id, Type::INT8), (&limit, Type::INT8)])
        })?;
        rows.iter()
            .map(|row| {
                let messages: Vec<Message> = serde_json::from_str(row.get::<_, &str>(7)).map_err(|e| {
                    Error::new(ErrorKind::Database(Backend::Postgres), "a kept conflict copy is not readable")
                        .with_source(e)
                })?;
                Ok(Conflict {
                    conflict_id: row.get(0),
                    conversation_id: row.get(1),
                    user_id: row.get(2),
                    conversation: Conversation {
                        title: row.get(3),
                        model: row.get(4),
                        messages,
                        created_at: row.get::<_, DateTime<Utc>>(5).into(),
                        last_modified: row.get::<_, DateTime<Utc>>(6).into(),
                    },
                    version: row.get(8),
                    reason: row.get(9),
                    kept_at: row.get::<_, DateTime<Utc>>(10).into(),
                    restored_at: row.get::<_, Option<DateTime<Utc>>>(11).map(Into::into),
                })
            })
            .collect()
    }

    /// Records that a kept copy was restored.
    pub fn mark_restored(&self, conflict_id: i64) -> Result<()> {
        self.run(|conn| conn.query(MARK_RESTORED, &[(&conflict_id, Type::INT8)]))?;
        Ok(())
    }

    /// Writes the whole conversation atomically, only over the row `expect` names, and returns the
    /// version it was stored under; `Ok(None)` when the row is not that one (or the id is another
    /// user's), and nothing was written. A caller
    /// that read the row, checked the save against it and then writes, writes over what it checked,
    /// not over a row another writer (a flush, say) put there in between.
    pub fn save_expecting(
        &self,
        conversation_id: &str,
        user_id: &str,
        conv: &Conversation,
        expect: Expect,
    ) -> Result<Option<i64>> {
        static SQL: LazyLock<String> = LazyLock::new(save_sql);
        let (mode, expected): (i32, Option<i64>) = match expect {
            Expect::Version(version) => (1, version),
            Expect::Absent => (2, None),
            Expect::Extending => (3, None),
        };
        let mut columns = MessageColumns::with_capacity(conv.messages.len());
        columns.push(conversation_id, conv, 0);
        let created_at = conv.created_at.as_datetime();
        let last_modified = conv.last_modified.as_datetime();
        let count = message_count(conv)?;
        let params: [(&(dyn ToSql + Sync), Type); 13] = [
            (&conversation_id, Type::VARCHAR),
            (&user_id, Type::VARCHAR),
            (&conv.title, Type::TEXT),
            (&conv.model, Type::VARCHAR),
            (&created_at, Type::TIMESTAMPTZ),
            (&last_modified, Type::TIMESTAMPTZ),
            (&count, Type::INT4),
            (&columns.sequence, Type::INT4_ARRAY),
            (&columns.role, Type::TEXT_ARRAY),
            (&columns.content, Type::TEXT_ARRAY),
            (&columns.time, Type::TIMESTAMPTZ_ARRAY),
            (&expected, Type::INT8),
            (&mode, Type::INT4),
        ];
        let rows = self.run(|conn| conn.query(&SQL, &params))?;
        Ok(rows.first().and_then(|row| row.get(0)))
    }

    /// A postgres-mode save (and the seed's `PostgresBackend`'s). An app's next turn extends the
    /// row: one statement. Otherwise (a write-back or another instance's save this one never read, a
    /// regenerate) the row is kept aside first, as [`PostgresStore::save_checked`] does, and as a
    /// flush keeps a copy it would lose (docs/design.md, "Divergence").
    ///
    /// # Errors
    ///
    /// As [`PostgresStore::save_checked`].
    pub fn save_keeping(&self, conversation_id: &str, user_id: &str, conv: &Conversation, reason: &str) -> Result<()> {
        if self.save_expecting(conversation_id, user_id, conv, Expect::Extending)?.is_some() {
            return Ok(());
        }
        let (_, kept) = self.save_checked(conversation_id, user_id, conv, reason)?;
        for messages in kept {
            log::warn!(
                "conversation {conversation_id:?} of user {user_id:?}: a save replaced a copy with {messages} messages \
                 it lacks; that copy is kept in conversation_conflicts (`chat-history conflicts` lists and restores it)"
            );
        }
        Ok(())
    }

    /// Saves over whatever row is there without losing it: the row is kept aside in
    /// `conversation_conflicts` (with `reason`) first, unless the new messages extend it. The
    /// write replaces only the row that was checked: a row another writer (a flush, another
    /// instance's save) put there in between makes it write nothing, and the check runs again on
    /// the new row. Returns the new version and the number of messages of each copy kept aside.
    ///
    /// # Errors
    ///
    /// Ownership when the id is another user's; a database error when the row kept changing.
    pub fn save_checked(
        &self,
        conversation_id: &str,
        user_id: &str,
        conv: &Conversation,
        reason: &str,
    ) -> Result<(i64, Vec<usize>)> {
        /// Times the row may change between this save's read and its write before it gives up.
        const ATTEMPTS: usize = 5;
        let mut kept = Vec::new();
        for _ in 0..ATTEMPTS {
            let current = self.get_versioned(conversation_id, user_id)?;
            if let Some((current, version)) = &current {
                if !crate::model::is_prefix(&current.messages, &conv.messages)
                    && self.keep_conflict(conversation_id, user_id, current, *version, reason)?
                {
                    kept.push(current.messages.len());
                }
            }
            fail::fail_point!("save.postgres.after_read");
            let expect = current.as_ref().map_or(Expect::Absent, |(_, version)| Expect::Version(*version));
            if let Some(version) = self.save_expecting(conversation_id, user_id, conv, expect)? {
                return Ok((version, kept));
            }
            if current.is_none() && self.get_versioned(conversation_id, user_id)?.is_none() {
                // Nothing of this user's was there, and the write was refused: another user's id.
                return Err(Error::new(
                    ErrorKind::Ownership,
                    format!("conversation {conversation_id:?} belongs to another user"),
                ));
            }
        }
        Err(Error::new(
            ErrorKind::Database(Backend::Postgres),
            format!(
                "conversation {conversation_id:?} kept changing in PostgreSQL while this save tried to replace it; \
                 nothing was saved (save again)"
            ),
        ))
    }

    /// Deletes the conversation and its messages when it is the user's, and records a tombstone
    /// at least `min_version` (the newest version the cache saw) so no older write-back lands
    /// after it. Returns whether a row was deleted and the tombstone's version.
    pub fn delete_versioned(
        &self,
        conversation_id: &str,
        user_id: &str,
        min_version: i64,
    ) -> Result<(bool, Option<i64>)> {
        static SQL: LazyLock<String> = LazyLock::new(delete_sql);
        // A version seen in the cache means the user has a copy there to delete.
        let had_copy = min_version > 0;
        let ids = [conversation_id];
        let ids = ids.as_slice();
        let rows = self.run(|conn| {
            conn.locked_query(
                LOCK_IDS,
                &ids,
                &SQL,
                &[
                    (&conversation_id, Type::VARCHAR),
                    (&user_id, Type::VARCHAR),
                    (&min_version, Type::INT8),
                    (&had_copy, Type::BOOL),
                ],
            )
        })?;
        let row = rows.first().ok_or_else(|| {
            Error::new(ErrorKind::Database(Backend::Postgres), "the delete statement returned no row")
        })?;
        Ok((row.get::<_, i64>(0) > 0, row.get(1)))
    }

    /// Deletes the conversation and its messages when it is the user's; returns whether it was.
    pub fn delete(&self, conversation_id: &str, user_id: &str) -> Result<bool> {
        Ok(self.delete_versioned(conversation_id, user_id, 0)?.0)
    }
}

/// What PostgreSQL knows of an id before a cache claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRow {
    /// The user whose row it is, if a row exists.
    pub owner: Option<String>,
    /// The newest write-back version of the row or of a tombstone of the id.
    pub version: Option<i64>,
}

/// A copy kept aside after a divergence.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// Its key in `conversation_conflicts`.
    pub conflict_id: i64,
    /// The conversation it is a copy of.
    pub conversation_id: String,
    /// The conversation's owner.
    pub user_id: String,
    /// The copy.
    pub conversation: Conversation,
    /// Its write-back version, when it had one.
    pub version: Option<i64>,
    /// Why it was kept.
    pub reason: String,
    /// When.
    pub kept_at: crate::model::Timestamp,
    /// When an operator restored it, if so.
    pub restored_at: Option<crate::model::Timestamp>,
}
