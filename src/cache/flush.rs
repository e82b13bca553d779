//! Write-back's Redis side: finding dirty conversations, reading them, and settling them after
//! PostgreSQL took them (compare-and-clear), plus adopting hashes another writer changed.

use std::sync::PoisonError;
use std::time::Duration;

use redis::Value;

use crate::cache::codec::{named_fields, parse_hash, Cached, ReadMark, StoredPrefix, FLUSH_FIELDS, FLUSH_READ_CHUNK};
use crate::cache::error::{CacheError, CacheResult};
use crate::cache::keys::{member, split_late_member, split_member, KeyLayout};
use crate::cache::redis::{RedisCache, Spread};
use crate::cache::scripts;
use crate::model::Conversation;

/// Conversations settled per `settle.lua` call: one call per conversation cost Redis more in the
/// call than in the work, and a hundred keep each call well under a millisecond.
const SETTLE_PER_CALL: usize = 100;
/// Late copies a flush on one node takes from the late set at most.
const LATE_PER_FLUSH: usize = 500;

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
    /// One step of a scan of the dirty conversations: the next cursor (0 at the end) and some
    /// members. On a cluster a step is one bucket of the index of users with dirty conversations
    /// (each process starts at its own bucket, so several flushers spread over the buckets; a
    /// conversation two flushers write is written once, the second finding PostgreSQL current).
    pub fn scan_dirty(&self, cursor: u64, count: usize) -> CacheResult<(u64, Vec<String>)> {
        let l = self.layout()?;
        if l == KeyLayout::Seed {
            return self.command(redis::cmd("SSCAN").arg(l.dirty_set("")).arg(cursor).arg("COUNT").arg(count));
        }
        if cursor == 0 {
            self.index_unindexed();
        }
        let buckets = l.dirty_buckets();
        let step = usize::try_from(cursor).unwrap_or(0);
        let bucket = &buckets[(step + *FIRST_BUCKET) % buckets.len()];
        let users: Vec<String> = self.command(redis::cmd("ZRANGE").arg(bucket).arg(0).arg(-1))?;
        let mut spread = Spread::default();
        for user in &users {
            let mut cmd = redis::cmd("SMEMBERS");
            cmd.arg(l.dirty_set(user));
            spread.add(cmd, true);
        }
        let mut members = Vec::new();
        for value in self.query_spread(&spread)? {
            members
                .extend(redis::from_redis_value::<Vec<String>>(value).map_err(|e| CacheError::Other(e.to_string()))?);
        }
        let next = if step + 1 >= buckets.len() { 0 } else { cursor + 1 };
        Ok((next, members))
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
        let l = self.layout()?;
        let values: Vec<Value> = self.run_on(|conn| {
            conn.con.set_read_timeout(Some(timeout))?;
            let result =
                members.chunks(FLUSH_READ_CHUNK).try_fold(Vec::with_capacity(members.len()), |mut values, chunk| {
                    let mut spread = Spread::default();
                    for m in chunk {
                        let (user_id, conversation_id) = split_member(m).unwrap_or(("", m.as_str()));
                        let mut cmd = redis::cmd("HMGET");
                        cmd.arg(l.conv(user_id, conversation_id)).arg(&FLUSH_FIELDS);
                        spread.add(cmd, true);
                    }
                    values.extend(spread.query_on_con(&mut conn.con)?);
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
        let l = self.layout()?;
        let ttl = self.ttl();
        // On a cluster a call settles one user's conversations (its keys are all in the user's
        // slot); on one node, up to a hundred of anyone's.
        let mut groups: Vec<Vec<&SettleItem>> = Vec::new();
        if l == KeyLayout::Seed {
            groups.extend(items.chunks(SETTLE_PER_CALL).map(|c| c.iter().collect()));
        } else {
            let mut by_user: std::collections::BTreeMap<&str, Vec<&SettleItem>> = std::collections::BTreeMap::new();
            for item in items {
                by_user.entry(split_member(&item.member).map_or("", |(u, _)| u)).or_default().push(item);
            }
            for (_, group) in by_user {
                groups.extend(group.chunks(SETTLE_PER_CALL).map(<[&SettleItem]>::to_vec));
            }
        }
        let deadline = self.deadline_now();
        let mut spread = Spread::default();
        for chunk in &groups {
            let first_user = chunk.first().and_then(|i| split_member(&i.member)).map_or("", |(u, _)| u);
            let mut keys = Vec::with_capacity(2 + 5 * chunk.len());
            keys.extend([l.dirty_set(first_user), l.dirty_since(first_user)]);
            let mut args: Vec<String> = Vec::with_capacity(2 + 11 * chunk.len());
            args.extend([ttl.to_string(), l.owner_in_slot().to_owned(), deadline.clone()]);
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
            spread.add(cmd, l == KeyLayout::Cluster);
        }
        let replies = self.query_spread(&spread)?;
        if l == KeyLayout::Seed {
            return Ok(());
        }
        // Cluster: the owner records (in the ids' own slots) follow what the settle did, and
        // users left with nothing dirty leave the index.
        let mut owners = Spread::default();
        let mut clean_users = Vec::new();
        for (chunk, reply) in groups.iter().zip(replies) {
            let flags: Vec<i64> = redis::from_redis_value(reply).map_err(|e| CacheError::Other(e.to_string()))?;
            for (item, settled) in chunk.iter().zip(&flags) {
                let (user_id, conversation_id) = split_member(&item.member).unwrap_or(("", item.member.as_str()));
                if *settled == 1 {
                    let mut cmd = scripts::call(&scripts::RELEASE, &[l.owner(conversation_id)]);
                    let ttl = if item.action == Settle::Clean { ttl.to_string() } else { String::new() };
                    cmd.arg(user_id).arg(ttl).arg(&deadline);
                    owners.add(cmd, false);
                }
            }
            if flags.last() == Some(&0) {
                if let Some((user, _)) = chunk.first().and_then(|i| split_member(&i.member)) {
                    clean_users.push(user);
                }
            }
        }
        self.query_spread(&owners)?;
        self.unindex_clean_users(&clean_users)
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
        let l = self.layout()?;
        let keys =
            [l.conv(user_id, conversation_id), l.dirty_set(user_id), l.dirty_since(user_id), l.user_dirty(user_id)];
        let member = member(user_id, conversation_id);
        let (version,): (Option<String>,) = self.query_fenced(|deadline| {
            let mut cmd = scripts::call(&scripts::ADOPT, &keys);
            cmd.arg(cached.version.map(|v| v.to_string()).unwrap_or_default())
                .arg(&cached.mark.last_modified)
                .arg(cached.mark.messages_len)
                .arg(cached.mark.title_len)
                .arg(cached.mark.sig)
                .arg(&member)
                .arg(conversation_id)
                .arg(deadline);
            let mut pipe = redis::pipe();
            pipe.add_command(cmd);
            pipe
        })?;
        if version.is_some() {
            self.index_dirty_user(user_id)?;
        }
        Ok(version.and_then(|v| v.parse().ok()))
    }

    /// The late members on one node (on a cluster they are in the users' dirty sets, and
    /// [`RedisCache::scan_dirty`] finds them).
    pub fn late_members(&self) -> CacheResult<Vec<String>> {
        let l = self.layout()?;
        if l == KeyLayout::Cluster {
            return Ok(Vec::new());
        }
        self.command(redis::cmd("SRANDMEMBER").arg(l.late_set("")).arg(LATE_PER_FLUSH))
    }

    /// The late copies of these late members (see `save.lua`; a copy an unguarded save kept aside
    /// is one too, with its `dirty` flag set): `None` when gone, `Some(Err)` when unreadable.
    pub fn fetch_late(&self, members: &[&str]) -> CacheResult<Vec<Option<Result<Cached, String>>>> {
        let l = self.layout()?;
        let mut spread = Spread::default();
        for m in members {
            let (user_id, conversation_id, token) = split_late_member(m).unwrap_or(("", "", m));
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(l.late_copy(user_id, conversation_id, token)).arg(&FLUSH_FIELDS);
            spread.add(cmd, true);
        }
        Ok(self
            .query_spread(&spread)?
            .into_iter()
            .map(|value| {
                let fields = named_fields(&FLUSH_FIELDS, value);
                (!fields.is_empty()).then(|| {
                    parse_hash(fields).ok_or_else(|| "the late copy is not a readable conversation".to_owned())
                })
            })
            .collect())
    }

    /// Removes late copies that PostgreSQL now holds (in the conversation or its conflicts).
    pub fn drop_late(&self, members: &[&str]) -> CacheResult<()> {
        let l = self.layout()?;
        let mut spread = Spread::default();
        for m in members {
            let Some((user_id, conversation_id, token)) = split_late_member(m) else { continue };
            let mut del = redis::cmd("DEL");
            del.arg(l.late_copy(user_id, conversation_id, token));
            spread.add(del, false);
            let mut srem = redis::cmd("SREM");
            srem.arg(l.late_set(user_id)).arg(*m);
            spread.add(srem, false);
        }
        self.query_spread(&spread)?;
        if l == KeyLayout::Cluster {
            // The late members kept their users in the dirty index; users left with nothing leave it.
            let mut users: Vec<&str> = members.iter().filter_map(|m| split_late_member(m).map(|(u, _, _)| u)).collect();
            users.sort_unstable();
            users.dedup();
            self.unindex_clean_users(&users)?;
        }
        Ok(())
    }

    /// The write-back version the cached hash holds now (`None`: gone, or written by a seed
    /// writer without one).
    pub fn version_now(&self, user_id: &str, conversation_id: &str) -> CacheResult<Option<i64>> {
        let key = self.layout()?.conv(user_id, conversation_id);
        let version: Option<String> = self.command(redis::cmd("HGET").arg(&key).arg("ver"))?;
        Ok(version.and_then(|v| v.parse().ok()))
    }

    /// How many conversations are dirty and since when the oldest is (Unix seconds).
    pub fn dirty_summary(&self) -> CacheResult<(u64, Option<f64>)> {
        let l = self.layout()?;
        if l == KeyLayout::Seed {
            // The late copies count too, as they do in a cluster's dirty sets: each waits for a flush.
            let mut pipe = redis::pipe();
            pipe.cmd("SCARD").arg(l.dirty_set("")).cmd("ZRANGE").arg(l.dirty_since("")).arg(0).arg(0).arg("WITHSCORES");
            pipe.cmd("SCARD").arg(l.late_set(""));
            let (count, oldest, late): (u64, Vec<(String, f64)>, u64) = self.query(&pipe)?;
            return Ok((count + late, oldest.first().map(|(_, score)| *score)));
        }
        self.index_unindexed();
        let mut spread = Spread::default();
        for bucket in l.dirty_buckets() {
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(bucket).arg(0).arg(-1);
            spread.add(cmd, true);
        }
        let mut users = Vec::new();
        for value in self.query_spread(&spread)? {
            users.extend(redis::from_redis_value::<Vec<String>>(value).map_err(|e| CacheError::Other(e.to_string()))?);
        }
        let mut spread = Spread::default();
        for user in &users {
            let mut count = redis::cmd("SCARD");
            count.arg(l.dirty_set(user));
            spread.add(count, true);
            let mut oldest = redis::cmd("ZRANGE");
            oldest.arg(l.dirty_since(user)).arg(0).arg(0).arg("WITHSCORES");
            spread.add(oldest, true);
        }
        let values = self.query_spread(&spread)?;
        let (mut total, mut first) = (0u64, None::<f64>);
        for pair in values.chunks(2) {
            total += redis::from_redis_value::<u64>(pair[0].clone()).unwrap_or(0);
            let since: Vec<(String, f64)> = redis::from_redis_value(pair[1].clone()).unwrap_or_default();
            if let Some((_, t)) = since.first() {
                first = Some(first.map_or(*t, |f: f64| f.min(*t)));
            }
        }
        Ok((total, first))
    }

    /// Cluster: writes the index entries saves could not write (see `unindexed`). Those that fail
    /// again wait for the next time; the walk or count that asked goes on without them.
    fn index_unindexed(&self) {
        let users = std::mem::take(&mut *self.unindexed.lock().unwrap_or_else(PoisonError::into_inner));
        for (i, user) in users.iter().enumerate() {
            if let Err(e) = self.index_dirty_user(user) {
                log::debug!("{} users still wait for their dirty index entry: {}", users.len() - i, e.into_error());
                self.unindexed.lock().unwrap_or_else(PoisonError::into_inner).extend(users[i..].iter().cloned());
                return;
            }
        }
    }

    /// Cluster: puts the user in the index of users with dirty conversations.
    pub(crate) fn index_dirty_user(&self, user_id: &str) -> CacheResult<()> {
        if let Some(bucket) = self.layout()?.dirty_bucket(user_id) {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            self.command::<()>(redis::cmd("ZADD").arg(bucket).arg("NX").arg(now).arg(user_id))?;
        }
        Ok(())
    }

    /// Cluster: takes users whose dirty sets a settle emptied out of the index, then looks again
    /// and puts back any a save made dirty meanwhile (a save adds to the index after its script,
    /// so whichever order the two land in, a user with dirty conversations stays indexed).
    fn unindex_clean_users(&self, users: &[&str]) -> CacheResult<()> {
        let l = self.layout()?;
        let mut spread = Spread::default();
        for user in users {
            if let Some(bucket) = l.dirty_bucket(user) {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(bucket).arg(*user);
                spread.add(cmd, false);
            }
        }
        self.query_spread(&spread)?;
        let mut spread = Spread::default();
        for user in users {
            let mut cmd = redis::cmd("SCARD");
            cmd.arg(l.dirty_set(user));
            spread.add(cmd, true);
        }
        let counts = self.query_spread(&spread)?;
        for (user, count) in users.iter().zip(counts) {
            if redis::from_redis_value::<u64>(count).unwrap_or(1) > 0 {
                self.index_dirty_user(user)?;
            }
        }
        Ok(())
    }
}

/// Where this process starts walking the dirty index, so flushers of several processes start apart.
static FIRST_BUCKET: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (seed as usize ^ std::process::id() as usize) % crate::cache::keys::DIRTY_BUCKETS as usize
});
