//! The tiers composed: which store serves a call, ids checked once for every mode, and the
//! lifecycle (`close`, the exit hook's registry). The Redis tier slots in as one more [`Tier`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::cache::RedisCache;
pub use crate::cached::Fetched;
use crate::cached::{CachedTier, Health};
use crate::config::probe::{self, Diagnosis};
pub use crate::config::{Mode, Settings};
use crate::error::{Backend, Error, ErrorKind, Result};
use crate::model::Conversation;
pub use crate::process::{after_fork_in_child, after_fork_in_parent, before_fork};
use crate::process::{fork_generation, CallGuard};
pub use crate::stats::{CacheStats, Stats};
use crate::store::local::LocalStore;
use crate::store::postgres::PostgresStore;
use crate::validate;
use crate::writeback::{BackgroundFlusher, Flush, FlushReport};

/// The stores behind a manager.
#[derive(Debug)]
enum Tier {
    Local(LocalStore),
    Postgres(Arc<PostgresStore>),
    Cached(Arc<CachedTier>),
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

/// The chat history of an app: the six calls of docs/design.md, "The contract", over the configured tiers.
pub struct ChatHistory {
    mode: Mode,
    history_days: i32,
    tier: RwLock<Option<Arc<Tier>>>,
    counters: Counters,
    background: Mutex<Option<BackgroundFlusher>>,
    close_timeout: Duration,
    /// Kept so a forked child can open its own pools.
    settings: Settings,
    /// The [`crate::process::FORK_GENERATION`] the tier's pools and threads belong to.
    generation: AtomicU64,
}

impl std::fmt::Debug for ChatHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatHistory").field("mode", &self.mode).field("tier", &self.tier).finish_non_exhaustive()
    }
}

/// The tier for one call, with the call's [`CallGuard`].
struct InCall {
    tier: Arc<Tier>,
    _guard: CallGuard,
}

impl std::ops::Deref for InCall {
    type Target = Tier;

    fn deref(&self) -> &Tier {
        &self.tier
    }
}

/// Every live manager, so the exit hook can close them all (docs/design.md, "Write-back").
static LIVE: Mutex<Vec<Weak<ChatHistory>>> = Mutex::new(Vec::new());

