//! Redis connections for the pool ([`crate::pool`]): short timeouts, scripts loaded once per connection, and a
//! connection that failed never handed out again. On a Redis Cluster each pooled connection is the
//! redis crate's cluster connection (it discovers the nodes from the one URL, follows MOVED and
//! ASK, and reconnects after failovers); whether the server is one is asked once, on the first
//! connection (docs/design.md, "Keys and rows").
//!
//! With a credential provider (docs/credentials.md) every new connection logs in with what it returns,
//! and a connection whose credentials are due for renewal authenticates again before its next call
//! ([`renew_if_due`]).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Connection, ConnectionLike, RedisError, RedisResult, Value};

use crate::cache::clock::RedisClock;
use crate::cache::keys::KeyLayout;
use crate::cache::scripts::load_scripts;
use crate::credentials::{CredentialProvider, Credentials, Lease};

/// A connection to one node, or to a cluster through the redis crate's router.
// Boxing the larger variant would cost an allocation per pooled connection to save bytes on a
// value that lives in the pool, not on a hot path.
#[allow(clippy::large_enum_variant)]
pub enum Con {
    /// One node.
    Single(Connection),
    /// A cluster.
    Cluster(ClusterConnection),
}

impl Con {
    /// How long a reply may take.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> RedisResult<()> {
        match self {
            Con::Single(con) => con.set_read_timeout(timeout),
            Con::Cluster(con) => con.set_read_timeout(timeout),
        }
    }
}

impl ConnectionLike for Con {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Con::Single(con) => con.req_packed_command(cmd),
            Con::Cluster(con) => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        match self {
            Con::Single(con) => con.req_packed_commands(cmd, offset, count),
            Con::Cluster(con) => con.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Single(con) => con.get_db(),
            Con::Cluster(con) => con.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Con::Single(con) => con.check_connection(),
            Con::Cluster(con) => con.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Con::Single(con) => con.is_open(),
            Con::Cluster(con) => con.is_open(),
        }
    }
}

/// A pooled connection that remembers a failed call: a timed-out connection may still receive the
/// late reply, so it is never handed out again.
pub struct RedisConnection {
    pub(crate) con: Con,
    pub(crate) broken: bool,
    /// The server takes `EXPIRE ... GT` (Redis 7.0 and later), so a clean hit's TTL is refreshed
    /// by two plain commands instead of a script.
    pub(crate) expire_gt: bool,
    /// When the credentials it logged in with are due for renewal.
    pub(crate) lease: Lease,
    /// A pipeline sent without waiting for its replies (a miss's backfill, see
    /// `RedisCache::send_fenced`), whose replies are read before the connection's next command.
    pub(crate) unread: Option<Unread>,
}

/// A pipeline sent without waiting: its bytes (sent again once if Redis did not have its scripts)
/// and how many replies it has.
pub(crate) struct Unread {
    pub(crate) packed: Vec<u8>,
    pub(crate) replies: usize,
}

impl RedisConnection {
    /// Reads the replies to a pipeline sent without waiting. A command Redis refused changes nothing
    /// for the caller that did not wait for it, and is only logged; a script Redis did not have
    /// (a restart, `SCRIPT FLUSH`) is loaded and the pipeline sent again, as a waiting caller's
    /// would be (its deadline still holds: late, it changes nothing). A failure to read is the
    /// connection's, as for any command.
    pub(crate) fn read_unread(&mut self) -> RedisResult<()> {
        let Some(unread) = self.unread.take() else {
            return Ok(());
        };
        let mut noscript = false;
        for _ in 0..unread.replies {
            let Con::Single(con) = &mut self.con else {
                return Ok(());
            };
            let refused = match con.recv_response() {
                Ok(Value::ServerError(e)) => RedisError::from(e),
                Ok(_) => continue,
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                    self.broken = true;
                    return Err(e);
                }
                Err(e) => e,
            };
            if refused.code() == Some("NOSCRIPT") {
                noscript = true;
            } else {
                log::debug!("Redis refused a command sent without waiting: {refused}");
            }
        }
        if noscript {
            load_scripts(&mut self.con)?;
            if let Err(e) = self.con.req_packed_commands(&unread.packed, 0, unread.replies) {
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    self.broken = true;
                    return Err(e);
                }
                log::debug!("Redis refused a command sent without waiting: {e}");
            }
        }
        Ok(())
    }
}

