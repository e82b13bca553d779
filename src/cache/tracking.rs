//! The tracker: the connections through which Redis tells the near cache ([`crate::cache::near`])
//! which keys changed.
//!
//! One thread per node holds a connection with `CLIENT TRACKING on REDIRECT <itself> BCAST PREFIX
//! ...`, subscribed to `__redis__:invalidate` (RESP2, so the connection is an ordinary one to any
//! Redis since 6.0); every [`PING_EVERY`] the thread publishes a heartbeat, on a second connection,
//! that comes back on the tracking connection behind every invalidation queued before it; see the
//! near cache for why the heartbeats are what lets copies be served. On a Redis Cluster every node that `CLUSTER SLOTS`
//! lists is tracked, replicas included, so a failover's new primary is already tracked when it
//! starts taking writes; the list is read again every [`TOPOLOGY_EVERY`] and a change (a node added,
//! removed or moved) empties the near cache and tracks the new set.
//!
//! BCAST, not the default mode: the default tracks the keys each connection read, which would
//! need every pooled connection (and, on a cluster, every node connection the redis crate's router
//! opens) to redirect to the tracker. BCAST tracks key prefixes on one connection per node, at the
//! price of hearing about every change under them, including keys this process never read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use redis::{ConnectionAddr, RedisResult, Value};

use crate::cache::keys::KeyLayout;
use crate::cache::near::{NearCache, LEASE};
use crate::cache::pool::{login_client, Topology};
use crate::credentials::{CredentialProvider, Lease};

/// How often each node's tracking connection proves it is current (a heartbeat).
pub const PING_EVERY: Duration = Duration::from_millis(100);

/// How long a read waits before the thread checks whether to send a heartbeat or stop.
const TICK: Duration = Duration::from_millis(20);

/// The tracking connections' names in `CLIENT LIST`.
pub const TRACKING_NAME: &str = "chat-history-near-tracking";
/// The heartbeat connections' names in `CLIENT LIST`.
pub const HEARTBEAT_NAME: &str = "chat-history-near-heartbeat";

/// The channel Redis sends a redirected client's invalidations on.
const INVALIDATIONS: &str = "__redis__:invalidate";

/// How often a cluster's node list is read again.
pub const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// How long a node whose server refused tracking waits before asking again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Where and how to connect.
#[derive(Clone)]
pub(crate) struct Source {
    /// The URL's node, with its TLS settings; other nodes get the same settings.
    pub(crate) client: redis::Client,
    pub(crate) timeout: Duration,
    pub(crate) credentials: Option<CredentialProvider>,
    /// Set by the pool's first connection.
    pub(crate) topology: Arc<OnceLock<Topology>>,
}

/// The running tracker; [`Tracker::stop`] (or dropping it) ends its threads.
pub(crate) struct Tracker {
    stop: Arc<AtomicBool>,
    supervisor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").finish_non_exhaustive()
    }
}

impl Tracker {
    /// Starts tracking for `near`. Nothing is served until the first connection told the pool what
    /// the server is and every node echoed a heartbeat.
    pub(crate) fn start(near: Arc<NearCache>, source: Source) -> Tracker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let supervisor = std::thread::Builder::new()
            .name("chr-near-tracker".into())
            .spawn(move || supervise(&near, &source, &flag))
            .map_err(|e| log::warn!("the near cache stays off: cannot start its tracker thread: {e}"))
            .ok();
        Tracker { stop, supervisor }
    }

    /// Ends the threads, waiting for them until `deadline`.
    pub(crate) fn stop(&mut self, deadline: Instant) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.supervisor.take() {
            wait_until(handle, deadline);
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Joins `handle` if it ends before `deadline`; otherwise leaves it to end by itself.
fn wait_until(handle: JoinHandle<()>, deadline: Instant) {
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = handle.join();
}

/// Sleeps `how_long` unless `stop` is raised first; returns whether it was.
fn sleep_unless(stop: &AtomicBool, how_long: Duration) -> bool {
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        if stop.load(Ordering::Acquire) {
            return true;
        }
        std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
    }
    stop.load(Ordering::Acquire)
}

