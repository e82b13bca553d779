//! The tiers composed: which store serves a call, ids checked once for every mode, and the
//! lifecycle (`close`, the exit hook's registry). The Redis tier slots in as one more [`Tier`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use crate::config::PostgresSettings;
use crate::error::{Error, ErrorKind, Result};
use crate::model::Conversation;
use crate::store::local::LocalStore;
use crate::store::postgres::PostgresStore;
use crate::validate;

/// Where conversations live (SPEC section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// JSON files in `<base_dir>/.chat_history`.
    Local,
    /// PostgreSQL only.
    Postgres,
    /// Redis in front of PostgreSQL with write-back (`mode="postgres", redis_enabled=True`).
    Redis,
}

impl Mode {
    /// `"local"`, `"postgres"` or `"redis"`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "local" => Ok(Mode::Local),
            "postgres" => Ok(Mode::Postgres),
            "redis" => Ok(Mode::Redis),
            other => Err(Error::config(format!("mode must be 'local', 'postgres' or 'redis', got {other:?}"))),
        }
    }

    /// The name `parse` takes.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Postgres => "postgres",
            Mode::Redis => "redis",
        }
    }
}

/// What a manager is built from; the binding layer fills it from keyword arguments and the
/// environment.
#[derive(Clone)]
pub struct Settings {
    /// The storage mode.
    pub mode: Mode,
    /// Local mode's folder (the `.chat_history` folder is created inside).
    pub base_dir: PathBuf,
    /// PostgreSQL settings (postgres and redis modes).
    pub postgres: Option<PostgresSettings>,
    /// `list_conversations` returns conversations created in the last this many days.
    pub history_days: i32,
}

/// The stores behind a manager.
#[derive(Debug)]
enum Tier {
    Local(LocalStore),
    Postgres(Arc<PostgresStore>),
}

/// Counters for `stats()`.
#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    lists: AtomicU64,
    saves: AtomicU64,
    deletes: AtomicU64,
    errors: AtomicU64,
}

/// A point-in-time copy of the manager's numbers (SPEC section 8).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// The mode's name.
    pub mode: &'static str,
    /// `get_conversation` calls.
    pub reads: u64,
    /// `list_conversations` calls.
    pub lists: u64,
    /// `save_conversation` calls that stored something.
    pub saves: u64,
    /// `delete_conversation` calls.
    pub deletes: u64,
    /// Calls that failed for a reason other than bad input.
    pub errors: u64,
    /// Whether `close()` was called.
    pub closed: bool,
}

/// The chat history of an app: the API of SPEC section 2 over the configured tiers.
#[derive(Debug)]
pub struct ChatHistory {
    mode: Mode,
    history_days: i32,
    tier: RwLock<Option<Arc<Tier>>>,
    counters: Counters,
}

/// Every live manager, so the exit hook can close them all (SPEC section 4.5).
static LIVE: Mutex<Vec<Weak<ChatHistory>>> = Mutex::new(Vec::new());

