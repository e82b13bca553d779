//! The change feed's Redis side (docs/design.md, "Every cache follows PostgreSQL"): applying the
//! changes PostgreSQL committed to this Redis's copies, the lease that makes one process per Redis
//! follow them, the mark of how far it got, and the full resync when the mark is lost or too old.

use std::time::Duration;

use redis::Value;

use crate::cache::error::{CacheError, CacheResult};
use crate::cache::keys::{member, KeyLayout};
use crate::cache::nodes::{scan_node, scan_primaries};
use crate::cache::pool::Con;
use crate::cache::redis::{RedisCache, Spread};
use crate::cache::scripts;
use crate::cache::writes::{Bypass, DELETE_TOMBSTONE_SECONDS};

/// Changes per round trip, for the feed.
const FOLLOW_PER_PIPELINE: usize = 500;
/// Changes per round trip after writes sent straight to PostgreSQL: each pipeline runs under a
/// deadline, so fewer.
const INVALIDATE_PER_PIPELINE: usize = 100;

/// What [`RedisCache::follow`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Followed {
    /// Copies dropped.
    pub dropped: usize,
    /// Changes to conversations this Redis held no copy of.
    pub uncached: usize,
    /// Copies at least as new as the change: nothing to do (this tier's own write-back, mostly).
    pub current: usize,
    /// `<user>:<id>` members whose dirty copy is older than PostgreSQL's row: the caller flushes
    /// them, which resolves the divergence.
    pub diverged: Vec<String>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisCache {
    /// Applies changes PostgreSQL committed (see `follow.lua`), `Bypass` giving each one's row
    /// version (or tombstone version, for a delete). Without a deadline: the change feed's.
    pub fn follow(&self, changes: &[Bypass]) -> CacheResult<Followed> {
        self.follow_changes(changes, FOLLOW_PER_PIPELINE, false)
    }

    /// Brings Redis in line with writes this process sent straight to PostgreSQL (see
    /// `follow.lua`), in pipelines of a hundred, each under a deadline. Returns the `<user>:<id>`
    /// members whose dirty copy is older than PostgreSQL's row: the caller flushes them, which
    /// resolves the divergence.
    pub fn invalidate(&self, items: &[Bypass]) -> CacheResult<Vec<String>> {
        Ok(self.follow_changes(items, INVALIDATE_PER_PIPELINE, true)?.diverged)
    }

    fn follow_changes(&self, changes: &[Bypass], per_pipeline: usize, fenced: bool) -> CacheResult<Followed> {
        let l = self.layout()?;
        let mut followed = Followed::default();
        for chunk in changes.chunks(per_pipeline) {
            let deadline = if fenced { self.deadline_now() } else { String::new() };
            let mut spread = Spread::default();
            for item in chunk {
                let (user_id, conversation_id) = (item.user_id.as_str(), item.conversation_id.as_str());
                let keys = [
                    l.conv(user_id, conversation_id),
                    l.dirty_set(user_id),
                    l.user_dirty(user_id),
                    l.dirty_since(user_id),
                    l.list(user_id),
                    l.list_meta(user_id),
                    l.owner_for_script(user_id, conversation_id),
                    l.deleted(user_id, conversation_id),
                    l.changed(user_id, conversation_id),
                    l.list_epoch(user_id),
                ];
                let mut cmd = scripts::call(&scripts::FOLLOW, &keys);
                cmd.arg(member(user_id, conversation_id))
                    .arg(conversation_id)
                    .arg(item.version)
                    .arg(if item.deleted { "delete" } else { "save" })
                    .arg(user_id)
                    .arg(DELETE_TOMBSTONE_SECONDS)
                    .arg(l.owner_in_slot())
                    .arg(&deadline);
                spread.add(cmd, true);
            }
            let replies = self.query_spread(&spread)?;
            let mut owners = Spread::default();
            for (item, reply) in chunk.iter().zip(replies) {
                match redis::from_redis_value::<i64>(reply).unwrap_or(1) {
                    -4 => return Err(CacheError::Unavailable("Redis applied a change after its deadline".into())),
                    0 => followed.current += 1,
                    2 => followed.diverged.push(member(&item.user_id, &item.conversation_id)),
                    dropped => {
                        if dropped == 3 {
                            followed.uncached += 1;
                        } else {
                            followed.dropped += 1;
                        }
                        if l == KeyLayout::Cluster {
                            // The owner record is in the id's own slot; a dropped copy takes it along.
                            let mut cmd = scripts::call(&scripts::RELEASE, &[l.owner(&item.conversation_id)]);
                            cmd.arg(&item.user_id).arg("").arg(&deadline);
                            owners.add(cmd, false);
                        }
                    }
                }
            }
            self.query_spread(&owners)?;
        }
        Ok(followed)
    }

    /// Takes or renews the change feed's lease for `ttl`. `None`: another process holds it;
    /// otherwise the mark it had reached (`None` when there is none: a Redis new or emptied).
    pub fn feed_claim(&self, token: &str, ttl: Duration) -> CacheResult<Option<Option<String>>> {
        let l = self.layout()?;
        let mut cmd = scripts::call(&scripts::FEED_CLAIM, &[l.feed_lease(), l.feed_mark()]);
        cmd.arg(token).arg(millis(ttl));
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let (reply,): (Vec<Value>,) = self.query(&pipe)?;
        let mut reply = reply.into_iter();
        let held = reply.next().map(redis::from_redis_value::<i64>);
        if !matches!(held, Some(Ok(1))) {
            return Ok(None);
        }
        let mark: String = reply.next().map_or(Ok(String::new()), redis::from_redis_value).unwrap_or_default();
        Ok(Some((!mark.is_empty()).then_some(mark)))
    }

    /// Records the mark and renews the lease; `false` when the lease is another process's.
    pub fn feed_advance(&self, token: &str, mark: &str, ttl: Duration) -> CacheResult<bool> {
        let l = self.layout()?;
        let mut cmd = scripts::call(&scripts::FEED_MARK, &[l.feed_lease(), l.feed_mark()]);
        cmd.arg(token).arg(mark).arg(millis(ttl));
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let (held,): (i64,) = self.query(&pipe)?;
        Ok(held == 1)
    }

    /// The full resync: drops every clean copy and every cached list, on every primary. Dirty
    /// copies stay; the flush writes them back, resolving any divergence. Returns how many copies
    /// went.
    pub fn drop_clean_copies(&self) -> CacheResult<usize> {
        let l = self.layout()?;
        let (conversations, lists) = l.copies_patterns();
        let scan = |pattern: &str| {
            self.run_on(|conn| match &mut conn.con {
                Con::Single(single) => scan_node(|scan| scan.query(single), pattern),
                Con::Cluster(cluster) => scan_primaries(cluster, pattern),
            })
        };
        let mut dropped = 0;
        for chunk in scan(conversations)?.chunks(FOLLOW_PER_PIPELINE) {
            let mut spread = Spread::default();
            for key in chunk {
                spread.add(scripts::call(&scripts::DROP_CLEAN, &[key]), true);
            }
            dropped += self.query_spread(&spread)?.into_iter().filter(|v| matches!(v, Value::Int(1))).count();
        }
        for pattern in lists {
            for chunk in scan(pattern)?.chunks(FOLLOW_PER_PIPELINE) {
                let mut spread = Spread::default();
                for key in chunk {
                    spread.add(redis::cmd("DEL").arg(key).clone(), false);
                }
                self.query_spread(&spread)?;
            }
        }
        Ok(dropped)
    }
}
