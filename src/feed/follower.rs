//! The follower: one thread per manager in redis mode. At most one process per Redis follows its
//! changes at a time (a lease in that Redis); the others stand by and take over within a lease's
//! time if the holder dies. The holder reads PostgreSQL's recorded changes after the mark stored in
//! Redis, applies them, and moves the mark (docs/design.md, "Every cache follows PostgreSQL").

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::plan::{plan, Early, Mark};
use crate::cache::{Bypass, CacheError, RedisCache};
use crate::error::{Error, Result};
use crate::store::postgres::{Position, PostgresStore};

/// How often the holder asks PostgreSQL for changes: the feed's delay, a fifth of a second at most
/// plus the time to apply them. A poll that finds nothing is one index lookup.
const POLL: Duration = Duration::from_millis(200);
/// How often a process that does not hold the lease tries to take it.
const STAND_BY: Duration = Duration::from_secs(1);
/// The lease: a holder that stops renewing it (dead, partitioned) is replaced after this.
const LEASE: Duration = Duration::from_secs(5);
/// Changes per read.
const PAGE: usize = 5_000;
/// Pages applied before the lease is renewed and the stop flag looked at.
const PAGES_PER_TURN: usize = 20;
/// How long PostgreSQL keeps recorded changes, and how often the holder prunes them.
const RETENTION: Duration = Duration::from_secs(24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// A mark older than this may lie before changes already pruned (a transaction may have begun up
/// to the margin before the mark was reached and committed after it): such a Redis resyncs fully.
const RESYNC_AFTER: Duration = Duration::from_secs(23 * 3600);
/// A Redis without a mark (new, or emptied) that this process did not follow until then: the
/// changes recorded this long before are applied again, for the copies reads cached since it was
/// emptied (a standing-by process claims its lease within [`STAND_BY`]).
const REPLAY_WITHOUT_MARK: Duration = Duration::from_secs(30);
/// After a failure (a server down), the next try.
const RETRY: Duration = Duration::from_secs(1);

/// Resolves dirty copies that are older than PostgreSQL's rows: the flush does, keeping whichever
/// copy loses aside (docs/design.md, "Divergence"). The cached tier implements it.
pub trait Resolve: Send + Sync {
    /// Flushes the `<user>:<id>` members now.
    fn resolve(&self, members: &[String]) -> Result<()>;
}

/// The follower thread of one manager; stopped (and joined) on drop.
#[derive(Debug)]
pub struct Follower {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

/// What `stats()` reports of the change feed (docs/monitoring.md, "What `stats()` returns").
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FeedFigures {
    /// Whether this process holds its Redis's lease, so is the one following PostgreSQL for it.
    pub following: bool,
    /// Recorded changes this process applied to its Redis.
    pub changes_applied: u64,
    /// Copies (and the users' cached lists with them) dropped because PostgreSQL held a newer row
    /// or a delete.
    pub copies_dropped: u64,
    /// Dirty copies older than PostgreSQL's row, handed to the flush to resolve.
    pub divergences: u64,
    /// Full resyncs (a mark lost, too old, or ahead of PostgreSQL).
    pub resyncs: u64,
    /// While following: seconds since the last read that reached the end of PostgreSQL's recorded
    /// changes (a poll's interval when all is well; it grows while PostgreSQL is out of reach).
    pub lag_seconds: Option<f64>,
}

/// The follower thread's counters, read by `stats()`.
#[derive(Debug, Default)]
struct Counters {
    following: AtomicBool,
    changes_applied: AtomicU64,
    copies_dropped: AtomicU64,
    divergences: AtomicU64,
    resyncs: AtomicU64,
    /// When a read last reached the end of the changes (Unix ms; 0: not since following).
    caught_up_ms: AtomicI64,
}

impl Follower {
    /// Starts the thread. It holds the resolver weakly, so a dropped manager ends it.
    pub fn start(redis: Arc<RedisCache>, postgres: Arc<PostgresStore>, resolver: Weak<dyn Resolve>) -> Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = Arc::clone(&stop);
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        let handle = std::thread::Builder::new()
            .name("chat-history-feed".into())
            .spawn(move || {
                let mut state = State::new(redis, postgres, shared);
                let (lock, condvar) = &*signal;
                let mut wait = Duration::ZERO;
                loop {
                    let stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    let (stopped, _) =
                        condvar.wait_timeout_while(stopped, wait, |s| !*s).unwrap_or_else(PoisonError::into_inner);
                    if *stopped {
                        state.release();
                        return;
                    }
                    drop(stopped);
                    // Tests whose proxy counts every late byte hold the follower here (`feed.turn`).
                    fail::fail_point!("feed.turn");
                    let _call = crate::process::CallGuard::enter();
                    let Some(resolver) = resolver.upgrade() else {
                        return;
                    };
                    wait = state.turn(&*resolver);
                }
            })
            .map_err(|e| Error::config("cannot start the change feed's thread").with_source(e))?;
        Ok(Follower { stop, handle: Some(handle), counters })
    }

    /// The feed's figures now.
    #[must_use]
    pub fn figures(&self) -> FeedFigures {
        let c = &self.counters;
        let following = c.following.load(Ordering::Relaxed);
        let caught_up = c.caught_up_ms.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)] // milliseconds of lag fit f64 exactly
        let lag_seconds = (following && caught_up > 0).then(|| (now_ms() - caught_up).max(0) as f64 / 1000.0);
        FeedFigures {
            following,
            changes_applied: c.changes_applied.load(Ordering::Relaxed),
            copies_dropped: c.copies_dropped.load(Ordering::Relaxed),
            divergences: c.divergences.load(Ordering::Relaxed),
            resyncs: c.resyncs.load(Ordering::Relaxed),
            lag_seconds,
        }
    }

    /// Stops the thread, waiting for it until `deadline` (a turn in progress finishes first).
    pub fn stop_until(&mut self, deadline: Instant) {
        let (lock, condvar) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        condvar.notify_all();
        let Some(handle) = self.handle.take() else { return };
        if handle.thread().id() == std::thread::current().id() {
            return;
        }
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return; // left to end on its own
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = handle.join();
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let (lock, condvar) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        condvar.notify_all();
    }
}

