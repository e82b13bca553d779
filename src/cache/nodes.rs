//! What a Redis Cluster's primaries hold: their slots, replicas and memory, for `stats()` and
//! `chat-history doctor`. On a cluster `INFO memory` through the redis crate's router goes to every
//! primary and comes back as a map, so the whole-cache numbers are summed here from each primary's
//! own reply (docs/design.md, section 16, "Memory and policy").

use redis::cluster::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;

use crate::cache::codec::{parse_memory_info, MemoryInfo};
use crate::cache::error::CacheResult;
use crate::cache::pool::Con;
use crate::cache::redis::RedisCache;

/// One primary of a Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `host:port`, as the cluster announces it (and as the router connects to it).
    pub address: String,
    /// Hash slots it serves.
    pub slots: u32,
    /// Replicas the slot map lists for it.
    pub replicas: u32,
    /// Its `INFO memory`; every field `None` when the node did not answer.
    pub memory: MemoryInfo,
}

/// The memory numbers of a whole cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheMemory {
    /// One node's numbers, or the primaries' combined by [`combined`].
    pub total: MemoryInfo,
    /// A cluster's primaries, ordered by address; empty on a single node.
    pub nodes: Vec<NodeInfo>,
}

/// The primaries' numbers as one cache's: `used_memory` and `maxmemory` summed (unknown when one
/// primary's is; `maxmemory` 0, no limit, when one primary has none), and the eviction policy when
/// every primary has the same one, else `None` (the per-node policies say which differ).
#[must_use]
pub fn combined(nodes: &[NodeInfo]) -> MemoryInfo {
    if nodes.is_empty() {
        return MemoryInfo::default();
    }
    let used = nodes.iter().map(|n| n.memory.used).sum::<Option<u64>>();
    let limits = nodes.iter().map(|n| n.memory.max).collect::<Option<Vec<u64>>>();
    let max = limits.map(|limits| if limits.contains(&0) { 0 } else { limits.iter().sum() });
    let first = nodes[0].memory.policy.as_ref();
    let policy = nodes.iter().all(|n| n.memory.policy.as_ref() == first).then(|| first.cloned()).flatten();
    MemoryInfo { used, max, policy }
}

/// The primaries in a `CLUSTER SLOTS` reply (`[[start, end, [host, port, id, ..], replicas..], ..]`),
/// with their slot and replica counts, ordered by address. Entries it cannot read are skipped.
#[must_use]
pub fn primaries_from_slots(reply: &Value) -> Vec<(String, u16, u32, u32)> {
    let Value::Array(ranges) = reply else { return Vec::new() };
    let mut found: Vec<(String, u16, u32, u32)> = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(start), Some(end), Some(Value::Array(primary))) = (parts.first(), parts.get(1), parts.get(2)) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (redis::from_redis_value_ref::<u32>(start), redis::from_redis_value_ref::<u32>(end))
        else {
            continue;
        };
        let (Some(host), Some(port)) = (primary.first(), primary.get(1)) else { continue };
        let (Ok(host), Ok(port)) =
            (redis::from_redis_value_ref::<String>(host), redis::from_redis_value_ref::<u16>(port))
        else {
            continue;
        };
        let slots = end.saturating_sub(start) + 1;
        let replicas = u32::try_from(parts.len() - 3).unwrap_or(u32::MAX);
        match found.iter_mut().find(|(h, p, _, _)| *h == host && *p == port) {
            Some(entry) => {
                entry.2 += slots;
                entry.3 = entry.3.max(replicas);
            }
            None => found.push((host, port, slots, replicas)),
        }
    }
    found.sort();
    found
}

/// Each primary's slots, replicas and `INFO memory`, asked through the router.
fn cluster_nodes(cluster: &mut ClusterConnection) -> redis::RedisResult<Vec<NodeInfo>> {
    let ask_slots = redis::cmd("CLUSTER").arg("SLOTS").clone();
    let slots = cluster.route_command(&ask_slots, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))?;
    let ask_memory = redis::cmd("INFO").arg("memory").clone();
    let mut nodes = Vec::new();
    for (host, port, slots, replicas) in primaries_from_slots(&slots) {
        let address = format!("{host}:{port}");
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        let memory = match cluster.route_command(&ask_memory, routing) {
            Ok(reply) => {
                redis::from_redis_value::<String>(reply).map(|info| parse_memory_info(&info)).unwrap_or_default()
            }
            // A primary that fails to answer (a failover in progress) shows as unknown; the others
            // are still worth reporting.
            Err(e) if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {
                log::debug!("Redis Cluster node {address} did not answer INFO memory: {e}");
                MemoryInfo::default()
            }
            Err(e) => return Err(e),
        };
        nodes.push(NodeInfo { address, slots, replicas, memory });
    }
    Ok(nodes)
}

/// Each primary's address, as `CLUSTER SLOTS` lists them.
fn primaries(cluster: &mut ClusterConnection) -> redis::RedisResult<Vec<(String, u16)>> {
    let ask_slots = redis::cmd("CLUSTER").arg("SLOTS").clone();
    let slots = cluster.route_command(&ask_slots, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))?;
    Ok(primaries_from_slots(&slots).into_iter().map(|(host, port, _, _)| (host, port)).collect())
}

