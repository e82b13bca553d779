//! Redis: an r2d2 pool of connections with short timeouts, the seed's key layout (SPEC section 3)
//! and the scripts that make write-back safe.
//!
//! Keys (the first three are the seed's, so a Python instance of the seed can share the Redis):
//! - `conv:<user>:<id>` hash: title, model, messages (JSON), created_at, last_modified, dirty,
//!   plus `ver` (the write-back version), `meta` (the list entry as JSON) and `score`.
//! - `user:<user>:convlist` sorted set of ids by last_modified (TTL 300 s), with
//!   `user:<user>:convmeta` (hash id -> list entry JSON) beside it.
//! - `dirty:convs` set of `<user>:<id>`; `dirty:since` sorted set (when each became dirty);
//!   `user:<user>:dirty` set of the user's dirty ids, so a list rebuild finds them without a scan.
//! - `owner:<id>` the user who owns an id (SPEC section 7), `deleted:<user>:<id>` a short-lived
//!   tombstone that keeps a read racing a delete from caching the deleted copy again.
//!
//! A dirty hash has no TTL, so with a `volatile-*` eviction policy it is never evicted; it gets
//! its TTL back only when a flush has written exactly its version (compare-and-clear).

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Cmd, Connection, ConnectionLike as _, RedisError, Script, Value};

use crate::cache::combine::Combiner;
use crate::cache::messages_json::{self, Text};
use crate::config::RedisSettings;
use crate::error::{Backend, Error, ErrorKind};
use crate::model::{Conversation, Message, Role, Timestamp};

/// The list cache's TTL, the seed's 5 minutes.
pub const LIST_TTL_SECONDS: u64 = 300;
/// How long a delete keeps reads from re-caching the deleted conversation.
const DELETE_TOMBSTONE_SECONDS: u64 = 60;
const DIRTY_SET: &str = "dirty:convs";
const DIRTY_SINCE: &str = "dirty:since";

/// Why a Redis call failed, in the terms the manager acts on.
#[derive(Debug, Clone)]
pub enum CacheError {
    /// No usable connection: fall back to PostgreSQL and back off.
    Unavailable(String),
    /// Redis refuses writes for lack of memory: this write goes to PostgreSQL.
    OutOfMemory(String),
    /// Anything else Redis refused.
    Other(String),
}

impl CacheError {
    fn from_redis(e: &RedisError) -> Self {
        if e.code() == Some("OOM") {
            CacheError::OutOfMemory(e.to_string())
        } else if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
        {
            CacheError::Unavailable(e.to_string())
        } else {
            CacheError::Other(e.to_string())
        }
    }

    /// As a core error.
    #[must_use]
    pub fn into_error(self) -> Error {
        match self {
            CacheError::Unavailable(why) => {
                Error::new(ErrorKind::Unavailable(Backend::Redis), "Redis is unavailable").with_source(why)
            }
            CacheError::OutOfMemory(why) => {
                Error::new(ErrorKind::Database(Backend::Redis), "Redis is out of memory").with_source(why)
            }
            CacheError::Other(why) => {
                Error::new(ErrorKind::Database(Backend::Redis), "Redis refused the command").with_source(why)
            }
        }
    }
}

/// Result of a Redis call.
pub type CacheResult<T> = std::result::Result<T, CacheError>;

/// A pooled connection that remembers a failed call: a timed-out connection may still receive the
/// late reply, so it is never handed out again.
pub struct RedisConnection {
    con: Connection,
    broken: bool,
    /// The server takes `EXPIRE ... GT` (Redis 7.0 and later), so a clean hit's TTL is refreshed
    /// by two plain commands instead of a script.
    expire_gt: bool,
}

/// Opens connections with the configured timeouts.
#[derive(Debug)]
struct Connector {
    client: redis::Client,
    timeout: Duration,
}

impl r2d2::ManageConnection for Connector {
    type Connection = RedisConnection;
    type Error = RedisError;

    fn connect(&self) -> Result<RedisConnection, RedisError> {
        let mut con = self.client.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        // Scripts sent by EVALSHA inside pipelines are loaded up front (one round trip per new
        // connection); a NOSCRIPT later (SCRIPT FLUSH, a failover) loads them again.
        load_scripts(&mut con, &[&REFRESH_TTL, &SAVE, &BACKFILL, &SETTLE, &INVALIDATE])?;
        // On a key that never exists, so it changes nothing. Older servers reply with an error, and
        // so may an ACL that does not cover the key: either way the script does the refresh.
        let probe: redis::RedisResult<i64> =
            redis::cmd("EXPIRE").arg("chat-history:expire-gt-probe").arg(1).arg("GT").query(&mut con);
        let expire_gt = match probe {
            Ok(_) => true,
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => return Err(e),
            Err(e) => {
                log::debug!("Redis refused EXPIRE ... GT ({e}); a script refreshes TTLs on this connection");
                false
            }
        };
        Ok(RedisConnection { con, broken: false, expire_gt })
    }

    fn is_valid(&self, conn: &mut RedisConnection) -> Result<(), RedisError> {
        redis::cmd("PING").query(&mut conn.con)
    }

    fn has_broken(&self, conn: &mut RedisConnection) -> bool {
        conn.broken || !conn.con.is_open()
    }
}

#[derive(Debug)]
struct PoolErrorLog;

impl r2d2::HandleError<RedisError> for PoolErrorLog {
    fn handle_error(&self, error: RedisError) {
        log::debug!("Redis connection failed: {error}");
    }
}

/// A conversation as the cache holds it.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The content.
    pub conversation: Conversation,
    /// Not yet written back.
    pub dirty: bool,
    /// The write-back version (`None` for hashes written by the Python seed).
    pub version: Option<i64>,
    /// What PostgreSQL is known to hold: (messages, version, fingerprint of those messages).
    pub stored: Option<StoredPrefix>,
    /// What a settle checks is still there, so a write by another writer keeps the hash dirty.
    pub mark: ReadMark,
    /// The content is not what this product's last save stamped (a seed-design writer's HSET, or a
    /// hash it wrote itself): it needs a version of its own before it is written back.
    pub foreign: bool,
}

/// The parts of a hash a flush read that its settle compares, besides the version: the raw
/// last_modified, the byte lengths of the transcript and the title, and the content signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadMark {
    /// `last_modified` as stored.
    pub last_modified: String,
    /// `HSTRLEN messages`.
    pub messages_len: usize,
    /// `HSTRLEN title`.
    pub title_len: usize,
    /// [`content_sig`] of what was read.
    pub sig: u64,
}

/// What a flush or a read from PostgreSQL established that PostgreSQL holds for a conversation:
/// its first `messages` messages, at `version`, with this fingerprint. Kept in the hash (fields
/// `pgn`, `pgv`, `pgh`) so the next flush can send only the messages added since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPrefix {
    /// How many messages PostgreSQL holds.
    pub messages: usize,
    /// At which version.
    pub version: i64,
    /// [`crate::model::messages_fingerprint`] of them.
    pub fingerprint: u64,
}

