//! The tiers composed: which store serves a call, ids checked once for every mode, and the
//! lifecycle (`close`, the exit hook's registry). The Redis tier slots in as one more [`Tier`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use std::collections::{HashMap, VecDeque};

use crate::cache::{
    copy_mark, member, Bypass, CacheError, CacheMemory, CachedConversation, Deleted, DirtyEntry, MemoryInfo, NodeInfo,
    RedisCache, SaveOptions, SaveOutcome,
};
use crate::config::probe::{self, Diagnosis};
use crate::config::{PostgresSettings, RedisSettings};
use crate::error::{Backend, Error, ErrorKind, Result};
use crate::model::{Conversation, Timestamp};
use crate::store::local::LocalStore;
use crate::store::postgres::PostgresStore;
use crate::validate;
use crate::writeback::{BackgroundFlusher, Flush, FlushReport, Flusher};

/// Where conversations live (the README's modes).
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
    /// Opened only to look (`chat-history stats` and `doctor`): the schema is neither created nor
    /// migrated, and nothing is written back (no background flusher, no flush on close or at exit).
    pub inspect_only: bool,
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
            inspect_only: false,
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

/// A point-in-time copy of the manager's numbers (the README, "Observability").
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

/// The Redis tier's numbers (the README, "Observability").
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
    /// Why Redis is not in use, while it is not (the last failure); `None` while it serves.
    pub redis_error: Option<String>,
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
    /// Copies this manager kept aside in `conversation_conflicts` after a divergence.
    pub conflicts_kept: u64,
    /// Redis memory, when the server allows `INFO`: on a Redis Cluster the primaries' combined
    /// (see `cache::nodes::combined`).
    pub memory: MemoryInfo,
    /// A Redis Cluster's primaries with their slots and memory; empty on a single node.
    pub nodes: Vec<NodeInfo>,
    /// The Redis URL without its password.
    pub redis_url: String,
    /// `"single"` or `"cluster"`, once Redis has been reached.
    pub layout: Option<&'static str>,
    /// The near cache's figures; `None` when `near_cache_bytes` is 0.
    pub near: Option<crate::cache::NearStats>,
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
    /// The [`FORK_GENERATION`] the tier's pools and threads belong to.
    generation: AtomicU64,
}

impl std::fmt::Debug for ChatHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatHistory").field("mode", &self.mode).field("tier", &self.tier).finish_non_exhaustive()
    }
}

/// Bumped in a forked child (the Python package registers [`after_fork_in_child`] with
/// `os.register_at_fork`): a manager whose pools belong to an older generation shares its sockets
/// with the parent, and opens its own before its next call.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Calls of any manager in progress in this process (the background flushes included).
static CALLS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// Set while a fork is being prepared: new calls wait until it is done.
static FORKING: AtomicBool = AtomicBool::new(false);

/// Held for the length of a call: a fork waits for the calls in flight to end, so no thread of
/// the parent is inside the product (holding one of its locks, half-way through a pool's
/// bookkeeping) at the instant the child is copied from it.
pub(crate) struct CallGuard(());