/// The thread's state between turns.
struct State {
    redis: Arc<RedisCache>,
    postgres: Arc<PostgresStore>,
    token: String,
    /// The mark while this process holds the lease.
    held: Option<Mark>,
    /// The last mark this process reached, held or not since.
    last: Option<Mark>,
    early: Early,
    last_prune: Option<Instant>,
    /// The failure last logged, so an outage is logged once, not every second.
    failing: Option<String>,
    counters: Arc<Counters>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl State {
    fn new(redis: Arc<RedisCache>, postgres: Arc<PostgresStore>, counters: Arc<Counters>) -> Self {
        State {
            redis,
            postgres,
            token: crate::cache::fresh_token(),
            held: None,
            last: None,
            early: Early::default(),
            last_prune: None,
            failing: None,
            counters,
        }
    }

    /// Records whether this process holds the lease.
    fn set_held(&mut self, mark: Option<Mark>) {
        if mark.is_none() || self.held.is_none() {
            self.counters.caught_up_ms.store(0, Ordering::Relaxed);
        }
        self.counters.following.store(mark.is_some(), Ordering::Relaxed);
        self.last = mark.or(self.last);
        self.held = mark;
    }

    /// One turn; returns how long to wait before the next.
    fn turn(&mut self, resolver: &dyn Resolve) -> Duration {
        match self.follow(resolver) {
            Ok(wait) => {
                if let Some(why) = self.failing.take() {
                    log::info!("change feed: following PostgreSQL again (after: {why})");
                }
                wait
            }
            Err(e) => {
                let why = e.to_string();
                if self.failing.as_ref() != Some(&why) {
                    log::warn!("change feed: cannot follow PostgreSQL's changes now, retrying: {why}");
                    self.failing = Some(why);
                }
                RETRY
            }
        }
    }

    fn follow(&mut self, resolver: &dyn Resolve) -> Result<Duration> {
        let Some(mut mark) = self.claim()? else {
            return Ok(STAND_BY);
        };
        for _ in 0..PAGES_PER_TURN {
            let page = self.postgres.changes_after(mark.at, i64::try_from(PAGE).unwrap_or(i64::MAX))?;
            if mark.timeline.is_some_and(|timeline| timeline != page.timeline) {
                // A replica promoted (a failover) or a restore: transactions the mark has passed may
                // be lost, and their ids handed out again to new ones, which would be skipped.
                match self.resync("PostgreSQL is on a new timeline (a failover to a replica, or a restore)")? {
                    Some(resynced) => mark = resynced,
                    None => return Ok(STAND_BY),
                }
                continue;
            }
            if page.horizon < mark.at.txid {
                // PostgreSQL is behind the mark: a replica promoted after losing the last transactions
                // (a forced failover), or a restore. Its next transactions may reuse ids the mark has
                // passed, so the mark means nothing here any more.
                match self.resync("PostgreSQL's transaction ids went back (a failover or a restore)")? {
                    Some(resynced) => mark = resynced,
                    None => return Ok(STAND_BY),
                }
                continue;
            }
            let read_ms = now_ms();
            let plan = plan(&page, mark.at, PAGE, &mut self.early);
            self.apply(&plan.apply, resolver)?;
            mark = Mark { at: plan.next, reached_ms: read_ms, timeline: Some(page.timeline) };
            if !self.redis.feed_advance(&self.token, &mark.render(), LEASE).map_err(CacheError::into_error)? {
                log::info!("change feed: another process took over following PostgreSQL for this Redis");
                self.set_held(None);
                return Ok(STAND_BY);
            }
            self.set_held(Some(mark));
            if !plan.more {
                self.counters.caught_up_ms.store(read_ms, Ordering::Relaxed);
                break;
            }
        }
        self.prune();
        Ok(POLL)
    }

    /// Takes or renews the lease; the mark to go on from, or `None` when another process holds it.
    /// A Redis without a mark (new, or emptied by a restart) follows from now; one with a mark too old
    /// resyncs fully.
    fn claim(&mut self) -> Result<Option<Mark>> {
        let Some(stored) = self.redis.feed_claim(&self.token, LEASE).map_err(CacheError::into_error)? else {
            self.set_held(None);
            return Ok(None);
        };
        if let Some(held) = self.held {
            return Ok(Some(held));
        }
        self.early = Early::default();
        let stale = |mark: &Mark| {
            now_ms().saturating_sub(mark.reached_ms) > i64::try_from(RESYNC_AFTER.as_millis()).unwrap_or(i64::MAX)
        };
        let mark = match stored.as_deref().and_then(Mark::parse) {
            Some(mark) if !stale(&mark) => {
                log::info!("change feed: following PostgreSQL for this Redis from where it stood");
                mark
            }
            Some(_) => match self.resync("the mark was too old to catch up from")? {
                Some(mark) => mark,
                None => return Ok(None),
            },
            None => {
                // A Redis new or restarted empty, and with a `volatile-*` policy the mark (which has
                // no TTL) is never evicted. If this process followed it until lately, the Redis was
                // emptied under it (a restart, a flush), maybe inside a turn whose mark then found
                // the lease gone: copies cached since may predate changes after the last mark this
                // process reached, so it goes on from there (a change applied twice is harmless).
                // Otherwise (another process followed it, or none yet) it goes on from the changes
                // of the last half minute: reads may have cached copies since it was emptied, and
                // a standing-by process claims the lease of an emptied Redis within a second.
                // Dropping every copy instead raced the copies a manager's first calls cache.
                let (mark, from) = match self.last.filter(|mark| !stale(mark)) {
                    Some(last) => (last, "from where this process stood (it was emptied)"),
                    None => (self.mark_recent()?, "from the changes of the last half minute"),
                };
                if !self.redis.feed_advance(&self.token, &mark.render(), LEASE).map_err(CacheError::into_error)? {
                    return Ok(None);
                }
                log::info!("change feed: no mark for this Redis; following PostgreSQL {from}");
                mark
            }
        };
        self.set_held(Some(mark));
        Ok(Some(mark))
    }

    /// Drops every clean copy and cached list, and follows from PostgreSQL's horizon now; `None` when
    /// the lease was lost meanwhile.
    fn resync(&mut self, why: &str) -> Result<Option<Mark>> {
        self.early = Early::default();
        // Read the horizon first: whatever is cached after the drop below was read after it.
        let mark = self.mark_now()?;
        let dropped = self.redis.drop_clean_copies().map_err(CacheError::into_error)?;
        log::info!("change feed: {why} for this Redis; {dropped} clean copies dropped, following PostgreSQL from now");
        self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
        if !self.redis.feed_advance(&self.token, &mark.render(), LEASE).map_err(CacheError::into_error)? {
            self.set_held(None);
            return Ok(None);
        }
        self.set_held(Some(mark));
        Ok(Some(mark))
    }

    /// A mark from which the changes recorded in the last [`REPLAY_WITHOUT_MARK`] are applied again.
    fn mark_recent(&self) -> Result<Mark> {
        let at = self.postgres.position_since(REPLAY_WITHOUT_MARK, i64::try_from(PAGE * 20).unwrap_or(i64::MAX))?;
        let timeline = self.mark_now()?.timeline;
        Ok(Mark { at, reached_ms: now_ms(), timeline })
    }

    /// A mark at PostgreSQL's horizon now: following from it misses nothing committed after.
    fn mark_now(&self) -> Result<Mark> {
        let page = self.postgres.changes_after(Position { txid: i64::MAX, change_id: 0 }, 1)?;
        Ok(Mark {
            at: Position { txid: page.horizon, change_id: -1 },
            reached_ms: now_ms(),
            timeline: Some(page.timeline),
        })
    }

    fn apply(&self, changes: &[Bypass], resolver: &dyn Resolve) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let followed = self.redis.follow(changes).map_err(CacheError::into_error)?;
        let c = &self.counters;
        c.changes_applied.fetch_add(changes.len() as u64, Ordering::Relaxed);
        c.copies_dropped.fetch_add(followed.dropped as u64, Ordering::Relaxed);
        c.divergences.fetch_add(followed.diverged.len() as u64, Ordering::Relaxed);
        log::debug!(
            "change feed: {} changes; {} copies dropped, {} not cached, {} current, {} diverged",
            changes.len(),
            followed.dropped,
            followed.uncached,
            followed.current,
            followed.diverged.len()
        );
        if !followed.diverged.is_empty() {
            // Left dirty if this fails: the next flush resolves them.
            if let Err(e) = resolver.resolve(&followed.diverged) {
                log::warn!("change feed: {} diverged copies left for the next flush: {e}", followed.diverged.len());
            }
        }
        Ok(())
    }

    fn prune(&mut self) {
        if self.last_prune.is_some_and(|at| at.elapsed() < PRUNE_EVERY) {
            return;
        }
        self.last_prune = Some(Instant::now());
        match self.postgres.prune_changes(RETENTION, 10_000) {
            Ok(0) => {}
            Ok(n) => log::info!("change feed: {n} recorded changes older than a day pruned"),
            Err(e) => log::warn!("change feed: old recorded changes could not be pruned: {e}"),
        }
    }

    /// Gives the lease up at once, so another process takes over without waiting for it to lapse.
    fn release(&self) {
        self.counters.following.store(false, Ordering::Relaxed);
        if let Some(mark) = self.held {
            let _ = self.redis.feed_advance(&self.token, &mark.render(), Duration::from_millis(1));
        }
    }
}
