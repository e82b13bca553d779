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
CREATE INDEX IF NOT EXISTS idx_conversation_changes_changed_at ON conversation_changes USING brin (changed_at);
-- A writer that does not set a new version (Phase 1 code, an operator's SQL) gets one from
-- PostgreSQL's clock, bumped past the row's, as a postgres-mode save does: every change to a row
-- changes its version, which is how a cache tells its copy is older.
CREATE OR REPLACE FUNCTION chat_history_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
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
CREATE OR REPLACE TRIGGER chat_history_version BEFORE INSERT OR UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION chat_history_version();
-- The outbox rows, one per changed conversation and statement. A delete by a writer that leaves
-- no tombstone (Phase 1 code, an operator's SQL) gets one, so no cached copy saved before it is
-- written back over it; a tombstone this transaction wrote (this library's delete) is left alone.
CREATE OR REPLACE FUNCTION chat_history_conversations_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO conversation_changes (conversation_id, user_client_id)
            SELECT conversation_id, user_client_id FROM old_rows;
        INSERT INTO conversation_tombstones AS t (conversation_id, user_client_id, deleted_version)
            SELECT conversation_id, user_client_id,
                   GREATEST(COALESCE(cache_version, 0) + 1, (extract(epoch from clock_timestamp()) * 1000000)::int8)
            FROM old_rows
        ON CONFLICT (conversation_id) DO UPDATE
            SET user_client_id = EXCLUDED.user_client_id, deleted_at = NOW(),
                deleted_version = GREATEST(t.deleted_version, EXCLUDED.deleted_version)
            WHERE t.deleted_at < NOW();
    ELSIF TG_OP = 'UPDATE' THEN
        -- An operator may give a conversation to another user: the old owner's copies go too.
        INSERT INTO conversation_changes (conversation_id, user_client_id)
            SELECT conversation_id, user_client_id FROM new_rows
            UNION SELECT conversation_id, user_client_id FROM old_rows;
    ELSE
        INSERT INTO conversation_changes (conversation_id, user_client_id)
            SELECT conversation_id, user_client_id FROM new_rows;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER chat_history_inserted AFTER INSERT ON conversations
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chat_history_conversations_changed();
CREATE OR REPLACE TRIGGER chat_history_updated AFTER UPDATE ON conversations
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chat_history_conversations_changed();
CREATE OR REPLACE TRIGGER chat_history_deleted AFTER DELETE ON conversations
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION chat_history_conversations_changed();
-- A statement that changes messages and not their conversation's row (an operator's SQL) gives
-- the row a new version, which records the change above. Writers that update the row in the same
-- transaction (every save, ours and Phase 1's) are left alone: the row changed already.
CREATE OR REPLACE FUNCTION chat_history_messages_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE conversations c SET cache_version = GREATEST(COALESCE(c.cache_version, 0) + 1,
                                                           (extract(epoch from clock_timestamp()) * 1000000)::int8)
        WHERE c.conversation_id IN (SELECT DISTINCT conversation_id FROM old_rows)
          AND c.xmin <> pg_current_xact_id()::xid;
    ELSE
        UPDATE conversations c SET cache_version = GREATEST(COALESCE(c.cache_version, 0) + 1,
                                                           (extract(epoch from clock_timestamp()) * 1000000)::int8)
        WHERE c.conversation_id IN (SELECT DISTINCT conversation_id FROM new_rows)
          AND c.xmin <> pg_current_xact_id()::xid;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER chat_history_messages_inserted AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chat_history_messages_changed();
CREATE OR REPLACE TRIGGER chat_history_messages_updated AFTER UPDATE ON messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chat_history_messages_changed();
CREATE OR REPLACE TRIGGER chat_history_messages_deleted AFTER DELETE ON messages
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION chat_history_messages_changed();