impl CallGuard {
    pub(crate) fn enter() -> CallGuard {
        loop {
            while FORKING.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            if !FORKING.load(Ordering::SeqCst) {
                return CallGuard(());
            }
            CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// As [`CallGuard::enter`], but `None` instead of waiting while a fork is prepared: for a
    /// caller holding the GIL, which the forking thread needs to go on.
    pub(crate) fn try_enter() -> Option<CallGuard> {
        CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        if FORKING.load(Ordering::SeqCst) {
            CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(CallGuard(()))
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs in the parent before a fork (`os.register_at_fork`, without the GIL): new calls wait,
/// and the calls in flight get up to `wait` to end. Returns how many were still in flight.
pub fn before_fork(wait: Duration) -> usize {
    FORKING.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + wait;
    loop {
        let in_flight = CALLS_IN_FLIGHT.load(Ordering::SeqCst);
        if in_flight == 0 || Instant::now() >= deadline {
            return in_flight;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs in the parent after a fork: the calls that waited go on.
pub fn after_fork_in_parent() {
    FORKING.store(false, Ordering::SeqCst);
}

/// Runs in a child process right after a fork. Only resets counters: the child has one thread,
/// and any lock another thread of the parent held at the fork stays held in the child.
pub fn after_fork_in_child() {
    CALLS_IN_FLIGHT.store(0, Ordering::SeqCst);
    FORKING.store(false, Ordering::SeqCst);
    FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
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
            generation: AtomicU64::new(FORK_GENERATION.load(Ordering::Acquire)),
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
        if self.generation.load(Ordering::Acquire) != FORK_GENERATION.load(Ordering::Acquire) {
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
        let generation = FORK_GENERATION.load(Ordering::Acquire);
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
        if self.generation.load(Ordering::Acquire) != FORK_GENERATION.load(Ordering::Acquire) {
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
            Tier::Cached(cached) => Ok(cached.flush(None, true)?.written),
            _ => Ok(0),
        }
    }

    /// Stops the background flusher, flushes what is dirty (for at most the close timeout,
    /// logging what it could not write), then releases the pools. Idempotent; never fails.
    pub fn close(&self) -> Result<()> {
        if self.generation.load(Ordering::Acquire) != FORK_GENERATION.load(Ordering::Acquire) {
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
            if !crate::writeback::is_prefix(&current.messages, &conflict.conversation.messages) {
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

    /// The numbers (the README, "Observability") that this mode has.
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
            Tier::Cached(Arc::new(CachedTier {
                flusher: Flusher::new(Arc::clone(&cache), Arc::clone(&store), settings.flush_batch_size),
                redis: cache,
                postgres: store,
                schema_ready: AtomicBool::new(schema_ready),
                history_days: settings.history_days,
                health,
                tainted: Tainted::default(),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
                conflicts_kept: AtomicU64::new(0),
            }))
        }
    };
    let background = match (&tier, settings.flush_interval) {
        (Tier::Cached(cached), Some(interval)) if !settings.inspect_only => {
            let cached: Arc<dyn Flush> = Arc::clone(cached) as Arc<dyn Flush>;
            Some(BackgroundFlusher::start(Arc::downgrade(&cached), interval)?)
        }
        _ => None,
    };
    Ok((tier, background))
}

/// Shortest and longest pause before Redis is tried again after it failed (docs/design.md, "Faults").
const MIN_REDIS_BACKOFF: Duration = Duration::from_millis(250);
const MAX_REDIS_BACKOFF: Duration = Duration::from_secs(30);

/// Writes that went straight to PostgreSQL and are not yet reconciled with Redis, at most this many
/// (deduplicated by conversation). Past it, further ones are not tracked, and the log says how many.
const MAX_BYPASSES: usize = 100_000;
/// Times a save keeps a copy aside and tries to replace it, when other saves keep replacing it.
const OVERWRITE_ATTEMPTS: usize = 3;

/// Redis's health as this process sees it: a circuit breaker with exponential backoff, and the
/// writes that went straight to PostgreSQL meanwhile (or because Redis refused them), which Redis
/// is brought in line with before it serves anything again.
#[derive(Debug, Default)]
struct Health {
    degraded: AtomicBool,
    /// Whether bypasses wait to be replayed, or a replay is under way: checked on every call without
    /// taking a lock. Cleared only once a replay finished with nothing left, so no call reads Redis
    /// while another thread's replay has taken the entries but not yet acted on them.
    pending: AtomicBool,
    /// One replay at a time; a call that finds one under way waits for it.
    replaying: Mutex<()>,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    retry_at: Option<Instant>,
    backoff: Duration,
    /// By (user, id): the newest write that went straight to PostgreSQL.
    bypasses: HashMap<(String, String), Bypass>,
    /// Bypasses not tracked because the map was full.
    untracked: u64,
    /// Why Redis is not in use, while it is not: the last failure, for `stats()`.
    why: Option<String>,
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
            (state.backoff * 2).clamp(MIN_REDIS_BACKOFF, MAX_REDIS_BACKOFF)
        } else {
            log::warn!("Redis is unavailable ({why}); using PostgreSQL directly until it is back");
            MIN_REDIS_BACKOFF
        };
        state.retry_at = Some(Instant::now() + state.backoff);
        state.why = Some(why.to_owned());
    }

    /// The last failure, while Redis is not in use.
    fn why(&self) -> Option<String> {
        if self.degraded.load(Ordering::Acquire) {
            self.lock().why.clone()
        } else {
            None
        }
    }

    fn remember(&self, bypass: Bypass) {
        let mut state = self.lock();
        let key = (bypass.user_id.clone(), bypass.conversation_id.clone());
        let full = state.bypasses.len() >= MAX_BYPASSES;
        match state.bypasses.get_mut(&key) {
            Some(known) if known.version < bypass.version => *known = bypass,
            Some(_) => {}
            None if full => state.untracked += 1,
            None => {
                state.bypasses.insert(key, bypass);
            }
        }
        self.pending.store(true, Ordering::Release);
    }

    fn succeeded(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            let mut state = self.lock();
            state.retry_at = None;
            state.backoff = Duration::ZERO;
            state.why = None;
            log::info!("Redis is back; caching resumed");
        }
    }
}

/// Conversations whose last read this process served from PostgreSQL because Redis did not answer:
/// Redis may hold a newer dirty copy that the caller did not see, so the caller's next save of them
/// must not silently replace it. Bounded, oldest forgotten first.
#[derive(Debug, Default)]
struct Tainted {
    count: AtomicU64,
    state: Mutex<TaintedReads>,
}

/// (user, id) -> the read, and the pairs in the order they were added.
type TaintedReads = (HashMap<(String, String), TaintedRead>, VecDeque<(String, String)>);

/// A read PostgreSQL served while Redis did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TaintedRead {
    /// The version of the row it served.
    version: Option<i64>,
}

/// At most this many tainted reads are remembered.
const MAX_TAINTED: usize = 100_000;

impl Tainted {
    fn add(&self, user_id: &str, conversation_id: &str, version: Option<i64>) {
        let key = (user_id.to_owned(), conversation_id.to_owned());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, order) = &mut *state;
        if set.insert(key.clone(), TaintedRead { version }).is_none() {
            order.push_back(key);
            if order.len() > MAX_TAINTED {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
        self.count.store(set.len() as u64, Ordering::Release);
    }

    /// The read, when the last read of the conversation was tainted.
    fn get(&self, user_id: &str, conversation_id: &str) -> Option<TaintedRead> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0.get(&(user_id.to_owned(), conversation_id.to_owned())).copied()
    }

    fn remove(&self, user_id: &str, conversation_id: &str) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, order) = &mut *state;
        if set.remove(&(user_id.to_owned(), conversation_id.to_owned())).is_some() {
            order.retain(|(u, c)| !(u == user_id && c == conversation_id));
        }
        self.count.store(set.len() as u64, Ordering::Release);
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
    tainted: Tainted,
    hits: AtomicU64,
    misses: AtomicU64,
    fallbacks: AtomicU64,
    /// Copies kept aside by saves (a flush's are counted by the flusher).
    conflicts_kept: AtomicU64,
}

impl CachedTier {
    /// Runs a Redis call unless Redis is backing off; `None` means "use PostgreSQL". Before the
    /// first call after an outage (or a refused write), Redis is brought in line with what went
    /// straight to PostgreSQL, so it never serves a copy older than one of those writes.
    fn cache<T>(&self, op: impl FnOnce(&RedisCache) -> Result<T, CacheError>) -> Option<Result<T, CacheError>> {
        if !self.health.usable() {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if let Err(e) = self.reconcile() {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            log::debug!("Redis could not be brought in line after an outage: {e}");
            return None;
        }
        let result = op(&self.redis);
        match &result {
            Err(CacheError::Unavailable(why)) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.health.failed(why);
            }
            _ => self.health.succeeded(),
        }
        Some(result)
    }

    /// Replays the bypasses (see [`Health`]), a hundred per round trip; a conversation whose dirty
    /// copy is older than its bypass is flushed now, which keeps the losing copy aside.
    fn reconcile(&self) -> Result<(), String> {
        if !self.health.pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let _turn = self.health.replaying.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.health.pending.load(Ordering::Acquire) {
            return Ok(()); // another thread's replay finished while this one waited
        }
        let (items, untracked) = {
            let mut state = self.health.lock();
            (state.bypasses.drain().map(|(_, b)| b).collect::<Vec<_>>(), std::mem::take(&mut state.untracked))
        };
        // Done (with nothing left): writes remembered meanwhile keep it pending.
        let finished = || {
            let state = self.health.lock();
            if state.bypasses.is_empty() {
                self.health.pending.store(false, Ordering::Release);
            }
        };
        if untracked > 0 {
            log::error!(
                "{untracked} writes went straight to PostgreSQL beyond the {MAX_BYPASSES} tracked; Redis may serve \
                 older copies of them until they expire"
            );
        }
        match self.redis.invalidate(&items) {
            Ok(diverged) if diverged.is_empty() => {
                log::info!("Redis brought in line with {} writes made while it was away", items.len());
                finished();
                Ok(())
            }
            Ok(diverged) => {
                if let Err(e) = self
                    .pg()
                    .map_err(|e| e.to_string())
                    .and_then(|_| self.flusher.flush_members(&diverged).map_err(|e| e.to_string()))
                {
                    log::warn!("{} diverged conversations could not be resolved yet: {e}", diverged.len());
                }
                // Redis may serve these only once the flush resolved them: a dirty copy older than
                // what went to PostgreSQL must not be read (and built on) meanwhile. Until then they
                // stay pending, and calls go to PostgreSQL for a backoff. (Found by the randomized
                // checker under out-of-memory: a settle refused for memory left the older copy.)
                let unresolved: Vec<Bypass> =
                    items.into_iter().filter(|b| diverged.contains(&member(&b.user_id, &b.conversation_id))).collect();
                let left = self.redis.invalidate(&unresolved).unwrap_or(diverged);
                if left.is_empty() {
                    finished();
                    return Ok(());
                }
                let mut state = self.health.lock();
                for item in unresolved {
                    if left.contains(&member(&item.user_id, &item.conversation_id)) {
                        state.bypasses.entry((item.user_id.clone(), item.conversation_id.clone())).or_insert(item);
                    }
                }
                self.health.pending.store(true, Ordering::Release);
                drop(state);
                let why =
                    format!("{} conversations in Redis are older than PostgreSQL's and not yet resolved", left.len());
                self.health.failed(&why);
                Err(why)
            }
            Err(e) => {
                let mut state = self.health.lock();
                for item in items {
                    let key = (item.user_id.clone(), item.conversation_id.clone());
                    state.bypasses.entry(key).or_insert(item);
                }
                self.health.pending.store(true, Ordering::Release);
                drop(state);
                let why = e.clone().into_error().to_string();
                if matches!(e, CacheError::Unavailable(_)) {
                    self.health.failed(&why);
                }
                Err(why)
            }
        }
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
                self.tainted.remove(user_id, conversation_id);
                return Ok(Some(Fetched::Cached(cached)));
            }
            Some(Ok(None)) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.tainted.remove(user_id, conversation_id);
                true
            }
            Some(Err(e)) => {
                log::debug!("Redis read failed, reading PostgreSQL: {}", e.into_error());
                false
            }
            None => false,
        };
        let Some((conv, version)) = self.pg()?.get_versioned(conversation_id, user_id)? else {
            // None from PostgreSQL while Redis did not answer may hide a conversation only Redis
            // holds: the next save is guarded like after any other such read. (Found by the soak:
            // an app that took None for a new chat replaced Redis's unflushed copy.)
            if !cache_up {
                self.tainted.add(user_id, conversation_id, None);
            }
            return Ok(None);
        };
        if cache_up {
            if let Some(Err(e)) = self.cache(|r| r.backfill(user_id, conversation_id, &conv, version)) {
                log::debug!("could not cache {conversation_id:?}: {}", e.into_error());
            }
        } else {
            self.tainted.add(user_id, conversation_id, version);
        }
        Ok(Some(Fetched::Stored(conv)))
    }

    fn list(&self, user_id: &str) -> Result<Vec<(String, Conversation)>> {
        let mut items = match self.cache(|r| r.list(user_id)) {
            Some(Ok(Some(items))) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Arc::unwrap_or_clone(items)
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

    /// The conversation from the near cache, without waiting on anything: `None` sends the caller
    /// to [`CachedTier::get`].
    fn get_near(&self, conversation_id: &str, user_id: &str) -> Option<Fetched> {
        let cached = self.redis.get_near(user_id, conversation_id)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.tainted.remove(user_id, conversation_id);
        Some(Fetched::Cached(cached))
    }

    /// Every path of a save; whichever it took (even a failed one, which may have written), the
    /// near cache's copies go, so this process reads its own write at once.
    fn save(&self, conversation_id: &str, user_id: &str, conv: &Conversation) -> Result<()> {
        let result = self.save_any(conversation_id, user_id, conv);
        self.redis.forget(user_id, conversation_id);
        result
    }

    fn save_any(&self, conversation_id: &str, user_id: &str, conv: &Conversation) -> Result<()> {
        let tainted = self.tainted.get(user_id, conversation_id);
        let guard = tainted.is_some();
        let mut options = SaveOptions { guard, ..SaveOptions::default() };
        let (mut asked_owner, mut kept_aside) = (false, 0);
        loop {
            let answer = self.cache(|r| r.save(user_id, conversation_id, conv, &options).map(|(outcome, _)| outcome));
            match save_step(answer.as_ref(), asked_owner, kept_aside) {
                SaveStep::Done => {
                    self.tainted.remove(user_id, conversation_id);
                    return Ok(());
                }
                SaveStep::AskOwner => {
                    asked_owner = true;
                    let floor = self.owner_floor(conversation_id, user_id)?;
                    options = SaveOptions { claim: true, floor, guard, replaces: None };
                }
                SaveStep::KeepAside => {
                    // The copy is kept aside, then replaced only if it is still the copy kept (a save
                    // that came meanwhile is kept aside in its turn). Fails closed: a copy that cannot
                    // be read or kept refuses the save.
                    kept_aside += 1;
                    let replaces = self.keep_overwritten(conversation_id, user_id)?;
                    options = SaveOptions { claim: true, guard: replaces.is_none(), replaces, floor: None };
                }
                SaveStep::RefuseOwnership => return Err(ownership(conversation_id)),
                SaveStep::RefuseChanging => {
                    return Err(Error::new(
                        ErrorKind::Database(Backend::Redis),
                        format!(
                            "conversation {conversation_id:?} kept changing in Redis while this save, made from a \
                             copy read from PostgreSQL, tried to replace it; nothing was saved (read it again and save)"
                        ),
                    ))
                }
                SaveStep::ToPostgres { refused } => {
                    if let (true, Some(Err(e))) = (refused, answer) {
                        // Out of memory (or another refusal): Redis is brought in line before its next
                        // call (deleting is allowed even when Redis is out of memory).
                        log::warn!("Redis refused a save, writing it to PostgreSQL: {}", e.into_error());
                        self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    return self.save_to_postgres(conversation_id, user_id, conv, tainted);
                }
            }
        }
    }

    /// Redis does not hold the conversation: PostgreSQL says whether the id is another user's, and
    /// how new its row (or tombstone) is, the floor of the save's version. An id that cannot be
    /// checked is refused rather than claimed blind (docs/design.md, "Ownership").
    fn owner_floor(&self, conversation_id: &str, user_id: &str) -> Result<Option<i64>> {
        match self.pg().and_then(|pg| pg.owner(conversation_id)) {
            Ok(Some(row)) if row.owner.as_deref().is_some_and(|o| o != user_id) => Err(ownership(conversation_id)),
            Ok(row) => Ok(row.and_then(|r| r.version)),
            Err(e) if e.is_unavailable() => Err(Error::new(
                ErrorKind::Unavailable(Backend::Postgres),
                format!(
                    "conversation {conversation_id:?} is not in Redis and PostgreSQL is unavailable to say whether it \
                     belongs to another user; nothing was saved (save again once PostgreSQL is back)"
                ),
            )
            .with_source(e)),
            Err(e) => Err(e),
        }
    }

    /// A save that cannot go through Redis. The row it replaces is kept aside first unless the new
    /// messages extend it, or the caller's copy was read from that very row (`read`).
    fn save_to_postgres(
        &self,
        conversation_id: &str,
        user_id: &str,
        conv: &Conversation,
        read: Option<TaintedRead>,
    ) -> Result<()> {
        let pg = self.pg()?;
        // Whatever the caller's copy was built from (a Redis read, a fallback read, an earlier
        // fallback save), the row it replaces is kept aside when the new messages do not extend
        // it: a save that cannot go through Redis is rare, and the extra read costs less than
        // guessing. (The randomized checker found a copy read from Redis that missed an earlier
        // fallback save's messages.)
        if let Some((current, version)) = pg.get_versioned(conversation_id, user_id)? {
            let unchanged_since_read = read.is_some_and(|r| r.version == version);
            if !unchanged_since_read && !crate::writeback::is_prefix(&current.messages, &conv.messages) {
                self.keep(conversation_id, user_id, &current, version)?;
            }
        }
        let version = pg.save(conversation_id, user_id, conv)?;
        self.bypassed(user_id, conversation_id, version, false);
        Ok(())
    }

    fn keep(&self, conversation_id: &str, user_id: &str, conv: &Conversation, version: Option<i64>) -> Result<()> {
        let kept =
            self.pg()?.keep_conflict(conversation_id, user_id, conv, version, crate::writeback::REASON_OVERWRITTEN)?;
        if kept {
            self.conflicts_kept.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "conversation {conversation_id:?} of user {user_id:?}: a save read from PostgreSQL while Redis did not \
                 answer replaced a copy with {} messages; that copy is kept in conversation_conflicts",
                conv.messages.len()
            );
        }
        Ok(())
    }

    /// Records a write that went straight to PostgreSQL; Redis is brought in line before its next
    /// call, or right now when it answers.
    ///
    /// After a save, the caller's next copy descends from what went to PostgreSQL, not from what
    /// Redis may still hold (a dirty copy the outage left there), so the next save into Redis is
    /// guarded like one after a tainted read, until Redis's copy is resolved. (Found by the
    /// randomized checker: the replay can leave that copy for a flush that cannot run while
    /// PostgreSQL is down, and an unguarded save then replaced it.)
    fn bypassed(&self, user_id: &str, conversation_id: &str, version: i64, deleted: bool) {
        if deleted {
            self.tainted.remove(user_id, conversation_id);
        } else {
            self.tainted.add(user_id, conversation_id, Some(version));
        }
        self.health.remember(Bypass {
            user_id: user_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            version,
            deleted,
        });
    }

    /// A save after a read that Redis did not answer found a copy in Redis that its messages do not
    /// extend: that copy is kept aside in PostgreSQL before the save replaces it. Returns the
    /// copy's mark, which the save must find unchanged ([`SaveOptions::replaces`]), or `None` when
    /// the copy is gone (the save is then guarded again). Fails closed: when the copy cannot be
    /// read, cannot be parsed or PostgreSQL cannot take it, the save is refused and nothing changes.
    fn keep_overwritten(&self, conversation_id: &str, user_id: &str) -> Result<Option<String>> {
        let member = member(user_id, conversation_id);
        let entries = self.redis.fetch_dirty(std::slice::from_ref(&member), Duration::from_secs(5));
        match entries.map_err(CacheError::into_error)?.pop() {
            None | Some(DirtyEntry { content: None, .. }) => Ok(None),
            Some(DirtyEntry { content: Some(Err(why)), .. }) => Err(Error::new(
                ErrorKind::Database(Backend::Redis),
                format!(
                    "conversation {conversation_id:?}: Redis holds a copy this save would replace that cannot be read                      ({why}); nothing was saved (the write-back reports the copy as failed until it is repaired)"
                ),
            )),
            Some(DirtyEntry { content: Some(Ok(cached)), .. }) => {
                self.keep(conversation_id, user_id, &cached.conversation, cached.version)?;
                Ok(Some(copy_mark(cached.version, &cached.mark)))
            }
        }
    }

    /// All or nothing: Redis is only asked (ownership, version) until PostgreSQL has deleted the
    /// row and written a tombstone at least as new as anything Redis held; only then is the copy in
    /// Redis removed. When PostgreSQL fails the call raises and nothing changed.
    fn delete(&self, conversation_id: &str, user_id: &str) -> Result<()> {
        let result = self.delete_any(conversation_id, user_id);
        self.redis.forget(user_id, conversation_id);
        result
    }

    fn delete_any(&self, conversation_id: &str, user_id: &str) -> Result<()> {
        let seen = match self.cache(|r| r.peek_delete(user_id, conversation_id)) {
            Some(Ok(None)) => {
                log::debug!("delete of {conversation_id:?}: it belongs to another user; nothing deleted");
                return Ok(());
            }
            Some(Ok(Some(version))) => version,
            Some(Err(e)) => {
                log::debug!("Redis delete check failed: {}", e.into_error());
                0
            }
            None => 0,
        };
        let (_, tombstone) = self.pg()?.delete_versioned(conversation_id, user_id, seen)?;
        let Some(mut tombstone) = tombstone else {
            log::debug!("delete of {conversation_id:?}: PostgreSQL gives the id to another user; nothing deleted");
            return Ok(());
        };
        fail::fail_point!("delete.after_postgres");
        for _ in 0..OVERWRITE_ATTEMPTS {
            match self.cache(|r| r.delete(user_id, conversation_id, tombstone)) {
                Some(Ok(Some(Deleted::Overtaken(version)))) => {
                    // A save landed in Redis between the two steps, newer than the tombstone, and Redis
                    // removed nothing. The delete wins over it once PostgreSQL's tombstone covers it (a
                    // flush that read it then cannot bring it back). If PostgreSQL fails here, the call
                    // raises with nothing changed that anyone can see: Redis holds that save, which
                    // supersedes what PostgreSQL removed, and the flush writes it over the tombstone.
                    tombstone = self.pg()?.delete_versioned(conversation_id, user_id, version)?.1.unwrap_or(version);
                }
                Some(Ok(_)) => return Ok(()),
                Some(Err(_)) | None => {
                    self.bypassed(user_id, conversation_id, tombstone, true);
                    return Ok(());
                }
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable(Backend::Redis),
            format!("conversation {conversation_id:?} kept being saved while it was deleted; save or delete it again"),
        ))
    }

    /// `explicit`: asked for by the caller (`flush_dirty_conversations()`, `close()`, the CLI), so
    /// Redis is tried now even while this process backs off from it.
    fn flush(&self, deadline: Option<Instant>, explicit: bool) -> Result<FlushReport> {
        if !explicit && !self.health.usable() {
            return Err(Error::new(
                ErrorKind::Unavailable(Backend::Redis),
                "Redis is unavailable; nothing can be flushed from it now",
            ));
        }
        if explicit && self.health.degraded.load(Ordering::Acquire) {
            match self.redis.ping() {
                Ok(()) => self.health.succeeded(),
                Err(e) => {
                    let error = e.into_error();
                    self.health.failed(&error.to_string());
                    return Err(error);
                }
            }
        }
        self.pg()?;
        self.reconcile().map_err(|why| {
            Error::new(ErrorKind::Unavailable(Backend::Redis), "Redis is unavailable").with_source(why)
        })?;
        let result = if explicit { self.flusher.flush(deadline) } else { self.flusher.flush_cancellable(deadline) };
        match &result {
            Err(e) if e.kind() == ErrorKind::Unavailable(Backend::Redis) => self.health.failed(&e.to_string()),
            Ok(_) => self.health.succeeded(),
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
        let CacheMemory { total: memory, nodes } =
            if usable { self.redis.cache_memory().unwrap_or_default() } else { CacheMemory::default() };
        CacheStats {
            hits,
            misses,
            read_round_trips,
            reads_shared,
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            redis_available: usable && !self.health.degraded.load(Ordering::Acquire),
            redis_error: self.health.why(),
            dirty_count,
            oldest_dirty_age_seconds,
            flushes: self.flusher.flushes.load(Ordering::Relaxed),
            conversations_flushed: self.flusher.conversations_flushed.load(Ordering::Relaxed),
            flush_failures: self.flusher.flush_failures.load(Ordering::Relaxed),
            conflicts_kept: self.flusher.conflicts_kept.load(Ordering::Relaxed)
                + self.conflicts_kept.load(Ordering::Relaxed),
            stuck: self.flusher.stuck(),
            memory,
            nodes,
            redis_url: self.redis.redacted_url().to_owned(),
            layout: if usable { self.redis.layout().ok().map(crate::cache::KeyLayout::name) } else { None },
            near: self.redis.near_stats(),
        }
    }
}

impl Flush for CachedTier {
    fn background_flush(&self) {
        match self.flush(None, false) {
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

/// What a save does next, given Redis's answer to its last attempt (`None`: Redis was not tried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaveStep {
    /// Stored.
    Done,
    /// Redis does not hold the conversation: ask PostgreSQL who owns the id, then claim it.
    AskOwner,
    /// A guarded save met a copy its messages do not extend: keep that copy aside, then replace it.
    KeepAside,
    /// Another user's id.
    RefuseOwnership,
    /// The copy kept changing while the save tried to replace it.
    RefuseChanging,
    /// Redis did not answer (or is backing off), or refused (`refused`, out of memory say):
    /// PostgreSQL takes the save.
    ToPostgres { refused: bool },
}

/// The cached tier's decision after each attempt of a save, without the servers: `asked_owner` once
/// PostgreSQL was asked who owns the id, `kept_aside` copies kept aside so far.
fn save_step(answer: Option<&Result<SaveOutcome, CacheError>>, asked_owner: bool, kept_aside: usize) -> SaveStep {
    match answer {
        None | Some(Err(CacheError::Unavailable(_))) => SaveStep::ToPostgres { refused: false },
        Some(Err(_)) => SaveStep::ToPostgres { refused: true },
        Some(Ok(SaveOutcome::Saved(_))) => SaveStep::Done,
        Some(Ok(SaveOutcome::OwnerUnknown)) if !asked_owner => SaveStep::AskOwner,
        Some(Ok(SaveOutcome::OtherOwner | SaveOutcome::OwnerUnknown)) => SaveStep::RefuseOwnership,
        Some(Ok(SaveOutcome::Diverged)) if kept_aside < OVERWRITE_ATTEMPTS => SaveStep::KeepAside,
        Some(Ok(SaveOutcome::Diverged)) => SaveStep::RefuseChanging,
    }
}

fn ownership(conversation_id: &str) -> Error {
    Error::new(ErrorKind::Ownership, format!("conversation {conversation_id:?} belongs to another user"))
}

/// A conversation as a read found it: still in Redis's form (no copy made yet), or owned.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// Served by Redis (or the near cache's copy of what Redis served).
    Cached(Arc<CachedConversation>),
    /// Read from PostgreSQL or a local file.
    Stored(Conversation),
}

impl Fetched {
    /// As an owned [`Conversation`].
    #[must_use]
    pub fn into_conversation(self) -> Conversation {
        match self {
            Fetched::Cached(cached) => Arc::unwrap_or_clone(cached).to_conversation(),
            Fetched::Stored(conv) => conv,
        }
    }
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
    fn a_save_steps_through_redis_postgresql_and_the_overwrite_guard() {
        use super::{save_step, SaveStep, OVERWRITE_ATTEMPTS};
        use crate::cache::{CacheError, SaveOutcome};
        let ok = |o| Some(Ok(o));
        let down: Option<Result<SaveOutcome, CacheError>> = Some(Err(CacheError::Unavailable("timed out".into())));
        let oom: Option<Result<SaveOutcome, CacheError>> = Some(Err(CacheError::Other("OOM".into())));
        let cases = [
            ("saved", ok(SaveOutcome::Saved(7)), false, 0, SaveStep::Done),
            ("backing off: Redis not tried", None, false, 0, SaveStep::ToPostgres { refused: false }),
            ("timed out (a late delivery too)", down, false, 0, SaveStep::ToPostgres { refused: false }),
            ("refused (out of memory)", oom, false, 0, SaveStep::ToPostgres { refused: true }),
            ("not in Redis: ask PostgreSQL", ok(SaveOutcome::OwnerUnknown), false, 0, SaveStep::AskOwner),
            ("still unknown after a claim", ok(SaveOutcome::OwnerUnknown), true, 0, SaveStep::RefuseOwnership),
            ("another user's id", ok(SaveOutcome::OtherOwner), false, 0, SaveStep::RefuseOwnership),
            ("a copy the save does not extend", ok(SaveOutcome::Diverged), true, 0, SaveStep::KeepAside),
            ("replaced again meanwhile", ok(SaveOutcome::Diverged), true, 1, SaveStep::KeepAside),
            ("kept changing", ok(SaveOutcome::Diverged), true, OVERWRITE_ATTEMPTS, SaveStep::RefuseChanging),
        ];
        for (what, answer, asked_owner, kept_aside, want) in cases {
            assert_eq!(save_step(answer.as_ref(), asked_owner, kept_aside), want, "{what}");
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
