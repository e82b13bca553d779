//! Every Redis key name, decided by one [`KeyLayout`] value; no other module spells one out.
//!
//! The seed layout is the seed design's (so seed-design Python instances can share a single-node
//! Redis during a rolling upgrade). The cluster layout puts every key of a user in that user's hash
//! slot (`{<user>}`: ids and user ids cannot hold braces), so each script and pipeline touches one
//! slot; an id's owner record lives in the id's own slot; dirty tracking is per user, with a
//! bucketed index of users that have dirty conversations, so no key is hot for all users.

use std::sync::LazyLock;

/// How many buckets the cluster layout's index of users with dirty conversations has: enough to
/// spread over any cluster's primaries, few enough that a flusher walks them all cheaply.
pub const DIRTY_BUCKETS: u32 = 64;

/// Which key names to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// The seed design's names; one node.
    Seed,
    /// One hash slot per user; owner records per id; bucketed dirty index.
    Cluster,
}

impl KeyLayout {
    /// What `stats()["redis_layout"]` calls it: `"single"` (one node's layout, the seed design's
    /// key names) or `"cluster"`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            KeyLayout::Seed => "single",
            KeyLayout::Cluster => "cluster",
        }
    }

    /// The prefixes of every key the near cache holds a copy of, in either layout: the tracker
    /// hears about changes under them.
    #[must_use]
    pub fn tracked_prefixes() -> [&'static str; 2] {
        ["conv:", "user:"]
    }

    /// The conversation hash.
    #[must_use]
    pub fn conv(self, user_id: &str, conversation_id: &str) -> String {
        match self {
            KeyLayout::Seed => format!("conv:{user_id}:{conversation_id}"),
            KeyLayout::Cluster => format!("conv:{{{user_id}}}:{conversation_id}"),
        }
    }

    /// The user's cached list (ids by last_modified).
    #[must_use]
    pub fn list(self, user_id: &str) -> String {
        match self {
            KeyLayout::Seed => format!("user:{user_id}:convlist"),
            KeyLayout::Cluster => format!("user:{{{user_id}}}:convlist"),
        }
    }

    /// The list entries beside the list (id -> entry JSON).
    #[must_use]
    pub fn list_meta(self, user_id: &str) -> String {
        match self {
            KeyLayout::Seed => format!("user:{user_id}:convmeta"),
            KeyLayout::Cluster => format!("user:{{{user_id}}}:convmeta"),
        }
    }

    /// When the user's cached list was last dropped because PostgreSQL changed (a fresh value per
    /// drop, short-lived): a list rebuilt from rows read before the drop must not be cached
    /// (`rebuild_list.lua`).
    #[must_use]
    pub fn list_epoch(self, user_id: &str) -> String {
        match self {
            KeyLayout::Seed => format!("user:{user_id}:listepoch"),
            KeyLayout::Cluster => format!("user:{{{user_id}}}:listepoch"),
        }
    }

    /// The user's dirty conversation ids.
    #[must_use]
    pub fn user_dirty(self, user_id: &str) -> String {
        match self {
            KeyLayout::Seed => format!("user:{user_id}:dirty"),
            KeyLayout::Cluster => format!("user:{{{user_id}}}:dirty"),
        }
    }

    /// The set of dirty `<user>:<id>` members a flush walks: the seed's one `dirty:convs`, or the
    /// user's own on a cluster.
    #[must_use]
    pub fn dirty_set(self, user_id: &str) -> String {
        match self {
            KeyLayout::Seed => SEED_DIRTY_SET.to_owned(),
            KeyLayout::Cluster => format!("user:{{{user_id}}}:dirtyconvs"),
        }
    }

    /// When each dirty member became dirty (sorted set), beside [`KeyLayout::dirty_set`].
    #[must_use]
    pub fn dirty_since(self, user_id: &str) -> String {
        match self {
            KeyLayout::Seed => SEED_DIRTY_SINCE.to_owned(),
            KeyLayout::Cluster => format!("user:{{{user_id}}}:dirtysince"),
        }
    }

    /// The id's owner record.
    #[must_use]
    pub fn owner(self, conversation_id: &str) -> String {
        match self {
            KeyLayout::Seed => format!("owner:{conversation_id}"),
            KeyLayout::Cluster => format!("owner:{{{conversation_id}}}"),
        }
    }

    /// The owner key a script of the user's slot is given: the record itself on one node; on a
    /// cluster, where the record is in another slot, a key of the user's slot that the script is
    /// told (by [`KeyLayout::owner_in_slot`]) not to touch.
    #[must_use]
    pub fn owner_for_script(self, user_id: &str, conversation_id: &str) -> String {
        match self {
            KeyLayout::Seed => self.owner(conversation_id),
            KeyLayout::Cluster => self.conv(user_id, conversation_id),
        }
    }

    /// Whether scripts of the user's slot may read and write the owner record (the `local owner`
    /// argument of the scripts).
    #[must_use]
    pub fn owner_in_slot(self) -> &'static str {
        match self {
            KeyLayout::Seed => "1",
            KeyLayout::Cluster => "0",
        }
    }

    /// A delete's short-lived tombstone.
    #[must_use]
    pub fn deleted(self, user_id: &str, conversation_id: &str) -> String {
        match self {
            KeyLayout::Seed => format!("deleted:{user_id}:{conversation_id}"),
            KeyLayout::Cluster => format!("deleted:{{{user_id}}}:{conversation_id}"),
        }
    }

    /// The row version the change feed last brought a conversation to (short-lived): a read that
    /// fetched an older row before that change and caches it after must not (`backfill.lua`).
    #[must_use]
    pub fn changed(self, user_id: &str, conversation_id: &str) -> String {
        match self {
            KeyLayout::Seed => format!("changed:{user_id}:{conversation_id}"),
            KeyLayout::Cluster => format!("changed:{{{user_id}}}:{conversation_id}"),
        }
    }

    /// A fresh key to stage a conversation in before a script renames it into place.
    #[must_use]
    pub fn staged(self, user_id: &str, conversation_id: &str) -> String {
        self.staged_as(user_id, conversation_id, &fresh_token())
    }

    /// The staging key of a save made under `token` (see [`fresh_token`]).
    #[must_use]
    pub fn staged_as(self, user_id: &str, conversation_id: &str, token: &str) -> String {
        match self {
            KeyLayout::Seed => format!("staged:conv:{user_id}:{conversation_id}:{token}"),
            KeyLayout::Cluster => format!("staged:{{{user_id}}}:{conversation_id}:{token}"),
        }
    }

    /// Where a save that arrived after its deadline is kept aside, under its save's `token`, until
    /// a flush puts it in `conversation_conflicts` (docs/design.md, "Write order").
    #[must_use]
    pub fn late_copy(self, user_id: &str, conversation_id: &str, token: &str) -> String {
        match self {
            KeyLayout::Seed => format!("late:{user_id}:{conversation_id}:{token}"),
            KeyLayout::Cluster => format!("late:{{{user_id}}}:{conversation_id}:{token}"),
        }
    }

    /// The set of late members (see [`late_member`]) a flush drains: its own key on one node, where
    /// the seed design's flusher walks `dirty:convs` and must not meet them; the user's dirty set on
    /// a cluster, so the dirty index keeps the user until they are drained.
    #[must_use]
    pub fn late_set(self, user_id: &str) -> String {
        match self {
            KeyLayout::Seed => SEED_LATE_SET.to_owned(),
            KeyLayout::Cluster => self.dirty_set(user_id),
        }
    }

    /// Cluster only: the index bucket that lists the user when the user has dirty conversations.
    #[must_use]
    pub fn dirty_bucket(self, user_id: &str) -> Option<String> {
        match self {
            KeyLayout::Seed => None,
            KeyLayout::Cluster => {
                Some(bucket_key(xxhash_rust::xxh3::xxh3_64(user_id.as_bytes()) % u64::from(DIRTY_BUCKETS)))
            }
        }
    }

    /// Cluster only: every index bucket, in the order flushers walk them.
    #[must_use]
    pub fn dirty_buckets(self) -> Vec<String> {
        match self {
            KeyLayout::Seed => Vec::new(),
            KeyLayout::Cluster => (0..u64::from(DIRTY_BUCKETS)).map(bucket_key).collect(),
        }
    }

    /// Cluster only: the lease a flusher takes on a bucket, so several flushers share the work.
    #[must_use]
    pub fn bucket_lease(self, bucket: &str) -> String {
        format!("{bucket}:lease")
    }

    /// The change feed's lease: the one process that follows PostgreSQL's changes for this Redis
    /// (docs/design.md, "Every cache follows PostgreSQL"). Beside [`KeyLayout::feed_mark`], in one
    /// slot on a cluster.
    #[must_use]
    pub fn feed_lease(self) -> &'static str {
        match self {
            KeyLayout::Seed => "feed:lease",
            KeyLayout::Cluster => "feed:{feed}:lease",
        }
    }

    /// How far this Redis has followed PostgreSQL's changes.
    #[must_use]
    pub fn feed_mark(self) -> &'static str {
        match self {
            KeyLayout::Seed => "feed:mark",
            KeyLayout::Cluster => "feed:{feed}:mark",
        }
    }

    /// `SCAN` patterns of every conversation hash, and of every cached list and its entries (the
    /// change feed's full resync).
    #[must_use]
    pub fn copies_patterns(self) -> (&'static str, [&'static str; 2]) {
        match self {
            KeyLayout::Seed => ("conv:*", ["user:*:convlist", "user:*:convmeta"]),
            KeyLayout::Cluster => ("conv:{*}:*", ["user:{*}:convlist", "user:{*}:convmeta"]),
        }
    }

    /// `SCAN` pattern of every user's dirty set (cluster: the sweep that re-indexes orphans).
    #[must_use]
    pub fn dirty_sets_pattern(self) -> &'static str {
        match self {
            KeyLayout::Seed => SEED_DIRTY_SET,
            KeyLayout::Cluster => "user:{*}:dirtyconvs",
        }
    }

    /// Cluster only: the user whose dirty set `key` is (the inverse of [`KeyLayout::dirty_set`]).
    #[must_use]
    pub fn user_of_dirty_set(self, key: &str) -> Option<String> {
        match self {
            KeyLayout::Seed => None,
            KeyLayout::Cluster => key.strip_prefix("user:{")?.strip_suffix("}:dirtyconvs").map(str::to_owned),
        }
    }
}

