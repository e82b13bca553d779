//! The Redis side of saves, reads that fill the cache, deletes and list rebuilds.

use std::sync::PoisonError;

use redis::Value;

use crate::cache::codec::{parse_listing, stage, ListEntry, STAGED_TTL_SECONDS};
use crate::cache::error::{CacheError, CacheResult};
use crate::cache::keys::{fresh_token, late_member, member, KeyLayout};
use crate::cache::redis::{RedisCache, LIST_TTL_SECONDS};
use crate::cache::scripts;
use crate::model::Conversation;

/// How long a delete keeps reads from re-caching the deleted conversation.
pub(crate) const DELETE_TOMBSTONE_SECONDS: u64 = 60;
/// Times a list rebuild reads the dirty ids again when a save changed them meanwhile.
const REBUILD_ATTEMPTS: usize = 5;

/// What a delete did in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The copy (if any) and every trace of it are gone.
    Removed,
    /// Redis holds a save newer than PostgreSQL's tombstone, at this version: it landed between
    /// PostgreSQL's step and this one, and nothing was removed.
    Overtaken(i64),
}

/// What a save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Stored and marked dirty under this version.
    Saved(i64),
    /// Redis does not know who owns the id: ask PostgreSQL, then save again with `claim`.
    OwnerUnknown,
    /// Another user owns the id.
    OtherOwner,
    /// Saved with `guard`: Redis holds a copy that the new messages do not extend; nothing was
    /// stored.
    Diverged,
}

/// A save to make in Redis.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// The caller found out from PostgreSQL that the id is free or the user's.
    pub claim: bool,
    /// The version of PostgreSQL's row, when known: the save's version goes past it.
    pub floor: Option<i64>,
    /// Refuse to replace a copy that the new messages do not extend.
    pub guard: bool,
    /// Replace only the copy with this mark (see [`copy_mark`]): the one the caller kept aside.
    pub replaces: Option<String>,
    /// The version of the copy this process last read or saved: a copy Redis holds at another
    /// version is replaced only if the new messages extend it (else [`SaveOutcome::Diverged`]).
    pub base: Option<i64>,
}

/// What identifies a cached copy for [`SaveOptions::replaces`]: its version, `last_modified`, and
/// the byte lengths of its transcript and title, as `save.lua` computes them.
#[must_use]
pub fn copy_mark(version: Option<i64>, mark: &crate::cache::codec::ReadMark) -> String {
    format!(
        "{}|{}|{}|{}",
        version.map(|v| v.to_string()).unwrap_or_default(),
        mark.last_modified,
        mark.messages_len,
        mark.title_len
    )
}

/// A write that went straight to PostgreSQL: Redis must not keep serving an older copy of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bypass {
    /// The owner.
    pub user_id: String,
    /// The id.
    pub conversation_id: String,
    /// PostgreSQL's version after the write (the tombstone's, for a delete).
    pub version: i64,
    /// A delete rather than a save.
    pub deleted: bool,
}

/// True only in a test that turned on the `save.lose_staged` failpoint.
fn staged_lost() -> bool {
    fail::fail_point!("save.lose_staged", |_| true);
    false
}

/// True only in a test that turned on the `save.index_fails` failpoint.
fn index_fails() -> bool {
    fail::fail_point!("save.index_fails", |_| true);
    false
}

