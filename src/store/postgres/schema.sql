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