impl ChatHistory {
    /// Opens the stores. In postgres mode the database is contacted and the schema created when
    /// missing, so a bad connection string fails here rather than at the first call.
    pub fn open(settings: &Settings) -> Result<Arc<Self>> {
        if settings.history_days < 0 {
            return Err(Error::config(format!("history_days must be 0 or more, got {}", settings.history_days)));
        }
        let (tier, background) = open_tier(settings)?;
        let history = Arc::new(ChatHistory {
            mode: settings.mode,
            history_days: settings.history_days,
            tier: RwLock::new(Some(Arc::new(tier))),
            counters: Counters::default(),
            background: Mutex::new(background),
            close_timeout: settings.close_timeout,
            settings: settings.clone(),
            generation: AtomicU64::new(fork_generation()),
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

    fn tier(&self) -> Result<InCall> {
        self.tier_with(CallGuard::enter())
    }

    fn tier_with(&self, guard: CallGuard) -> Result<InCall> {
        if self.generation.load(Ordering::Acquire) != fork_generation() {
            self.reopen_after_fork()?;
        }
        let tier = self
            .tier
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Closed, "this ChatHistoryManager is closed"))?;
        Ok(InCall { tier, _guard: guard })
    }

    /// In a forked child: leaves the parent's pools and threads alone (never closing a socket the
    /// parent still uses: dropping a PostgreSQL client sends Terminate on it) and opens new ones.
    fn reopen_after_fork(&self) -> Result<()> {
        let mut tier = self.tier.write().unwrap_or_else(PoisonError::into_inner);
        let generation = fork_generation();
        if self.generation.load(Ordering::Acquire) == generation {
            return Ok(());
        }
        let Some(inherited) = tier.take() else {
            self.generation.store(generation, Ordering::Release);
            return Ok(());
        };
        std::mem::forget(inherited);
        std::mem::forget(self.background.lock().unwrap_or_else(PoisonError::into_inner).take());
        let (fresh, background) = open_tier(&self.settings)?;
        *tier = Some(Arc::new(fresh));
        *self.background.lock().unwrap_or_else(PoisonError::into_inner) = background;
        self.generation.store(generation, Ordering::Release);
        log::debug!("forked child: {} ChatHistoryManager opened its own connections", self.mode.as_str());
        Ok(())
    }

    /// The PostgreSQL store, for the seed's `manager.postgres_backend`.
    pub fn postgres(&self) -> Result<Option<Arc<PostgresStore>>> {
        Ok(match &*self.tier()? {
            Tier::Postgres(store) => Some(Arc::clone(store)),
            Tier::Cached(cached) => Some(Arc::clone(&cached.postgres)),
            Tier::Local(_) => None,
        })
    }

    /// The Redis cache, for the seed's `manager.redis_backend`.
    pub fn redis(&self) -> Result<Option<Arc<RedisCache>>> {
        Ok(match &*self.tier()? {
            Tier::Cached(cached) => Some(Arc::clone(&cached.redis)),
            _ => None,
        })
    }

    fn require_user<'a>(&self, user_id: Option<&'a str>) -> Result<&'a str> {
        let user_id =
            user_id.ok_or_else(|| Error::validation(format!("user_id is required in {} mode", self.mode.as_str())))?;
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
            Tier::Cached(cached) => cached.list(self.require_user(user_id)?),
        };
        self.count(&self.counters.lists, result)
    }

    /// The conversation when the near cache holds it, without waiting on any lock held across I/O
    /// or on the network: a caller holding the GIL asks this first. `Ok(None)` means "call
    /// [`ChatHistory::get`]", not "no such conversation". Bad input and a closed manager fail here
    /// as in `get`.
    pub fn get_near(&self, conversation_id: &str, user_id: Option<&str>) -> Result<Option<Fetched>> {
        validate::conversation_id(conversation_id)?;
        let Some(guard) = CallGuard::try_enter() else { return Ok(None) };
        // A forked child's first call opens new pools: that is `get`'s to do, without the GIL.
        if self.generation.load(Ordering::Acquire) != fork_generation() {
            return Ok(None);
        }
        let tier = self.tier_with(guard)?;
        let Tier::Cached(cached) = &*tier else { return Ok(None) };
        let found = cached.get_near(conversation_id, self.require_user(user_id)?);
        if found.is_some() {
            self.counters.reads.fetch_add(1, Ordering::Relaxed);
        }
        Ok(found)
    }

    /// The conversation, or `None` when there is none of that id (for that user).
    pub fn get(&self, conversation_id: &str, user_id: Option<&str>) -> Result<Option<Fetched>> {
        validate::conversation_id(conversation_id)?;
        let result = match &*self.tier()? {
            Tier::Local(store) => store.get(conversation_id).map(|c| c.map(Fetched::Stored)),
            Tier::Postgres(store) => {
                store.get(conversation_id, self.require_user(user_id)?).map(|c| c.map(Fetched::Stored))
            }
            Tier::Cached(cached) => cached.get(conversation_id, self.require_user(user_id)?),
        };
        self.count(&self.counters.reads, result)
    }

    /// Stores the conversation. Refuses bad input and other users' ids before anything is written.
    pub fn save(&self, conversation_id: &str, user_id: Option<&str>, conv: &Conversation) -> Result<()> {
        validate::conversation_id(conversation_id)?;
        validate::conversation(conversation_id, conv)?;
        let result = match &*self.tier()? {
            Tier::Local(store) => store.save(conversation_id, conv),
            Tier::Postgres(store) => store.save_keeping(
                conversation_id,
                self.require_user(user_id)?,
                conv,
                crate::writeback::REASON_SAVED_OVER,
            ),
            Tier::Cached(cached) => cached.save(conversation_id, self.require_user(user_id)?, conv),
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
            Tier::Cached(cached) => cached.delete(conversation_id, self.require_user(user_id)?),
        };
        self.count(&self.counters.deletes, result)
    }

    /// Writes dirty conversations back to PostgreSQL; returns how many. Without a cache there
    /// are none.
    pub fn flush(&self) -> Result<usize> {
        match &*self.tier()? {
            Tier::Cached(cached) => Ok(cached.flush(None, true)?.written),
            _ => Ok(0),
        }
    }

    /// Stops the background flusher, flushes what is dirty (for at most the close timeout,
    /// logging what it could not write), then releases the pools. Idempotent; never fails.
    pub fn close(&self) -> Result<()> {
        if self.generation.load(Ordering::Acquire) != fork_generation() {
            // A forked child that never used the manager: the pools and whatever they would flush
            // are the parent's.
            let mut tier = self.tier.write().unwrap_or_else(PoisonError::into_inner);
            std::mem::forget(tier.take());
            std::mem::forget(self.background.lock().unwrap_or_else(PoisonError::into_inner).take());
            return Ok(());
        }
        let deadline = Instant::now() + self.close_timeout;
        let background = self.background.lock().unwrap_or_else(PoisonError::into_inner).take();
        let tier = self.tier.write().unwrap_or_else(PoisonError::into_inner).take();
        if let (Some(Tier::Cached(cached)), Some(_)) = (tier.as_deref(), &background) {
            cached.flusher.cancel();
        }
        if let Some(mut background) = background {
            if !background.stop_until(deadline) {
                log::warn!("close: the background flush did not stop within close_timeout; leaving it behind");
            }
        }
        if let Some(tier) = tier {
            if let Tier::Cached(cached) = &*tier {
                // Its threads end within a heartbeat's wait; a cluster's discovery may take longer
                // with Redis gone, and is left to end by itself rather than hold up the flush.
                let timeout = cached.redis.settings.timeout;
                cached.redis.stop_tracking(deadline.min(Instant::now() + timeout * 2 + Duration::from_millis(500)));
                cached.stop_following(deadline.min(Instant::now() + timeout * 2 + Duration::from_millis(500)));
                if self.settings.inspect_only {
                    // `chat-history stats` and `doctor` only look: a scrape every 15 s must not
                    // become the deployment's flusher and hide a dead one.
                    log::debug!("close: opened only to inspect; nothing written back");
                    return Ok(());
                }
                match flush_until(&tier, deadline) {
                    None => {
                        let dirty =
                            cached.redis.dirty_summary().map_or_else(|_| "the".to_owned(), |(n, _)| n.to_string());
                        log::error!(
                            "close: the write-back did not finish within close_timeout (a server stopped answering \
                             mid-statement); {dirty} dirty conversations stay in Redis for the next flush"
                        );
                    }
                    Some(Ok(report)) if report.incomplete || report.failed > 0 => log::error!(
                        "close: {} conversations written back; {} failed and some may remain dirty in Redis \
                         (they are kept there and written by the next flush)",
                        report.written,
                        report.failed
                    ),
                    Some(Ok(report)) => log::debug!("close: {} conversations written back", report.written),
                    Some(Err(e)) if e.kind() == ErrorKind::Unavailable(Backend::Redis) => {
                        log::warn!("close: no write-back ({e}); whatever is dirty stays in Redis for the next flush");
                    }
                    Some(Err(e)) => {
                        let dirty =
                            cached.redis.dirty_summary().map_or_else(|_| "the".to_owned(), |(n, _)| n.to_string());
                        log::error!(
                            "close: {dirty} dirty conversations could not be written back and stay in Redis: {e}"
                        );
                    }
                }
            }
            log::debug!("{} ChatHistoryManager closed", self.mode.as_str());
        }
        Ok(())
    }

    /// Copies kept aside after a divergence (see [`PostgresStore::conflicts`]).
    pub fn conflicts(
        &self,
        user_id: Option<&str>,
        conflict_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<crate::store::postgres::Conflict>> {
        let store = self.postgres()?.ok_or_else(|| Error::config("local mode keeps no conflict copies"))?;
        store.conflicts(user_id, conflict_id, limit)
    }

    /// Makes kept copy `conflict_id` the conversation again, through the normal save path. The
    /// copy it replaces is kept aside first unless the restored one holds all its messages, so a
    /// restore loses nothing either.
    pub fn restore_conflict(&self, conflict_id: i64) -> Result<(String, String)> {
        let store = self.postgres()?.ok_or_else(|| Error::config("local mode keeps no conflict copies"))?;
        let conflict = store
            .conflicts(None, Some(conflict_id), 1)?
            .pop()
            .ok_or_else(|| Error::new(ErrorKind::Validation, format!("no kept copy has conflict_id {conflict_id}")))?;
        let (id, user) = (conflict.conversation_id.as_str(), conflict.user_id.as_str());
        if let Some(current) = self.get(id, Some(user))?.map(Fetched::into_conversation) {
            if !crate::model::is_prefix(&current.messages, &conflict.conversation.messages) {
                store.keep_conflict(id, user, &current, None, "was replaced when an operator restored another copy")?;
            }
        }
        self.save(id, Some(user), &conflict.conversation)?;
        store.mark_restored(conflict_id)?;
        log::info!("restored kept copy {conflict_id} as conversation {id:?} of user {user:?}");
        Ok((conflict.conversation_id, conflict.user_id))
    }

    /// Whether `close()` was called.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.tier.read().unwrap_or_else(PoisonError::into_inner).is_none()
    }

    /// The numbers (docs/monitoring.md, "What `stats()` returns") that this mode has.
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
            closed: self.is_closed(),
            cache: match self.tier().as_deref() {
                Ok(Tier::Cached(cached)) => Some(cached.stats()),
                _ => None,
            },
        }
    }
}

