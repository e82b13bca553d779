//! The Redis cache: the pool, the layout its keys follow, and the reads. Writes are in
//! [`crate::cache::writes`], write-back's Redis side in [`crate::cache::flush`]; every key name comes
//! from [`KeyLayout`] and every script from [`crate::cache::scripts`].
//!
//! A dirty hash has no TTL, so with a `volatile-*` eviction policy it is never evicted; it gets
//! its TTL back only when a flush has written exactly what it holds (docs/design.md, "Write-back").

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use redis::{ConnectionLike as _, Value};

use crate::cache::clock::{deadline_arg, RedisClock};
use crate::cache::codec::{
    named_fields, parse_listing, parse_memory_info, CachedConversation, MemoryInfo, READ_FIELDS,
};
use crate::cache::combine::Combiner;
use crate::cache::error::{CacheError, CacheResult};
use crate::cache::keys::KeyLayout;
use crate::cache::near::{Listing, NearCache, NearStats, NearValue};
use crate::cache::pool::{renew_if_due, Con, Connector, PoolErrorLog, RedisConnection, Renewal, Topology, Unread};
use crate::cache::scripts::{self, query_loading};
use crate::cache::tracking::{self, Tracker};
use crate::config::RedisSettings;
use crate::error::Error;
use crate::pool::Pool;

/// The list cache's TTL, the seed's 5 minutes.
pub const LIST_TTL_SECONDS: u64 = 300;

