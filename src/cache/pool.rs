//! The r2d2 pool of Redis connections: short timeouts, scripts loaded once per connection, and a
//! connection that failed never handed out again.

use std::time::Duration;

use redis::{Connection, ConnectionLike as _, RedisError};

use crate::cache::scripts::load_scripts;

/// A pooled connection that remembers a failed call: a timed-out connection may still receive the
/// late reply, so it is never handed out again.
pub struct RedisConnection {
    pub(crate) con: Connection,
    pub(crate) broken: bool,
    /// The server takes `EXPIRE ... GT` (Redis 7.0 and later), so a clean hit's TTL is refreshed
    /// by two plain commands instead of a script.
    pub(crate) expire_gt: bool,
}

/// Opens connections with the configured timeouts.
#[derive(Debug)]
pub(crate) struct Connector {
    pub(crate) client: redis::Client,
    pub(crate) timeout: Duration,
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
pub(crate) struct PoolErrorLog;

impl r2d2::HandleError<RedisError> for PoolErrorLog {
    fn handle_error(&self, error: RedisError) {
        log::debug!("Redis connection failed: {error}");
    }
}