/// One message of a [`CachedConversation`].
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: &'a str,
    /// When, in the canonical form.
    pub time: &'a str,
}

/// A conversation read from Redis, kept as the JSON Redis returned, with the messages located
/// but not copied: a read hands the strings to Python once, without building a [`Conversation`]
/// first. (That copy and the timestamp round trip were most of a cache hit's cost.)
#[derive(Debug, Clone)]
pub struct CachedConversation {
    /// The title.
    pub title: String,
    /// The model.
    pub model: String,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last modified.
    pub last_modified: Timestamp,
    json: String,
    messages: Vec<(Role, Text, Text)>,
}

impl CachedConversation {
    fn parse(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Option<Self> {
        let mut title = None;
        let mut model = None;
        let mut json = None;
        let mut created_at = None;
        let mut last_modified = None;
        for (key, value) in fields {
            match key.as_slice() {
                b"title" => title = String::from_utf8(value).ok(),
                b"model" => model = String::from_utf8(value).ok(),
                b"messages" => json = String::from_utf8(value).ok(),
                b"created_at" => created_at = std::str::from_utf8(&value).ok().and_then(|t| Timestamp::parse(t).ok()),
                b"last_modified" => {
                    last_modified = std::str::from_utf8(&value).ok().and_then(|t| Timestamp::parse(t).ok());
                }
                _ => {}
            }
        }
        let json = json.unwrap_or_else(|| "[]".to_owned());
        let messages = match messages_json::scan(&json) {
            Some(scanned) => {
                let mut messages = Vec::with_capacity(scanned.len());
                for (role, content, time) in scanned {
                    let role = Role::parse(text_of(&json, &role))?;
                    let time = match Timestamp::canonical_text(text_of(&json, &time))? {
                        std::borrow::Cow::Borrowed(_) => time,
                        std::borrow::Cow::Owned(normalised) => Text::Owned(normalised),
                    };
                    messages.push((role, content, time));
                }
                messages
            }
            None => Self::parse_with_serde(&json)?,
        };
        Some(CachedConversation {
            title: title?,
            model: model?,
            created_at: created_at?,
            last_modified: last_modified?,
            json,
            messages,
        })
    }

    /// The general path, for JSON the scanner does not take.
    fn parse_with_serde(json: &str) -> Option<Vec<(Role, Text, Text)>> {
        #[derive(serde::Deserialize)]
        struct Raw<'a> {
            role: Role,
            #[serde(borrow)]
            content: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            time: std::borrow::Cow<'a, str>,
        }
        let base = json.as_ptr() as usize;
        let locate = |text: std::borrow::Cow<'_, str>| match text {
            std::borrow::Cow::Borrowed(t) => {
                let start = t.as_ptr() as usize - base;
                Text::Span(start..start + t.len())
            }
            std::borrow::Cow::Owned(t) => Text::Owned(t),
        };
        let raw: Vec<Raw<'_>> = serde_json::from_str(json).ok()?;
        let mut messages = Vec::with_capacity(raw.len());
        for m in raw {
            let time = match Timestamp::canonical_text(&m.time)? {
                std::borrow::Cow::Borrowed(_) => locate(m.time),
                std::borrow::Cow::Owned(normalised) => Text::Owned(normalised),
            };
            messages.push((m.role, locate(m.content), time));
        }
        Some(messages)
    }

    fn text<'a>(&'a self, text: &'a Text) -> &'a str {
        text_of(&self.json, text)
    }

    /// The messages in order.
    #[must_use]
    pub fn messages(&self) -> impl ExactSizeIterator<Item = MessageRef<'_>> {
        self.messages.iter().map(|(role, content, time)| MessageRef {
            role: *role,
            content: self.text(content),
            time: self.text(time),
        })
    }

    /// As an owned [`Conversation`].
    #[must_use]
    pub fn to_conversation(&self) -> Conversation {
        Conversation {
            title: self.title.clone(),
            model: self.model.clone(),
            messages: self
                .messages()
                .map(|m| Message {
                    role: m.role,
                    content: m.content.to_owned(),
                    time: Timestamp::parse(m.time).unwrap_or_else(|_| Timestamp::now()),
                })
                .collect(),
            created_at: self.created_at,
            last_modified: self.last_modified,
        }
    }
}

fn text_of<'a>(json: &'a str, text: &'a Text) -> &'a str {
    match text {
        Text::Span(range) => &json[range.clone()],
        Text::Owned(owned) => owned,
    }
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
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveOptions {
    /// The caller found out from PostgreSQL that the id is free or the user's.
    pub claim: bool,
    /// The version of PostgreSQL's row, when known: the save's version goes past it.
    pub floor: Option<i64>,
    /// Refuse to replace a copy that the new messages do not extend.
    pub guard: bool,
}

/// The list entry of a conversation: everything but the messages.
#[derive(serde::Serialize, serde::Deserialize)]
struct ListEntry<'a> {
    title: std::borrow::Cow<'a, str>,
    model: std::borrow::Cow<'a, str>,
    created_at: Timestamp,
    last_modified: Timestamp,
}

impl ListEntry<'_> {
    fn of(conv: &Conversation) -> ListEntry<'_> {
        ListEntry {
            title: conv.title.as_str().into(),
            model: conv.model.as_str().into(),
            created_at: conv.created_at,
            last_modified: conv.last_modified,
        }
    }

    fn to_json(conv: &Conversation) -> String {
        serde_json::to_string(&ListEntry::of(conv)).expect("a list entry always serialises")
    }

    fn parse(text: &[u8]) -> Option<Conversation> {
        let entry: ListEntry<'_> = serde_json::from_slice(text).ok()?;
        Some(Conversation {
            title: entry.title.into_owned(),
            model: entry.model.into_owned(),
            messages: Vec::new(),
            created_at: entry.created_at,
            last_modified: entry.last_modified,
        })
    }
}

/// KEYS: conv, dirty set, list, list meta, user dirty, owner, dirty since, delete tombstone, staged.
/// ARGV: member, user, created_at, meta, claim, id, floor, guard.
///
/// The conversation arrives staged in its own hash (written by the `HSET` pipelined before this
/// script): Redis copies every script argument into Lua, and for a long transcript
/// that copy cost more than everything else in a save. The script checks ownership, stamps the
/// version and renames the staged hash over the conversation, all atomically.
///
/// Replies: {1, version, created_at} saved; {0} Redis does not hold the conversation (ask
/// PostgreSQL who owns it, then save again with `claim` and PostgreSQL's version as `floor`);
/// {-1} another user's id; {-3} the staged hash is gone (evicted between the two commands): nothing
/// was stored; {2} with `guard`: the new messages do not extend the cached copy (the caller read an
/// older copy from PostgreSQL while Redis did not answer): nothing was stored.
///
/// The version is Redis's clock in microseconds, bumped past the hash's current version, past the
/// PostgreSQL version the copy was derived from, past `floor` and past a delete's tombstone, so a
/// later save never gets a lower version than a row it replaces, whatever the two clocks say.
static SAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[9]) == 0 then return {-3} end
local owner = redis.call('GET', KEYS[6])
if owner and owner ~= ARGV[2] then redis.call('DEL', KEYS[9]) return {-1} end
if ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[9])
  return {0}
