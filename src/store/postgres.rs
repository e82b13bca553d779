//! PostgreSQL: the source of truth. A pool ([`crate::pool`]) of rust-postgres clients over rustls, the Phase 1
//! schema (the README, "Schema"), and one statement per operation so every save is atomic and costs one
//! round trip.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use postgres::types::{ToSql, Type};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PostgresSettings;
use crate::credentials::{CredentialProvider, Lease};
use crate::error::{Backend, Error, ErrorKind, Result};
use crate::model::{Conversation, Message, Role};
use crate::pool::PoolError;

type Pool = crate::pool::Pool<Connector>;
type PooledClient = crate::pool::Pooled<Connector>;

/// Opens connections for the pool. Our own rather than r2d2_postgres's, for the statement cache.
struct Connector {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    /// `SET`s run on every new connection: the bounds on statements and lock waits.
    session: String,
    /// `postgres_credential_provider`: the user and password of every new connection.
    credentials: Option<CredentialProvider>,
}

/// Why a connection could not be opened: the driver's error, or the credential provider's.
#[derive(Debug)]
enum ConnectError {
    Postgres(postgres::Error),
    /// What the provider raised, naming it (never what it returned).
    Credentials(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Postgres(e) => e.fmt(f),
            ConnectError::Credentials(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Postgres(e) => e.source(),
            ConnectError::Credentials(_) => None,
        }
    }
}

impl From<postgres::Error> for ConnectError {
    fn from(e: postgres::Error) -> Self {
        ConnectError::Postgres(e)
    }
}

/// The server ended the session with this error (`pg_terminate_backend`, a shutdown, a restart in
/// progress): the FATAL arrives before the client sees its socket close, so `is_closed()` alone
/// would return the error to the caller instead of trying a fresh connection.
fn session_ended(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    e.code().is_some_and(|code| {
        [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW].contains(code)
    })
}

impl r2d2::ManageConnection for Connector {
    type Connection = Connection;
    type Error = ConnectError;

    fn connect(&self) -> Result<Connection, ConnectError> {
        let (mut client, lease) = match &self.credentials {
            None => (self.config.connect(self.tls.clone())?, Lease::forever()),
            Some(provider) => {
                let (login, lease) = provider.fetch().map_err(ConnectError::Credentials)?;
                let mut config = self.config.clone();
                // An empty username keeps the connection string's user.
                if !login.username.is_empty() {
                    config.user(&login.username);
                }
                config.password(&login.password);
                (config.connect(self.tls.clone())?, lease)
            }
        };
        // Set per session rather than as startup `options`, which poolers such as PgBouncer refuse.
        client.batch_execute(&self.session)?;
        Ok(Connection { client, statements: HashMap::new(), lease, ending: false })
    }

    fn is_valid(&self, conn: &mut Connection) -> Result<(), ConnectError> {
        Ok(conn.client.simple_query("").map(|_| ())?)
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        // PostgreSQL checks credentials only at connect, but Azure closes sessions whose token
        // expired: a connection is retired before then (see `PostgresStore::checkout`).
        conn.ending || conn.client.is_closed() || conn.lease.due(SystemTime::now())
    }
}

/// A client and the statements prepared on it. Every statement here is a fixed string, prepared
/// once per connection: a statement sent unprepared is parsed and planned again on every call,
/// which was most of a PostgreSQL read's time.
pub(crate) struct Connection {
    client: postgres::Client,
    /// Keyed by the address of the `'static` SQL text: hashing the text itself (up to 2 KB) on
    /// every call would cost more than the lookup saves.
    statements: HashMap<usize, postgres::Statement>,
    /// When the credentials it logged in with are due for renewal.
    lease: Lease,
    /// The server said it is ending this session (an administrator's or a shutdown's FATAL): the
    /// socket may not look closed yet, but the connection is not handed out again.
    ending: bool,
}

