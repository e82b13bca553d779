//! Write-back's Redis side: finding dirty conversations, reading them, and settling them after
//! PostgreSQL took them (compare-and-clear), plus adopting hashes another writer changed.

use std::time::Duration;

use redis::Value;

use crate::cache::codec::{named_fields, parse_hash, Cached, ReadMark, StoredPrefix, FLUSH_FIELDS, FLUSH_READ_CHUNK};
use crate::cache::error::CacheResult;
use crate::cache::keys::{member, split_member};
use crate::cache::redis::RedisCache;
use crate::cache::scripts;
use crate::model::Conversation;

/// Conversations settled per `settle.lua` call: one call per conversation cost Redis more in the
/// call than in the work, and a hundred keep each call well under a millisecond.
const SETTLE_PER_CALL: usize = 100;

/// A fetched dirty conversation, for a flush.
#[derive(Debug)]
pub struct DirtyEntry {
    /// `<user>:<id>`.
    pub member: String,
    /// What the hash holds: `None` when it is gone, `Some(Err)` when it cannot be parsed.
    pub content: Option<Result<Cached, String>>,
}

/// One conversation for [`RedisCache::settle`].
#[derive(Debug, Clone)]
pub struct SettleItem {
    /// `<user>:<id>`.
    pub member: String,
    /// The version the flush read ("" for none).
    pub version: String,
    /// What to do.
    pub action: Settle,
    /// What PostgreSQL now holds, when known.
    pub stored: Option<StoredPrefix>,
    /// What the flush read, checked again; `None` when the hash was gone.
    pub mark: Option<ReadMark>,
}

/// How a flush settles one conversation in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// PostgreSQL holds this version: mark clean, give the TTL back.
    Clean,
    /// PostgreSQL holds something newer, or it was deleted: drop the cached copy.
    Drop,
}

impl RedisCache {
    /// One step of a scan of the dirty set: the next cursor (0 at the end) and some members.
    pub fn scan_dirty(&self, cursor: u64, count: usize) -> CacheResult<(u64, Vec<String>)> {
        let set = self.layout.dirty_set("");
        self.command(redis::cmd("SSCAN").arg(set).arg(cursor).arg("COUNT").arg(count))
    }

    /// Every dirty member (the seed's `get_dirty_conversations`).
    pub fn all_dirty(&self) -> CacheResult<Vec<String>> {
        let mut members = Vec::new();
        let mut cursor = 0;
        loop {
            let (next, page) = self.scan_dirty(cursor, 1000)?;
            members.extend(page);
            if next == 0 {
                members.sort();
                members.dedup();
                return Ok(members);
            }
            cursor = next;
        }
    }

    /// The hashes of dirty members, a hundred per round trip, under a longer read timeout (a
    /// flush may read more than a call does).
    pub fn fetch_dirty(&self, members: &[String], timeout: Duration) -> CacheResult<Vec<DirtyEntry>> {
        let l = self.layout;
        let values: Vec<Value> = self.run_on(|conn| {
            conn.con.set_read_timeout(Some(timeout))?;
            let result =
                members.chunks(FLUSH_READ_CHUNK).try_fold(Vec::with_capacity(members.len()), |mut values, chunk| {
                    let mut pipe = redis::pipe();
                    for m in chunk {
                        let (user_id, conversation_id) = split_member(m).unwrap_or(("", m.as_str()));
                        pipe.cmd("HMGET").arg(l.conv(user_id, conversation_id)).arg(&FLUSH_FIELDS);
                    }
                    values.extend(pipe.query::<Vec<Value>>(&mut conn.con)?);
                    Ok(values)
                });
            conn.con.set_read_timeout(Some(self.settings.timeout))?;
            result
        })?;
        Ok(members
            .iter()
            .zip(values)
            .map(|(member, value)| {
                let fields = named_fields(&FLUSH_FIELDS, value);
                let content = if fields.is_empty() {
                    None
                } else {
                    Some(parse_hash(fields).ok_or_else(|| "the cached hash is not a readable conversation".to_owned()))
                };
                DirtyEntry { member: member.clone(), content }
            })
            .collect())
    }