end
local h = redis.call('HMGET', KEYS[1], 'ver', 'pgv', 'dirty', 'created_at', 'pgn', 'pgh')
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  local old = redis.call('HGET', KEYS[1], 'messages') or '[]'
  local new = redis.call('HGET', KEYS[9], 'messages') or '[]'
  local n = #old - 1
  local extends = old == '[]' or old == new
    or (n > 0 and string.sub(new, 1, n) == string.sub(old, 1, n) and string.sub(new, n + 1, n + 1) == ',')
  if not extends then
    redis.call('DEL', KEYS[9])
    return {2}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local deleted = tonumber(redis.call('GET', KEYS[8]) or '0') or 0
local ver = math.max(now, (tonumber(h[1] or '0') or 0) + 1, deleted + 1,
  (tonumber(h[2] or '0') or 0) + 1, (tonumber(ARGV[7]) or 0) + 1)
ver = string.format('%.0f', ver)
local created = h[4] or ARGV[3]
local meta = ARGV[4]
if created ~= ARGV[3] then
  local entry = cjson.decode(meta)
  entry['created_at'] = created
  meta = cjson.encode(entry)
  redis.call('HSET', KEYS[9], 'created_at', created)
end
redis.call('HSET', KEYS[9], 'dirty', '1', 'ver', ver, 'meta', meta)
if h[5] and h[2] and h[6] then
  redis.call('HSET', KEYS[9], 'pgn', h[5], 'pgv', h[2], 'pgh', h[6])
end
redis.call('RENAME', KEYS[9], KEYS[1])
redis.call('PERSIST', KEYS[1])
redis.call('SET', KEYS[6], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[6])
redis.call('ZADD', KEYS[7], 'NX', t[1], ARGV[1])
redis.call('DEL', KEYS[8])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'score'), ARGV[6])
  redis.call('HSET', KEYS[4], ARGV[6], meta)
end
return {1, ver, created}
",
    )
});

/// KEYS: conv. ARGV: ttl. Gives a clean conversation (one with a TTL) its TTL back; a dirty one
/// has none and keeps none. Sent in a pipeline after a plain `HMGET`: a script that returned the
/// hash itself would copy every message through Lua, which cost Redis 20 times the `HMGET`. Only
/// for servers without `EXPIRE ... GT` (Redis 6), which does the same in one command.
static REFRESH_TTL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('TTL', KEYS[1]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
",
    )
});

/// KEYS: conv, owner, delete tombstone, staged. ARGV: user, ttl. Caches a clean copy read from
/// PostgreSQL (staged like a save's) unless something newer is there, it was just deleted, or
/// another user has a claim on the id in Redis. It writes no owner record: PostgreSQL, which
/// just answered for this user, is the record for a clean conversation (see [`RedisCache::get`]).
static BACKFILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
local owner = redis.call('GET', KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[1]) == 1 or (owner and owner ~= ARGV[1]) then
  redis.call('DEL', KEYS[4])
  return 0
end
redis.call('RENAME', KEYS[4], KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// KEYS: conv, dirty set, list, list meta, user dirty, owner, dirty since, delete tombstone.
/// ARGV: member, id, user, tombstone ttl. Returns {-1} for another user's id, else {1, version}.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local owner = redis.call('GET', KEYS[6])
if owner and owner ~= ARGV[3] then return {-1} end
local ver = redis.call('HGET', KEYS[1], 'ver') or '0'
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('SREM', KEYS[5], ARGV[2])
redis.call('ZREM', KEYS[7], ARGV[1])
if owner then redis.call('DEL', KEYS[6]) end
redis.call('SET', KEYS[8], ver, 'EX', ARGV[4])
return {1, ver}
",
    )
});

/// KEYS: list, list meta. The cached list: ids newest first, each followed by its entry, or nil
/// when the list is not cached or an entry is missing.
static LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  if not entry then return false end
  out[#out + 1] = id
  out[#out + 1] = entry
end
return out
",
    )
});

/// KEYS: list, list meta, user dirty. ARGV: list ttl, conv key prefix, deleted key prefix, then
/// (id, score, entry) triples from PostgreSQL. Rebuilds the list from PostgreSQL's rows plus the
/// user's dirty conversations, atomically, so a save that finished before it is included and one
/// after it updates the rebuilt list. Returns what LIST returns.
static REBUILD_LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1], KEYS[2])
for i = 4, #ARGV, 3 do
  if redis.call('EXISTS', ARGV[3] .. ARGV[i]) == 0 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  end
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local h = redis.call('HMGET', ARGV[2] .. id, 'meta', 'score')
  if h[1] and h[2] then
    redis.call('ZADD', KEYS[1], h[2], id)
    redis.call('HSET', KEYS[2], id, h[1])
  end
end
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id)
end
if #ids > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return out
",
    )
});

/// Conversations settled per `SETTLE` call: one script call per conversation cost Redis more in
/// the call than in the work, and a hundred keep each call well under a millisecond.
const SETTLE_PER_CALL: usize = 100;

/// Values per conversation in `SETTLE`'s ARGV.
const SETTLE_ARGS: usize = 11;