/// A token no other save of any process uses: a save's staging key and late copy are named by it.
#[must_use]
pub fn fresh_token() -> String {
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static PROCESS: LazyLock<u128> = LazyLock::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id())
    });
    let n = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The pid as well: a forked child inherits PROCESS and NONCE, and its names must not be the
    // parent's (or a sibling's), or one process's save could rename the other's staged copy.
    format!("{:x}:{:x}:{n}", *PROCESS, process_id())
}

/// This process's id, asked of the kernel once per fork generation
/// ([`crate::process::FORK_GENERATION`], moved in a forked child) instead of once per save.
#[allow(clippy::cast_possible_truncation)] // packing: the generation's low half, and a u32 unpacked
fn process_id() -> u32 {
    use std::sync::atomic::{AtomicU64, Ordering};
    /// The generation's low 32 bits, then the pid; 0 before the first ask.
    static CACHED: AtomicU64 = AtomicU64::new(0);
    let generation = crate::process::fork_generation() as u32;
    let cached = CACHED.load(Ordering::Acquire);
    if cached != 0 && (cached >> 32) as u32 == generation {
        return cached as u32;
    }
    let pid = std::process::id();
    CACHED.store(u64::from(generation) << 32 | u64::from(pid), Ordering::Release);
    pid
}