/// What the server turned out to be, and so which connections and key names to use.
pub(crate) struct Topology {
    /// The key layout.
    pub(crate) layout: KeyLayout,
    /// `Some` when the server is a Redis Cluster: connections go through the cluster router. Built
    /// once without a credential provider; with one, each connection builds its own (see `connect`).
    cluster: Option<ClusterClient>,
}

impl Topology {
    /// Whether the server is a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }
}

/// Opens connections with the configured timeouts.
pub(crate) struct Connector {
    pub(crate) client: redis::Client,
    pub(crate) timeout: Duration,
    /// `redis_cluster`: `None` asks the server.
    pub(crate) requested: Option<bool>,
    /// For the cluster client: the URL and the CA file's certificates.
    pub(crate) url: String,
    pub(crate) root_cert: Option<Vec<u8>>,
    pub(crate) topology: Arc<OnceLock<Topology>>,
    /// `redis_credential_provider`: the login of every new connection, instead of the URL's.
    pub(crate) credentials: Option<CredentialProvider>,
    /// Measured on every new connection (see [`RedisClock`]).
    pub(crate) clock: Arc<RedisClock>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Connector {
    /// The server's topology, found out over `con` (a connection to the URL's node) if not yet.
    fn topology(&self, con: &mut Connection) -> RedisResult<&Topology> {
        if let Some(topology) = self.topology.get() {
            return Ok(topology);
        }
        let is_cluster = if self.requested == Some(false) {
            false
        } else {
            let info: String = redis::cmd("INFO").arg("cluster").query(con)?;
            info.lines().any(|line| line.trim() == "cluster_enabled:1")
        };
        // `redis_cluster=True` on a server that is not a cluster (Azure's Enterprise policy shows
        // one endpoint but still wants a script's keys in one slot): the cluster layout over a
        // plain connection.
        let layout = if is_cluster || self.requested == Some(true) { KeyLayout::Cluster } else { KeyLayout::Seed };
        let cluster = if is_cluster { Some(self.cluster_client(None)?) } else { None };
        log::info!(
            "Redis is {}; using the {} key layout",
            if is_cluster { "a cluster" } else { "a single node" },
            if layout == KeyLayout::Cluster { "cluster" } else { "single-node" }
        );
        Ok(self.topology.get_or_init(|| Topology { layout, cluster }))
    }

    fn cluster_client(&self, login: Option<&Credentials>) -> RedisResult<ClusterClient> {
        let mut builder = ClusterClient::builder([self.url.as_str()])
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            // One retry: a node that stopped answering costs a call about two timeouts, not the
            // four attempts (and slot refreshes) that made a save wait 6 s on a held primary. MOVED,
            // ASK and a failover's new primary past that are followed by `RedisCache::run_on`, on a
            // fresh connection that reads the slot map again.
            .retries(1)
            .min_retry_wait(10)
            .max_retry_wait(200);
        if let Some(pem) = &self.root_cert {
            builder = builder.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) });
        }
        if let Some(login) = login {
            builder = builder.username(acl_user(login)).password(&login.password);
        }
        builder.build()
    }

    /// The client to open one connection with, and when its login is due for renewal.
    fn login(&self) -> RedisResult<(redis::Client, Option<Credentials>, Lease)> {
        login_with(&self.client, self.credentials.as_ref())
    }
}

fn login_with(
    client: &redis::Client,
    credentials: Option<&CredentialProvider>,
) -> RedisResult<(redis::Client, Option<Credentials>, Lease)> {
    let Some(provider) = credentials else {
        return Ok((client.clone(), None, Lease::forever()));
    };
    let (login, lease) = provider.fetch().map_err(credential_error)?;
    // The address (and its TLS settings) stay; the URL's user and password give way.
    let info = client.get_connection_info().clone();
    let redis = info.redis_settings().clone().set_username(acl_user(&login)).set_password(&login.password);
    let client = redis::Client::open(info.set_redis_settings(redis))?;
    Ok((client, Some(login), lease))
}

/// `client` with the provider's current login (when there is a provider), and when it is due.
pub(crate) fn login_client(
    client: &redis::Client,
    credentials: Option<&CredentialProvider>,
) -> RedisResult<(redis::Client, Lease)> {
    login_with(client, credentials).map(|(client, _, lease)| (client, lease))
}

/// The ACL user to log in as: Redis's `default` user stands for a provider's empty username (and
/// the redis crate falls back to `AUTH password` on servers older than 6).
fn acl_user(login: &Credentials) -> &str {
    if login.username.is_empty() {
        "default"
    } else {
        &login.username
    }
}

