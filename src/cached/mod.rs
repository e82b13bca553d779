//! Redis in front of PostgreSQL: the read path, the write path, their fallbacks and the
//! write-back's policy (docs/design.md, sections 4 to 8). [`CachedTier`] is the tier; its parts
//! are private modules: Redis's health ([`health`]), the reads served while Redis did not answer
//! ([`tainted`]) and the decisions taken on what the servers answered ([`decide`]).

mod decide;
mod health;
mod seen;
mod tainted;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::cache::{
    copy_mark, member, Bypass, CacheError, CacheMemory, CachedConversation, Deleted, DirtyEntry, ListRead, RedisCache,
    SaveOptions, SaveOutcome,
};
use crate::error::{Backend, Error, ErrorKind, Result};
use crate::model::{Conversation, Timestamp};
use crate::stats::CacheStats;
use crate::store::postgres::PostgresStore;
use crate::writeback::{Flush, FlushReport, Flusher};

use decide::{save_step, SaveStep, OVERWRITE_ATTEMPTS};
pub(crate) use health::Health;
use health::MAX_BYPASSES;
use seen::Seen;
use tainted::Tainted;

/// Times a list miss reads PostgreSQL's rows when changes keep moving the list epoch meanwhile.
const LIST_ATTEMPTS: usize = 3;

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

/// Redis in front of PostgreSQL: the read path, the write path and their fallbacks.
#[derive(Debug)]
pub(crate) struct CachedTier {
    pub(crate) redis: Arc<RedisCache>,
    pub(crate) postgres: Arc<PostgresStore>,
    pub(crate) flusher: Flusher,
    pub(crate) schema_ready: AtomicBool,
    pub(crate) history_days: i32,
    pub(crate) health: Health,
    pub(crate) tainted: Tainted,
    /// The version each conversation was last read or saved at, the base of its next save.
    pub(crate) seen: Seen,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
    /// Copies kept aside by saves (a flush's are counted by the flusher).
    pub(crate) conflicts_kept: AtomicU64,
    /// The change feed's thread (docs/design.md, "Every cache follows PostgreSQL"), once started.
    pub(crate) follower: std::sync::Mutex<Option<crate::feed::Follower>>,
}

impl CachedTier {
    /// The tier over `redis` and `postgres`; `schema_ready` once PostgreSQL's schema is known to
    /// be there, `health` as the first contact with Redis left it.
    pub(crate) fn new(
        redis: Arc<RedisCache>,
        postgres: Arc<PostgresStore>,
        settings: &crate::config::Settings,
        schema_ready: bool,
        health: Health,
    ) -> Self {
        CachedTier {
            flusher: Flusher::new(Arc::clone(&redis), Arc::clone(&postgres), settings.flush_batch_size),
            redis,
            postgres,
            schema_ready: AtomicBool::new(schema_ready),
            history_days: settings.history_days,
            health,
            tainted: Tainted::default(),
            seen: Seen::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            conflicts_kept: AtomicU64::new(0),
            follower: std::sync::Mutex::new(None),
        }
    }

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
    pub(crate) fn pg(&self) -> Result<&PostgresStore> {
        if !self.schema_ready.load(Ordering::Acquire) {
            self.postgres.ensure_schema()?;
            self.schema_ready.store(true, Ordering::Release);
        }
        Ok(&self.postgres)
    }

    pub(crate) fn get(&self, conversation_id: &str, user_id: &str) -> Result<Option<Fetched>> {
        let cache_up = match self.cache(|r| r.get(user_id, conversation_id)) {
            Some(Ok(Some(cached))) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                self.tainted.remove(user_id, conversation_id);
                self.seen.record(user_id, conversation_id, cached.version);
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
            // The copy the backfill caches carries PostgreSQL's version (0 for a Phase 1 row).
            self.seen.record(user_id, conversation_id, Some(version.unwrap_or(0)));
            if let Some(Err(e)) = self.cache(|r| r.backfill(user_id, conversation_id, &conv, version)) {
                log::debug!("could not cache {conversation_id:?}: {}", e.into_error());
            }
        } else {
            self.tainted.add(user_id, conversation_id, version);
        }
        Ok(Some(Fetched::Stored(conv)))
    }

