-- The PostgreSQL schema, its one copy (the README, "Schema"). schema.rs runs it, in one transaction under an
-- advisory lock, when the catalog lacks any part of it; tests/support/servers.py and benches/reference.py create the
-- Phase 1 tables from the part above the line "-- Phase 1 ends here". Every statement is idempotent and additive:
-- existing tables and rows are never altered, and a second run changes nothing.

-- Phase 1: the tables as the production system had them.
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
-- Phase 1 ends here; this product's additions follow.

-- Write-back ordering (docs/design.md): additions only, so Phase 1 rows and Phase 1 writers keep
-- working. A nullable column without a default is a catalog-only change.
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS cache_version BIGINT;
CREATE TABLE IF NOT EXISTS conversation_tombstones (
    conversation_id VARCHAR(50) PRIMARY KEY,
    user_client_id VARCHAR(255) NOT NULL,
    deleted_version BIGINT NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
-- Ids a user claimed through Redis before PostgreSQL has their row (docs/design.md, "Ownership"):
-- a save that reaches PostgreSQL while Redis cannot answer (a fall-back, postgres mode, a flush)
-- must not give the id to another user while the owner's conversation waits in Redis.
CREATE TABLE IF NOT EXISTS conversation_claims (
    conversation_id VARCHAR(50) PRIMARY KEY,
    user_client_id VARCHAR(255) NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
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

-- The change feed (docs/design.md, "Every cache follows PostgreSQL"): every committed change to a
-- conversation, by any writer, leaves a row here in its own transaction (a transactional outbox).
-- `txid` orders them for the readers: a reader takes only what lies below the oldest transaction
-- still running, so a transaction that commits late is never skipped.
CREATE TABLE IF NOT EXISTS conversation_changes (
    change_id BIGSERIAL PRIMARY KEY,
    txid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    conversation_id VARCHAR(50) NOT NULL,
    user_client_id VARCHAR(255),
    changed_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_conversation_changes_txid ON conversation_changes (txid, change_id);
-- One trigger per row written to `conversations`, before the write (one call of ours per row is what a
-- save pays; docs/benchmarks.md has the figure):
-- - A writer that sets no new version (Phase 1 code, an operator's SQL) gets one from PostgreSQL's clock,
--   bumped past the row's, as a postgres-mode save does: every change to a row changes its version, which
--   is how a cache tells its copy is older.
-- - The first write of a conversation in a transaction records it in the outbox (the follower reads what
--   PostgreSQL holds after the commit, so one row per conversation and transaction is enough; a row
--   recorded for an upsert that then wrote nothing only makes the follower look once more), and notes it
--   in the transaction-local setting `chat_history.written` (",<id>,<id>,"; past 8,000 characters "*",
--   every row) for the messages trigger below.
-- Not called at all in a transaction that set `chat_history.flush` to 'on' (a write-back's, sql.rs's
-- LOCK_IDS_FOR_FLUSH): its statement records each conversation it writes itself, in one INSERT, and
-- always sets a newer version of the same owner's row, so there is nothing for the function to do. The
-- WHEN clause calls no function of ours; schema.rs's check looks for it, so an existing database gets it.
CREATE OR REPLACE FUNCTION chat_history_version() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    written text := COALESCE(current_setting('chat_history.written', true), '');
    id text := CASE WHEN TG_OP = 'DELETE' THEN OLD.conversation_id ELSE NEW.conversation_id END;
BEGIN
    IF written <> '*' AND strpos(written, ',' || id || ',') = 0 THEN
        PERFORM set_config('chat_history.written', CASE WHEN length(written) > 8000 THEN '*'
                                                        ELSE written || ',' || id || ',' END, true);
        INSERT INTO conversation_changes (conversation_id, user_client_id)
        VALUES (id, CASE WHEN TG_OP = 'DELETE' THEN OLD.user_client_id ELSE NEW.user_client_id END);
    ELSIF written = '*' THEN
        INSERT INTO conversation_changes (conversation_id, user_client_id)
        VALUES (id, CASE WHEN TG_OP = 'DELETE' THEN OLD.user_client_id ELSE NEW.user_client_id END);
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    -- An operator may give a conversation to another user: the old owner's copies follow too.
    IF TG_OP = 'UPDATE' AND NEW.user_client_id IS DISTINCT FROM OLD.user_client_id THEN
        INSERT INTO conversation_changes (conversation_id, user_client_id) VALUES (id, OLD.user_client_id);
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.cache_version IS NULL THEN
            NEW.cache_version := (extract(epoch from clock_timestamp()) * 1000000)::int8;
        END IF;
    ELSIF NEW.cache_version IS NOT DISTINCT FROM OLD.cache_version THEN
        NEW.cache_version := GREATEST(COALESCE(OLD.cache_version, 0) + 1,
                                      (extract(epoch from clock_timestamp()) * 1000000)::int8);
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER chat_history_version BEFORE INSERT OR UPDATE OR DELETE ON conversations
    FOR EACH ROW WHEN (current_setting('chat_history.flush', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION chat_history_version();
-- A delete by a writer that leaves no tombstone (Phase 1 code, an operator's SQL) gets one, so no cached
-- copy saved before it is ever written back over it; a tombstone this transaction wrote (this library's
-- delete, whose statement writes it after the row is gone) is left alone.
CREATE OR REPLACE FUNCTION chat_history_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversation_tombstones AS t (conversation_id, user_client_id, deleted_version)
    VALUES (OLD.conversation_id, OLD.user_client_id,
            GREATEST(COALESCE(OLD.cache_version, 0) + 1, (extract(epoch from clock_timestamp()) * 1000000)::int8))
    ON CONFLICT (conversation_id) DO UPDATE
        SET user_client_id = EXCLUDED.user_client_id, deleted_at = NOW(),
            deleted_version = GREATEST(t.deleted_version, EXCLUDED.deleted_version)
        WHERE t.deleted_at < NOW();
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER chat_history_deleted AFTER DELETE ON conversations
    FOR EACH ROW EXECUTE FUNCTION chat_history_deleted();
-- A message changed by a transaction that did not write its conversation's row (an operator's
-- `UPDATE messages`) gives the row a new version, which records the change above. The WHEN clause calls
-- no function of ours, so a save (ours or Phase 1's, which write the row first) pays a string search per
-- message row, not a call.
CREATE OR REPLACE FUNCTION chat_history_messages_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE conversations SET cache_version = GREATEST(COALESCE(cache_version, 0) + 1,
                                                      (extract(epoch from clock_timestamp()) * 1000000)::int8)
    WHERE conversation_id = CASE WHEN TG_OP = 'DELETE' THEN OLD.conversation_id ELSE NEW.conversation_id END;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER chat_history_messages_changed AFTER INSERT OR UPDATE ON messages FOR EACH ROW
    WHEN (COALESCE(current_setting('chat_history.written', true), '') <> '*'
          AND strpos(COALESCE(current_setting('chat_history.written', true), ''), ',' || NEW.conversation_id || ',') = 0)
    EXECUTE FUNCTION chat_history_messages_changed();
CREATE OR REPLACE TRIGGER chat_history_messages_deleted AFTER DELETE ON messages FOR EACH ROW
    WHEN (COALESCE(current_setting('chat_history.written', true), '') <> '*'
          AND strpos(COALESCE(current_setting('chat_history.written', true), ''), ',' || OLD.conversation_id || ',') = 0)
    EXECUTE FUNCTION chat_history_messages_changed();