/// The member a late copy is listed under: `<user>:<id>:late:<token>`. Ids never hold ':', so no
/// conversation's member looks like one.
#[must_use]
pub fn late_member(user_id: &str, conversation_id: &str, token: &str) -> String {
    format!("{user_id}:{conversation_id}:late:{token}")
}

/// (user, id, token) of a late member; `None` for a conversation's member.
#[must_use]
pub fn split_late_member(member: &str) -> Option<(&str, &str, &str)> {
    let (user_id, rest) = split_member(member)?;
    let (conversation_id, token) = rest.split_once(":late:")?;
    (!conversation_id.is_empty() && !conversation_id.contains(':') && !token.is_empty()).then_some((
        user_id,
        conversation_id,
        token,
    ))
}

/// The seed design's set of dirty members.
const SEED_DIRTY_SET: &str = "dirty:convs";
/// Late members on one node (see [`KeyLayout::late_set`]).
const SEED_LATE_SET: &str = "late:convs";
/// Ours, beside it.
const SEED_DIRTY_SINCE: &str = "dirty:since";

fn bucket_key(n: u64) -> String {
    format!("dirtyusers:{{{n}}}")
}

/// `<user>:<id>`, a member of the dirty sets.
#[must_use]
pub fn member(user_id: &str, conversation_id: &str) -> String {
    format!("{user_id}:{conversation_id}")
}