impl ChatHistory {
    /// Opens the stores. In postgres mode the database is contacted and the schema created when
    /// missing, so a bad connection string fails here rather than at the first call.
    pub fn open(settings: Settings) -> Result<Arc<Self>> {
        if settings.history_days < 0 {
            return Err(Error::config(format!("history_days must be 0 or more, got {}", settings.history_days)));
        }
        let tier = match settings.mode {
            Mode::Local => Tier::Local(LocalStore::open(&settings.base_dir)?),
            Mode::Postgres => {
                let pg = settings.postgres.as_ref().ok_or_else(|| {
                    Error::config("postgres mode needs a connection string (the connection_string argument or DATABASE_URL)")
                })?;
                let store = PostgresStore::new(pg)?;
                store.ensure_schema()?;
                Tier::Postgres(Arc::new(store))
            }
            Mode::Redis => {
                return Err(Error::config(
                    "the Redis tier is not available in this version yet; use mode='postgres' without redis_enabled",
                ))
            }
        };
        let history = Arc::new(ChatHistory {
            mode: settings.mode,
            history_days: settings.history_days,
            tier: RwLock::new(Some(Arc::new(tier))),
            counters: Counters::default(),
        });
        let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|weak| weak.strong_count() > 0);
        live.push(Arc::downgrade(&history));
        Ok(history)
    }

    /// The mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn tier(&self) -> Result<Arc<Tier>> {
        self.tier
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Closed, "this ChatHistoryManager is closed"))
    }

    /// The PostgreSQL store, for the seed's `manager.postgres_backend`.
    pub fn postgres(&self) -> Result<Option<Arc<PostgresStore>>> {
        Ok(match &*self.tier()? {
            Tier::Postgres(store) => Some(Arc::clone(store)),
            Tier::Local(_) => None,
        })
    }

    fn require_user<'a>(&self, user_id: Option<&'a str>) -> Result<&'a str> {
        let user_id = user_id.ok_or_else(|| {
            Error::validation(format!("user_id is required in {} mode", self.mode.as_str()))
        })?;
        validate::user_id(user_id)?;
        Ok(user_id)
    }

    fn count<T>(&self, counter: &AtomicU64, result: Result<T>) -> Result<T> {
        match &result {
            Ok(_) => counter.fetch_add(1, Ordering::Relaxed),
            Err(e) if e.is_invalid_input() || e.kind() == ErrorKind::Ownership => 0,
            Err(_) => self.counters.errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Local mode: every readable conversation, by file name. Otherwise the user's conversations
    /// created within `history_days`, newest first, without messages.
    pub fn list(&self, user_id: Option<&str>) -> Result<Vec<(String, Conversation)>> {
        let result = match &*self.tier()? {
            Tier::Local(store) => store.list(),
            Tier::Postgres(store) => {
                let user_id = self.require_user(user_id)?;
                store.list(user_id, self.history_days)
            }
        };
        self.count(&self.counters.lists, result)
    }

    /// The conversation, or `None` when there is none of that id (for that user).
    pub fn get(&self, conversation_id: &str, user_id: Option<&str>) -> Result<Option<Conversation>> {
        validate::conversation_id(conversation_id)?;
        let result = match &*self.tier()? {
            Tier::Local(store) => store.get(conversation_id),
            Tier::Postgres(store) => store.get(conversation_id, self.require_user(user_id)?),
        };
        self.count(&self.counters.reads, result)
    }

    /// Stores the conversation. Refuses bad input and other users' ids before anything is written.
    pub fn save(&self, conversation_id: &str, user_id: Option<&str>, conv: &Conversation) -> Result<()> {
        validate::conversation_id(conversation_id)?;
        validate::conversation(conversation_id, conv)?;
        let result = match &*self.tier()? {
            Tier::Local(store) => store.save(conversation_id, conv),
            Tier::Postgres(store) => store.save(conversation_id, self.require_user(user_id)?, conv),
        };
        self.count(&self.counters.saves, result)
    }

    /// Deletes the conversation when it is the user's; another user's id is left untouched.
    pub fn delete(&self, conversation_id: &str, user_id: Option<&str>) -> Result<()> {
        validate::conversation_id(conversation_id)?;
        let result = match &*self.tier()? {
            Tier::Local(store) => store.delete(conversation_id),
            Tier::Postgres(store) => {
                let user_id = self.require_user(user_id)?;
                store.delete(conversation_id, user_id).map(|deleted| {
                    if !deleted {
                        log::debug!("delete of {conversation_id:?}: no such conversation for this user");
                    }
                })
            }
        };
        self.count(&self.counters.deletes, result)
    }

    /// Writes dirty conversations back to PostgreSQL; without a cache there are none.
    pub fn flush(&self) -> Result<usize> {
        self.tier()?;
        Ok(0)
    }

    /// Flushes, then releases the pools. Idempotent.
    pub fn close(&self) -> Result<()> {
        let tier = self.tier.write().unwrap_or_else(PoisonError::into_inner).take();
        if tier.is_some() {
            log::debug!("{} ChatHistoryManager closed", self.mode.as_str());
        }
        Ok(())
    }

    /// The numbers of SPEC section 8 that this mode has.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            mode: self.mode.as_str(),
            reads: c.reads.load(Ordering::Relaxed),
            lists: c.lists.load(Ordering::Relaxed),
            saves: c.saves.load(Ordering::Relaxed),
            deletes: c.deletes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            closed: self.tier.read().unwrap_or_else(PoisonError::into_inner).is_none(),
        }
    }
}

/// Closes every manager still alive: the body of the Python package's `atexit` hook. Failures
/// are logged, never raised, since the interpreter is going away.
pub fn close_all() {
    let live: Vec<Arc<ChatHistory>> =
        LIVE.lock().unwrap_or_else(PoisonError::into_inner).drain(..).filter_map(|weak| weak.upgrade()).collect();
    for history in live {
        if let Err(e) = history.close() {
            log::error!("closing a {} ChatHistoryManager at exit failed: {e}", history.mode.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, Role, Timestamp};

    fn local(dir: &std::path::Path) -> Arc<ChatHistory> {
        ChatHistory::open(Settings { mode: Mode::Local, base_dir: dir.to_owned(), postgres: None, history_days: 7 }).unwrap()
    }

    fn sample() -> Conversation {
        let now = Timestamp::now();
        Conversation {
            title: "t".into(),
            model: "m".into(),
            messages: vec![Message { role: Role::User, content: "hi".into(), time: now }],
            created_at: now,
            last_modified: now,
        }
    }

    #[test]
    fn refused_save_leaves_the_stored_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let history = local(dir.path());
        history.save("c1", None, &sample()).unwrap();
        let before = history.get("c1", None).unwrap();
        let mut bad = sample();
        bad.model = "x".repeat(101);
        assert_eq!(history.save("c1", None, &bad).unwrap_err().kind(), ErrorKind::Validation);
        assert_eq!(history.get("c1", None).unwrap(), before);
        assert_eq!(history.stats().saves, 1);
    }

    #[test]
    fn closed_manager_refuses_calls_and_close_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let history = local(dir.path());
        history.close().unwrap();
        history.close().unwrap();
        assert_eq!(history.get("c1", None).unwrap_err().kind(), ErrorKind::Closed);
        assert!(history.stats().closed);
    }

    #[test]
    fn redis_mode_is_refused_until_the_cache_tier_lands() {
        let err = ChatHistory::open(Settings { mode: Mode::Redis, base_dir: ".".into(), postgres: None, history_days: 7 })
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("Redis"));
    }
}