impl Connection {
    fn statement(
        &mut self,
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<postgres::Statement, postgres::Error> {
        let key = sql.as_ptr() as usize;
        if let Some(statement) = self.statements.get(&key) {
            return Ok(statement.clone());
        }
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let statement = self.client.prepare_typed(sql, &types)?;
        self.statements.insert(key, statement.clone());
        Ok(statement)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let statement = self.statement(sql, params)?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        self.client.query(&statement, &values)
    }

    /// `lock` then `sql` in one transaction (see [`LOCK_IDS`]).
    fn locked_query(
        &mut self,
        ids: &(dyn ToSql + Sync),
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let lock = self.statement(LOCK_IDS, &[(ids, Type::TEXT_ARRAY)])?;
        let statement = self.statement(sql, params)?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        let mut tx = self.client.transaction()?;
        tx.execute(&lock, &[ids])?;
        let rows = tx.query(&statement, &values)?;
        tx.commit()?;
        Ok(rows)
    }
}

/// What the product needs in the catalog. Read first, so a start on an existing schema takes no
/// lock stronger than a read: `ALTER TABLE ... ADD COLUMN IF NOT EXISTS` and `CREATE INDEX IF NOT
/// EXISTS` lock the table even when there is nothing to do, and a DDL lock queued behind one long
/// reader makes every other client's query queue behind it (docs/design.md, "Faults").
const SCHEMA_CHECK: &str = "
SELECT to_regclass('conversations') IS NOT NULL
   AND to_regclass('messages') IS NOT NULL
   AND to_regclass('conversation_tombstones') IS NOT NULL
   AND to_regclass('conversation_conflicts') IS NOT NULL
   AND to_regclass('idx_conversations_user_modified') IS NOT NULL
   AND to_regclass('idx_conversations_user_created') IS NOT NULL
   AND to_regclass('idx_messages_conversation_seq') IS NOT NULL
   AND to_regclass('idx_conversation_conflicts_user') IS NOT NULL
   AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('conversations')
               AND attname = 'cache_version' AND NOT attisdropped)";

/// The Phase 1 schema and this product's additions, run only when [`SCHEMA_CHECK`] finds something
/// missing; existing tables and rows are never altered. Serialised by an advisory lock: concurrent
/// `CREATE TABLE IF NOT EXISTS` can otherwise fail on the catalog's unique index when two processes
/// start at once. The session's `lock_timeout` bounds every lock it waits for.
const SCHEMA: &str = "
SELECT pg_advisory_xact_lock(7215864202913520411);
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id VARCHAR(50) PRIMARY KEY,
    user_client_id VARCHAR(255) NOT NULL,
    title TEXT NOT NULL,
    model VARCHAR(100) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    last_modified TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_conversations_user_modified ON conversations (user_client_id, last_modified DESC);