impl RedisCache {
    /// Stores the conversation as dirty, without a TTL, and updates the user's cached list: one
    /// round trip (a pipeline of the staged fields and the script). Returns the stored
    /// `created_at` too (an existing one is kept, as PostgreSQL does).
    pub fn save(
        &self,
        user_id: &str,
        conversation_id: &str,
        conv: &Conversation,
        options: &SaveOptions,
    ) -> CacheResult<(SaveOutcome, Option<String>)> {
        let l = self.layout()?;
        // On a cluster the owner record is in the id's own slot: claimed first, then the save
        // (docs/design.md, "Ownership").
        if options.claim && l == KeyLayout::Cluster && !self.claim(user_id, conversation_id)? {
            return Ok((SaveOutcome::OtherOwner, None));
        }
        let meta = ListEntry::to_json(conv);
        let token = fresh_token();
        let staged = l.staged_as(user_id, conversation_id, &token);
        let keys = [
            l.conv(user_id, conversation_id),
            l.dirty_set(user_id),
            l.list(user_id),
            l.list_meta(user_id),
            l.user_dirty(user_id),
            l.owner_for_script(user_id, conversation_id),
            l.dirty_since(user_id),
            l.deleted(user_id, conversation_id),
            staged.clone(),
            l.late_copy(user_id, conversation_id, &token),
            l.late_set(user_id),
        ];
        let created_at = conv.created_at.to_string();
        // The list's score, as the staged hash has it (`score`).
        let score = conv.last_modified.unix_seconds();
        let late = late_member(user_id, conversation_id, &token);
        let member = member(user_id, conversation_id);
        let mut stage_pipe = redis::pipe();
        let staged = if staged_lost() { format!("{staged}:lost") } else { staged };
        stage(&mut stage_pipe, &staged, conv, &[], self.settings.compression, STAGED_TTL_SECONDS);
        let (reply,): (Vec<Value>,) = self.query_fenced(|deadline| {
            let mut script = scripts::call(&scripts::SAVE, &keys);
            script
                .arg(&member)
                .arg(user_id)
                .arg(&created_at)
                .arg(&meta)
                .arg(if options.claim { "1" } else { "0" })
                .arg(conversation_id)
                .arg(options.floor.unwrap_or(0))
                .arg(if options.guard { "1" } else { "0" })
                .arg(l.owner_in_slot())
                .arg(deadline)
                .arg(&late)
                .arg(options.replaces.as_ref().map_or("", |m| m.as_str()))
                .arg(options.base.map(|v| v.to_string()).unwrap_or_default())
                .arg(score);
            let mut pipe = stage_pipe.clone();
            pipe.add_command(script);
            pipe
        })?;
        let status = reply.first().and_then(|v| redis::from_redis_value_ref::<i64>(v).ok()).unwrap_or(-2);
        Ok(match status {
            1 => {
                let version = reply
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    .and_then(|v| v.parse().ok());
                let created = reply.get(2).and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
                let first = reply.get(3).and_then(|v| redis::from_redis_value_ref::<i64>(v).ok()) == Some(1);
                if first {
                    // The user had nothing dirty: into the index, after the script (see
                    // `unindex_clean_users` for why this order). The save is in Redis, dirty, either
                    // way: an entry that cannot be written now (a failover of the index's node) is
                    // written before the next walk or count of the index, not turned into a failed
                    // save, which would also go to PostgreSQL and leave the user out of the index.
                    let indexed = if index_fails() {
                        Err(CacheError::Unavailable("the save.index_fails failpoint".into()))
                    } else {
                        self.index_dirty_user(user_id)
                    };
                    if let Err(e) = indexed {
                        log::warn!("user {user_id:?} goes into the dirty index later: {}", e.into_error());
                        self.unindexed.lock().unwrap_or_else(PoisonError::into_inner).push(user_id.to_owned());
                    }
                }
                (SaveOutcome::Saved(version.unwrap_or(0)), created)
            }
            0 => (SaveOutcome::OwnerUnknown, None),
            -1 => (SaveOutcome::OtherOwner, None),
            2 => (SaveOutcome::Diverged, None),
            // Past its deadline: the caller had (or would have) given up on it by now, so it is a
            // timeout as far as the caller knows; Redis kept the copy aside if it had to.
            -4 => {
                return Err(CacheError::Unavailable("Redis ran the save after its deadline (a late delivery)".into()))
            }
            // Refused like a write Redis had no memory for: the caller saves to PostgreSQL.
            -3 => return Err(CacheError::Other("the staged copy vanished before the save script ran".into())),
            _ => return Err(CacheError::Other(format!("unexpected reply to the save script: {reply:?}"))),
        })
    }

