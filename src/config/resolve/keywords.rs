//! The keyword arguments a manager takes, and the environment variables behind them.

use std::path::PathBuf;

/// The keyword arguments as a caller gave them; `None` where one was not given. Counts are kept as
/// given (`i64`), so [`Resolved::resolve`] checks every range and names the argument.
#[derive(Default, Clone)]
#[allow(missing_docs)] // each field is the keyword argument of the same name (the README's table)
pub struct Keywords {
    pub mode: Option<String>,
    pub base_dir: Option<PathBuf>,
    pub connection_string: Option<String>,
    pub history_days: Option<i64>,
    pub redis_enabled: Option<bool>,
    pub postgres_pool_size: Option<i64>,
    pub postgres_connect_timeout: Option<f64>,
    pub postgres_ca_file: Option<PathBuf>,
    pub postgres_statement_timeout: Option<f64>,
    pub postgres_lock_timeout: Option<f64>,
    pub redis_connection_string: Option<String>,
    pub redis_host: Option<String>,
    pub redis_password: Option<String>,
    pub redis_port: Option<i64>,
    pub redis_ssl: Option<bool>,
    pub redis_ttl: Option<i64>,
    pub redis_pool_size: Option<i64>,
    pub redis_timeout: Option<f64>,
    pub redis_ca_file: Option<PathBuf>,
    pub redis_cluster: Option<bool>,
    pub near_cache_bytes: Option<i64>,
    pub credential_refresh_margin: Option<f64>,
    pub flush_interval: Option<f64>,
    pub background_flush: Option<bool>,
    pub flush_batch_size: Option<i64>,
    pub close_timeout: Option<f64>,
}

/// The names of [`Keywords`], in the README table's order: what the binding accepts, and what a
/// test holds the README's table and the stubs to.
pub const KEYWORD_NAMES: &[&str] = &[
    "mode",
    "base_dir",
    "connection_string",
    "history_days",
    "redis_enabled",
    "postgres_pool_size",
    "postgres_connect_timeout",
    "postgres_ca_file",
    "postgres_statement_timeout",
    "postgres_lock_timeout",
    "redis_connection_string",
    "redis_host",
    "redis_port",
    "redis_password",
    "redis_ssl",
    "redis_ttl",
    "redis_pool_size",
    "redis_timeout",
    "redis_ca_file",
    "redis_cluster",
    "near_cache_bytes",
    "credential_refresh_margin",
    "flush_interval",
    "background_flush",
    "flush_batch_size",
    "close_timeout",
];

/// Every environment variable [`Resolved::resolve`] reads, in the README table's order (a test
/// records the reads and holds this list to them; another holds `.env.example` to it).
pub const ENVIRONMENT: &[&str] = &[
    "CHAT_HISTORY_MODE",
    "DATABASE_URL",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DATABASE",
    "POSTGRES_ADMIN_LOGIN",
    "POSTGRES_ADMIN_PASSWORD",
    "POSTGRES_SSLMODE",
    "REDIS_ENABLED",
    "REDIS_CONNECTION_STRING",
    "REDIS_HOST",
    "REDIS_PASSWORD",
    "REDIS_PORT",
    "REDIS_SSL",
    "REDIS_TTL_SECONDS",
    "REDIS_CACHE_TTL",
    "REDIS_CA_FILE",
    "REDIS_CLUSTER",
    "NEAR_CACHE_BYTES",
];
/// Default Redis port with `redis_host`: Azure Cache for Redis's TLS port.
pub const DEFAULT_REDIS_PORT: u16 = 6380;
/// Default seconds a clean conversation stays cached.
pub const DEFAULT_REDIS_TTL: u64 = 1800;
/// Default bound of the near cache: 64 MiB, a few thousand long conversations per process.
pub const DEFAULT_NEAR_CACHE_BYTES: u64 = 64 << 20;
