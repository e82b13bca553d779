//! The manager's numbers as `stats()` returns them (docs/monitoring.md, "What `stats()` returns").

use crate::cache::{MemoryInfo, NodeInfo};

/// A point-in-time copy of the manager's numbers (docs/monitoring.md, "What `stats()` returns").
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// The mode's name.
    pub mode: &'static str,
    /// `get_conversation` calls.
    pub reads: u64,
    /// `list_conversations` calls.
    pub lists: u64,
    /// `save_conversation` calls that stored something.
    pub saves: u64,
    /// `delete_conversation` calls.
    pub deletes: u64,
    /// Calls that failed for a reason other than bad input.
    pub errors: u64,
    /// Whether `close()` was called.
    pub closed: bool,
    /// The cache's numbers, in redis mode.
    pub cache: Option<CacheStats>,
}

/// The Redis tier's numbers (docs/monitoring.md, "What `stats()` returns").
#[derive(Debug, Clone, PartialEq)]
pub struct CacheStats {
    /// Reads and lists served by Redis.
    pub hits: u64,
    /// Reads and lists Redis did not have.
    pub misses: u64,
    /// Calls that went to PostgreSQL because Redis was unreachable, backing off or out of memory.
    pub fallbacks: u64,
    /// Whether the last Redis call succeeded (and no backoff is in force).
    pub redis_available: bool,
    /// Why Redis is not in use, while it is not (the last failure); `None` while it serves.
    pub redis_error: Option<String>,
    /// Round trips that cache reads took.
    pub read_round_trips: u64,
    /// Reads that shared their round trip with another thread's (see `cache::combine`).
    pub reads_shared: u64,
    /// `SCARD dirty:convs`, when Redis answered.
    pub dirty_count: Option<u64>,
    /// Seconds since the oldest dirty conversation became dirty (the write-back lag).
    pub oldest_dirty_age_seconds: Option<f64>,
    /// Completed flush runs.
    pub flushes: u64,
    /// Conversations written back.
    pub conversations_flushed: u64,
    /// Failed write-back attempts.
    pub flush_failures: u64,
    /// `<user>:<id>` of conversations PostgreSQL refused, kept dirty and retried.
    pub stuck: Vec<String>,
    /// Copies this manager kept aside in `conversation_conflicts` after a divergence.
    pub conflicts_kept: u64,
    /// Redis memory, when the server allows `INFO`: on a Redis Cluster the primaries' combined
    /// (see `cache::nodes::combined`).
    pub memory: MemoryInfo,
    /// A Redis Cluster's primaries with their slots and memory; empty on a single node.
    pub nodes: Vec<NodeInfo>,
    /// The Redis URL without its password.
    pub redis_url: String,
    /// `"single"` or `"cluster"`, once Redis has been reached.
    pub layout: Option<&'static str>,
    /// The near cache's figures; `None` when `near_cache_bytes` is 0.
    pub near: Option<crate::cache::NearStats>,
    /// The change feed's figures (zero in a manager opened only to look, as `chat-history stats`
    /// opens one: it does not follow).
    pub feed: crate::feed::FeedFigures,
}
