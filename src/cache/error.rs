//! Why a Redis call failed, in the terms the manager acts on.

use redis::RedisError;

use crate::error::{Backend, Error, ErrorKind};

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
    pub(crate) fn from_redis(e: &RedisError) -> Self {
        // Inside a pipeline the redis crate reports a failed command as a "Pipeline failure"
        // wrapping it, without its code: Redis's own OOM message is what is left to recognise.
        if e.code() == Some("OOM") || e.to_string().contains("command not allowed when used memory") {
            CacheError::OutOfMemory(e.to_string())
        } else if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
            // A cluster without a primary for some slot (a failover in progress), or a slot still
            // moving after the retries: Redis is unusable for now, so back off to PostgreSQL.
            || matches!(e.code(), Some("CLUSTERDOWN" | "TRYAGAIN" | "MOVED" | "ASK"))
            || e.to_string().contains("ClusterDown")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oom_inside_a_pipeline_failure_is_out_of_memory() {
        let inner = RedisError::from((
            redis::ErrorKind::Extension,
            "Pipeline failure",
            "[(Index 0, error: \"OOM\": command not allowed when used memory > 'maxmemory'.)]".to_owned(),
        ));
        assert!(matches!(CacheError::from_redis(&inner), CacheError::OutOfMemory(_)));
        let other = RedisError::from((redis::ErrorKind::Extension, "Pipeline failure", "ERR something".to_owned()));
        assert!(matches!(CacheError::from_redis(&other), CacheError::Other(_)));
    }
}