    /// Caches a clean copy read from PostgreSQL (with its TTL), unless Redis has something newer.
    pub fn backfill(
        &self,
        user_id: &str,
        conversation_id: &str,
        conv: &Conversation,
        version: Option<i64>,
    ) -> CacheResult<()> {
        let l = self.layout()?;
        let staged = l.staged(user_id, conversation_id);
        let keys = [
            l.conv(user_id, conversation_id),
            l.owner_for_script(user_id, conversation_id),
            l.deleted(user_id, conversation_id),
            staged.clone(),
            l.changed(user_id, conversation_id),
        ];
        // With a version, PostgreSQL holds exactly these messages at it.
        let stored = version.map(|v| {
            (
                conv.messages.len().to_string(),
                v.to_string(),
                crate::model::messages_fingerprint(&conv.messages).to_string(),
            )
        });
        let ver = version.unwrap_or(0).to_string();
        let mut fields = vec![("dirty", "0"), ("ver", ver.as_str())];
        if let Some((n, v, h)) = &stored {
            fields.extend([("pgn", n.as_str()), ("pgv", v.as_str()), ("pgh", h.as_str())]);
        }
        let mut stage_pipe = redis::pipe();
        stage(&mut stage_pipe, &staged, conv, &fields, self.settings.compression, self.ttl());
        self.send_fenced(|deadline| {
            let mut script = scripts::call(&scripts::BACKFILL, &keys);
            script.arg(user_id).arg(l.owner_in_slot()).arg(deadline).arg(&ver);
            let mut pipe = stage_pipe.clone();
            pipe.add_command(script);
            pipe
        })
    }

    /// Whether the user may delete the id as far as Redis knows, and the version Redis holds (0
    /// when none): `Ok(None)` when the id is another user's. Changes nothing, so a delete can ask
    /// PostgreSQL first and leave everything as it was when PostgreSQL refuses.
    pub fn peek_delete(&self, user_id: &str, conversation_id: &str) -> CacheResult<Option<i64>> {
        let (owner_key, conv_key) =
            (self.layout()?.owner(conversation_id), self.layout()?.conv(user_id, conversation_id));
        let (owner, version): (Option<String>, Option<String>) = if self.layout()? == KeyLayout::Seed {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(&owner_key).cmd("HGET").arg(&conv_key).arg("ver");
            self.query(&pipe)?
        } else {
            // Two slots on a cluster: two commands.
            (
                self.command(redis::cmd("GET").arg(&owner_key))?,
                self.command(redis::cmd("HGET").arg(&conv_key).arg("ver"))?,
            )
        };
        if owner.is_some_and(|o| o != user_id) {
            return Ok(None);
        }
        Ok(Some(version.and_then(|v| v.parse().ok()).unwrap_or(0)))
    }

    /// Removes the conversation from every key, after PostgreSQL deleted it under `tombstone`.
    /// `Ok(None)` when the id is another user's; `Ok(Some(Deleted::Overtaken(version)))`, with
    /// nothing changed, when Redis holds a save newer than the tombstone.
    pub fn delete(&self, user_id: &str, conversation_id: &str, tombstone: i64) -> CacheResult<Option<Deleted>> {
        let l = self.layout()?;
        let keys = [
            l.conv(user_id, conversation_id),
            l.dirty_set(user_id),
            l.list(user_id),
            l.list_meta(user_id),
            l.user_dirty(user_id),
            l.owner_for_script(user_id, conversation_id),
            l.dirty_since(user_id),
            l.deleted(user_id, conversation_id),
        ];
        let member = member(user_id, conversation_id);
        let (reply,): (Vec<Value>,) = self.query_fenced(|deadline| {
            let mut script = scripts::call(&scripts::DELETE, &keys);
            script
                .arg(&member)
                .arg(conversation_id)
                .arg(user_id)
                .arg(DELETE_TOMBSTONE_SECONDS)
                .arg(l.owner_in_slot())
                .arg(deadline)
                .arg(tombstone);
            let mut pipe = redis::pipe();
            pipe.add_command(script);
            pipe
        })?;
        match reply.first().and_then(|v| redis::from_redis_value_ref::<i64>(v).ok()).unwrap_or(-2) {
            1 => {}
            -1 => return Ok(None),
            -5 => {
                let version = reply
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(i64::MAX);
                return Ok(Some(Deleted::Overtaken(version)));
            }
            -4 => return Err(CacheError::Unavailable("Redis ran the delete after its deadline".into())),
            _ => return Err(CacheError::Other(format!("unexpected reply to the delete script: {reply:?}"))),
        }
        if l == KeyLayout::Cluster {
            self.release_owner(user_id, conversation_id, None)?;
        }
        Ok(Some(Deleted::Removed))
    }