CREATE INDEX IF NOT EXISTS idx_conversations_user_created ON conversations (user_client_id, created_at DESC);
CREATE TABLE IF NOT EXISTS messages (
    message_id SERIAL PRIMARY KEY,
    conversation_id VARCHAR(50) NOT NULL REFERENCES conversations (conversation_id) ON DELETE CASCADE,
    sequence_number INTEGER NOT NULL,
    role VARCHAR(20) NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    timestamp TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    UNIQUE (conversation_id, sequence_number)
);
CREATE INDEX IF NOT EXISTS idx_messages_conversation_seq ON messages (conversation_id, sequence_number);
-- Write-back ordering (docs/design.md): additions only, so Phase 1 rows and Phase 1 writers keep
-- working. A nullable column without a default is a catalog-only change.
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS cache_version BIGINT;
CREATE TABLE IF NOT EXISTS conversation_tombstones (
    conversation_id VARCHAR(50) PRIMARY KEY,
    user_client_id VARCHAR(255) NOT NULL,
    deleted_version BIGINT NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
-- Copies that lost a divergence between Redis and PostgreSQL, kept for an operator to list and
-- restore (`chat-history conflicts`). The fingerprint makes keeping the same copy twice a no-op.
CREATE TABLE IF NOT EXISTS conversation_conflicts (
    conflict_id BIGSERIAL PRIMARY KEY,
    conversation_id VARCHAR(50) NOT NULL,
    user_client_id VARCHAR(255) NOT NULL,
    title TEXT NOT NULL,
    model VARCHAR(100) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    last_modified TIMESTAMPTZ NOT NULL,
    messages JSONB NOT NULL,
    version BIGINT,
    fingerprint BIGINT NOT NULL,
    reason TEXT NOT NULL,
    kept_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    restored_at TIMESTAMPTZ,
    UNIQUE (conversation_id, user_client_id, fingerprint)
);
CREATE INDEX IF NOT EXISTS idx_conversation_conflicts_user ON conversation_conflicts (user_client_id, kept_at DESC);
";

/// Old tombstones go; run at start, a plain DELETE that takes no table lock.
const PRUNE_TOMBSTONES: &str = "DELETE FROM conversation_tombstones WHERE deleted_at < NOW() - INTERVAL '30 days'";

/// Microseconds since the epoch on PostgreSQL's clock: the version of a write that did not come
/// through Redis. Versions from Redis use Redis's clock (`TIME`), so the two tiers order writes
/// by wall-clock time, each bumped past the version it replaces.
const NOW_MICROS: &str = "(extract(epoch from clock_timestamp()) * 1000000)::int8";

/// One round trip, one row: the conversation and its messages as arrays in sequence order.
/// One row rather than one per message: each row repeated the conversation's columns and cost the
/// client a row's decoding, and a 20-message reply no longer overflows PostgreSQL's 8 KB send buffer.
/// The messages are sorted once in the subquery and aggregated in that order, rather than by an
/// `ORDER BY` in each aggregate (PostgreSQL 15 sorts once per such aggregate); the sequence numbers
/// come along so the order is checked, not assumed (see [`in_sequence`]).
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

const GET: &str = conversation_row!("", "c.conversation_id = $1 AND c.user_client_id = $2");

/// A [`GET`] row as the conversation and its version.
fn conversation_of(row: &postgres::Row) -> Result<(Conversation, Option<i64>)> {
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

const LIST: &str = "
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
fn save_sql() -> String {
    format!(
        "
WITH conv AS (
    INSERT INTO conversations AS c (conversation_id, user_client_id, title, model, created_at, last_modified, cache_version)
    VALUES ($1, $2, $3, $4, $5, $6, {NOW_MICROS})
    ON CONFLICT (conversation_id) DO UPDATE
        SET title = EXCLUDED.title, model = EXCLUDED.model, last_modified = EXCLUDED.last_modified,
            cache_version = GREATEST(COALESCE(c.cache_version, 0) + 1, EXCLUDED.cache_version)
        WHERE c.user_client_id = EXCLUDED.user_client_id
    RETURNING c.conversation_id, c.cache_version
), trimmed AS (
    DELETE FROM messages
    WHERE conversation_id IN (SELECT conversation_id FROM conv) AND sequence_number >= $7
), written AS (
    {WRITE_MESSAGES}
    FROM conv, unnest($8::int4[], $9::text[], $10::text[], $11::timestamptz[]) AS new(seq, role, content, ts)
    {UPSERT_MESSAGES}
)
SELECT cache_version FROM conv"
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
fn flush_sql() -> String {
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
    RETURNING c.conversation_id
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
/// another user's: their conversation must stay writable.
fn delete_sql() -> String {
    format!(
        "
WITH gone AS (
    DELETE FROM conversations WHERE conversation_id = $1 AND user_client_id = $2 RETURNING cache_version
), tomb AS (
    INSERT INTO conversation_tombstones AS t (conversation_id, user_client_id, deleted_version)
    SELECT $1, $2, GREATEST({NOW_MICROS}, COALESCE((SELECT max(cache_version) FROM gone), 0) + 1, $3)
    WHERE NOT EXISTS (SELECT 1 FROM conversations WHERE conversation_id = $1 AND user_client_id <> $2)
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
const LOCK_IDS: &str = "
SELECT pg_advisory_xact_lock(1667786866, k)
FROM (SELECT DISTINCT hashtext(id) AS k FROM unnest($1::text[]) AS id ORDER BY 1) AS keys";

/// Who owns the id, and the newest version its row or its tombstone has.
const OWNER: &str = "
SELECT (SELECT user_client_id FROM conversations WHERE conversation_id = $1),
       GREATEST((SELECT cache_version FROM conversations WHERE conversation_id = $1),
                (SELECT deleted_version FROM conversation_tombstones WHERE conversation_id = $1))";

/// [`GET`] for whoever owns the id, with the owner: what a divergence is resolved against.
const GET_ANY: &str = conversation_row!(", c.user_client_id", "c.conversation_id = $1");

/// Keeps a copy that lost a divergence. The same copy kept twice (a flush retried) is one row.
const KEEP_CONFLICT: &str = "
INSERT INTO conversation_conflicts
    (conversation_id, user_client_id, title, model, created_at, last_modified, messages, version, fingerprint, reason)
VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9, $10)
ON CONFLICT (conversation_id, user_client_id, fingerprint) DO NOTHING
RETURNING conflict_id";

const LIST_CONFLICTS: &str = "
SELECT conflict_id, conversation_id, user_client_id, title, model, created_at, last_modified, messages::text,
       version, reason, kept_at, restored_at
FROM conversation_conflicts
WHERE ($1::text IS NULL OR user_client_id = $1) AND ($2::int8 IS NULL OR conflict_id = $2)
ORDER BY kept_at DESC, conflict_id DESC
LIMIT $3";

const MARK_RESTORED: &str = "UPDATE conversation_conflicts SET restored_at = NOW() WHERE conflict_id = $1";

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

/// Logs every connection that could not be opened, and keeps the last one's whole chain of
/// causes: the driver's own message often says only "db error", not why (a refused login, say).
#[derive(Debug, Default, Clone)]
struct PoolErrorLog {
    last: Arc<Mutex<Option<String>>>,
}

impl r2d2::HandleError<ConnectError> for PoolErrorLog {
    fn handle_error(&self, error: ConnectError) {
        let text = error_chain(&error);
        log::warn!("PostgreSQL connection failed: {text}");
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(text);
    }
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
        let created = self.run(|conn| {
            let present: bool = conn.client.query_one(SCHEMA_CHECK, &[])?.get(0);
            if !present {
                let mut tx = conn.client.transaction()?;
                tx.batch_execute(SCHEMA)?;
                tx.commit()?;
            }
            conn.client.batch_execute(PRUNE_TOMBSTONES)?;
            Ok(!present)
        })?;
        log::info!("PostgreSQL schema {} at {}", if created { "created" } else { "ready" }, self.redacted);
        Ok(())
    }

    /// Runs `op` on a pooled client. A statement that fails because its connection died (a server
    /// restart, a dropped socket) is run again on a fresh connection: every operation here is
    /// idempotent, so a retry after an unacknowledged commit lands in the same state.
    fn run<T>(&self, mut op: impl FnMut(&mut Connection) -> Result<T, postgres::Error>) -> Result<T> {
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

    /// Who owns the id and how new its row or tombstone is; `None` when PostgreSQL has neither.
    pub fn owner(&self, conversation_id: &str) -> Result<Option<OwnerRow>> {
        let rows = self.run(|conn| conn.query(OWNER, &[(&conversation_id, Type::VARCHAR)]))?;
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

    /// Writes the whole conversation atomically and returns the version it was stored under.
    /// Fails with [`ErrorKind::Ownership`], changing nothing, when the id belongs to another user.
    pub fn save(&self, conversation_id: &str, user_id: &str, conv: &Conversation) -> Result<i64> {
        static SQL: LazyLock<String> = LazyLock::new(save_sql);
        let columns = MessageColumns::new(std::slice::from_ref(&conv), |_| conversation_id);
        let created_at = conv.created_at.as_datetime();
        let last_modified = conv.last_modified.as_datetime();
        let count = message_count(conv)?;
        let params: [(&(dyn ToSql + Sync), Type); 11] = [
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
        ];
        let rows = self.run(|conn| conn.query(&SQL, &params))?;
        match rows.first() {
            Some(row) => Ok(row.get(0)),
            None => Err(Error::new(
                ErrorKind::Ownership,
                format!("conversation {conversation_id:?} belongs to another user"),
            )),
        }
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
        let columns = MessageColumns::tails(batch);
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
        let rows = self.run(|conn| conn.locked_query(&ids, &SQL, &params))?;
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

fn message_count(conv: &Conversation) -> Result<i32> {
    i32::try_from(conv.messages.len()).map_err(|_| Error::validation("too many messages"))
}

/// The messages of one or more conversations as the column arrays `unnest` takes.
struct MessageColumns<'a> {
    id: Vec<&'a str>,
    sequence: Vec<i32>,
    role: Vec<&'static str>,
    content: Vec<&'a str>,
    time: Vec<DateTime<Utc>>,
}

impl<'a> MessageColumns<'a> {
    /// The messages a batch of write-backs sends: each one's messages after those PostgreSQL holds.
    fn tails(batch: &[WriteBack<'a>]) -> Self {
        let mut columns = MessageColumns {
            id: Vec::new(),
            sequence: Vec::new(),
            role: Vec::new(),
            content: Vec::new(),
            time: Vec::new(),
        };
        for w in batch {
            let first = w.extends.map_or(0, |(n, _)| n);
            for (seq, message) in (0..).zip(&w.conversation.messages).skip(first) {
                columns.id.push(w.conversation_id);
                columns.sequence.push(seq);
                columns.role.push(message.role.as_str());
                columns.content.push(&message.content);
                columns.time.push(message.time.as_datetime());
            }
        }
        columns
    }

    fn new(conversations: &[&'a Conversation], id_of: impl Fn(usize) -> &'a str) -> Self {
        let n = conversations.iter().map(|c| c.messages.len()).sum();
        let mut columns = MessageColumns {
            id: Vec::with_capacity(n),
            sequence: Vec::with_capacity(n),
            role: Vec::with_capacity(n),
            content: Vec::with_capacity(n),
            time: Vec::with_capacity(n),
        };
        for (i, conv) in conversations.iter().enumerate() {
            let id = id_of(i);
            for (seq, message) in (0..).zip(&conv.messages) {
                columns.id.push(id);
                columns.sequence.push(seq);
                columns.role.push(message.role.as_str());
                columns.content.push(&message.content);
                columns.time.push(message.time.as_datetime());
            }
        }
        columns
    }
}

/// Classifies a driver error: the server refusing a statement is a database error; anything that
/// means "no usable connection" (I/O, closed socket, TLS, login refused, shutting down) is
/// unavailability, so it can never be mistaken for "not found".
fn pg_error(error: &postgres::Error) -> Error {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        // 08: connection exception; 57P0x: shutdown / cannot connect now; 53300: too many
        // connections; 28: authentication failed.
        // 55P03 / 57014: a lock wait or a statement ran past lock_timeout / statement_timeout, or a
        // query was cancelled: transient, so a flush keeps the data dirty and a read says why.
        let unavailable = code.starts_with("08")
            || code.starts_with("57P")
            || code == "53300"
            || code.starts_with("28")
            || code == "55P03"
            || code == "57014";
        if unavailable && (code == "55P03" || code == "57014") {
            return Error::new(
                ErrorKind::Unavailable(Backend::Postgres),
                format!("PostgreSQL is unavailable: {} (lock_timeout / statement_timeout)", db.message()),
            )
            .with_source(error_chain(error));
        }
        if !unavailable {
            return Error::new(
                ErrorKind::Database(Backend::Postgres),
                format!("PostgreSQL refused the statement: {}", db.message()),
            )
            .with_source(error_chain(error));
        }
    }
    Error::new(ErrorKind::Unavailable(Backend::Postgres), "PostgreSQL is unavailable").with_source(error_chain(error))
}

/// The error and its causes on one line: rust-postgres puts the useful part ("Connection refused")
/// in the source.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
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
