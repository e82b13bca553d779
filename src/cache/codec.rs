//! How conversations look in Redis: the hash a save stages, the fields a read and a flush take back,
//! the list entries, and the signature that tells our writes from another writer's.

use redis::Value;

use crate::cache::compression;
use crate::cache::messages_json::{self, Text};
use crate::config::Compression;
use crate::model::{Conversation, Message, Role, Timestamp};

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
    /// The write-back version of the copy read (`None` for a hash without one, a seed writer's).
    pub version: Option<i64>,
    json: String,
    messages: Vec<(Role, Text, Text)>,
}

impl CachedConversation {
    pub(crate) fn parse(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Option<Self> {
        let mut title = None;
        let mut model = None;
        let mut json = None;
        let mut created_at = None;
        let mut last_modified = None;
        let mut version = None;
        for (key, value) in fields {
            match key.as_slice() {
                b"title" => title = String::from_utf8(value).ok(),
                b"model" => model = String::from_utf8(value).ok(),
                // Whichever form it is stored in (plain, the seed's zlib, ours): decoded once, here.
                b"messages" => json = compression::decode(value),
                b"ver" => version = std::str::from_utf8(&value).ok().and_then(|v| v.parse().ok()),
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
            version,
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

    /// Bytes it occupies, counted for the near cache's bound: the struct, its strings and the
    /// message index.
    #[must_use]
    pub fn weight(&self) -> usize {
        let owned = |t: &Text| if let Text::Owned(s) = t { s.capacity() } else { 0 };
        std::mem::size_of::<Self>()
            + self.title.capacity()
            + self.model.capacity()
            + self.json.capacity()
            + self.messages.capacity() * std::mem::size_of::<(Role, Text, Text)>()
            + self.messages.iter().map(|(_, c, t)| owned(c) + owned(t)).sum::<usize>()
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

/// The list entry of a conversation: everything but the messages.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct ListEntry<'a> {
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

    pub(crate) fn to_json(conv: &Conversation) -> String {
        serde_json::to_string(&ListEntry::of(conv)).expect("a list entry always serialises")
    }

    pub(crate) fn parse(text: &[u8]) -> Option<Conversation> {
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

/// Parses a conversation hash (ours or the Python seed's) for a flush: the content as
/// [`CachedConversation::parse`] reads it for a cache hit (one parser for both), plus the
/// write-back fields.
pub(crate) fn parse_hash(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Option<Cached> {
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
pub(crate) const READ_FIELDS: [&str; 6] = ["title", "model", "messages", "created_at", "last_modified", "ver"];

/// The fields a flush needs: the content, the dirty flag and the write-back bookkeeping (not the
/// list entry or its score).
pub(crate) const FLUSH_FIELDS: [&str; 11] =
    ["title", "model", "messages", "created_at", "last_modified", "dirty", "ver", "pgn", "pgv", "pgh", "sig"];

/// Conversations a flush reads per pipeline. A whole batch in one (500 of 7 KB for 20 messages)
/// made Redis and this client each buffer megabytes per round trip, and paging that memory in
/// cost more than the four extra round trips.
pub(crate) const FLUSH_READ_CHUNK: usize = 100;

/// An `HMGET` of `names` as (name, value) pairs, without the missing ones: none for a missing hash.
pub(crate) fn named_fields(names: &[&str], value: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
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

/// The fields of an `INFO memory` reply that [`MemoryInfo`] keeps.
#[must_use]
pub fn parse_memory_info(info: &str) -> MemoryInfo {
    let field = |name: &str| {
        info.lines().find_map(|line| {
            line.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')).map(str::trim).map(str::to_owned)
        })
    };
    MemoryInfo {
        used: field("used_memory").and_then(|v| v.parse().ok()),
        max: field("maxmemory").and_then(|v| v.parse().ok()),
        policy: field("maxmemory_policy"),
    }
}

/// Seconds a staged hash may outlive a save that never reached its script.
pub(crate) const STAGED_TTL_SECONDS: u64 = 60;

/// A signature of the content fields exactly as stored (XXH3, so every process agrees): a save
/// stamps it in the `sig` field, and a flush that finds it does not match knows another writer
/// changed the hash since.
pub(crate) fn content_sig(title: &[u8], model: &[u8], messages: &[u8], last_modified: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    for part in [title, model, messages, last_modified] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.digest()
}

/// What the prefix fingerprints (field `fps`, or `fpb` in bytes; see
/// [`crate::model::prefix_fingerprints`]) were computed from, as field `fpm`: the stored transcript's
/// byte length and `last_modified`. The save script trusts the fingerprints only while `fpm` still
/// matches the hash (`HSTRLEN messages` and `last_modified`): a writer that knows nothing of them (a
/// seed-design instance's `HSET`) changes both, and its copy then counts as unknown, which the
/// script treats as the one it must not lose.
pub(crate) fn prints_mark(messages_len: usize, last_modified: &str) -> String {
    format!("{messages_len}|{last_modified}")
}

/// Stages a conversation's fields, and `extra` ones, in `staged` with one `HSET` (the transcript in
/// the form `compression` names; its signature is of the stored bytes) and gives it `ttl` seconds (a
/// save's [`STAGED_TTL_SECONDS`], so one whose script never ran, say on NOSCRIPT, leaves nothing
/// behind; a clean copy's own TTL for a read's backfill, which its rename keeps); the script that follows
/// in the same pipeline renames it into place. No MULTI/EXEC around them: the staged key's name is
/// unique to this call, so nothing else can touch it in between, and the script does every check
/// and the rename atomically; the transaction cost time for nothing (docs/benchmarks.md). The
/// command is sized up front: the transcript is most of its bytes, and growing the buffer for it
/// cost more than writing it.
pub(crate) fn stage(
    pipe: &mut redis::Pipeline,
    staged: &str,
    conv: &Conversation,
    extra: &[(&str, &str)],
    compression: Compression,
    ttl: u64,
) {
    let messages = compression::encode(messages_json::write(&conv.messages), compression);
    let mut times = String::with_capacity(64);
    conv.created_at.push_to(&mut times);
    let created_len = times.len();
    conv.last_modified.push_to(&mut times);
    let (created_at, last_modified) = times.split_at(created_len);
    let extra_bytes: usize = extra.iter().map(|(k, v)| k.len() + v.len()).sum();
    let sig = content_sig(conv.title.as_bytes(), conv.model.as_bytes(), &messages, last_modified.as_bytes());
    // Fingerprints as bytes where the hash is compressed with our own codec (a seed-design reader
    // cannot decode it anyway), as hexadecimal text elsewhere: `save.lua` compares either.
    let (prints_field, prints) = match compression {
        Compression::Zstd => ("fpb", crate::model::prefix_fingerprint_bytes(&conv.messages)),
        Compression::Off | Compression::Zlib => ("fps", crate::model::prefix_fingerprints(&conv.messages).into_bytes()),
    };
    let prints_of = prints_mark(messages.len(), last_modified);
    let mut hset = redis::Cmd::with_capacity(
        20 + 2 * extra.len(),
        staged.len() + conv.title.len() + conv.model.len() + messages.len() + prints.len() + extra_bytes + 240,
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
        .arg(sig)
        .arg(prints_field)
        .arg(prints)
        .arg("fpm")
        .arg(prints_of);
    for (field, value) in extra {
        hset.arg(*field).arg(*value);
    }
    pipe.add_command(hset).ignore().cmd("EXPIRE").arg(staged).arg(ttl).ignore();
}

pub(crate) fn parse_listing(value: Value) -> Option<Vec<(String, Conversation)>> {
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

    #[test]
    fn parse_memory_info_reads_the_three_fields_and_not_their_prefixed_cousins() {
        let info = "# Memory\r\nused_memory:1024\r\nused_memory_human:1.00K\r\nmaxmemory:0\r\n\
                    maxmemory_human:0B\r\nmaxmemory_policy:volatile-lru\r\n";
        assert_eq!(
            parse_memory_info(info),
            MemoryInfo { used: Some(1024), max: Some(0), policy: Some("volatile-lru".into()) }
        );
    }
}
