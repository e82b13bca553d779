//! The tiers composed: which store serves a call, ids checked once for every mode, and the
//! lifecycle (`close`, the exit hook's registry). The Redis tier slots in as one more [`Tier`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::cache::redis::{CacheError, CachedConversation, MemoryInfo, RedisCache, SaveOutcome};
use crate::config::{PostgresSettings, RedisSettings};
use crate::error::{Backend, Error, ErrorKind, Result};
use crate::model::{Conversation, Timestamp};
use crate::store::local::LocalStore;
use crate::store::postgres::PostgresStore;
use crate::validate;
use crate::writeback::{BackgroundFlusher, Flush, FlushReport, Flusher};

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
    /// Redis settings (redis mode).
    pub redis: Option<RedisSettings>,
    /// How often the background flusher runs; `None` turns it off.
    pub flush_interval: Option<Duration>,
    /// Conversations per PostgreSQL transaction in a flush.
    pub flush_batch_size: usize,
    /// How long `close()` may spend flushing before it gives up and logs what is left.
    pub close_timeout: Duration,
}

impl Settings {
    /// Local mode in `base_dir`, everything else at its default.
    #[must_use]
    pub fn local(base_dir: PathBuf) -> Self {
        Settings {
            mode: Mode::Local,
            base_dir,
            postgres: None,
            history_days: 7,
            redis: None,
            flush_interval: None,
            flush_batch_size: 500,
            close_timeout: Duration::from_secs(30),
        }
    }
}

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
    /// The cache's numbers, in redis mode.
    pub cache: Option<CacheStats>,
}

/// The Redis tier's numbers (SPEC section 8).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheStats {
    /// Reads and lists served by Redis.
    pub hits: u64,
    /// Reads and lists Redis did not have.
    pub misses: u64,
    /// Calls that went to PostgreSQL because Redis was unreachable, backing off or out of memory.
    pub fallbacks: u64,
    /// Whether the last Redis call succeeded (and no backoff is in force).
    pub redis_available: bool,
    /// Round trips that cache reads took.
    pub read_round_trips: u64,
    /// Reads that shared their round trip with another thread's (see `cache::combine`).
    pub reads_shared: u64,
    /// `SCARD dirty:convs`, when Redis answered.
    pub dirty_count: Option<u64>,
    /// Seconds since the oldest dirty conversation became dirty (the write-back lag).
    pub oldest_dirty_age_seconds: Option<f64>,
    /// Completed flush runs.
    pub flushes: u64,
    /// Conversations written back.
    pub conversations_flushed: u64,
    /// Failed write-back attempts.
    pub flush_failures: u64,
    /// `<user>:<id>` of conversations PostgreSQL refused, kept dirty and retried.
    pub stuck: Vec<String>,
    /// Redis memory, when the server allows `INFO`.
    pub memory: MemoryInfo,
    /// The Redis URL without its password.
    pub redis_url: String,
}

/// The chat history of an app: the API of SPEC section 2 over the configured tiers.
#[derive(Debug)]
pub struct ChatHistory {
    mode: Mode,
    history_days: i32,
    tier: RwLock<Option<Arc<Tier>>>,
    counters: Counters,
    background: Mutex<Option<BackgroundFlusher>>,
    close_timeout: Duration,
}

/// Every live manager, so the exit hook can close them all (SPEC section 4.5).
static LIVE: Mutex<Vec<Weak<ChatHistory>>> = Mutex::new(Vec::new());