/// A provider's failure as the redis crate's error: an authentication failure, which the cache
/// reports as Redis being unavailable (the manager falls back to PostgreSQL and backs off).
fn credential_error(why: String) -> RedisError {
    RedisError::from((redis::ErrorKind::AuthenticationFailed, "no Redis credentials", why))
}

/// What [`renew_if_due`] did.
pub(crate) enum Renewal {
    /// The connection's credentials are good for now (renewed if they were due).
    Ready,
    /// A cluster connection whose credentials are due: drop it and open another.
    Replace,
}

/// Before a call on `conn`: when its credentials are due for renewal, asks the provider again and
/// sends `AUTH` with the result, so the server never sees a connection outlive its token. A
/// provider that fails while the old credentials still hold is logged and asked again on the next
/// call; once they expired, the call fails.
pub(crate) fn renew_if_due(conn: &mut RedisConnection, provider: &CredentialProvider) -> RedisResult<Renewal> {
    let now = SystemTime::now();
    if !conn.lease.due(now) {
        return Ok(Renewal::Ready);
    }
    let Con::Single(single) = &mut conn.con else {
        // The sync cluster client keeps the credentials it was built with for the node connections
        // it opens by itself (after a failover, a MOVED to a new node) and has no way to AUTH
        // those it holds: the cluster connection is replaced by one built with fresh credentials.
        return Ok(Renewal::Replace);
    };
    let (login, lease) = match provider.fetch() {
        Ok(fetched) => fetched,
        Err(why) if !conn.lease.expired(now) => {
            log::warn!("{why}; the Redis connection keeps its current credentials until they expire");
            return Ok(Renewal::Ready);
        }
        Err(why) => return Err(credential_error(why)),
    };
    let auth: RedisResult<()> = redis::cmd("AUTH").arg(acl_user(&login)).arg(&login.password).query(single);
    match auth {
        Ok(()) => {
            conn.lease = lease;
            log::debug!("Redis connection authenticated again before its credentials expire");
            Ok(Renewal::Ready)
        }
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => Err(e),
        // The server's refusal (WRONGPASS) names no credential; the connection is not used again.
        Err(e) => Err(RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Redis refused the renewed credentials",
            e.code().unwrap_or("AUTH failed").to_owned(),
        ))),
    }
}

impl r2d2::ManageConnection for Connector {
    type Connection = RedisConnection;
    type Error = RedisError;

    fn connect(&self) -> Result<RedisConnection, RedisError> {
        let (client, login, lease) = self.login()?;
        let mut single = client.get_connection_with_timeout(self.timeout)?;
        single.set_read_timeout(Some(self.timeout))?;
        single.set_write_timeout(Some(self.timeout))?;
        // Redis's clock, for the deadlines writes carry (docs/design.md, "Write order").
        // An ACL that refuses TIME leaves the clock unmeasured: the scripts then take no deadline.
        match redis::cmd("TIME").query::<Vec<String>>(&mut single) {
            Ok(time) => {
                if let Some(micros) = RedisClock::parse_time(&time) {
                    self.clock.observe(micros, std::time::Instant::now());
                }
            }
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => return Err(e),
            Err(e) => log::debug!("Redis refused TIME ({e}); writes carry no deadline"),
        }
        let mut con = match &self.topology(&mut single)?.cluster {
            None => Con::Single(single),
            Some(client) => {
                let cluster = match &login {
                    None => client.get_connection()?,
                    Some(login) => self.cluster_client(Some(login))?.get_connection()?,
                };
                cluster.set_write_timeout(Some(self.timeout))?;
                Con::Cluster(cluster)
            }
        };
        con.set_read_timeout(Some(self.timeout))?;
        // Scripts sent by EVALSHA inside pipelines are loaded up front (one round trip per new
        // connection, to every primary on a cluster); a NOSCRIPT later (SCRIPT FLUSH, a failover)
        // loads them again.
        load_scripts(&mut con)?;
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
        Ok(RedisConnection { con, broken: false, expire_gt, lease, unread: None })
    }

    fn is_valid(&self, conn: &mut RedisConnection) -> Result<(), RedisError> {
        conn.read_unread()?;
        redis::cmd("PING").query(&mut conn.con)
    }

    fn has_broken(&self, conn: &mut RedisConnection) -> bool {
        conn.broken || !conn.con.is_open()
    }
}

#[derive(Debug)]
pub(crate) struct PoolErrorLog;

impl r2d2::HandleError<RedisError> for PoolErrorLog {
    fn handle_error(&self, error: RedisError) {
        log::debug!("Redis connection failed: {error}");
    }
}