struct NodeThread {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

/// Keeps one tracking thread per node of the current topology.
fn supervise(near: &Arc<NearCache>, source: &Source, stop: &AtomicBool) {
    let mut current: Vec<(String, u16)> = Vec::new();
    let mut threads: Vec<NodeThread> = Vec::new();
    let mut discovery: Option<(redis::Connection, Lease)> = None;
    let stop_all = |threads: &mut Vec<NodeThread>| {
        for t in threads.iter() {
            t.stop.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + source.timeout + Duration::from_millis(200);
        for t in threads.drain(..) {
            wait_until(t.handle, deadline);
        }
    };
    loop {
        if stop.load(Ordering::Acquire) {
            stop_all(&mut threads);
            return;
        }
        let Some(topology) = source.topology.get() else {
            sleep_unless(stop, Duration::from_millis(50));
            continue;
        };
        let nodes = if topology.is_cluster() {
            match cluster_nodes(source, &current, &mut discovery) {
                Ok(nodes) if !nodes.is_empty() => nodes,
                Ok(_) => current.clone(),
                Err(e) => {
                    log::debug!("near cache: could not read the cluster's nodes: {e}");
                    current.clone()
                }
            }
        } else {
            vec![address_of(&source.client)]
        };
        if nodes != current || threads.is_empty() {
            stop_all(&mut threads);
            let generation = near.track_nodes(nodes.len());
            if !current.is_empty() {
                log::info!("near cache: Redis's nodes changed; emptied, tracking {} nodes", nodes.len());
            }
            for (index, (host, port)) in nodes.iter().enumerate() {
                let node = Node {
                    near: Arc::clone(near),
                    source: source.clone(),
                    // One node: the URL's own client (whatever its address, a Unix socket too).
                    client: if topology.is_cluster() {
                        node_client(&source.client, host, *port)
                    } else {
                        source.client.clone()
                    },
                    address: format!("{host}:{port}"),
                    generation,
                    index,
                };
                let node_stop = Arc::new(AtomicBool::new(false));
                let flag = Arc::clone(&node_stop);
                match std::thread::Builder::new().name("chr-near-node".into()).spawn(move || node.run(&flag)) {
                    Ok(handle) => threads.push(NodeThread { stop: node_stop, handle }),
                    Err(e) => log::warn!("near cache: cannot start a tracking thread: {e}"),
                }
            }
            current = nodes;
        }
        let every = if topology.is_cluster() { TOPOLOGY_EVERY } else { Duration::from_secs(3600) };
        if sleep_unless(stop, every) {
            stop_all(&mut threads);
            return;
        }
    }
}

/// The host and port a client connects to.
fn address_of(client: &redis::Client) -> (String, u16) {
    match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
        ConnectionAddr::Unix(path) => (path.display().to_string(), 0),
        _ => (String::new(), 0),
    }
}

/// A client for another node of the cluster, with the URL's TLS settings and login.
fn node_client(base: &redis::Client, host: &str, port: u16) -> redis::Client {
    let info = base.get_connection_info().clone();
    let addr = match info.addr() {
        ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
            ConnectionAddr::TcpTls { host: host.to_owned(), port, insecure: *insecure, tls_params: tls_params.clone() }
        }
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    redis::Client::open(info.set_addr(addr)).unwrap_or_else(|_| base.clone())
}

/// Every node `CLUSTER SLOTS` lists (primaries and replicas), sorted; asked of a node already
/// known, or of the URL's.
fn cluster_nodes(
    source: &Source,
    known: &[(String, u16)],
    discovery: &mut Option<(redis::Connection, Lease)>,
) -> RedisResult<Vec<(String, u16)>> {
    let ask = |con: &mut redis::Connection| -> RedisResult<Value> { redis::cmd("CLUSTER").arg("SLOTS").query(con) };
    // A connection whose credentials are due is not used again (the next one logs in afresh).
    if discovery.as_ref().is_some_and(|(_, lease)| lease.due(SystemTime::now())) {
        *discovery = None;
    }
    if let Some((con, _)) = discovery.as_mut() {
        match ask(con) {
            Ok(reply) => return Ok(all_nodes_from_slots(&reply)),
            Err(_) => *discovery = None,
        }
    }
    let mut candidates: Vec<redis::Client> =
        known.iter().map(|(host, port)| node_client(&source.client, host, *port)).collect();
    candidates.push(source.client.clone());
    let mut last = None;
    for client in candidates {
        let attempt = (|| {
            let (client, lease) = login_client(&client, source.credentials.as_ref())?;
            let con = client.get_connection_with_timeout(source.timeout)?;
            con.set_read_timeout(Some(source.timeout))?;
            con.set_write_timeout(Some(source.timeout))?;
            Ok::<_, redis::RedisError>((con, lease))
        })();
        match attempt {
            Ok((mut con, lease)) => match ask(&mut con) {
                Ok(reply) => {
                    *discovery = Some((con, lease));
                    return Ok(all_nodes_from_slots(&reply));
                }
                Err(e) => last = Some(e),
            },
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no Redis Cluster node answered"))))
}

/// The nodes of a `CLUSTER SLOTS` reply, primaries and replicas, sorted and without repeats.
#[must_use]
pub fn all_nodes_from_slots(reply: &Value) -> Vec<(String, u16)> {
    let Value::Array(ranges) = reply else { return Vec::new() };
    let mut nodes = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        for node in parts.iter().skip(2) {
            let Value::Array(fields) = node else { continue };
            let (Some(host), Some(port)) = (fields.first(), fields.get(1)) else { continue };
            if let (Ok(host), Ok(port)) =
                (redis::from_redis_value_ref::<String>(host), redis::from_redis_value_ref::<u16>(port))
            {
                if !host.is_empty() && host != "?" {
                    nodes.push((host, port));
                }
            }
        }
    }
    nodes.sort();
    nodes.dedup();
    nodes
}

/// One node's tracking thread.
struct Node {
    near: Arc<NearCache>,
    source: Source,
    client: redis::Client,
    address: String,
    generation: u64,
    index: usize,
}

/// How far the tracking threads lower their priority below the callers': an invalidation arriving with
/// a caller's reply (every save's own write is one) then does not run ahead of the caller on a busy
/// CPU, and the tracker still keeps a tenth of a caller's share, so invalidations and heartbeats keep
/// up. A tracker that fell behind anyway stops the near cache (its heartbeats vouch for nothing older
/// than [`LEASE`]); it is never served stale. docs/benchmarks.md, "History", has the figures.
const TRACKER_NICE_ABOVE_CALLERS: i32 = 10;

/// Lowers the calling thread's scheduling priority by [`TRACKER_NICE_ABOVE_CALLERS`] nice levels
/// from the process's (Linux keeps a nice value per thread; a thread starts with its creator's).
/// Nowhere else: on other systems the call would renice the whole process.
fn yield_to_callers() {
    #[cfg(target_os = "linux")]
    {
        let me = Some(rustix::thread::gettid());
        let lowered = rustix::process::getpriority_process(me)
            .and_then(|nice| rustix::process::setpriority_process(me, (nice + TRACKER_NICE_ABOVE_CALLERS).min(19)));
        if let Err(e) = lowered {
            log::debug!("near cache: the tracking thread keeps its priority ({e})");
        }
    }
}

/// Why a tracking session ended.
enum Ended {
    Stopped,
    /// The credentials are due: log in again.
    Renew,
    Failed(redis::RedisError),
    Refused(String),
}

impl Node {
    fn run(&self, stop: &AtomicBool) {
        yield_to_callers();
        let mut backoff = Duration::from_millis(50);
        let mut warned = false;
        loop {
            let (ended, served) = self.session(stop);
            if matches!(ended, Ended::Stopped) {
                // The supervisor (or the manager's close) empties the cache for the set it drops.
                return;
            }
            self.near.lost(self.generation, self.index);
            if served {
                backoff = Duration::from_millis(50);
            }
            let wait = match ended {
                Ended::Stopped => return,
                Ended::Renew => Duration::ZERO,
                Ended::Failed(e) => {
                    log::debug!(
                        "near cache: tracking connection to {} lost ({e}); emptied until it is back",
                        self.address
                    );
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    wait
                }
                Ended::Refused(why) => {
                    if !warned {
                        log::warn!(
                            "near cache off: Redis at {} refused CLIENT TRACKING ({why}); reads go to Redis",
                            self.address
                        );
                        warned = true;
                    }
                    REFUSED_RETRY
                }
            };
            if sleep_unless(stop, wait) {
                return;
            }
        }
    }

    /// A connection to the node with the provider's current login and the call timeouts, named
    /// `name` in `CLIENT LIST` (when the ACL allows it) so an operator can tell what it is.
    fn connect(&self, name: &str) -> RedisResult<(redis::Connection, Lease)> {
        let (client, lease) = login_client(&self.client, self.source.credentials.as_ref())?;
        let mut con = client.get_connection_with_timeout(self.source.timeout)?;
        con.set_read_timeout(Some(self.source.timeout))?;
        con.set_write_timeout(Some(self.source.timeout))?;
        match redis::cmd("CLIENT").arg("SETNAME").arg(name).query::<()>(&mut con) {
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => return Err(e),
            _ => {}
        }
        Ok((con, lease))
    }

    /// Connects, turns tracking on, and applies invalidations until the connection fails, the
    /// credentials are due or `stop` is raised. Also says whether the session vouched for the
    /// copies at least once.
    ///
    /// The heartbeat is a message this thread publishes, on a second connection to the same node,
    /// to a channel only the tracking connection listens to: Redis delivers it after every
    /// invalidation of a write that completed before it was sent, and it arrives through the same
    /// reads as the invalidations, so reading it means they were applied. (A PING on the tracking
    /// connection itself would do the same, but the redis crate's subscriber queues the messages
    /// that precede its reply where this thread cannot see when they run out.) A heartbeat is sent
    /// every [`PING_EVERY`] whatever else arrives, so a stream of invalidations never holds it up.
    fn session(&self, stop: &AtomicBool) -> (Ended, bool) {
        let fail = |e| (Ended::Failed(e), false);
        let (mut con, lease) = match self.connect(TRACKING_NAME) {
            Ok(found) => found,
            Err(e) => return fail(e),
        };
        let (mut beat, _) = match self.connect(HEARTBEAT_NAME) {
            Ok(found) => found,
            Err(e) => return fail(e),
        };
        let id: i64 = match redis::cmd("CLIENT").arg("ID").query(&mut con) {
            Ok(id) => id,
            Err(e) => return fail(e),
        };
        let mut tracking = redis::cmd("CLIENT");
        tracking.arg("TRACKING").arg("on").arg("REDIRECT").arg(id).arg("BCAST");
        for prefix in KeyLayout::tracked_prefixes() {
            tracking.arg("PREFIX").arg(prefix);
        }
        match tracking.query::<()>(&mut con) {
            Ok(()) => {}
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => return fail(e),
            Err(e) => return (Ended::Refused(e.to_string()), false),
        }
        // Unique to this connection on this node (client ids are never reused by a server run).
        let heartbeat = format!("chat-history:near-heartbeat:{id}:{}", std::process::id());
        let mut pubsub = con.as_pubsub();
        match pubsub.subscribe(&[INVALIDATIONS, heartbeat.as_str()]) {
            Ok(()) => {}
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => return fail(e),
            // An ACL without these channels (Redis 7's default for new users has none).
            Err(e) => return (Ended::Refused(format!("SUBSCRIBE: {e}")), false),
        }
        if let Err(e) = pubsub.set_read_timeout(Some(TICK)) {
            return fail(e);
        }
        let mut served = false;
        let mut seq: u64 = 0;
        let mut waiting: Option<Instant> = None;
        let mut last_sent: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Acquire) {
                return (Ended::Stopped, served);
            }
            if lease.due(SystemTime::now()) {
                return (Ended::Renew, served);
            }
            if let Some(sent) = waiting {
                if sent.elapsed() > self.source.timeout.max(LEASE) {
                    let why = (redis::ErrorKind::Io, "no heartbeat came back in time");
                    return (Ended::Failed(redis::RedisError::from(why)), served);
                }
            } else if last_sent.is_none_or(|at| at.elapsed() >= PING_EVERY) {
                seq += 1;
                let sent = Instant::now();
                match redis::cmd("PUBLISH").arg(&heartbeat).arg(seq).query::<i64>(&mut beat) {
                    Ok(1) => {}
                    Ok(_) => {
                        let why = (redis::ErrorKind::Io, "the tracking connection is no longer subscribed");
                        return (Ended::Failed(redis::RedisError::from(why)), served);
                    }
                    Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                        return (Ended::Failed(e), served)
                    }
                    Err(e) => return (Ended::Refused(format!("PUBLISH: {e}")), served),
                }
                waiting = Some(sent);
                last_sent = Some(sent);
            }
            let msg = match pubsub.get_message() {
                Ok(msg) => msg,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return (Ended::Failed(e), served),
            };
            if msg.get_channel_name() == INVALIDATIONS {
                match msg.get_payload::<Option<Vec<Vec<u8>>>>() {
                    Ok(Some(keys)) => {
                        self.near.invalidate(&keys);
                    }
                    Ok(None) => self.near.invalidate_all(),
                    Err(e) => return (Ended::Failed(e), served),
                }
            } else if msg.get_channel_name() == heartbeat {
                let echoed = msg.get_payload::<u64>().ok();
                if let (Some(sent), Some(echoed)) = (waiting, echoed) {
                    if echoed == seq {
                        self.near.acked(self.generation, self.index, sent);
                        served = true;
                        waiting = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn all_nodes_lists_primaries_and_replicas_once() {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("127.0.0.1", 7000), node("127.0.0.1", 7003)]),
            Value::Array(vec![Value::Int(5461), Value::Int(9000), node("127.0.0.1", 7001), node("127.0.0.1", 7004)]),
            Value::Array(vec![Value::Int(9001), Value::Int(10922), node("127.0.0.1", 7001), node("127.0.0.1", 7004)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("127.0.0.1", 7002), node("?", 7005)]),
        ]);
        let ports: Vec<u16> = all_nodes_from_slots(&reply).into_iter().map(|(_, p)| p).collect();
        assert_eq!(ports, vec![7000, 7001, 7002, 7003, 7004]);
    }
}