/// Opens the stores of `settings` and, in redis mode, starts the background flusher.
fn open_tier(settings: &Settings) -> Result<(Tier, Option<BackgroundFlusher>)> {
    let postgres = || -> Result<Arc<PostgresStore>> {
        let pg = settings.postgres.as_ref().ok_or_else(|| {
            Error::config(
                "this mode needs a PostgreSQL connection string (the connection_string argument or DATABASE_URL)",
            )
        })?;
        Ok(Arc::new(PostgresStore::new(pg)?))
    };
    let tier = match settings.mode {
        Mode::Local => Tier::Local(LocalStore::open(&settings.base_dir)?),
        Mode::Postgres => {
            let store = postgres()?;
            if !settings.inspect_only {
                store.ensure_schema()?;
            }
            Tier::Postgres(store)
        }
        Mode::Redis => {
            let redis = settings.redis.as_ref().ok_or_else(|| {
                Error::config(
                    "redis mode needs Redis: pass redis_connection_string=... (or REDIS_CONNECTION_STRING), or redis_host=...",
                )
            })?;
            let store = postgres()?;
            // Saves must work while PostgreSQL is down (docs/design.md, "Faults"): the schema is
            // made now if possible, else before the first PostgreSQL call. Opened only to inspect,
            // it is never made (marked ready, so no call makes it either).
            let schema_ready = settings.inspect_only
                || match store.ensure_schema() {
                    Ok(()) => true,
                    Err(e) if e.is_unavailable() => {
                        log::warn!("PostgreSQL is unavailable at start; saves go to Redis until it is back ({e})");
                        false
                    }
                    Err(e) => return Err(e),
                };
            let cache = Arc::new(RedisCache::new(redis)?);
            let health = Health::default();
            if let Err(e) = cache.ping() {
                // A misconfiguration will not fix itself: refused here, naming the cause. An
                // outage falls back to PostgreSQL (the README, "Misconfiguration or outage").
                let failure = e.into_error();
                let cause =
                    std::error::Error::source(&failure).map_or_else(|| failure.to_string(), ToString::to_string);
                match probe::diagnose(redis, &cause) {
                    Diagnosis::Misconfigured(error) => {
                        cache.stop_tracking(Instant::now() + redis.timeout * 2);
                        return Err(error);
                    }
                    Diagnosis::Outage(why) => health.failed(&format!("at start, Redis is unavailable: {why}")),
                    Diagnosis::Reachable => health.failed(&format!("at start, {failure}")),
                }
            }
            Tier::Cached(Arc::new(CachedTier::new(cache, store, settings, schema_ready, health)))
        }
    };
    if let (Tier::Cached(cached), false) = (&tier, settings.inspect_only) {
        cached.start_following()?;
    }
    let background = match (&tier, settings.flush_interval) {
        (Tier::Cached(cached), Some(interval)) if !settings.inspect_only => {
            let cached: Arc<dyn Flush> = Arc::clone(cached) as Arc<dyn Flush>;
            Some(BackgroundFlusher::start(Arc::downgrade(&cached), interval)?)
        }
        _ => None,
    };
    Ok((tier, background))
}