/// KEYS: dirty set, dirty since, then per conversation: conv, user dirty, owner, list, list meta.
/// ARGV: ttl, then per conversation: member, id, version written, action ('clean' or 'drop'), what
/// PostgreSQL now holds (messages, version, fingerprint; empty when unknown, recorded even when a
/// newer save raced the flush), then what the flush read (last_modified, byte lengths of messages
/// and title; empty to skip the check) and the user.
///
/// Compare-and-clear: only when the hash still holds what the flush wrote does it become clean (or,
/// when PostgreSQL kept something else, get dropped). A save of ours that raced the flush changed
/// the version; a seed-design writer's HSET leaves our version in place but changes last_modified or
/// the transcript's length, so either way the hash stays dirty. A dropped copy's owner record goes
/// with it, so the next save of the id asks PostgreSQL again.
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 0, (#KEYS - 2) / 5 - 1 do
  local conv, user_dirty, owner, list, meta = KEYS[3 + 5 * i], KEYS[4 + 5 * i], KEYS[5 + 5 * i], KEYS[6 + 5 * i], KEYS[7 + 5 * i]
  local a = 1 + 11 * i
  local member, id, version, action = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local pgn, pgv, pgh = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local lm, mlen, tlen, user = ARGV[a + 8], ARGV[a + 9], ARGV[a + 10], ARGV[a + 11]
  local settled = true
  if redis.call('EXISTS', conv) == 1 then
    local h = redis.call('HMGET', conv, 'ver', 'pgv', 'last_modified')
    local set = {}
    if pgv ~= '' and (tonumber(h[2] or '0') or 0) < tonumber(pgv) then
      set = {'pgn', pgn, 'pgv', pgv, 'pgh', pgh}
    end
    settled = (h[1] or '') == version
    if settled and lm ~= '' then
      settled = h[3] == lm and redis.call('HSTRLEN', conv, 'messages') == tonumber(mlen)
        and redis.call('HSTRLEN', conv, 'title') == tonumber(tlen)
    end
    if settled and action == 'clean' then
      set[#set + 1] = 'dirty'
      set[#set + 1] = '0'
    end
    if #set > 0 then redis.call('HSET', conv, unpack(set)) end
    if settled and action == 'clean' then
      redis.call('EXPIRE', conv, ARGV[1])
      redis.call('EXPIRE', owner, ARGV[1])
    elseif settled then
      redis.call('DEL', conv)
      redis.call('ZREM', list, id)
      redis.call('HDEL', meta, id)
    end
  end
  if settled and action == 'drop' and redis.call('GET', owner) == user then
    redis.call('DEL', owner)
  end
  if settled then
    redis.call('SREM', KEYS[1], member)
    redis.call('SREM', user_dirty, id)
    redis.call('ZREM', KEYS[2], member)
  end
end
return 0
",
    )
});

/// KEYS: conv, dirty set, dirty since, user dirty. ARGV: version read, last_modified, byte lengths
/// of messages and title (as read), new sig, member, id.
///
/// Adopts a hash that a writer other than this product changed (a seed-design instance's HSET,
/// which keeps our fields but not our signature): gives it a version of its own, newer than any
/// it may replace, keeps it dirty and without a TTL (the seed's writer set one). Nothing happens
/// when the hash changed again since it was read. Returns the new version or nil.
static ADOPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local h = redis.call('HMGET', KEYS[1], 'ver', 'last_modified', 'pgv')
if (h[1] or '') ~= ARGV[1] or h[2] ~= ARGV[2] or redis.call('HSTRLEN', KEYS[1], 'messages') ~= tonumber(ARGV[3])
  or redis.call('HSTRLEN', KEYS[1], 'title') ~= tonumber(ARGV[4]) then
  return false
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ver = math.max(now, (tonumber(h[1] or '0') or 0) + 1, (tonumber(h[3] or '0') or 0) + 1)
ver = string.format('%.0f', ver)
redis.call('HSET', KEYS[1], 'ver', ver, 'sig', ARGV[5], 'dirty', '1')
redis.call('PERSIST', KEYS[1])
redis.call('SADD', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], 'NX', t[1], ARGV[6])
redis.call('SADD', KEYS[4], ARGV[7])
return ver
",
    )
});

/// KEYS: conv, dirty set, user dirty, dirty since, list, list meta, owner, delete tombstone.
/// ARGV: member, id, version, kind ('save' or 'delete'), user, tombstone ttl.
///
/// After a write went straight to PostgreSQL (Redis unreachable or refusing), brings Redis in line
/// with it. A copy at least as new stays. A delete drops the copy, dirty or not (the delete is newer
/// than anything it held), and leaves the tombstone that keeps reads from caching it again. After a
/// save, a clean older copy is dropped, with its owner record, so the next save asks PostgreSQL and
/// gets a version above the row's; a dirty older copy is not dropped here but left to the flush,
/// which keeps whichever copy loses aside (docs/design.md, "Divergence"). Returns 0 (newer copy
/// kept or nothing cached), 1 (dropped) or 2 (dirty copy left for the flush).
static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  local h = redis.call('HMGET', KEYS[1], 'ver', 'dirty')
  if (tonumber(h[1] or '0') or 0) >= tonumber(ARGV[3]) then return 0 end
  if ARGV[4] == 'save' and h[2] == '1' then return 2 end
end
local dropped = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('HDEL', KEYS[6], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('GET', KEYS[7]) == ARGV[5] then redis.call('DEL', KEYS[7]) end
if ARGV[4] == 'delete' then redis.call('SET', KEYS[8], ARGV[3], 'EX', ARGV[6]) end
return dropped
",
    )
});

/// Bypass entries replayed per pipeline, each call well inside the Redis timeout.
const INVALIDATE_PER_PIPELINE: usize = 100;

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

/// Seconds a staged hash may outlive a save that never reached its script.
const STAGED_TTL_SECONDS: u64 = 60;

/// True only in a test that turned on the `save.lose_staged` failpoint.
fn staged_lost() -> bool {
    fail::fail_point!("save.lose_staged", |_| true);
    false
}

/// A fresh key to stage a conversation in before the script renames it into place.
fn staged_key(conv_key: &str) -> String {
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static PROCESS: LazyLock<u128> = LazyLock::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id())
    });
    let n = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The pid as well: a forked child inherits PROCESS and NONCE, and its names must not be the
    // parent's, or one process's save could rename the other's staged copy.
    format!("staged:{conv_key}:{:x}:{:x}:{n}", *PROCESS, std::process::id())
}

fn conv_key(user_id: &str, conversation_id: &str) -> String {
    format!("conv:{user_id}:{conversation_id}")
}
fn member(user_id: &str, conversation_id: &str) -> String {
    format!("{user_id}:{conversation_id}")
}
fn list_key(user_id: &str) -> String {
    format!("user:{user_id}:convlist")
}
fn list_meta_key(user_id: &str) -> String {
    format!("user:{user_id}:convmeta")
}
fn user_dirty_key(user_id: &str) -> String {
    format!("user:{user_id}:dirty")
}
fn owner_key(conversation_id: &str) -> String {
    format!("owner:{conversation_id}")
}
fn deleted_key(user_id: &str, conversation_id: &str) -> String {
    format!("deleted:{user_id}:{conversation_id}")
}

/// Splits a `dirty:convs` member into (user, conversation id). User ids never hold ':'.
#[must_use]
pub fn split_member(member: &str) -> Option<(&str, &str)> {
    member.split_once(':').filter(|(user, id)| !user.is_empty() && !id.is_empty())
}

