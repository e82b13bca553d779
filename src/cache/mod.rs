//! The Redis tier: the key layouts, the Lua scripts that make every multi-key change atomic, and
//! the cache's reads, writes and write-back side.
//!
//! This file is the cache's one façade: its modules are private, and what the rest of the crate
//! uses is re-exported below.
//!
//! - `redis`: [`RedisCache`], its pool of connections and its reads
//! - `writes`: saves, deletes and list updates; `flush`: write-back's Redis side (dirty sets, settles)
//! - `follow`: the change feed's Redis side (changes PostgreSQL committed, its lease and mark)
//! - `keys`: every key name, built by one layout value ([`KeyLayout`])
//! - `codec`: hashes and replies to and from Rust values; `messages_json`: the transcripts' JSON;
//!   `compression`: the forms it is stored in (`redis_compression`)
//! - `scripts`: the Lua scripts and the one way they are called
//! - `pool`, `clock`, `error`: connections and topology, Redis's clock, [`CacheError`]
//! - `combine`: concurrent reads sharing a round trip; `near`, `tracking`: the near cache and the
//!   connections that keep it correct; `nodes`: a cluster's primaries

mod clock;
mod codec;
mod combine;
mod compression;
mod error;
mod flush;
mod follow;
mod keys;
mod messages_json;
mod near;
mod nodes;
mod pool;
mod redis;
mod scripts;
mod tracking;
mod writes;

pub use codec::{Cached, CachedConversation, MemoryInfo, StoredPrefix};
pub use error::{CacheError, CacheResult};
pub use flush::{DirtyEntry, Settle, SettleItem};
pub use follow::Followed;
pub use keys::{fresh_token, member, split_late_member, split_member, KeyLayout};
pub use near::NearStats;
pub use nodes::{CacheMemory, NodeInfo};
pub use redis::{ListRead, RedisCache};
pub use writes::{copy_mark, Bypass, Deleted, SaveOptions, SaveOutcome};