    pub(crate) fn list(&self, user_id: &str) -> Result<Vec<(String, Conversation)>> {
        let mut items = self.list_any(user_id)?;
        let horizon = Timestamp::from(chrono::Utc::now() - chrono::Duration::days(i64::from(self.history_days)));
        items.retain(|(_, c)| c.created_at >= horizon);
        items.sort_by(|(a_id, a), (b_id, b)| b.last_modified.cmp(&a.last_modified).then_with(|| a_id.cmp(b_id)));
        Ok(items)
    }

    /// The user's list: the cached one, or PostgreSQL's rows (merged with the dirty copies) cached
    /// unless a change PostgreSQL committed meanwhile makes them old (then read again).
    fn list_any(&self, user_id: &str) -> Result<Vec<(String, Conversation)>> {
        for attempt in 0..LIST_ATTEMPTS {
            let epoch = match self.cache(|r| r.list(user_id)) {
                Some(Ok(ListRead::Cached(items))) => {
                    if attempt == 0 {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(Arc::unwrap_or_clone(items));
                }
                Some(Ok(ListRead::Missing { epoch })) => epoch,
                _ => break,
            };
            if attempt == 0 {
                self.misses.fetch_add(1, Ordering::Relaxed);
            }
            let from_postgres = self.pg()?.list(user_id, self.history_days)?;
            fail::fail_point!("list.after_postgres");
            match self.cache(|r| r.rebuild_list(user_id, &epoch, &from_postgres)) {
                Some(Ok(Some(items))) => return Ok(items),
                Some(Ok(None)) => {} // read before a change the feed applied since: read again
                _ => return Ok(from_postgres),
            }
        }
        // Redis is down, or PostgreSQL kept changing the user's rows: its newest rows, uncached.
        self.pg()?.list(user_id, self.history_days)
    }

    /// The conversation from the near cache, without waiting on anything: `None` sends the caller
    /// to [`CachedTier::get`].
    pub(crate) fn get_near(&self, conversation_id: &str, user_id: &str) -> Option<Fetched> {
        let cached = self.redis.get_near(user_id, conversation_id)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.tainted.remove(user_id, conversation_id);
        self.seen.record(user_id, conversation_id, cached.version);
        Some(Fetched::Cached(cached))
    }

    /// Every path of a save; whichever it took (even a failed one, which may have written), the
    /// near cache's copies go, so this process reads its own write at once.
    pub(crate) fn save(&self, conversation_id: &str, user_id: &str, conv: &Conversation) -> Result<()> {
        let result = self.save_any(conversation_id, user_id, conv);
        self.redis.forget(user_id, conversation_id);
        result
    }

    fn save_any(&self, conversation_id: &str, user_id: &str, conv: &Conversation) -> Result<()> {
        let tainted = self.tainted.get(user_id, conversation_id);
        let guard = tainted.is_some();
        let base = if guard { None } else { self.seen.get(user_id, conversation_id) };
        let mut options = SaveOptions { guard, base, ..SaveOptions::default() };
        let (mut asked_owner, mut kept_aside) = (false, 0);
        loop {
            let answer = self.cache(|r| r.save(user_id, conversation_id, conv, &options).map(|(outcome, _)| outcome));
            match save_step(answer.as_ref(), asked_owner, kept_aside) {
                SaveStep::Done => {
                    self.tainted.remove(user_id, conversation_id);
                    if let Some(Ok(SaveOutcome::Saved(version))) = answer {
                        self.seen.record(user_id, conversation_id, Some(version));
                    }
                    return Ok(());
                }
                SaveStep::AskOwner => {
                    asked_owner = true;
                    let floor = self.owner_floor(conversation_id, user_id)?;
                    options = SaveOptions { claim: true, floor, guard, replaces: None, base: None };
                }
                SaveStep::KeepAside => {
                    // The copy is kept aside, then replaced only if it is still the copy kept (a save
                    // that came meanwhile is kept aside in its turn). Fails closed: a copy that cannot
                    // be read or kept refuses the save.
                    kept_aside += 1;
                    let replaces = self.keep_overwritten(conversation_id, user_id)?;
                    options = SaveOptions { claim: true, guard: replaces.is_none(), replaces, floor: None, base: None };
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
                    return self.save_to_postgres(conversation_id, user_id, conv);
                }
            }
        }
    }

    /// Redis does not hold the conversation: PostgreSQL records the claim (unless the id has a row
    /// or a claim already) and says whether the id is another user's, and how new its row (or
    /// tombstone) is, the floor of the save's version. An id that cannot be checked is refused
    /// rather than claimed blind (docs/design.md, "Ownership").
    fn owner_floor(&self, conversation_id: &str, user_id: &str) -> Result<Option<i64>> {
        match self.pg().and_then(|pg| pg.claim(conversation_id, user_id)) {
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
    /// messages extend it.
    fn save_to_postgres(&self, conversation_id: &str, user_id: &str, conv: &Conversation) -> Result<()> {
        // Whatever the caller's copy was built from (a Redis read, a fallback read, an earlier
        // fallback save), the row it replaces is kept aside when the new messages do not extend
        // it: a save that cannot go through Redis is rare, and the extra read costs less than
        // guessing. (The randomized checker found a copy read from Redis that missed an earlier
        // fallback save's messages; and a tab whose requests alternate between instances may have
        // read its copy through another instance than the one whose own fallback read of this very
        // row it would otherwise trust.) The write replaces only the row that was checked. (Found
        // by the randomized checker: a save checked the row it read, then replaced the newer one a
        // flush had just written, whose messages were then nowhere.)
        let (version, kept) =
            self.pg()?.save_checked(conversation_id, user_id, conv, crate::writeback::REASON_OVERWRITTEN)?;
        for messages in kept {
            self.conflicts_kept.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "conversation {conversation_id:?} of user {user_id:?}: a save read from PostgreSQL while Redis did not \
                 answer replaced a copy with {messages} messages; that copy is kept in conversation_conflicts"
            );
        }
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
    pub(crate) fn delete(&self, conversation_id: &str, user_id: &str) -> Result<()> {
        self.seen.record(user_id, conversation_id, None);
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
    pub(crate) fn flush(&self, deadline: Option<Instant>, explicit: bool) -> Result<FlushReport> {
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

    pub(crate) fn stats(&self) -> CacheStats {
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
            feed: self
                .follower
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map(crate::feed::Follower::figures)
                .unwrap_or_default(),
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

impl crate::feed::Resolve for CachedTier {
    fn resolve(&self, members: &[String]) -> Result<()> {
        self.pg()?;
        self.flusher.flush_members(members).map(|_| ())
    }
}

impl CachedTier {
    /// Starts following PostgreSQL's changes (the change feed), once.
    pub(crate) fn start_following(self: &Arc<Self>) -> Result<()> {
        let mut follower = self.follower.lock().unwrap_or_else(PoisonError::into_inner);
        if follower.is_none() {
            let resolver: Arc<dyn crate::feed::Resolve> = Arc::clone(self) as Arc<dyn crate::feed::Resolve>;
            *follower = Some(crate::feed::Follower::start(
                Arc::clone(&self.redis),
                Arc::clone(&self.postgres),
                Arc::downgrade(&resolver),
            )?);
        }
        Ok(())
    }

    /// Stops following, waiting for a turn in progress until `deadline`.
    pub(crate) fn stop_following(&self, deadline: Instant) {
        if let Some(mut follower) = self.follower.lock().unwrap_or_else(PoisonError::into_inner).take() {
            follower.stop_until(deadline);
        }
    }
}

fn ownership(conversation_id: &str) -> Error {
    Error::new(ErrorKind::Ownership, format!("conversation {conversation_id:?} belongs to another user"))
}