/// Every key matching `pattern` on one node, `run` sending each `SCAN` to it.
pub(super) fn scan_node(
    mut run: impl FnMut(&redis::Cmd) -> redis::RedisResult<Value>,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let scan = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).clone();
        let (next, found): (u64, Vec<String>) = redis::from_redis_value(run(&scan)?)?;
        keys.extend(found);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

/// Every key matching `pattern` on every primary (a cluster has no one keyspace to scan).
pub(super) fn scan_primaries(cluster: &mut ClusterConnection, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    for (host, port) in primaries(cluster)? {
        keys.extend(scan_node(
            |scan| {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port });
                cluster.route_command(scan, routing)
            },
            pattern,
        )?);
    }
    Ok(keys)
}

impl RedisCache {
    /// Cluster: puts back into the dirty index every user whose dirty set is not empty but who is
    /// missing from the index (a process that died between a save's script and the index entry
    /// leaves such a user: the conversation is dirty and safe, but no flusher would find it).
    /// Returns how many users were put back. A full scan of every primary, so flushers run it
    /// rarely (docs/design.md, "Redis Cluster").
    pub fn reindex_dirty_users(&self) -> CacheResult<usize> {
        let layout = self.layout()?;
        if layout != crate::cache::keys::KeyLayout::Cluster {
            return Ok(0);
        }
        let keys = self.run_on(|conn| match &mut conn.con {
            Con::Single(single) => scan_node(|scan| scan.query(single), layout.dirty_sets_pattern()),
            Con::Cluster(cluster) => scan_primaries(cluster, layout.dirty_sets_pattern()),
        })?;
        let mut put_back = 0;
        for key in keys {
            let Some(user) = layout.user_of_dirty_set(&key) else { continue };
            let Some(bucket) = layout.dirty_bucket(&user) else { continue };
            let indexed: Option<f64> = self.command(redis::cmd("ZSCORE").arg(&bucket).arg(&user))?;
            if indexed.is_none() && self.command::<u64>(redis::cmd("SCARD").arg(&key))? > 0 {
                self.index_dirty_user(&user)?;
                put_back += 1;
            }
        }
        if put_back > 0 {
            log::warn!("{put_back} users with dirty conversations were missing from the dirty index; put back");
        }
        Ok(put_back)
    }

    /// The cache's memory: one node's `INFO memory`, or on a Redis Cluster each primary's (with
    /// its slots and replicas) and their [`combined`] numbers.
    pub fn cache_memory(&self) -> CacheResult<CacheMemory> {
        self.layout()?; // connects once, so the pool knows whether this is a cluster
        let nodes = self.run_on(|conn| match &mut conn.con {
            Con::Single(_) => Ok(None),
            Con::Cluster(cluster) => cluster_nodes(cluster).map(Some),
        })?;
        match nodes {
            None => Ok(CacheMemory { total: self.memory()?, nodes: Vec::new() }),
            Some(nodes) => Ok(CacheMemory { total: combined(&nodes), nodes }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(used: Option<u64>, max: Option<u64>, policy: Option<&str>) -> NodeInfo {
        NodeInfo {
            address: "127.0.0.1:7000".into(),
            slots: 5461,
            replicas: 1,
            memory: MemoryInfo { used, max, policy: policy.map(str::to_owned) },
        }
    }

    #[test]
    fn combined_sums_memory_and_keeps_a_shared_policy() {
        let nodes = [node(Some(10), Some(100), Some("volatile-lru")), node(Some(5), Some(50), Some("volatile-lru"))];
        assert_eq!(
            combined(&nodes),
            MemoryInfo { used: Some(15), max: Some(150), policy: Some("volatile-lru".into()) }
        );
    }

    #[test]
    fn combined_has_no_policy_when_primaries_differ_and_no_limit_when_one_has_none() {
        let nodes = [node(Some(10), Some(0), Some("volatile-lru")), node(Some(5), Some(50), Some("allkeys-lru"))];
        assert_eq!(combined(&nodes), MemoryInfo { used: Some(15), max: Some(0), policy: None });
    }

    #[test]
    fn combined_is_unknown_when_a_primary_did_not_answer() {
        let nodes = [node(Some(10), Some(100), Some("noeviction")), node(None, None, None)];
        assert_eq!(combined(&nodes), MemoryInfo { used: None, max: None, policy: None });
        assert_eq!(combined(&[]), MemoryInfo::default());
    }

    #[test]
    fn primaries_from_slots_counts_slots_per_primary_across_ranges() {
        let primary = |host: &str, port: i64| {
            Value::Array(vec![Value::BulkString(host.into()), Value::Int(port), Value::BulkString(b"id".to_vec())])
        };
        let range = |start: i64, end: i64, host: &str, port: i64, replicas: usize| {
            let mut parts = vec![Value::Int(start), Value::Int(end), primary(host, port)];
            parts.extend((0..replicas).map(|_| primary("10.0.0.9", 7100)));
            Value::Array(parts)
        };
        let reply = Value::Array(vec![
            range(0, 5460, "10.0.0.2", 7000, 1),
            range(5461, 10922, "10.0.0.1", 7000, 1),
            range(10923, 16383, "10.0.0.2", 7000, 0),
            Value::Int(1), // not a range: skipped
        ]);
        assert_eq!(
            primaries_from_slots(&reply),
            vec![("10.0.0.1".to_owned(), 7000, 5462, 1), ("10.0.0.2".to_owned(), 7000, 10922, 1)]
        );
        assert_eq!(primaries_from_slots(&Value::Nil), vec![]);
    }
}