/// Parses a conversation hash (ours or the Python seed's) for a flush: the content as
/// [`CachedConversation::parse`] reads it for a cache hit (one parser for both), plus the
/// write-back fields.
fn parse_hash(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Option<Cached> {
    let raw = |name: &str| fields.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice());
    let text = |name: &str| raw(name).and_then(|v| std::str::from_utf8(v).ok());
    let dirty = text("dirty") == Some("1");
    let version = text("ver").and_then(|v| v.parse().ok());
    let stored = (|| {
        Some(StoredPrefix {
            messages: text("pgn")?.parse().ok()?,
            version: text("pgv")?.parse().ok()?,
            fingerprint: text("pgh")?.parse().ok()?,
        })
    })();
    let (title, messages, last_modified) = (raw("title")?, raw("messages").unwrap_or(b"[]"), raw("last_modified")?);
    let sig = content_sig(title, raw("model")?, messages, last_modified);
    let mark = ReadMark {
        last_modified: String::from_utf8_lossy(last_modified).into_owned(),
        messages_len: raw("messages").map_or(0, <[u8]>::len),
        title_len: title.len(),
        sig,
    };
    let foreign = version.is_none() || text("sig").and_then(|v| v.parse::<u64>().ok()) != Some(sig);
    let conversation = CachedConversation::parse(fields)?.to_conversation();
    Some(Cached { conversation, dirty, version, stored, mark, foreign })
}

/// The fields a read needs: `HMGET` of these replies with a fifth of `HGETALL`'s values to parse
/// (the hash also keeps the list entry, the version and the flush's bookkeeping).
const READ_FIELDS: [&str; 5] = ["title", "model", "messages", "created_at", "last_modified"];

/// The fields a flush needs: the content, the dirty flag and the write-back bookkeeping (not the
/// list entry or its score).
const FLUSH_FIELDS: [&str; 11] =
    ["title", "model", "messages", "created_at", "last_modified", "dirty", "ver", "pgn", "pgv", "pgh", "sig"];

/// Conversations a flush reads per pipeline. A whole batch in one (500 of 7 KB for 20 messages)
/// made Redis and this client each buffer megabytes per round trip, and paging that memory in
/// cost more than the four extra round trips.
const FLUSH_READ_CHUNK: usize = 100;

/// An `HMGET` of `names` as (name, value) pairs, without the missing ones: none for a missing hash.
fn named_fields(names: &[&str], value: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    names
        .iter()
        .zip(items)
        .filter_map(|(name, v)| match v {
            Value::BulkString(v) => Some((name.as_bytes().to_vec(), v)),
            _ => None,
        })
        .collect()
}

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

/// Redis memory as `INFO memory` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryInfo {
    /// `used_memory`.
    pub used: Option<u64>,
    /// `maxmemory` (0 = no limit).
    pub max: Option<u64>,
    /// `maxmemory_policy`.
    pub policy: Option<String>,
}

/// The Redis cache.
pub struct RedisCache {
    pool: r2d2::Pool<Connector>,
    settings: RedisSettings,
    /// Concurrent reads share round trips (see [`Combiner`]).
    reads: Combiner<String, CacheResult<Value>>,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache").field("url", &self.settings.redacted()).finish_non_exhaustive()
    }
}