/// How long a near-cache copy is served before Redis is read again: a quarter of the TTL, at most
/// a minute, so a conversation read only from the process still has its TTL in Redis refreshed.
fn near_max_age(ttl_seconds: u64) -> Duration {
    (Duration::from_secs(ttl_seconds) / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Times a call is tried again after a cluster redirect (about two seconds in all).
const MAX_REDIRECTS: u64 = 20;

/// A cluster's answer that a slot is elsewhere or moving: MOVED, ASK, TRYAGAIN, CLUSTERDOWN, as
/// the redis crate reports them inside a pipeline's failures too.
fn is_redirect(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    ["MOVED", "Moved", "ASK", "Ask", "TRYAGAIN", "TryAgain", "CLUSTERDOWN", "ClusterDown"]
        .iter()
        .any(|marker| text.contains(marker))
}

/// Commands for [`RedisCache::query_spread`].
#[derive(Default)]
pub(crate) struct Spread {
    cmds: Vec<(redis::Cmd, bool)>,
}

impl Spread {
    /// Adds a command; `keep`: its reply is returned.
    pub(crate) fn add(&mut self, cmd: redis::Cmd, keep: bool) {
        self.cmds.push((cmd, keep));
    }

    /// Sends the commands on `con` (for callers already holding a pooled connection).
    pub(crate) fn query_on_con(&self, con: &mut Con) -> redis::RedisResult<Vec<Value>> {
        self.query_on(con)
    }

    fn query_on(&self, con: &mut Con) -> redis::RedisResult<Vec<Value>> {
        let once = |con: &mut Con| match con {
            Con::Single(single) => {
                let mut pipe = redis::pipe();
                for (cmd, keep) in &self.cmds {
                    pipe.add_command(cmd.clone());
                    if !keep {
                        pipe.ignore();
                    }
                }
                pipe.query::<Vec<Value>>(single)
            }
            Con::Cluster(cluster) => {
                let mut pipe = redis::cluster::ClusterPipeline::with_capacity(self.cmds.len());
                for (cmd, keep) in &self.cmds {
                    pipe.add_command(cmd.clone());
                    if !keep {
                        pipe.ignore();
                    }
                }
                pipe.query::<Vec<Value>>(cluster)
            }
        };
        match once(con) {
            Err(e) if e.kind() == redis::ServerErrorKind::NoScript.into() || e.to_string().contains("NOSCRIPT") => {
                scripts::load_scripts(con)?;
                once(con)
            }
            other => other,
        }
    }
}

/// What [`RedisCache::list`] found.
#[derive(Debug, Clone)]
pub enum ListRead {
    /// The cached list.
    Cached(Arc<Listing>),
    /// Not cached: the list epoch, read before PostgreSQL's rows are, for
    /// [`RedisCache::rebuild_list`].
    Missing {
        /// The epoch as read ('' when there is none).
        epoch: String,
    },
}

/// The Redis cache.
pub struct RedisCache {
    pool: Pool<Connector>,
    pub(crate) settings: RedisSettings,
    /// Shared with the pool's connector, which finds it out on the first connection.
    topology: Arc<OnceLock<Topology>>,
    /// Concurrent reads share round trips (see [`Combiner`]).
    reads: Combiner<String, CacheResult<Value>>,
    /// Copies of what was read, kept correct by Redis's invalidations; `None` with
    /// `near_cache_bytes=0`.
    near: Option<Arc<NearCache>>,
    tracker: Mutex<Option<Tracker>>,
    /// Redis's clock as measured by the pool's connections: the deadlines of writes.
    pub(crate) clock: Arc<RedisClock>,
    /// Cluster: users whose saves are in Redis but whose entry in the dirty index could not be
    /// written after the save (see [`RedisCache::index_dirty_user`]); written before the next walk
    /// or count of the index.
    pub(crate) unindexed: Mutex<Vec<String>>,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache").field("url", &self.settings.redacted()).finish_non_exhaustive()
    }
}

impl RedisCache {
    /// Builds the pool without connecting.
    pub fn new(settings: &RedisSettings) -> crate::error::Result<Self> {
        let root_cert = match &settings.ca_file {
            None => None,
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| Error::config(format!("cannot read the CA file {}", path.display())).with_source(e))?,
            ),
        };
        let client = match &root_cert {
            None => redis::Client::open(settings.url()),
            Some(pem) => redis::Client::build_with_tls(
                settings.url(),
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
            ),
        }
        .map_err(|e| Error::config("the Redis connection string is not valid").with_source(e.to_string()))?;
        let topology = Arc::new(OnceLock::new());
        let clock = Arc::new(RedisClock::default());
        let tracker_client = client.clone();
        let pool = Pool::builder()
            .max_size(settings.pool_size)
            .connection_timeout(settings.timeout)
            // A Redis restarting within the timeout costs a call the wait, not a fallback.
            .retry_failed_connects(true)
            .idle_timeout(Some(Duration::from_secs(300)))
            .error_handler(Box::new(PoolErrorLog))
            .build(Connector {
                client,
                timeout: settings.timeout,
                requested: settings.cluster,
                url: settings.url().to_owned(),
                root_cert,
                topology: Arc::clone(&topology),
                credentials: settings.credentials.clone(),
                clock: Arc::clone(&clock),
            });
        // One round trip in flight per CPU this process may run on (taskset and cgroup limits
        // count), and never more than the pool's connections.
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let reads = Combiner::new(
            cpus.min(settings.pool_size as usize),
            || Err(CacheError::Other("the batch carrying this read failed".into())),
            |reply| matches!(reply, Err(CacheError::Unavailable(_))),
        );
        let (near, tracker) = if settings.near_cache_bytes == 0 {
            (None, None)
        } else {
            let limit = usize::try_from(settings.near_cache_bytes).unwrap_or(usize::MAX);
            let near = NearCache::register(limit, near_max_age(settings.ttl_seconds));
            let source = tracking::Source {
                client: tracker_client,
                timeout: settings.timeout,
                credentials: settings.credentials.clone(),
                topology: Arc::clone(&topology),
            };
            (Some(Arc::clone(&near)), Some(Tracker::start(near, source)))
        };
        Ok(RedisCache {
            pool,
            settings: settings.clone(),
            topology,
            reads,
            near,
            tracker: Mutex::new(tracker),
            clock,
            unindexed: Mutex::new(Vec::new()),
        })
    }

    /// The near cache's figures; `None` when it is off.
    #[must_use]
    pub fn near_stats(&self) -> Option<NearStats> {
        self.near.as_ref().map(|near| near.stats())
    }

    /// Stops the near cache's tracking threads (waiting for them until `deadline`); the near cache
    /// serves nothing afterwards.
    pub fn stop_tracking(&self, deadline: Instant) {
        if let Some(mut tracker) = self.tracker.lock().unwrap_or_else(PoisonError::into_inner).take() {
            tracker.stop(deadline);
        }
        if let Some(near) = &self.near {
            near.track_nodes(0);
        }
    }

    /// Drops the copies of the conversation and of the user's list from every near cache of the
    /// process (each manager has its own): this process wrote (or tried to write) them, and any of
    /// its managers reads its writes at once, without waiting for Redis's invalidation.
    pub fn forget(&self, user_id: &str, conversation_id: &str) {
        // A manager that never reached Redis does not know its layout; other managers of the
        // process may hold copies under either.
        let layouts = match self.topology.get() {
            Some(topology) => vec![topology.layout],
            None => vec![KeyLayout::Seed, KeyLayout::Cluster],
        };
        let keys: Vec<String> = layouts
            .into_iter()
            .flat_map(|layout| [layout.conv(user_id, conversation_id), layout.list(user_id)])
            .collect();
        crate::cache::near::forget_everywhere(&keys);
    }

    /// The conversation from the near cache alone: never waits on Redis (a caller holding the GIL
    /// asks this first). `None` is not a miss; [`RedisCache::get`] says.
    pub fn get_near(&self, user_id: &str, conversation_id: &str) -> Option<Arc<CachedConversation>> {
        let near = self.near.as_ref()?;
        let layout = self.topology.get()?.layout;
        match near.peek(&layout.conv(user_id, conversation_id))? {
            NearValue::Conversation(cached) => Some(cached),
            NearValue::List(_) => None,
        }
    }

    /// The URL without the password.
    #[must_use]
    pub fn redacted_url(&self) -> &str {
        self.settings.redacted()
    }

    /// Seconds a clean conversation stays cached.
    #[must_use]
    pub fn ttl(&self) -> u64 {
        self.settings.ttl_seconds
    }

    /// The key layout in use: decided by the server (or `redis_cluster`) on the first connection,
    /// so it needs Redis once.
    pub fn layout(&self) -> CacheResult<KeyLayout> {
        if let Some(topology) = self.topology.get() {
            return Ok(topology.layout);
        }
        self.run_on(|_| Ok(()))?;
        self.topology
            .get()
            .map(|t| t.layout)
            .ok_or_else(|| CacheError::Unavailable("Redis's topology is not known yet".into()))
    }

    /// Runs `op` on a pooled connection. A connection that a restart or a dropped socket killed
    /// while idle is replaced and the call run again (every script here is safe to repeat);
    /// a timeout is not retried, so a dead Redis costs one timeout, not several.
    pub(crate) fn run_on<T>(
        &self,
        mut op: impl FnMut(&mut RedisConnection) -> redis::RedisResult<T>,
    ) -> CacheResult<T> {
        let attempts = self.pool.max_size() + 1;
        let mut attempt = 0;
        let mut redirects = 0;
        loop {
            attempt += 1;
            let mut conn = self.pool.get().map_err(|e| CacheError::Unavailable(e.to_string()))?;
            let renewed = match &self.settings.credentials {
                None => Ok(Renewal::Ready),
                Some(provider) => renew_if_due(&mut conn, provider),
            };
            let result = match renewed {
                Ok(Renewal::Replace) if attempt < attempts => {
                    conn.broken = true;
                    log::debug!("Redis Cluster connection replaced before its credentials expire");
                    continue;
                }
                // A connection to replace is used anyway once every attempt went to replacing: a
                // provider whose credentials are always due must not stall calls.
                Ok(Renewal::Ready | Renewal::Replace) => conn.read_unread().and_then(|()| op(&mut conn)),
                Err(e) => Err(e),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(e) if is_redirect(&e) && redirects < MAX_REDIRECTS => {
                    // A failover or a resharding moved a slot under a pipeline: the redis crate
                    // follows MOVED and ASK for single commands, not inside pipelines. A fresh
                    // cluster connection reads the new slot map; a slot still migrating (ASK,
                    // TRYAGAIN) is tried again shortly. Every command here is safe to repeat.
                    redirects += 1;
                    attempt -= 1;
                    conn.broken = true;
                    log::debug!("Redis Cluster moved a slot ({e}); trying again on a fresh connection");
                    std::thread::sleep(Duration::from_millis(10 * redirects));
                }
                Err(e) => {
                    let error = CacheError::from_redis(&e);
                    if matches!(error, CacheError::Unavailable(_)) {
                        conn.broken = true;
                        // A login refused after a rotation (a cluster connection reconnecting a
                        // node with the credentials it was built with): a new connection asks the
                        // provider again.
                        let stale_login =
                            self.settings.credentials.is_some() && e.kind() == redis::ErrorKind::AuthenticationFailed;
                        let dropped = e.is_connection_dropped() || !conn.con.is_open() || stale_login;
                        if dropped && !e.is_timeout() && attempt < attempts {
                            continue;
                        }
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Sends a pipeline that changes something, built by `build` from the deadline it carries (see
    /// [`RedisClock`]) right before it goes out, so a wait for a pooled connection does not eat
    /// into the time Redis has to run it.
    pub(crate) fn query_fenced<T: redis::FromRedisValue>(
        &self,
        mut build: impl FnMut(&str) -> redis::Pipeline,
    ) -> CacheResult<T> {
        self.run_on(|conn| {
            let pipe = build(&deadline_arg(self.clock.deadline(self.settings.timeout)));
            query_loading(&mut conn.con, &pipe)
        })
    }

    /// Sends a pipeline built around its deadline, as [`Self::query_fenced`], without waiting for
    /// its replies on one node: they are read before the connection's next command. For a write
    /// whose outcome the caller does not need (a miss's backfill), so that its round trip is not
    /// the caller's. The bytes are on their way to Redis when this returns, ahead of anything sent
    /// later on any connection. On a cluster (whose router reads replies as it routes) it waits.
    pub(crate) fn send_fenced(&self, mut build: impl FnMut(&str) -> redis::Pipeline) -> CacheResult<()> {
        self.run_on(|conn| {
            let pipe = build(&deadline_arg(self.clock.deadline(self.settings.timeout)));
            match &mut conn.con {
                Con::Single(con) => {
                    let packed = pipe.get_packed_pipeline();
                    con.send_packed_command(&packed)?;
                    conn.unread = Some(Unread { packed, replies: pipe.len() });
                    Ok(())
                }
                Con::Cluster(_) => query_loading::<Value>(&mut conn.con, &pipe).map(drop),
            }
        })
    }

    /// The deadline argument for a write sent now (see [`RedisClock`]).
    pub(crate) fn deadline_now(&self) -> String {
        deadline_arg(self.clock.deadline(self.settings.timeout))
    }

    /// Sends a pipeline (see [`scripts::query_loading`]) on a pooled connection.
    pub(crate) fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> CacheResult<T> {
        self.run_on(|conn| query_loading(&mut conn.con, pipe))
    }

    /// Sends commands that may touch many hash slots, one round trip (per node on a cluster, where
    /// the redis crate's cluster pipeline routes each command to its slot's primary). Returns the
    /// replies of the commands added with `keep`, in order. Loads the scripts and sends again on
    /// NOSCRIPT, as [`scripts::query_loading`] does.
    pub(crate) fn query_spread(&self, spread: &Spread) -> CacheResult<Vec<Value>> {
        if spread.cmds.is_empty() {
            return Ok(Vec::new());
        }
        self.run_on(|conn| spread.query_on(&mut conn.con))
    }

    /// A single command on a pooled connection.
    pub(crate) fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> CacheResult<T> {
        self.run_on(|conn| cmd.query(&mut conn.con))
    }

    /// The cached conversation; a clean hit whose TTL ran low gets it back ([`RedisCache::fresh_enough`]).
    /// An unreadable hash reads as a miss.
    ///
    /// The id's owner record is not given its TTL back: it keeps the one it got when the
    /// conversation became clean, and when it lapses first nothing changes for the owner, whose
    /// conversation hash still proves the claim, while another user's save or delete of the id is
    /// checked in PostgreSQL, as for any id Redis does not know. A hit is one command instead of two.
    pub fn get(&self, user_id: &str, conversation_id: &str) -> CacheResult<Option<Arc<CachedConversation>>> {
        let key = self.layout()?.conv(user_id, conversation_id);
        let Some(near) = &self.near else {
            let value = match self.reads.run(key.clone(), |batch| self.read_batch(batch))? {
                Value::Array(mut pair) if pair.len() == 2 => {
                    self.fresh_enough(&key, redis::from_redis_value_ref::<i64>(&pair[1]).unwrap_or(-2));
                    pair.swap_remove(0)
                }
                other => other,
            };
            return Ok(Self::parse_read(&key, value).map(Arc::new));
        };
        if let Some(NearValue::Conversation(cached)) = near.get(&key) {
            return Ok(Some(cached));
        }
        let token = near.begin_fill(&key, None);
        let read = self.reads.run(key.clone(), |batch| self.read_batch(batch));
        let (value, fill) = match read {
            Ok(Value::Array(mut pair)) if pair.len() == 2 => {
                let pttl = redis::from_redis_value_ref::<i64>(&pair[1]).unwrap_or(-2);
                (pair.swap_remove(0), self.fresh_enough(&key, pttl))
            }
            Ok(other) => (other, false),
            Err(e) => {
                if let Some(token) = token {
                    near.finish_fill(&key, token, None);
                }
                return Err(e);
            }
        };
        let cached = Self::parse_read(&key, value).map(Arc::new);
        if let Some(token) = token {
            let copy = cached.as_ref().filter(|_| fill).map(|c| NearValue::Conversation(Arc::clone(c)));
            near.finish_fill(&key, token, copy);
        }
        Ok(cached)
    }

    fn parse_read(key: &str, value: Value) -> Option<CachedConversation> {
        let fields = named_fields(&READ_FIELDS, value);
        if fields.is_empty() {
            return None;
        }
        let cached = CachedConversation::parse(fields);
        if cached.is_none() {
            log::warn!("ignoring the unreadable cached conversation {key}");
        }
        cached
    }

    /// A read does not refresh the TTL each time: an `EXPIRE` is a write, replicated, and an
    /// invalidation sent to every process's near-cache tracker (with the near cache on, it would
    /// drop the very copy the read fills). A clean hash whose TTL ran below the threshold gets it
    /// back here, and its copy is not kept in the near cache (the refresh's own invalidation is on
    /// its way). Returns whether the reply may fill the near cache.
    fn fresh_enough(&self, key: &str, pttl: i64) -> bool {
        // -1: no TTL (dirty); -2: no such key (nothing to keep anyway).
        if pttl < 0 {
            return true;
        }
        let ttl_ms = i64::try_from(self.ttl()).unwrap_or(i64::MAX / 1000).saturating_mul(1000);
        let max_age_ms = i64::try_from(near_max_age(self.ttl()).as_millis()).unwrap_or(i64::MAX);
        if pttl >= ttl_ms.saturating_sub(max_age_ms.saturating_mul(2)) {
            return true;
        }
        let ttl = self.ttl();
        let refreshed = self.run_on(|conn| {
            if conn.expire_gt {
                redis::cmd("EXPIRE").arg(key).arg(ttl).arg("GT").query::<Value>(&mut conn.con)
            } else {
                let mut cmd = scripts::call(&scripts::REFRESH_TTL, &[key]);
                cmd.arg(ttl);
                cmd.query::<Value>(&mut conn.con)
            }
        });
        if let Err(e) = refreshed {
            log::debug!("could not give {key} its TTL back: {}", e.into_error());
        }
        false
    }

    /// The hashes of a batch of conversation keys and their TTLs (`PTTL`), in one round trip: each
    /// a pair, for [`RedisCache::fresh_enough`].
    fn read_batch(&self, batch: &[&String]) -> Vec<CacheResult<Value>> {
        let result = self.run_on(|conn| {
            if let Con::Single(single) = &mut conn.con {
                // The hot path: one plain pipeline.
                let mut pipe = redis::pipe();
                for key in batch {
                    pipe.cmd("HMGET").arg(key).arg(&READ_FIELDS).cmd("PTTL").arg(key);
                }
                return query_loading::<Vec<Value>>(single, &pipe);
            }
            let mut spread = Spread::default();
            for key in batch {
                let mut read = redis::cmd("HMGET");
                read.arg(key).arg(&READ_FIELDS);
                spread.add(read, true);
                spread.add(redis::cmd("PTTL").arg(key).clone(), true);
            }
            spread.query_on(&mut conn.con)
        });
        match result {
            Ok(values) if values.len() == batch.len() * 2 => {
                let mut values = values.into_iter();
                let mut out = Vec::with_capacity(batch.len());
                while let (Some(fields), Some(pttl)) = (values.next(), values.next()) {
                    out.push(Ok(Value::Array(vec![fields, pttl])));
                }
                out
            }
            Ok(values) => {
                let why = format!("{} replies to a pipeline of {} reads", values.len(), batch.len() * 2);
                vec![Err(CacheError::Other(why)); batch.len()]
            }
            Err(e) => vec![Err(e); batch.len()],
        }
    }

    /// The round trips reads took, and the reads that shared theirs with another thread's.
    #[must_use]
    pub fn read_batching(&self) -> (u64, u64) {
        self.reads.counts()
    }

    /// The user's cached list (ids with metadata, newest first), or, when it is not cached, the
    /// list epoch to hand [`RedisCache::rebuild_list`] (read before PostgreSQL's rows are).
    pub fn list(&self, user_id: &str) -> CacheResult<ListRead> {
        let l = self.layout()?;
        let keys = [l.list(user_id), l.list_meta(user_id), l.list_epoch(user_id)];
        let read = || -> CacheResult<ListRead> {
            let mut pipe = redis::pipe();
            pipe.add_command(scripts::call(&scripts::LIST, &keys));
            let (value,): (Value,) = self.query(&pipe)?;
            match value {
                Value::BulkString(epoch) => {
                    Ok(ListRead::Missing { epoch: String::from_utf8_lossy(&epoch).into_owned() })
                }
                other => {
                    if let Some(items) = parse_listing(other) {
                        return Ok(ListRead::Cached(Arc::new(items)));
                    }
                    // An entry this build cannot read (another writer's): rebuilt like a missing list.
                    let epoch: Option<String> = self.command(redis::cmd("GET").arg(&keys[2]))?;
                    Ok(ListRead::Missing { epoch: epoch.unwrap_or_default() })
                }
            }
        };
        let Some(near) = &self.near else { return read() };
        if let Some(NearValue::List(items)) = near.get(&keys[0]) {
            return Ok(ListRead::Cached(items));
        }
        let token = near.begin_fill(&keys[0], Some(&keys[1]));
        let result = read();
        if let Some(token) = token {
            let copy = match &result {
                Ok(ListRead::Cached(items)) => Some(NearValue::List(Arc::clone(items))),
                _ => None,
            };
            near.finish_fill(&keys[0], token, copy);
        }
        result
    }

    /// `INFO memory`, where the server allows it. One node's: on a cluster the router sends it to
    /// every primary, and [`RedisCache::cache_memory`] is what combines them.
    pub fn memory(&self) -> CacheResult<MemoryInfo> {
        let info: String = self.command(redis::cmd("INFO").arg("memory"))?;
        Ok(parse_memory_info(&info))
    }

    /// A round trip, to see whether Redis is back.
    pub fn ping(&self) -> CacheResult<()> {
        self.command(&redis::cmd("PING"))
    }
}
