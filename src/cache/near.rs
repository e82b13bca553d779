//! The near cache: conversations and lists read from Redis, kept in the process so that a repeated
//! read costs no round trip, and never served once Redis could have changed them without telling
//! us (docs/design.md, "The near cache").
//!
//! Redis keeps it correct: the tracker ([`crate::cache::tracking`]) holds one connection per node
//! with `CLIENT TRACKING ... BCAST`, so every change of a key under our prefixes, by any client,
//! an expiry or an eviction, arrives as an invalidation that drops the copy. Three rules make that
//! enough:
//! - **Leases.** Every 100 ms the tracker publishes a heartbeat that only the tracking connection
//!   hears. Once it is read, every invalidation Redis queued before it has been applied, so the
//!   copies are vouched for as of the instant the heartbeat was sent. Copies are served only while
//!   the oldest such instant across the nodes is under [`LEASE`] old: a tracking connection that is
//!   cut, stalled or partitioned stops the near cache within that bound, whether or not its socket
//!   reports the loss.
//! - **Placeholders.** A read that may fill the cache first leaves a placeholder with a fresh token;
//!   an invalidation (or a loss of tracking) removes it, and the reply is stored only when its
//!   placeholder is still there. An invalidation that arrives while the read is in flight therefore
//!   never leaves the old copy behind.
//! - **Losses empty the cache.** A tracking connection that fails, a node added or removed, a
//!   refused `CLIENT TRACKING`: every copy is dropped and none is served or stored until every node
//!   is tracked again.
//!
//! The process's own writes drop the copy synchronously ([`NearCache::forget`]), so it reads them at
//! once without waiting for their invalidation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::cache::codec::CachedConversation;
use crate::model::Conversation;

/// How long a node's last heartbeat vouches for the copies.
pub const LEASE: Duration = Duration::from_millis(500);

/// A user's list as the near cache holds it.
pub type Listing = Vec<(String, Conversation)>;

/// A copy the near cache holds.
#[derive(Debug, Clone)]
pub enum NearValue {
    /// A conversation's hash.
    Conversation(Arc<CachedConversation>),
    /// A user's list.
    List(Arc<Listing>),
}

impl NearValue {
    fn weight(&self) -> usize {
        match self {
            NearValue::Conversation(c) => c.weight(),
            NearValue::List(items) => {
                items.capacity() * std::mem::size_of::<(String, Conversation)>()
                    + items
                        .iter()
                        .map(|(id, c)| {
                            id.capacity() + c.title.capacity() + c.model.capacity() + c.messages.capacity() * 64
                        })
                        .sum::<usize>()
            }
        }
    }
}

/// What a lookup found.
enum Lookup {
    Hit(NearValue),
    Miss,
    /// Nothing is vouched for now (`get` counts it as a miss: the read goes to Redis).
    NotServing,
}

/// A read in flight that may fill the cache: see [`NearCache::begin_fill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillToken(u64);

enum Slot {
    Pending(FillToken),
    Ready { value: NearValue, weight: usize, filled: Instant },
}

struct Entry {
    slot: Slot,
    /// A second Redis key whose change drops this entry too (a list's entries hash).
    alias: Option<String>,
}

struct State {
    /// By the Redis key whose change drops them.
    entries: LruCache<String, Entry>,
    aliases: HashMap<String, String>,
    bytes: usize,
    next_token: u64,
    /// Microseconds since `NearCache::epoch` until which the tracking vouches for the copies; 0
    /// while a node is not tracked. Written under this lock, so an emptying and the end of the
    /// vouching are one step for fills.
    valid_until: u64,
}

impl State {
    fn remove(&mut self, key: &str) -> bool {
        let Some(entry) = self.entries.pop(key) else { return false };
        if let Slot::Ready { weight, .. } = entry.slot {
            self.bytes -= weight;
        }
        if let Some(alias) = entry.alias {
            self.aliases.remove(&alias);
        }
        true
    }

    fn clear(&mut self) -> usize {
        let dropped = self.entries.len();
        self.entries.clear();
        self.aliases.clear();
        self.bytes = 0;
        dropped
    }
}