    /// Compare-and-clear for a batch of flushed conversations (see `settle.lua`), a hundred per
    /// script call, every call of the batch in one pipeline.
    pub fn settle(&self, items: &[SettleItem]) -> CacheResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let l = self.layout;
        let ttl = self.ttl();
        let mut pipe = redis::pipe();
        for chunk in items.chunks(SETTLE_PER_CALL) {
            let first_user = chunk.first().and_then(|i| split_member(&i.member)).map_or("", |(u, _)| u);
            let mut keys = Vec::with_capacity(2 + 5 * chunk.len());
            keys.extend([l.dirty_set(first_user), l.dirty_since(first_user)]);
            let mut args: Vec<String> = Vec::with_capacity(2 + 11 * chunk.len());
            args.extend([ttl.to_string(), l.owner_in_slot().to_owned()]);
            for SettleItem { member, version, action, stored, mark } in chunk {
                let (user_id, conversation_id) = split_member(member).unwrap_or(("", member.as_str()));
                keys.extend([
                    l.conv(user_id, conversation_id),
                    l.user_dirty(user_id),
                    l.owner_for_script(user_id, conversation_id),
                    l.list(user_id),
                    l.list_meta(user_id),
                ]);
                let action = match action {
                    Settle::Clean => "clean",
                    Settle::Drop => "drop",
                };
                args.extend([member.clone(), conversation_id.to_owned(), version.clone(), action.to_owned()]);
                let stored = stored.as_ref().map_or_else(
                    || [String::new(), String::new(), String::new()],
                    |p| [p.messages.to_string(), p.version.to_string(), p.fingerprint.to_string()],
                );
                args.extend(stored);
                match mark {
                    Some(m) => {
                        args.extend([m.last_modified.clone(), m.messages_len.to_string(), m.title_len.to_string()]);
                    }
                    None => args.extend([String::new(), String::new(), String::new()]),
                }
                args.push(user_id.to_owned());
            }
            let mut cmd = scripts::call(&scripts::SETTLE, &keys);
            cmd.arg(&args);
            pipe.add_command(cmd).ignore();
        }
        self.query(&pipe)
    }

    /// The seed's `clear_dirty_flag`, made safe: the hash becomes clean only if `in_postgres` says
    /// PostgreSQL holds what it contains, and only if nothing changed it since it was read.
    /// Otherwise it stays dirty, for the flush to write.
    pub fn clear_dirty(
        &self,
        user_id: &str,
        conversation_id: &str,
        in_postgres: impl FnOnce(&Conversation) -> bool,
    ) -> CacheResult<bool> {
        let member = member(user_id, conversation_id);
        let entry = self.fetch_dirty(std::slice::from_ref(&member), self.settings.timeout)?.pop();
        let Some(DirtyEntry { content: Some(Ok(cached)), .. }) = entry else {
            return Ok(false);
        };
        if !in_postgres(&cached.conversation) {
            return Ok(false);
        }
        let item = SettleItem {
            member,
            version: cached.version.map(|v| v.to_string()).unwrap_or_default(),
            action: Settle::Clean,
            stored: None,
            mark: Some(cached.mark),
        };
        self.settle(&[item])?;
        Ok(true)
    }

    /// Gives a hash another writer changed a version of its own (see `adopt.lua`); `None` when it
    /// changed again since it was read.
    pub fn adopt(&self, user_id: &str, conversation_id: &str, cached: &Cached) -> CacheResult<Option<i64>> {
        let l = self.layout;
        let keys =
            [l.conv(user_id, conversation_id), l.dirty_set(user_id), l.dirty_since(user_id), l.user_dirty(user_id)];
        let mut cmd = scripts::call(&scripts::ADOPT, &keys);
        cmd.arg(cached.version.map(|v| v.to_string()).unwrap_or_default())
            .arg(&cached.mark.last_modified)
            .arg(cached.mark.messages_len)
            .arg(cached.mark.title_len)
            .arg(cached.mark.sig)
            .arg(member(user_id, conversation_id))
            .arg(conversation_id);
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let (version,): (Option<String>,) = self.query(&pipe)?;
        Ok(version.and_then(|v| v.parse().ok()))
    }

    /// How many conversations are dirty and since when the oldest is (Unix seconds).
    pub fn dirty_summary(&self) -> CacheResult<(u64, Option<f64>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("SCARD")
            .arg(self.layout.dirty_set(""))
            .cmd("ZRANGE")
            .arg(self.layout.dirty_since(""))
            .arg(0)
            .arg(0)
            .arg("WITHSCORES");
        let (count, oldest): (u64, Vec<(String, f64)>) = self.query(&pipe)?;
        Ok((count, oldest.first().map(|(_, score)| *score)))
    }
}