/// `close()`'s write-back, on a thread of its own: a statement sent over a link that stalled
/// mid-call waits on the socket without bound (PostgreSQL never received it, so its
/// `statement_timeout` cannot end it), and `close()` must return by its deadline all the same. The
/// thread is left behind then, holding the pools until the statement ends. `None` at the deadline.
fn flush_until(tier: &Arc<Tier>, deadline: Instant) -> Option<Result<FlushReport>> {
    let Tier::Cached(_) = &**tier else { return None };
    let (sent, received) = std::sync::mpsc::channel();
    let flushing = Arc::clone(tier);
    let spawned = std::thread::Builder::new().name("chat-history-close".into()).spawn(move || {
        if let Tier::Cached(cached) = &*flushing {
            let _ = sent.send(cached.flush(Some(deadline), true));
        }
    });
    if spawned.is_err() {
        // No thread to spare: flush here, as before.
        let Tier::Cached(cached) = &**tier else { return None };
        return Some(cached.flush(Some(deadline), true));
    }
    // A flush stops between batches at the deadline; the grace covers the batch in progress.
    received.recv_timeout(deadline.saturating_duration_since(Instant::now()) + CLOSE_GRACE).ok()
}

/// How long past `close_timeout` `close()` waits for the batch a flush has in progress.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

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
        ChatHistory::open(&Settings::local(dir.to_owned())).unwrap()
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
        let before = history.get("c1", None).unwrap().map(Fetched::into_conversation);
        let mut bad = sample();
        bad.model = "x".repeat(101);
        assert_eq!(history.save("c1", None, &bad).unwrap_err().kind(), ErrorKind::Validation);
        assert_eq!(history.get("c1", None).unwrap().map(Fetched::into_conversation), before);
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
    fn redis_mode_needs_redis_settings() {
        let mut settings = Settings::local(".".into());
        settings.mode = Mode::Redis;
        let err = ChatHistory::open(&settings).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }
}