/// The tracking state of the nodes.
struct Links {
    /// Per node: when the last heartbeat read back had been sent (µs since the epoch), or
    /// `None` while the node is not tracked.
    acked: Vec<Option<u64>>,
    /// Bumped by each [`NearCache::track_nodes`].
    generation: u64,
}

/// Figures for `stats()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NearStats {
    /// Reads answered from the process.
    pub hits: u64,
    /// Reads that asked and went to Redis: no copy to serve, or not serving (tracking not up yet,
    /// or lost), so the hit rate is never overstated.
    pub misses: u64,
    /// Copies dropped because Redis said their key changed.
    pub invalidations: u64,
    /// Copies dropped to stay within the byte bound.
    pub evictions: u64,
    /// Times tracking was lost and the cache emptied.
    pub resets: u64,
    /// Copies held.
    pub entries: u64,
    /// Bytes they occupy (approximately: strings and indexes).
    pub bytes: u64,
    /// The bound, `near_cache_bytes`.
    pub limit: u64,
    /// Whether every node is tracked and vouching now, so copies are served.
    pub tracking: bool,
}

/// Every live near cache of the process, so a write through one manager drops the copies every
/// other manager of the process holds (a process reads its own writes at once, whichever manager
/// made them). A cache of another Redis that happens to hold the same key names only refills.
static LIVE: Mutex<Vec<Weak<NearCache>>> = Mutex::new(Vec::new());

/// Drops `keys` from every near cache of the process.
///
/// Only those made in this process: a forked child's managers open new near caches, and the
/// parent's, which the child inherits and never frees, are left alone (and out of the registry). A
/// tracking thread of the parent may have held one's lock at the fork, and no thread of the child
/// would ever release it.
pub fn forget_everywhere<K: AsRef<str>>(keys: &[K]) {
    let generation = crate::process::fork_generation();
    let live: Vec<Arc<NearCache>> = {
        let mut registry = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
        let mut live = Vec::with_capacity(registry.len());
        registry.retain(|weak| match weak.upgrade() {
            Some(near) if near.generation == generation => {
                live.push(near);
                true
            }
            _ => false,
        });
        live
    };
    for near in live {
        for key in keys {
            near.forget(key.as_ref());
        }
    }
}