    /// Cluster: claims the id in its own slot for the user (see docs/design.md, "Ownership");
    /// false when another user holds it.
    pub fn claim(&self, user_id: &str, conversation_id: &str) -> CacheResult<bool> {
        let owner = self.layout()?.owner(conversation_id);
        let (claimed,): (i64,) = self.query_fenced(|deadline| {
            let mut pipe = redis::pipe();
            let mut cmd = scripts::call(&scripts::CLAIM, &[&owner]);
            cmd.arg(user_id).arg(deadline);
            pipe.add_command(cmd);
            pipe
        })?;
        if claimed == -4 {
            return Err(CacheError::Unavailable("Redis ran the claim after its deadline".into()));
        }
        Ok(claimed == 1)
    }

    /// Cluster: removes the id's owner record if it is the user's, or (with `ttl`) gives it one.
    pub(crate) fn release_owner(&self, user_id: &str, conversation_id: &str, ttl: Option<u64>) -> CacheResult<()> {
        let owner = self.layout()?.owner(conversation_id);
        self.query_fenced(|deadline| {
            let mut pipe = redis::pipe();
            let mut cmd = scripts::call(&scripts::RELEASE, &[&owner]);
            cmd.arg(user_id).arg(ttl.map(|t| t.to_string()).unwrap_or_default()).arg(deadline);
            pipe.add_command(cmd).ignore();
            pipe
        })
    }

    /// Rebuilds the user's list from PostgreSQL's rows plus the user's dirty conversations and
    /// returns it; `None` when a change PostgreSQL committed moved the list epoch since `epoch` was
    /// read (the rows may be older than that change: the caller reads them again).
    pub fn rebuild_list(
        &self,
        user_id: &str,
        epoch: &str,
        from_postgres: &[(String, Conversation)],
    ) -> CacheResult<Option<Vec<(String, Conversation)>>> {
        let l = self.layout()?;
        let entries: Vec<(f64, String)> =
            from_postgres.iter().map(|(_, c)| (c.last_modified.unix_seconds(), ListEntry::to_json(c))).collect();
        for _ in 0..REBUILD_ATTEMPTS {
            // The script may touch only keys it is given: the dirty ids are read first, and the
            // script refuses (and this reads them again) if a save changed them meanwhile.
            let dirty: Vec<String> = self.command(redis::cmd("SMEMBERS").arg(l.user_dirty(user_id)))?;
            let mut keys = vec![l.list(user_id), l.list_meta(user_id), l.user_dirty(user_id), l.list_epoch(user_id)];
            keys.extend(from_postgres.iter().map(|(id, _)| l.deleted(user_id, id)));
            keys.extend(dirty.iter().map(|id| l.conv(user_id, id)));
            let (value,): (Value,) = self.query_fenced(|deadline| {
                let mut script = scripts::call(&scripts::REBUILD_LIST, &keys);
                script.arg(LIST_TTL_SECONDS).arg(from_postgres.len()).arg(deadline).arg(epoch);
                for ((id, _), (score, entry)) in from_postgres.iter().zip(&entries) {
                    script.arg(id).arg(*score).arg(entry);
                }
                for id in &dirty {
                    script.arg(id);
                }
                let mut pipe = redis::pipe();
                pipe.add_command(script);
                pipe
            })?;
            match value {
                Value::Int(-4) => {
                    return Err(CacheError::Unavailable("Redis ran the list rebuild after its deadline".into()))
                }
                Value::Int(-5) => return Ok(None),
                other => {
                    if let Some(listing) = parse_listing(other) {
                        return Ok(Some(listing));
                    }
                }
            }
        }
        Err(CacheError::Other("the user's dirty conversations kept changing while the list was rebuilt".into()))
    }
}