/// Splits a dirty-set member into (user, conversation id). User ids never hold ':'.
#[must_use]
pub fn split_member(member: &str) -> Option<(&str, &str)> {
    member.split_once(':').filter(|(user, id)| !user.is_empty() && !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_members_are_told_from_conversations() {
        let token = fresh_token();
        let m = late_member("u-1", "a1b2", &token);
        assert_eq!(split_late_member(&m), Some(("u-1", "a1b2", token.as_str())));
        assert_eq!(split_late_member("u-1:a1b2"), None);
        assert_eq!(split_late_member("u-1:a1b2:late:"), None);
        assert_ne!(fresh_token(), fresh_token());
        assert_eq!(KeyLayout::Seed.late_copy("u", "c", "t"), "late:u:c:t");
        assert_eq!(KeyLayout::Cluster.late_copy("u", "c", "t"), "late:{u}:c:t");
        assert_eq!(KeyLayout::Cluster.late_set("u"), KeyLayout::Cluster.dirty_set("u"));
        assert_eq!(KeyLayout::Seed.late_set("u"), "late:convs");
    }

    #[test]
    fn members_split_at_the_first_colon() {
        assert_eq!(split_member("u-1:a1b2c3d4"), Some(("u-1", "a1b2c3d4")));
        assert_eq!(split_member(":x"), None);
        assert_eq!(split_member("nocolon"), None);
    }

    #[test]
    fn seed_names_are_the_seed_designs() {
        let l = KeyLayout::Seed;
        assert_eq!(l.conv("u", "c"), "conv:u:c");
        assert_eq!(l.list("u"), "user:u:convlist");
        assert_eq!(l.dirty_set("u"), "dirty:convs");
        assert_eq!(l.owner("c"), "owner:c");
    }

    /// Redis Cluster hashes only what is inside the first `{...}`; every key a user's scripts
    /// touch must hash alike.
    #[test]
    fn cluster_keys_of_a_user_share_one_hash_tag() {
        fn tag(key: &str) -> &str {
            let open = key.find('{').expect("a hash tag");
            let close = key[open..].find('}').expect("closed") + open;
            &key[open + 1..close]
        }
        let l = KeyLayout::Cluster;
        let keys = [
            l.conv("u-1", "c1"),
            l.list("u-1"),
            l.list_meta("u-1"),
            l.list_epoch("u-1"),
            l.changed("u-1", "c1"),
            l.user_dirty("u-1"),
            l.dirty_set("u-1"),
            l.dirty_since("u-1"),
            l.deleted("u-1", "c1"),
            l.staged("u-1", "c1"),
            l.owner_for_script("u-1", "c1"),
        ];
        for key in &keys {
            assert_eq!(tag(key), "u-1", "{key}");
        }
        assert_eq!(tag(&l.owner("c1")), "c1");
        assert_eq!(l.user_of_dirty_set(&l.dirty_set("u-1")).as_deref(), Some("u-1"));
        let buckets = l.dirty_buckets();
        assert_eq!(buckets.len(), DIRTY_BUCKETS as usize);
        assert!(buckets.contains(&l.dirty_bucket("u-1").expect("cluster has buckets")));
    }
}