/// The near cache of one manager.
pub struct NearCache {
    /// The process's fork generation when it was made (see [`forget_everywhere`]).
    generation: u64,
    limit: usize,
    /// A copy older than this is read from Redis again (which refreshes its TTL there).
    max_age: Duration,
    epoch: Instant,
    state: Mutex<State>,
    links: Mutex<Links>,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    evictions: AtomicU64,
    resets: AtomicU64,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache").field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl NearCache {
    /// As [`NearCache::new`], registered so the process's writes through any manager reach it.
    #[must_use]
    pub fn register(limit: usize, max_age: Duration) -> Arc<Self> {
        let near = Arc::new(NearCache::new(limit, max_age));
        LIVE.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::downgrade(&near));
        near
    }

    /// An empty cache of at most `limit` bytes that serves nothing until its nodes are tracked.
    #[must_use]
    pub fn new(limit: usize, max_age: Duration) -> Self {
        NearCache {
            generation: crate::process::fork_generation(),
            limit,
            max_age,
            // Before any instant a caller can name (tests name ones in the past).
            epoch: Instant::now().checked_sub(Duration::from_secs(3600)).unwrap_or_else(Instant::now),
            state: Mutex::new(State {
                entries: LruCache::unbounded(),
                aliases: HashMap::new(),
                bytes: 0,
                next_token: 0,
                valid_until: 0,
            }),
            links: Mutex::new(Links { acked: Vec::new(), generation: 0 }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn links(&self) -> MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    fn vouched(&self, state: &State) -> bool {
        state.valid_until > self.micros(Instant::now())
    }

    /// The copy under `key`, when tracking vouches for it and it is not too old to serve; counted
    /// as a hit, else as a miss (a read made before tracking is up, or after it was lost, went to
    /// Redis all the same).
    pub fn get(&self, key: &str) -> Option<NearValue> {
        match self.lookup(key) {
            Lookup::Hit(value) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(value)
            }
            Lookup::Miss | Lookup::NotServing => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// As [`NearCache::get`], counting only a hit: for a first look that a full read follows
    /// when it finds nothing.
    pub fn peek(&self, key: &str) -> Option<NearValue> {
        let Lookup::Hit(value) = self.lookup(key) else { return None };
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(value)
    }

    fn lookup(&self, key: &str) -> Lookup {
        let mut state = self.state();
        if !self.vouched(&state) {
            return Lookup::NotServing;
        }
        match state.entries.get(key) {
            Some(Entry { slot: Slot::Ready { value, filled, .. }, .. }) if filled.elapsed() < self.max_age => {
                Lookup::Hit(value.clone())
            }
            _ => Lookup::Miss,
        }
    }

    /// Before a read from Redis that may fill `key` (and `alias`): leaves a placeholder, unless
    /// tracking does not vouch now (then the read fills nothing).
    pub fn begin_fill(&self, key: &str, alias: Option<&str>) -> Option<FillToken> {
        let mut state = self.state();
        if !self.vouched(&state) {
            return None;
        }
        state.remove(key);
        if let Some(alias) = alias {
            if let Some(owner) = state.aliases.get(alias).cloned() {
                state.remove(&owner);
            }
            state.aliases.insert(alias.to_owned(), key.to_owned());
        }
        state.next_token += 1;
        let token = FillToken(state.next_token);
        state.entries.push(key.to_owned(), Entry { slot: Slot::Pending(token), alias: alias.map(str::to_owned) });
        Some(token)
    }

    /// After the read: stores `value` if the placeholder is still there (no invalidation and no
    /// loss of tracking came in between) and it fits; `None` just removes the placeholder.
    pub fn finish_fill(&self, key: &str, token: FillToken, value: Option<NearValue>) {
        let mut state = self.state();
        let ours = matches!(state.entries.peek(key), Some(Entry { slot: Slot::Pending(t), .. }) if *t == token);
        if !ours {
            return;
        }
        let weight = value.as_ref().map_or(0, |v| v.weight() + key.len() * 2);
        match value {
            Some(value) if self.vouched(&state) && weight <= self.limit => {
                if let Some(entry) = state.entries.get_mut(key) {
                    entry.slot = Slot::Ready { value, weight, filled: Instant::now() };
                }
                state.bytes += weight;
                let mut evicted = 0;
                while state.bytes > self.limit {
                    let Some((lru_key, _)) = state.entries.peek_lru() else { break };
                    let lru_key = lru_key.clone();
                    state.remove(&lru_key);
                    evicted += 1;
                }
                if evicted > 0 {
                    self.evictions.fetch_add(evicted, Ordering::Relaxed);
                }
            }
            _ => {
                state.remove(key);
            }
        }
    }

    /// Drops the copies of keys Redis says changed. Returns how many were dropped.
    pub fn invalidate<K: AsRef<[u8]>>(&self, keys: &[K]) -> usize {
        let mut state = self.state();
        fail::fail_point!("near.invalidate.locked");
        let mut dropped = 0;
        for key in keys {
            let Ok(key) = std::str::from_utf8(key.as_ref()) else { continue };
            if state.remove(key) {
                dropped += 1;
            } else if let Some(owner) = state.aliases.get(key).cloned() {
                state.remove(&owner);
                dropped += 1;
            }
        }
        drop(state);
        self.invalidations.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    /// Redis dropped every key (FLUSHALL, FLUSHDB): every copy goes.
    pub fn invalidate_all(&self) {
        let dropped = self.state().clear();
        self.invalidations.fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// A write of this process: its copy goes now, so the next read sees the write.
    pub fn forget(&self, key: &str) {
        self.state().remove(key);
    }

    /// The tracker follows `nodes` nodes from now on, none of them tracked yet: nothing is served
    /// until each has echoed a heartbeat.
    /// Returns the generation the node threads pass back, so a thread of an earlier set of nodes
    /// is not heard.
    pub fn track_nodes(&self, nodes: usize) -> u64 {
        let mut links = self.links();
        if nodes > 0 && links.acked.iter().any(Option::is_some) {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        links.acked = vec![None; nodes];
        links.generation += 1;
        self.reset();
        links.generation
    }

    /// Node `node`'s tracking connection is gone (or never came): every copy goes, and none is
    /// served or stored until it is back.
    pub fn lost(&self, generation: u64, node: usize) {
        let mut links = self.links();
        if links.generation != generation {
            return;
        }
        if let Some(slot) = links.acked.get_mut(node) {
            if slot.is_none() {
                return;
            }
            *slot = None;
        }
        // Under the links lock, so an acknowledgement of another node cannot vouch again meanwhile.
        self.reset();
        self.resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Nothing is vouched for and every copy (and placeholder) goes, in one step for fills.
    fn reset(&self) {
        let mut state = self.state();
        state.valid_until = 0;
        state.clear();
    }

    /// Node `node` echoed a heartbeat sent at `sent`, after every invalidation queued before it was
    /// applied: the copies are vouched for until the oldest node's acknowledgement plus [`LEASE`].
    pub fn acked(&self, generation: u64, node: usize, sent: Instant) {
        let mut links = self.links();
        if links.generation != generation {
            return;
        }
        let sent = self.micros(sent);
        if let Some(slot) = links.acked.get_mut(node) {
            *slot = Some(sent);
        }
        let oldest = links.acked.iter().copied().collect::<Option<Vec<u64>>>().and_then(|a| a.into_iter().min());
        let lease = u64::try_from(LEASE.as_micros()).unwrap_or(u64::MAX);
        self.state().valid_until = oldest.map_or(0, |oldest| oldest.saturating_add(lease));
    }

    /// Figures for `stats()`.
    #[must_use]
    pub fn stats(&self) -> NearStats {
        let state = self.state();
        let entries = state.entries.iter().filter(|(_, e)| matches!(e.slot, Slot::Ready { .. })).count();
        NearStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            entries: entries as u64,
            bytes: state.bytes as u64,
            limit: self.limit as u64,
            tracking: self.vouched(&state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timestamp;

    fn list(n: usize) -> NearValue {
        let now = Timestamp::now();
        let conv = Conversation {
            title: "t".repeat(100),
            model: "m".into(),
            messages: Vec::new(),
            created_at: now,
            last_modified: now,
        };
        NearValue::List(Arc::new((0..n).map(|i| (format!("id{i}"), conv.clone())).collect()))
    }

    fn tracked() -> NearCache {
        let near = NearCache::new(1 << 20, Duration::from_secs(60));
        let g = near.track_nodes(1);
        near.acked(g, 0, Instant::now());
        near
    }

    fn fill(near: &NearCache, key: &str, value: NearValue) {
        let token = near.begin_fill(key, None).expect("tracking vouches");
        near.finish_fill(key, token, Some(value));
    }

    #[test]
    fn nothing_is_served_or_stored_until_every_node_answered() {
        let near = NearCache::new(1 << 20, Duration::from_secs(60));
        let g = near.track_nodes(2);
        assert!(near.begin_fill("k", None).is_none());
        near.acked(g, 0, Instant::now());
        assert!(near.begin_fill("k", None).is_none(), "one node of two vouches for nothing");
        near.acked(g - 1, 1, Instant::now());
        assert!(near.begin_fill("k", None).is_none(), "an earlier generation's thread is not heard");
        near.acked(g, 1, Instant::now());
        fill(&near, "k", list(1));
        assert!(near.get("k").is_some());
    }

    #[test]
    fn a_read_before_tracking_is_up_is_a_miss() {
        let near = NearCache::new(1 << 20, Duration::from_secs(60));
        assert!(near.get("k").is_none());
        assert!(near.peek("k").is_none(), "a first look that a full read follows counts nothing");
        let stats = near.stats();
        assert_eq!((stats.hits, stats.misses, stats.tracking), (0, 1, false));
        let near = tracked();
        fill(&near, "k", list(1));
        assert!(near.get("k").is_some() && near.get("other").is_none());
        assert_eq!((near.stats().hits, near.stats().misses), (1, 1));
    }

    #[test]
    fn an_invalidation_during_a_read_keeps_its_reply_out() {
        let near = tracked();
        let token = near.begin_fill("k", None).unwrap();
        assert_eq!(near.invalidate(&["k"]), 1);
        near.finish_fill("k", token, Some(list(1)));
        assert!(near.get("k").is_none());
        assert_eq!(near.stats().entries, 0);
    }

    #[test]
    fn a_loss_during_a_read_keeps_its_reply_out_after_tracking_returns() {
        let near = tracked();
        let token = near.begin_fill("k", None).unwrap();
        near.lost(1, 0);
        near.acked(1, 0, Instant::now());
        near.finish_fill("k", token, Some(list(1)));
        assert!(near.get("k").is_none());
    }

    #[test]
    fn a_lapsed_lease_stops_serving_without_a_loss() {
        let near = tracked();
        fill(&near, "k", list(1));
        near.acked(1, 0, Instant::now().checked_sub(LEASE * 2).unwrap());
        assert!(near.get("k").is_none());
        near.acked(1, 0, Instant::now());
        assert!(near.get("k").is_some(), "the copy was never invalidated, only unvouched");
    }

    #[test]
    fn a_lost_node_empties_the_cache() {
        let near = tracked();
        fill(&near, "a", list(1));
        fill(&near, "b", list(1));
        near.lost(1, 0);
        near.acked(1, 0, Instant::now());
        assert!(near.get("a").is_none() && near.get("b").is_none());
        assert_eq!(near.stats().bytes, 0);
    }

    #[test]
    fn the_alias_drops_the_entry() {
        let near = tracked();
        let token = near.begin_fill("list", Some("meta")).unwrap();
        near.finish_fill("list", token, Some(list(2)));
        assert!(near.get("list").is_some());
        near.invalidate(&["meta"]);
        assert!(near.get("list").is_none());
        assert!(near.state().aliases.is_empty());
    }

    #[test]
    fn the_byte_bound_evicts_the_least_recently_used() {
        let weight = list(10).weight() + 4;
        let near = NearCache::new(weight * 3, Duration::from_secs(60));
        let g = near.track_nodes(1);
        near.acked(g, 0, Instant::now());
        for key in ["k1", "k2", "k3"] {
            fill(&near, key, list(10));
        }
        assert!(near.get("k1").is_some()); // k2 is now the least recently used
        fill(&near, "k4", list(10));
        assert!(near.get("k2").is_none());
        assert!(near.get("k1").is_some() && near.get("k3").is_some() && near.get("k4").is_some());
        let stats = near.stats();
        assert!(stats.bytes <= stats.limit, "{stats:?}");
        assert_eq!(stats.evictions, 1);
    }

    #[test]
    fn a_copy_bigger_than_the_bound_is_not_kept() {
        let near = NearCache::new(100, Duration::from_secs(60));
        let g = near.track_nodes(1);
        near.acked(g, 0, Instant::now());
        fill(&near, "k", list(10));
        assert!(near.get("k").is_none());
        assert_eq!(near.stats().bytes, 0);
    }

    #[test]
    fn an_old_copy_is_read_again() {
        let near = NearCache::new(1 << 20, Duration::from_millis(1));
        let g = near.track_nodes(1);
        near.acked(g, 0, Instant::now());
        fill(&near, "k", list(1));
        std::thread::sleep(Duration::from_millis(5));
        near.acked(1, 0, Instant::now());
        assert!(near.get("k").is_none());
    }

    #[test]
    fn a_write_through_one_manager_drops_every_managers_copy() {
        let registered = || {
            let near = NearCache::register(1 << 20, Duration::from_secs(60));
            let g = near.track_nodes(1);
            near.acked(g, 0, Instant::now());
            near
        };
        let (first, second) = (registered(), registered());
        fill(&first, "k", list(1));
        fill(&second, "k", list(1));
        forget_everywhere(&["k"]);
        assert!(first.get("k").is_none() && second.get("k").is_none());
    }

    #[test]
    fn forget_and_invalidate_all_drop_copies() {
        let near = tracked();
        fill(&near, "a", list(1));
        fill(&near, "b", list(1));
        near.forget("a");
        assert!(near.get("a").is_none() && near.get("b").is_some());
        near.invalidate_all();
        assert!(near.get("b").is_none());
        assert_eq!(near.stats().invalidations, 1);
    }
}