impl ChatHistory {
    /// Opens the stores. In postgres mode the database is contacted and the schema created when
    /// missing, so a bad connection string fails here rather than at the first call.
    pub fn open(settings: &Settings) -> Result<Arc<Self>> {
        if settings.history_days < 0 {
            return Err(Error::config(format!("history_days must be 0 or more, got {}", settings.history_days)));
        }
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
                store.ensure_schema()?;
                Tier::Postgres(store)
            }
            Mode::Redis => {
                let redis = settings.redis.as_ref().ok_or_else(|| {
                    Error::config("redis mode needs Redis: pass redis_connection_string=... (or REDIS_CONNECTION_STRING), or redis_host=...")
                })?;
                let store = postgres()?;
                // Saves must work while PostgreSQL is down (SPEC section 5): the schema is made
                // now if possible, else before the first PostgreSQL call.
                let schema_ready = match store.ensure_schema() {
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
                    health.failed(&format!("at start, {}", e.into_error()));
                }
                Tier::Cached(Arc::new(CachedTier {
                    flusher: Flusher::new(Arc::clone(&cache), Arc::clone(&store), settings.flush_batch_size),
                    redis: cache,
                    postgres: store,
                    schema_ready: AtomicBool::new(schema_ready),
                    history_days: settings.history_days,
                    health,
                    hits: AtomicU64::new(0),
                    misses: AtomicU64::new(0),
                    fallbacks: AtomicU64::new(0),
                }))
            }
        };
        let background = match (&tier, settings.flush_interval) {
            (Tier::Cached(cached), Some(interval)) => {
                let cached: Arc<dyn Flush> = Arc::clone(cached) as Arc<dyn Flush>;
                Some(BackgroundFlusher::start(Arc::downgrade(&cached), interval)?)
            }
            _ => None,
        };
        let history = Arc::new(ChatHistory {
            mode: settings.mode,
            history_days: settings.history_days,
            tier: RwLock::new(Some(Arc::new(tier))),
            counters: Counters::default(),
            background: Mutex::new(background),
            close_timeout: settings.close_timeout,
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
            Tier::Postgres(store) => store.save(conversation_id, self.require_user(user_id)?, conv).map(|_| ()),
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
            Tier::Cached(cached) => Ok(cached.flush(None)?.written),
            _ => Ok(0),
        }
    }

    /// Stops the background flusher, flushes what is dirty (for at most the close timeout,
    /// logging what it could not write), then releases the pools. Idempotent; never fails.
    pub fn close(&self) -> Result<()> {
        if let Some(mut background) = self.background.lock().unwrap_or_else(PoisonError::into_inner).take() {
            background.stop();
        }
        let tier = self.tier.write().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(tier) = tier {
            if let Tier::Cached(cached) = &*tier {
                match cached.flush(Some(Instant::now() + self.close_timeout)) {
                    Ok(report) if report.incomplete || report.failed > 0 => log::error!(
                        "close: {} conversations written back; {} failed and some may remain dirty in Redis \
                         (they are kept there and written by the next flush)",
                        report.written,
                        report.failed
                    ),
                    Ok(report) => log::debug!("close: {} conversations written back", report.written),
                    Err(e) if e.kind() == ErrorKind::Unavailable(Backend::Redis) => {
                        log::warn!("close: no write-back ({e}); whatever is dirty stays in Redis for the next flush");
                    }
                    Err(e) => {
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

    /// Whether `close()` was called.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.tier.read().unwrap_or_else(PoisonError::into_inner).is_none()
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
            closed: self.is_closed(),
            cache: match self.tier().as_deref() {
                Ok(Tier::Cached(cached)) => Some(cached.stats()),
                _ => None,
            },
        }
    }
}

/// Shortest and longest pause before Redis is tried again after it failed (SPEC section 5).
const MIN_REDIS_BACKOFF: Duration = Duration::from_millis(250);
const MAX_REDIS_BACKOFF: Duration = Duration::from_secs(30);

/// Redis's health as this process sees it: a circuit breaker with exponential backoff, and the
/// writes that went straight to PostgreSQL meanwhile, whose older cached copies are dropped as
/// soon as Redis answers again.
#[derive(Debug, Default)]
struct Health {
    degraded: AtomicBool,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    retry_at: Option<Instant>,
    backoff: Duration,
    /// (user, id, PostgreSQL version) written while Redis was unreachable.
    pending: Vec<(String, String, i64)>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// False while backing off: the call goes to PostgreSQL without waiting on Redis.
    fn usable(&self) -> bool {
        !self.degraded.load(Ordering::Acquire) || self.lock().retry_at.is_none_or(|t| Instant::now() >= t)
    }

    fn failed(&self, why: &str) {
        let mut state = self.lock();
        state.backoff = if self.degraded.swap(true, Ordering::AcqRel) {
            (state.backoff * 2).min(MAX_REDIS_BACKOFF)
        } else {
            log::warn!("Redis is unavailable ({why}); using PostgreSQL directly until it is back");
            MIN_REDIS_BACKOFF
        };
        state.retry_at = Some(Instant::now() + state.backoff);
    }

    fn remember(&self, user_id: &str, conversation_id: &str, version: i64) {
        self.lock().pending.push((user_id.to_owned(), conversation_id.to_owned(), version));
    }

    fn succeeded(&self, redis: &RedisCache) {
        if !self.degraded.load(Ordering::Acquire) {
            return;
        }
        let pending = {
            let mut state = self.lock();
            state.retry_at = None;
            state.backoff = Duration::ZERO;
            std::mem::take(&mut state.pending)
        };
        self.degraded.store(false, Ordering::Release);
        match redis.invalidate(&pending) {
            Ok(()) => log::info!("Redis is back; caching resumed ({} stale entries checked)", pending.len()),
            Err(e) => {
                self.lock().pending.extend(pending);
                self.failed(&e.into_error().to_string());
            }
        }
    }
}

/// Redis in front of PostgreSQL: the read path, the write path and their fallbacks.
#[derive(Debug)]
struct CachedTier {
    redis: Arc<RedisCache>,
    postgres: Arc<PostgresStore>,
    flusher: Flusher,
    schema_ready: AtomicBool,
    history_days: i32,
    health: Health,
    hits: AtomicU64,
    misses: AtomicU64,
    fallbacks: AtomicU64,
}

impl CachedTier {
    /// Runs a Redis call unless Redis is backing off; `None` means "use PostgreSQL".
    fn cache<T>(&self, op: impl FnOnce(&RedisCache) -> Result<T, CacheError>) -> Option<Result<T, CacheError>> {
        if !self.health.usable() {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let result = op(&self.redis);
        match &result {
            Err(CacheError::Unavailable(why)) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.health.failed(why);
            }
            _ => self.health.succeeded(&self.redis),
        }
        Some(result)
    }

    /// PostgreSQL, with the schema made first if it could not be at start.
    fn pg(&self) -> Result<&PostgresStore> {
        if !self.schema_ready.load(Ordering::Acquire) {
            self.postgres.ensure_schema()?;
            self.schema_ready.store(true, Ordering::Release);
        }
        Ok(&self.postgres)
    }

    fn get(&self, conversation_id: &str, user_id: &str) -> Result<Option<Fetched>> {
        let cache_up = match self.cache(|r| r.get(user_id, conversation_id)) {
            Some(Ok(Some(cached))) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(Fetched::Cached(cached)));
            }
            Some(Ok(None)) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(Err(e)) => {
                log::debug!("Redis read failed, reading PostgreSQL: {}", e.into_error());
                false
            }
            None => false,
        };
        let Some((conv, version)) = self.pg()?.get_versioned(conversation_id, user_id)? else {
            return Ok(None);
        };
        if cache_up {
            if let Some(Err(e)) = self.cache(|r| r.backfill(user_id, conversation_id, &conv, version)) {
                log::debug!("could not cache {conversation_id:?}: {}", e.into_error());
            }
        }
        Ok(Some(Fetched::Stored(conv)))
    }

    fn list(&self, user_id: &str) -> Result<Vec<(String, Conversation)>> {
        let mut items = match self.cache(|r| r.list(user_id)) {
            Some(Ok(Some(items))) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                items
            }
            Some(Ok(None)) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                let from_postgres = self.pg()?.list(user_id, self.history_days)?;
                match self.cache(|r| r.rebuild_list(user_id, &from_postgres)) {
                    Some(Ok(items)) => items,
                    _ => from_postgres,
                }
            }
            _ => return self.pg()?.list(user_id, self.history_days),
        };
        let horizon = Timestamp::from(chrono::Utc::now() - chrono::Duration::days(i64::from(self.history_days)));
        items.retain(|(_, c)| c.created_at >= horizon);
        items.sort_by(|(a_id, a), (b_id, b)| b.last_modified.cmp(&a.last_modified).then_with(|| a_id.cmp(b_id)));
        Ok(items)
    }

    fn save(&self, conversation_id: &str, user_id: &str, conv: &Conversation) -> Result<()> {
        let outcome = match self.cache(|r| r.save(user_id, conversation_id, conv, false)) {
            Some(Ok((SaveOutcome::OwnerUnknown, _))) => {
                // A new id for this cache: PostgreSQL knows whether another user owns it. When
                // PostgreSQL is down the save is not refused; the flush will catch a conflict.
                match self.pg().and_then(|pg| pg.owner(conversation_id)) {
                    Ok(Some(owner)) if owner != user_id => return Err(ownership(conversation_id)),
                    Ok(_) => {}
                    Err(e) if e.is_unavailable() => {
                        log::debug!("claiming {conversation_id:?} while PostgreSQL is unavailable");
                    }
                    Err(e) => return Err(e),
                }
                self.cache(|r| r.save(user_id, conversation_id, conv, true))
            }
            other => other,
        };
        match outcome {
            Some(Ok((SaveOutcome::Saved(_), _))) => Ok(()),
            Some(Ok((SaveOutcome::OtherOwner | SaveOutcome::OwnerUnknown, _))) => Err(ownership(conversation_id)),
            Some(Err(CacheError::Unavailable(_))) | None => {
                let version = self.pg()?.save(conversation_id, user_id, conv)?;
                self.health.remember(user_id, conversation_id, version);
                Ok(())
            }
            // Out of memory (or another refusal): the save goes to PostgreSQL, and the now older
            // cached copy is dropped (deleting is allowed even when Redis is out of memory).
            Some(Err(e)) => {
                log::warn!("Redis refused a save, writing it to PostgreSQL: {}", e.into_error());
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                let version = self.pg()?.save(conversation_id, user_id, conv)?;
                let item = [(user_id.to_owned(), conversation_id.to_owned(), version)];
                if let Some(Err(_)) | None = self.cache(|r| r.invalidate(&item)) {
                    self.health.remember(user_id, conversation_id, version);
                }
                Ok(())
            }
        }
    }

    fn delete(&self, conversation_id: &str, user_id: &str) -> Result<()> {
        let seen_version = match self.cache(|r| r.delete(user_id, conversation_id)) {
            Some(Ok(None)) => {
                log::debug!("delete of {conversation_id:?}: it belongs to another user; nothing deleted");
                return Ok(());
            }
            Some(Ok(Some(version))) => Some(version),
            Some(Err(e)) => {
                log::debug!("Redis delete failed: {}", e.into_error());
                None
            }
            None => None,
        };
        let (_, tombstone) = self.pg()?.delete_versioned(conversation_id, user_id, seen_version.unwrap_or(0))?;
        if let Some(version) = tombstone {
            if seen_version.is_none() {
                self.health.remember(user_id, conversation_id, version);
            } else if let Some(Err(e)) = self.cache(|r| r.mark_deleted(user_id, conversation_id, version)) {
                log::debug!("could not record the delete of {conversation_id:?} in Redis: {}", e.into_error());
            }
        }
        Ok(())
    }

    fn flush(&self, deadline: Option<Instant>) -> Result<FlushReport> {
        if !self.health.usable() {
            return Err(Error::new(
                ErrorKind::Unavailable(Backend::Redis),
                "Redis is unavailable; nothing can be flushed from it now",
            ));
        }
        self.pg()?;
        let result = self.flusher.flush(deadline);
        match &result {
            Err(e) if e.kind() == ErrorKind::Unavailable(Backend::Redis) => self.health.failed(&e.to_string()),
            Ok(_) => self.health.succeeded(&self.redis),
            Err(_) => {}
        }
        result
    }

    fn stats(&self) -> CacheStats {
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        let usable = self.health.usable();
        let (dirty_count, oldest) = match usable.then(|| self.redis.dirty_summary()) {
            Some(Ok((count, oldest))) => (Some(count), oldest),
            _ => (None, None),
        };
        let now = chrono::Utc::now().timestamp_micros();
        #[allow(clippy::cast_precision_loss)] // seconds since 1970 fit f64 exactly enough
        let oldest_dirty_age_seconds = oldest.map(|since| (now as f64 / 1e6 - since).max(0.0));
        let (read_round_trips, reads_shared) = self.redis.read_batching();
        CacheStats {
            hits,
            misses,
            read_round_trips,
            reads_shared,
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            redis_available: usable && !self.health.degraded.load(Ordering::Acquire),
            dirty_count,
            oldest_dirty_age_seconds,
            flushes: self.flusher.flushes.load(Ordering::Relaxed),
            conversations_flushed: self.flusher.conversations_flushed.load(Ordering::Relaxed),
            flush_failures: self.flusher.flush_failures.load(Ordering::Relaxed),
            stuck: self.flusher.stuck(),
            memory: if usable { self.redis.memory().unwrap_or_default() } else { MemoryInfo::default() },
            redis_url: self.redis.redacted_url().to_owned(),
        }
    }
}

impl Flush for CachedTier {
    fn background_flush(&self) {
        match self.flush(None) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Unavailable(Backend::Redis) => {
                log::debug!("background flush skipped: {e}");
            }
            Err(e) if e.is_unavailable() => {
                log::warn!("background flush: dirty conversations stay in Redis until PostgreSQL is back ({e})");
            }
            Err(e) => log::warn!("background flush failed: {e}"),
        }
    }
}

fn ownership(conversation_id: &str) -> Error {
    Error::new(ErrorKind::Ownership, format!("conversation {conversation_id:?} belongs to another user"))
}

/// A conversation as a read found it: still in Redis's form (no copy made yet), or owned.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// Served by Redis.
    Cached(CachedConversation),
    /// Read from PostgreSQL or a local file.
    Stored(Conversation),
}

impl Fetched {
    /// As an owned [`Conversation`].
    #[must_use]
    pub fn into_conversation(self) -> Conversation {
        match self {
            Fetched::Cached(cached) => cached.to_conversation(),
            Fetched::Stored(conv) => conv,
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