impl RedisCache {
    /// Builds the pool without connecting.
    pub fn new(settings: &RedisSettings) -> crate::error::Result<Self> {
        let client = match &settings.ca_file {
            None => redis::Client::open(settings.url()),
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| Error::config(format!("cannot read the CA file {}", path.display())).with_source(e))?;
                redis::Client::build_with_tls(
                    settings.url(),
                    redis::TlsCertificates { client_tls: None, root_cert: Some(pem) },
                )
            }
        }
        .map_err(|e| Error::config("the Redis connection string is not valid").with_source(e.to_string()))?;
        let pool = r2d2::Pool::builder()
            .max_size(settings.pool_size)
            .min_idle(Some(0))
            .connection_timeout(settings.timeout)
            .test_on_check_out(false)
            .idle_timeout(Some(Duration::from_secs(300)))
            .error_handler(Box::new(PoolErrorLog))
            .build_unchecked(Connector { client, timeout: settings.timeout });
        // One round trip in flight per CPU this process may run on (taskset and cgroup limits
        // count), and never more than the pool's connections.
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let reads = Combiner::new(
            cpus.min(settings.pool_size as usize),
            || Err(CacheError::Other("the batch carrying this read failed".into())),
            |reply| matches!(reply, Err(CacheError::Unavailable(_))),
        );
        Ok(RedisCache { pool, settings: settings.clone(), reads })
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

    /// Runs `op` on a pooled connection. A connection that a restart or a dropped socket killed
    /// while idle is replaced and the call run again (every script here is safe to repeat);
    /// a timeout is not retried, so a dead Redis costs one timeout, not several.
    fn run_on<T>(&self, mut op: impl FnMut(&mut RedisConnection) -> redis::RedisResult<T>) -> CacheResult<T> {
        let attempts = self.pool.max_size() + 1;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut conn = self.pool.get().map_err(|e| CacheError::Unavailable(e.to_string()))?;
            match op(&mut conn) {
                Ok(value) => return Ok(value),
                Err(e) => {
                    let error = CacheError::from_redis(&e);
                    if matches!(error, CacheError::Unavailable(_)) {
                        conn.broken = true;
                        if (e.is_connection_dropped() || !conn.con.is_open()) && !e.is_timeout() && attempt < attempts {
                            continue;
                        }
                    }
                    return Err(error);
                }
            }
        }
    }

    /// [`RedisCache::run_on`] for calls that need only the connection.
    fn run<T>(&self, mut op: impl FnMut(&mut Connection) -> redis::RedisResult<T>) -> CacheResult<T> {
        self.run_on(|conn| op(&mut conn.con))
    }

    /// The cached conversation; a clean hit gets its TTL back. An unreadable hash reads as a miss.
    ///
    /// The id's owner record (`owner:<id>`) is not given its TTL back: it keeps the one it got when
    /// the conversation became clean, and when it lapses first nothing changes for the owner, whose
    /// `conv:<user>:<id>` still proves the claim, while another user's save or delete of the id is
    /// checked in PostgreSQL, as for any id Redis does not know. A hit is one command instead of two.
    pub fn get(&self, user_id: &str, conversation_id: &str) -> CacheResult<Option<CachedConversation>> {
        let key = conv_key(user_id, conversation_id);
        let value = self.reads.run(key, |batch| self.read_batch(batch))?;
        let fields = named_fields(&READ_FIELDS, value);
        if fields.is_empty() {
            return Ok(None);
        }
        let cached = CachedConversation::parse(fields);
        if cached.is_none() {
            log::warn!("ignoring the unreadable cached conversation {}", conv_key(user_id, conversation_id));
        }
        Ok(cached)
    }

    /// The hashes of a batch of conversation keys in one round trip, each clean one given its TTL
    /// back.
    fn read_batch(&self, batch: &[&String]) -> Vec<CacheResult<Value>> {
        let ttl = self.ttl();
        let result = self.run_on(|conn| {
            let pipe = |script: bool| {
                let mut pipe = redis::pipe();
                for key in batch {
                    pipe.cmd("HMGET").arg(key).arg(&READ_FIELDS);
                    if script {
                        let mut refresh = evalsha(&REFRESH_TTL, &[key]);
                        refresh.arg(ttl);
                        pipe.add_command(refresh).ignore();
                    } else {
                        // GT leaves a key without a TTL (a dirty conversation) without one.
                        pipe.cmd("EXPIRE").arg(key).arg(ttl).arg("GT").ignore();
                    }
                }
                pipe
            };
            if conn.expire_gt {
                return pipe(false).query::<Vec<Value>>(&mut conn.con);
            }
            query_loading(&mut conn.con, &pipe(true), &[&REFRESH_TTL])
        });
        match result {
            Ok(values) if values.len() == batch.len() => values.into_iter().map(Ok).collect(),
            Ok(values) => {
                let why = format!("{} replies to a pipeline of {} reads", values.len(), batch.len());
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

    /// Stores the conversation as dirty, without a TTL, and updates the user's cached list: one
    /// round trip (a pipeline of the staged fields and the script). Returns the stored
    /// `created_at` too (an existing one is kept, as PostgreSQL does).
    pub fn save(
        &self,
        user_id: &str,
        conversation_id: &str,
        conv: &Conversation,
        options: SaveOptions,
    ) -> CacheResult<(SaveOutcome, Option<String>)> {
        let meta = ListEntry::to_json(conv);
        let conv_key = conv_key(user_id, conversation_id);
        let staged = staged_key(&conv_key);
        let keys = [
            conv_key.as_str(),
            DIRTY_SET,
            &list_key(user_id),
            &list_meta_key(user_id),
            &user_dirty_key(user_id),
            &owner_key(conversation_id),
            DIRTY_SINCE,
            &deleted_key(user_id, conversation_id),
            &staged,
        ];
        let created_at = conv.created_at.to_string();
        let member = member(user_id, conversation_id);
        let mut script = evalsha(&SAVE, &keys);
        script
            .arg(&member)
            .arg(user_id)
            .arg(&created_at)
            .arg(&meta)
            .arg(if options.claim { "1" } else { "0" })
            .arg(conversation_id)
            .arg(options.floor.unwrap_or(0))
            .arg(if options.guard { "1" } else { "0" });
        let mut pipe = redis::pipe();
        stage(&mut pipe, &if staged_lost() { format!("{staged}:lost") } else { staged.clone() }, conv, &[]);
        pipe.add_command(script);
        let (reply,): (Vec<Value>,) = self.run(|con| query_loading(con, &pipe, &[&SAVE]))?;
        let status = reply.first().and_then(|v| redis::from_redis_value_ref::<i64>(v).ok()).unwrap_or(-2);
        Ok(match status {
            1 => {
                let version = reply
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    .and_then(|v| v.parse().ok());
                let created = reply.get(2).and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
                (SaveOutcome::Saved(version.unwrap_or(0)), created)
            }
            0 => (SaveOutcome::OwnerUnknown, None),
            -1 => (SaveOutcome::OtherOwner, None),
            2 => (SaveOutcome::Diverged, None),
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
        let conv_key = conv_key(user_id, conversation_id);
        let staged = staged_key(&conv_key);
        let (owner, deleted) = (owner_key(conversation_id), deleted_key(user_id, conversation_id));
        let mut script = evalsha(&BACKFILL, &[&conv_key, &owner, &deleted, &staged]);
        script.arg(user_id).arg(self.ttl());
        let meta = ListEntry::to_json(conv);
        // With a version, PostgreSQL holds exactly these messages at it.
        let stored = version.map(|v| {
            (
                conv.messages.len().to_string(),
                v.to_string(),
                crate::model::messages_fingerprint(&conv.messages).to_string(),
            )
        });
        let ver = version.unwrap_or(0).to_string();
        let mut fields = vec![("dirty", "0"), ("ver", ver.as_str()), ("meta", meta.as_str())];
        if let Some((n, v, h)) = &stored {
            fields.extend([("pgn", n.as_str()), ("pgv", v.as_str()), ("pgh", h.as_str())]);
        }
        let mut pipe = redis::pipe();
        stage(&mut pipe, &staged, conv, &fields);
        pipe.add_command(script);
        let _: (i64,) = self.run(|con| query_loading(con, &pipe, &[&BACKFILL]))?;
        Ok(())
    }

    /// Whether the user may delete the id as far as Redis knows, and the version Redis holds (0
    /// when none): `Ok(None)` when the id is another user's. Changes nothing, so a delete can ask
    /// PostgreSQL first and leave everything as it was when PostgreSQL refuses.
    pub fn peek_delete(&self, user_id: &str, conversation_id: &str) -> CacheResult<Option<i64>> {
        let (owner, version): (Option<String>, Option<String>) = self.run(|con| {
            redis::pipe()
                .cmd("GET")
                .arg(owner_key(conversation_id))
                .cmd("HGET")
                .arg(conv_key(user_id, conversation_id))
                .arg("ver")
                .query(con)
        })?;
        if owner.is_some_and(|o| o != user_id) {
            return Ok(None);
        }
        Ok(Some(version.and_then(|v| v.parse().ok()).unwrap_or(0)))
    }

    /// Removes the conversation from every key. `Ok(None)` when the id is another user's;
    /// otherwise the version Redis had (0 when none), for PostgreSQL's tombstone.
    pub fn delete(&self, user_id: &str, conversation_id: &str) -> CacheResult<Option<i64>> {
        let keys = [
            conv_key(user_id, conversation_id),
            DIRTY_SET.to_owned(),
            list_key(user_id),
            list_meta_key(user_id),
            user_dirty_key(user_id),
            owner_key(conversation_id),
            DIRTY_SINCE.to_owned(),
            deleted_key(user_id, conversation_id),
        ];
        let member = member(user_id, conversation_id);
        let reply: Vec<Value> = self.run(|con| {
            let mut invocation = DELETE.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            invocation.arg(&member).arg(conversation_id).arg(user_id).arg(DELETE_TOMBSTONE_SECONDS).invoke(con)
        })?;
        let status = reply.first().and_then(|v| redis::from_redis_value_ref::<i64>(v).ok()).unwrap_or(-2);
        if status == -1 {
            return Ok(None);
        }
        let version =
            reply.get(1).and_then(|v| redis::from_redis_value_ref::<String>(v).ok()).and_then(|v| v.parse().ok());
        Ok(Some(version.unwrap_or(0)))
    }

    /// Records PostgreSQL's tombstone version for a just-deleted conversation, so a save of the
    /// same id soon after gets a newer version whatever the clocks say.
    pub fn mark_deleted(&self, user_id: &str, conversation_id: &str, version: i64) -> CacheResult<()> {
        let key = deleted_key(user_id, conversation_id);
        self.run(|con| {
            redis::cmd("SET").arg(&key).arg(version).arg("EX").arg(DELETE_TOMBSTONE_SECONDS).query::<()>(con)
        })
    }

    /// The user's cached list (ids with metadata, newest first), or `None` when not cached.
    pub fn list(&self, user_id: &str) -> CacheResult<Option<Vec<(String, Conversation)>>> {
        let (list, meta) = (list_key(user_id), list_meta_key(user_id));
        let value: Value = self.run(|con| LIST.key(&list).key(&meta).invoke(con))?;
        match value {
            Value::Nil => Ok(None),
            other => Ok(parse_listing(other)),
        }
    }

    /// Rebuilds the user's list from PostgreSQL's rows plus the user's dirty conversations and
    /// returns it.
    pub fn rebuild_list(
        &self,
        user_id: &str,
        from_postgres: &[(String, Conversation)],
    ) -> CacheResult<Vec<(String, Conversation)>> {
        let keys = [list_key(user_id), list_meta_key(user_id), user_dirty_key(user_id)];
        let conv_prefix = format!("conv:{user_id}:");
        let deleted_prefix = format!("deleted:{user_id}:");
        let entries: Vec<(f64, String)> =
            from_postgres.iter().map(|(_, c)| (c.last_modified.unix_seconds(), ListEntry::to_json(c))).collect();
        let value: Value = self.run(|con| {
            let mut invocation = REBUILD_LIST.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            invocation.arg(LIST_TTL_SECONDS).arg(&conv_prefix).arg(&deleted_prefix);
            for ((id, _), (score, entry)) in from_postgres.iter().zip(&entries) {
                invocation.arg(id).arg(*score).arg(entry);
            }
            invocation.invoke(con)
        })?;
        Ok(parse_listing(value).unwrap_or_default())
    }

    /// Brings Redis in line with writes that went straight to PostgreSQL (see [`INVALIDATE`]), in
    /// pipelines of a hundred. Returns the `<user>:<id>` members whose dirty copy is older than
    /// PostgreSQL's row: the caller flushes them, which resolves the divergence.
    pub fn invalidate(&self, items: &[Bypass]) -> CacheResult<Vec<String>> {
        let mut left = Vec::new();
        for chunk in items.chunks(INVALIDATE_PER_PIPELINE) {
            let replies: Vec<i64> = self.run(|con| {
                let mut pipe = redis::pipe();
                for item in chunk {
                    let (user_id, conversation_id) = (item.user_id.as_str(), item.conversation_id.as_str());
                    let mut cmd = evalsha(
                        &INVALIDATE,
                        &[
                            &conv_key(user_id, conversation_id),
                            DIRTY_SET,
                            &user_dirty_key(user_id),
                            DIRTY_SINCE,
                            &list_key(user_id),
                            &list_meta_key(user_id),
                            &owner_key(conversation_id),
                            &deleted_key(user_id, conversation_id),
                        ],
                    );
                    cmd.arg(member(user_id, conversation_id))
                        .arg(conversation_id)
                        .arg(item.version)
                        .arg(if item.deleted { "delete" } else { "save" })
                        .arg(user_id)
                        .arg(DELETE_TOMBSTONE_SECONDS);
                    pipe.add_command(cmd);
                }
                query_loading(con, &pipe, &[&INVALIDATE])
            })?;
            left.extend(
                chunk
                    .iter()
                    .zip(replies)
                    .filter(|(_, status)| *status == 2)
                    .map(|(item, _)| member(&item.user_id, &item.conversation_id)),
            );
        }
        Ok(left)
    }

    /// One step of a scan of the dirty set: the next cursor (0 at the end) and some members.
    pub fn scan_dirty(&self, cursor: u64, count: usize) -> CacheResult<(u64, Vec<String>)> {
        self.run(|con| redis::cmd("SSCAN").arg(DIRTY_SET).arg(cursor).arg("COUNT").arg(count).query(con))
    }

    /// Every dirty member (the seed's `get_dirty_conversations`).
    pub fn all_dirty(&self) -> CacheResult<Vec<String>> {
        self.run(|con| redis::cmd("SMEMBERS").arg(DIRTY_SET).query(con))
    }

    /// The hashes of dirty members, in one round trip.
    pub fn fetch_dirty(&self, members: &[String], timeout: Duration) -> CacheResult<Vec<DirtyEntry>> {
        let values: Vec<Value> = self.run(|con| {
            con.set_read_timeout(Some(timeout))?;
            let result =
                members.chunks(FLUSH_READ_CHUNK).try_fold(Vec::with_capacity(members.len()), |mut values, chunk| {
                    let mut pipe = redis::pipe();
                    for m in chunk {
                        let key = split_member(m).map_or_else(|| format!("conv:{m}"), |(u, c)| conv_key(u, c));
                        pipe.cmd("HMGET").arg(key).arg(&FLUSH_FIELDS);
                    }
                    values.extend(pipe.query::<Vec<Value>>(con)?);
                    Ok(values)
                });
            con.set_read_timeout(Some(self.settings.timeout))?;
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

    /// Compare-and-clear for a batch of flushed conversations (see [`SETTLE`]).
    pub fn settle(&self, items: &[SettleItem]) -> CacheResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let ttl = self.ttl();
        self.run(|con| {
            let mut pipe = redis::pipe();
            for chunk in items.chunks(SETTLE_PER_CALL) {
                let mut keys = Vec::with_capacity(2 + 5 * chunk.len());
                let mut args: Vec<String> = Vec::with_capacity(1 + SETTLE_ARGS * chunk.len());
                keys.extend([DIRTY_SET.to_owned(), DIRTY_SINCE.to_owned()]);
                args.push(ttl.to_string());
                for SettleItem { member, version, action, stored, mark } in chunk {
                    let (user_id, conversation_id) = split_member(member).unwrap_or(("", member.as_str()));
                    keys.extend([
                        conv_key(user_id, conversation_id),
                        user_dirty_key(user_id),
                        owner_key(conversation_id),
                        list_key(user_id),
                        list_meta_key(user_id),
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
                let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                let mut cmd = evalsha(&SETTLE, &key_refs);
                cmd.arg(&args);
                pipe.add_command(cmd).ignore();
            }
            query_loading::<()>(con, &pipe, &[&SETTLE])
        })
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

    /// Gives a hash another writer changed a version of its own (see [`ADOPT`]); `None` when it
    /// changed again since it was read.
    pub fn adopt(&self, user_id: &str, conversation_id: &str, cached: &Cached) -> CacheResult<Option<i64>> {
        let keys =
            [conv_key(user_id, conversation_id), DIRTY_SET.to_owned(), DIRTY_SINCE.to_owned(), user_dirty_key(user_id)];
        let version: Option<String> = self.run(|con| {
            let mut invocation = ADOPT.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            invocation
                .arg(cached.version.map(|v| v.to_string()).unwrap_or_default())
                .arg(&cached.mark.last_modified)
                .arg(cached.mark.messages_len)
                .arg(cached.mark.title_len)
                .arg(cached.mark.sig)
                .arg(member(user_id, conversation_id))
                .arg(conversation_id)
                .invoke(con)
        })?;
        Ok(version.and_then(|v| v.parse().ok()))
    }

    /// `SCARD dirty:convs` and the oldest entry of `dirty:since` (Unix seconds), in one round trip.
    pub fn dirty_summary(&self) -> CacheResult<(u64, Option<f64>)> {
        let (count, oldest): (u64, Vec<(String, f64)>) = self.run(|con| {
            redis::pipe()
                .cmd("SCARD")
                .arg(DIRTY_SET)
                .cmd("ZRANGE")
                .arg(DIRTY_SINCE)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .query(con)
        })?;
        Ok((count, oldest.first().map(|(_, score)| *score)))
    }

    /// `INFO memory`, where the server allows it.
    pub fn memory(&self) -> CacheResult<MemoryInfo> {
        let info: String = self.run(|con| redis::cmd("INFO").arg("memory").query(con))?;
        let field = |name: &str| {
            info.lines().find_map(|line| {
                line.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')).map(str::trim).map(str::to_owned)
            })
        };
        Ok(MemoryInfo {
            used: field("used_memory").and_then(|v| v.parse().ok()),
            max: field("maxmemory").and_then(|v| v.parse().ok()),
            policy: field("maxmemory_policy"),
        })
    }

    /// A round trip, to see whether Redis is back.
    pub fn ping(&self) -> CacheResult<()> {
        self.run(|con| redis::cmd("PING").query::<()>(con))
    }
}

/// `EVALSHA` of a script with its keys, for pipelines; the caller appends the arguments.
fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}

/// A signature of the content fields exactly as stored (XXH3, so every process agrees): a save
/// stamps it in the `sig` field, and a flush that finds it does not match knows another writer
/// changed the hash since.
fn content_sig(title: &[u8], model: &[u8], messages: &[u8], last_modified: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    for part in [title, model, messages, last_modified] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.digest()
}

/// Stages a conversation's fields, and `extra` ones, in `staged` with one `HSET` (with a TTL, so a
/// save whose script never ran, say on NOSCRIPT, leaves nothing behind); the script that follows
/// in the same pipeline renames it into place. No MULTI/EXEC around them: the staged key's name is
/// unique to this call, so nothing else can touch it in between, and the script does every check
/// and the rename atomically; the transaction cost a save or a miss 2-4 us for nothing. The
/// command is sized up front: the transcript is most of its bytes, and growing the buffer for it
/// cost more than writing it.
fn stage(pipe: &mut redis::Pipeline, staged: &str, conv: &Conversation, extra: &[(&str, &str)]) {
    let messages = messages_json::write(&conv.messages);
    let mut times = String::with_capacity(64);
    conv.created_at.push_to(&mut times);
    let created_len = times.len();
    conv.last_modified.push_to(&mut times);
    let (created_at, last_modified) = times.split_at(created_len);
    let extra_bytes: usize = extra.iter().map(|(k, v)| k.len() + v.len()).sum();
    let sig = content_sig(conv.title.as_bytes(), conv.model.as_bytes(), messages.as_bytes(), last_modified.as_bytes());
    let mut hset = redis::Cmd::with_capacity(
        16 + 2 * extra.len(),
        staged.len() + conv.title.len() + conv.model.len() + messages.len() + extra_bytes + 190,
    );
    hset.arg("HSET")
        .arg(staged)
        .arg("title")
        .arg(&conv.title)
        .arg("model")
        .arg(&conv.model)
        .arg("messages")
        .arg(messages)
        .arg("created_at")
        .arg(created_at)
        .arg("last_modified")
        .arg(last_modified)
        .arg("score")
        .arg(conv.last_modified.unix_seconds())
        .arg("sig")
        .arg(sig);
    for (field, value) in extra {
        hset.arg(*field).arg(*value);
    }
    pipe.add_command(hset).ignore().cmd("EXPIRE").arg(staged).arg(STAGED_TTL_SECONDS).ignore();
}

/// Runs a pipeline that uses EVALSHA, loading the scripts and running it again on NOSCRIPT (the
/// scripts are loaded when a connection opens, so this is for a SCRIPT FLUSH or a failover).
fn query_loading<T: redis::FromRedisValue>(
    con: &mut Connection,
    pipe: &redis::Pipeline,
    scripts: &[&Script],
) -> redis::RedisResult<T> {
    match pipe.query(con) {
        Err(e) if e.kind() == redis::ServerErrorKind::NoScript.into() || e.to_string().contains("NOSCRIPT") => {
            load_scripts(con, scripts)?;
            pipe.query(con)
        }
        other => other,
    }
}

/// Loads scripts that are about to be used by EVALSHA in a pipeline (single invocations load
/// themselves on NOSCRIPT).
fn load_scripts(con: &mut Connection, scripts: &[&Script]) -> redis::RedisResult<()> {
    // One SCRIPT EXISTS for all of them: this runs for every new pooled connection.
    let mut exists_cmd = redis::cmd("SCRIPT");
    exists_cmd.arg("EXISTS");
    for script in scripts {
        exists_cmd.arg(script.get_hash());
    }
    let exists: Vec<bool> = exists_cmd.query(con)?;
    for (script, loaded) in scripts.iter().zip(exists) {
        if !loaded {
            script.prepare_invoke().load(con)?;
        }
    }
    Ok(())
}

fn parse_listing(value: Value) -> Option<Vec<(String, Conversation)>> {
    let Value::Array(items) = value else {
        return None;
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut iter = items.into_iter();
    while let (Some(id), Some(entry)) = (iter.next(), iter.next()) {
        let (Value::BulkString(id), Value::BulkString(entry)) = (id, entry) else {
            return None;
        };
        out.push((String::from_utf8(id).ok()?, ListEntry::parse(&entry)?));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_split_at_the_first_colon() {
        assert_eq!(split_member("u-1:a1b2c3d4"), Some(("u-1", "a1b2c3d4")));
        assert_eq!(split_member(":x"), None);
        assert_eq!(split_member("nocolon"), None);
    }

    #[test]
    fn seed_hashes_parse() {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = [
            ("title", "t"),
            ("model", "m"),
            ("messages", r#"[{"role": "user", "content": "hi", "time": "2025-01-01T00:00:00+00:00"}]"#),
            ("created_at", "2025-01-01T00:00:00+00:00"),
            ("last_modified", "2025-01-01T00:00:00+00:00"),
            ("dirty", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        let cached = parse_hash(fields).unwrap();
        assert!(cached.dirty);
        assert_eq!(cached.version, None);
        assert_eq!(cached.conversation.messages.len(), 1);
    }

    #[test]
    fn list_entries_round_trip() {
        let t = Timestamp::parse("2025-01-01T00:00:00+00:00").unwrap();
        let conv = Conversation {
            title: "Grüße".into(),
            model: "m".into(),
            messages: vec![],
            created_at: t,
            last_modified: t,
        };
        assert_eq!(ListEntry::parse(ListEntry::to_json(&conv).as_bytes()), Some(conv));
    }
}
