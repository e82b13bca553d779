//! The schema: what the product needs in the catalog, created when something is missing. The DDL
//! itself is `schema.sql`, the one copy tests and benches load too.

use super::connection::Connection;

/// What the product needs in the catalog. Read first, so a start on an existing schema takes no
/// lock stronger than a read: `ALTER TABLE ... ADD COLUMN IF NOT EXISTS` and `CREATE INDEX IF NOT
/// EXISTS` lock the table even when there is nothing to do, and a DDL lock queued behind one long
/// reader makes every other client's query queue behind it (docs/design.md, "Faults"). A trigger
/// whose definition changed is looked for by what the new one says (`chat_history_version`'s `WHEN`
/// on `chat_history.flush`), so a database made before the change gets the new one at its next start.
const SCHEMA_CHECK: &str = "
SELECT to_regclass('conversations') IS NOT NULL
   AND to_regclass('messages') IS NOT NULL
   AND to_regclass('conversation_tombstones') IS NOT NULL
   AND to_regclass('conversation_conflicts') IS NOT NULL
   AND to_regclass('conversation_claims') IS NOT NULL
   AND to_regclass('idx_conversations_user_modified') IS NOT NULL
   AND to_regclass('idx_conversations_user_created') IS NOT NULL
   AND to_regclass('idx_messages_conversation_seq') IS NOT NULL
   AND to_regclass('idx_conversation_conflicts_user') IS NOT NULL
   AND to_regclass('conversation_changes') IS NOT NULL
   AND to_regclass('idx_conversation_changes_txid') IS NOT NULL
   AND to_regproc('chat_history_version') IS NOT NULL
   AND to_regproc('chat_history_messages_changed') IS NOT NULL
   AND to_regproc('chat_history_deleted') IS NOT NULL
   AND (SELECT count(*) FROM pg_trigger WHERE tgname IN ('chat_history_version', 'chat_history_deleted',
        'chat_history_messages_changed', 'chat_history_messages_deleted')) = 4
   AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'chat_history_version'
               AND tgrelid = to_regclass('conversations') AND pg_get_triggerdef(oid) LIKE '%chat_history.flush%')
   AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('conversations')
               AND attname = 'cache_version' AND NOT attisdropped)";

/// The Phase 1 schema and this product's additions, run only when [`SCHEMA_CHECK`] finds something
/// missing; existing tables and rows are never altered. Serialised by an advisory lock: concurrent
/// `CREATE TABLE IF NOT EXISTS` can otherwise fail on the catalog's unique index when two processes
/// start at once. The session's `lock_timeout` bounds every lock it waits for.
const SCHEMA: &str = concat!("SELECT pg_advisory_xact_lock(7215864202913520411);\n", include_str!("schema.sql"));

/// Old tombstones go; run at start, a plain DELETE that takes no table lock.
const PRUNE_TOMBSTONES: &str = "DELETE FROM conversation_tombstones WHERE deleted_at < NOW() - INTERVAL '30 days'";

/// Creates the tables and indexes when the catalog says something is missing, then prunes old
/// tombstones; returns whether it created anything.
pub(super) fn ensure(conn: &mut Connection) -> Result<bool, postgres::Error> {
    let present: bool = conn.client.query_one(SCHEMA_CHECK, &[])?.get(0);
    if !present {
        let mut tx = conn.client.transaction()?;
        tx.batch_execute(SCHEMA)?;
        tx.commit()?;
    }
    conn.client.batch_execute(PRUNE_TOMBSTONES)?;
    Ok(!present)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statements of `schema.sql`, comments dropped; a function body (between `$$`) is one
    /// statement with the `CREATE` around it.
    fn statements() -> Vec<String> {
        let text: String = include_str!("schema.sql")
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut out = Vec::new();
        let mut current = String::new();
        for (n, part) in text.split("$$").enumerate() {
            if n % 2 == 1 {
                current.push_str(" $$body$$ ");
                continue;
            }
            let mut pieces = part.split(';').peekable();
            while let Some(piece) = pieces.next() {
                current.push_str(piece);
                if pieces.peek().is_some() {
                    out.push(std::mem::take(&mut current));
                }
            }
        }
        out.push(current);
        out.into_iter().map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|s| !s.is_empty()).collect()
    }

    #[test]
    fn every_statement_is_idempotent_and_additive() {
        for statement in statements() {
            // A function or trigger of this product's own (named `chat_history_...`) is replaced whole:
            // it holds no data.
            let additive = [
                "CREATE TABLE IF NOT EXISTS ",
                "CREATE INDEX IF NOT EXISTS ",
                "CREATE OR REPLACE FUNCTION chat_history_",
                "CREATE OR REPLACE TRIGGER chat_history_",
            ]
            .iter()
            .any(|head| statement.starts_with(head))
                || (statement.starts_with("ALTER TABLE ") && statement.contains(" ADD COLUMN IF NOT EXISTS "));
            assert!(additive, "not idempotent and additive: {statement}");
            assert!(
                !statement.contains(" DROP ") && !statement.contains(" TYPE "),
                "alters existing data: {statement}"
            );
        }
    }

    #[test]
    fn the_check_looks_for_everything_the_schema_creates() {
        for statement in statements() {
            let words: Vec<&str> = statement.split(' ').collect();
            let (created, check) = match words.as_slice() {
                ["CREATE", "TABLE" | "INDEX", "IF", "NOT", "EXISTS", name, ..] => {
                    (*name, format!("to_regclass('{name}') IS NOT NULL"))
                }
                ["CREATE", "OR", "REPLACE", "FUNCTION", name, ..] => {
                    let name = name.trim_end_matches("()");
                    (name, format!("to_regproc('{name}') IS NOT NULL"))
                }
                ["CREATE", "OR", "REPLACE", "TRIGGER", name, ..] => (*name, format!("'{name}'")),
                ["ALTER", "TABLE", table, "ADD", "COLUMN", "IF", "NOT", "EXISTS", column, ..] => {
                    (*column, format!("attrelid = to_regclass('{table}')\n               AND attname = '{column}'"))
                }
                _ => panic!("unexpected statement: {statement}"),
            };
            assert!(SCHEMA_CHECK.contains(&check), "SCHEMA_CHECK does not look for {created}");
        }
    }

    #[test]
    fn the_check_looks_for_the_flush_clause_of_the_version_trigger() {
        // A database made before the clause has the trigger under the same name: only its definition
        // tells the two apart, and the flush's statement relies on the clause (sql.rs, LOCK_IDS_FOR_FLUSH).
        let trigger = statements()
            .into_iter()
            .find(|s| s.starts_with("CREATE OR REPLACE TRIGGER chat_history_version "))
            .expect("the version trigger");
        assert!(trigger.contains("WHEN (current_setting('chat_history.flush', true) IS DISTINCT FROM 'on')"));
        assert!(SCHEMA_CHECK.contains("pg_get_triggerdef(oid) LIKE '%chat_history.flush%'"));
    }

    #[test]
    fn phase_one_ends_where_tests_and_benches_cut_the_file() {
        // tests/support/servers.py and benches/reference.py create the Phase 1 tables from the text above this line.
        let (phase1, _) = include_str!("schema.sql").split_once("\n-- Phase 1 ends here").expect("the marker line");
        assert!(phase1.contains("CREATE TABLE IF NOT EXISTS messages"));
        assert!(!phase1.contains("cache_version") && !phase1.contains("conversation_tombstones"));
    }
}
