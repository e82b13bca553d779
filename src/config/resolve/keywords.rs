//! The keyword arguments a manager takes, and the environment variables behind them.

use std::path::PathBuf;

use self::DefaultValue::{CurrentDirectory, Flag, Seconds, Text, Unset, Whole};

/// The keyword arguments as a caller gave them; `None` where one was not given. Counts are kept as
/// given (`i64`), so [`Resolved::resolve`](super::Resolved::resolve) checks every range and names the argument.
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
    /// As given: a keyword's `True` and `False` arrive as `"on"` and `"off"`.
    pub redis_compression: Option<String>,
    pub credential_refresh_margin: Option<f64>,
    pub flush_interval: Option<f64>,
    pub background_flush: Option<bool>,
    pub flush_batch_size: Option<i64>,
    pub close_timeout: Option<f64>,
}

/// A keyword argument's value, converted by its [`Kind`] (the binding's side of [`Keywords::set`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Given {
    /// For [`Kind::Mode`], [`Kind::Text`] and [`Kind::Compression`] (whose `True` and `False` the
    /// binding gives as `"on"` and `"off"`).
    Text(String),
    /// For [`Kind::Path`].
    Path(PathBuf),
    /// For [`Kind::Whole`].
    Whole(i64),
    /// For [`Kind::Seconds`].
    Seconds(f64),
    /// For [`Kind::Flag`].
    Flag(bool),
}

impl Keywords {
    /// Sets the setting `name` to `value`; false when `name` is not a setting (see
    /// [`KEYWORD_NAMES`]) or `value` is not of its [`Kind`] (a test sets every one).
    pub fn set(&mut self, name: &str, value: Given) -> bool {
        use Given::{Flag, Path, Seconds, Text, Whole};
        match (name, value) {
            ("mode", Text(v)) => self.mode = Some(v),
            ("base_dir", Path(v)) => self.base_dir = Some(v),
            ("connection_string", Text(v)) => self.connection_string = Some(v),
            ("history_days", Whole(v)) => self.history_days = Some(v),
            ("redis_enabled", Flag(v)) => self.redis_enabled = Some(v),
            ("postgres_pool_size", Whole(v)) => self.postgres_pool_size = Some(v),
            ("postgres_connect_timeout", Seconds(v)) => self.postgres_connect_timeout = Some(v),
            ("postgres_ca_file", Path(v)) => self.postgres_ca_file = Some(v),
            ("postgres_statement_timeout", Seconds(v)) => self.postgres_statement_timeout = Some(v),
            ("postgres_lock_timeout", Seconds(v)) => self.postgres_lock_timeout = Some(v),
            ("redis_connection_string", Text(v)) => self.redis_connection_string = Some(v),
            ("redis_host", Text(v)) => self.redis_host = Some(v),
            ("redis_port", Whole(v)) => self.redis_port = Some(v),
            ("redis_password", Text(v)) => self.redis_password = Some(v),
            ("redis_ssl", Flag(v)) => self.redis_ssl = Some(v),
            ("redis_ttl", Whole(v)) => self.redis_ttl = Some(v),
            ("redis_pool_size", Whole(v)) => self.redis_pool_size = Some(v),
            ("redis_timeout", Seconds(v)) => self.redis_timeout = Some(v),
            ("redis_ca_file", Path(v)) => self.redis_ca_file = Some(v),
            ("redis_cluster", Flag(v)) => self.redis_cluster = Some(v),
            ("near_cache_bytes", Whole(v)) => self.near_cache_bytes = Some(v),
            ("redis_compression", Text(v)) => self.redis_compression = Some(v),
            ("credential_refresh_margin", Seconds(v)) => self.credential_refresh_margin = Some(v),
            ("flush_interval", Seconds(v)) => self.flush_interval = Some(v),
            ("background_flush", Flag(v)) => self.background_flush = Some(v),
            ("flush_batch_size", Whole(v)) => self.flush_batch_size = Some(v),
            ("close_timeout", Seconds(v)) => self.close_timeout = Some(v),
            _ => return false,
        }
        true
    }
}

/// What a keyword argument takes. The binding converts and type-checks by it (an
/// `InvalidTypeError` naming the argument); the stubs' annotations follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A mode's name (`"local"`, `"postgres"`, `"redis"`, or the example app's two).
    Mode,
    /// Text: a connection string, a host name, a password.
    Text,
    /// A file or folder: a `str` or an `os.PathLike`.
    Path,
    /// A whole number (a count, a port, bytes, seconds of a TTL); a bool is refused.
    Whole,
    /// Seconds, an int or a float; a bool is refused.
    Seconds,
    /// True or False.
    Flag,
    /// `redis_compression`: True, False, or a codec's name (`Compression::parse` lists them).
    Compression,
    /// A callable returning credentials (`src/credentials.rs`); not a setting, never resolved.
    CredentialProvider,
}

/// A setting's value when neither its keyword argument nor any of its variables is given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    /// None: the setting is off, or something else decides (the README's table says what).
    Unset,
    /// The process's current directory when the manager is built.
    CurrentDirectory,
    /// A flag.
    Flag(bool),
    /// A whole number.
    Whole(i64),
    /// Seconds.
    Seconds(f64),
    /// Text.
    Text(&'static str),
}

/// One keyword argument of `ChatHistoryManager` and `AsyncChatHistoryManager`.
#[derive(Debug, Clone, Copy)]
pub struct Keyword {
    /// The argument's name.
    pub name: &'static str,
    /// What it takes.
    pub kind: Kind,
    /// Its value when not given.
    pub default: DefaultValue,
    /// The environment variables that set it when the argument is not given, the first set one
    /// winning (README, "Configuration").
    pub env: &'static [&'static str],
    /// What it is, in one line.
    pub doc: &'static str,
}

const fn kw(
    name: &'static str,
    kind: Kind,
    default: DefaultValue,
    env: &'static [&'static str],
    doc: &'static str,
) -> Keyword {
    Keyword { name, kind, default, env, doc }
}

/// How many of [`KEYWORDS`] may also be given by position: Phase 1's five, in this order.
pub const POSITIONAL: usize = 5;

/// The keyword arguments of `ChatHistoryManager` and `AsyncChatHistoryManager`, declared once, in
/// their signature's order: the settings, then the two credential providers. Everything else that
/// names them is derived from this table or held to it by a test: [`Keywords`] and the resolver
/// (`resolved.rs`), the binding's conversion and `ResolvedSettings.value` (`src/bindings/settings.rs`),
/// the stubs (`_core.pyi`, `_asyncio.pyi`) and the README's configuration table.
pub const KEYWORDS: [Keyword; 29] = [
    kw(
        "mode",
        Kind::Mode,
        Text("local"),
        &["CHAT_HISTORY_MODE"],
        "local files, postgres, or redis (postgres with Redis)",
    ),
    kw("base_dir", Kind::Path, CurrentDirectory, &[], "local mode's folder; files go in <base_dir>/.chat_history/"),
    kw(
        "connection_string",
        Kind::Text,
        Unset,
        // POSTGRES_HOST with its parts (`POSTGRES_PARTS`): the example app's variables.
        &["DATABASE_URL", "POSTGRES_HOST"],
        "PostgreSQL, as a URL or libpq key=value string",
    ),
    kw("history_days", Kind::Whole, Whole(7), &[], "list_conversations returns chats created in the last N days"),
    kw("redis_enabled", Kind::Flag, Flag(false), &["REDIS_ENABLED"], "when set, whether a PostgreSQL mode uses Redis"),
    kw("postgres_pool_size", Kind::Whole, Whole(4), &[], "connections in the PostgreSQL pool"),
    kw(
        "postgres_connect_timeout",
        Kind::Seconds,
        Seconds(5.0),
        &[],
        "seconds to connect, or to wait for a pooled connection",
    ),
    kw("postgres_ca_file", Kind::Path, Unset, &[], "PEM CA file for verify-ca / verify-full (unset: Mozilla's roots)"),
    kw("postgres_statement_timeout", Kind::Seconds, Seconds(30.0), &[], "seconds any statement may run"),
    kw("postgres_lock_timeout", Kind::Seconds, Seconds(5.0), &[], "seconds any statement may wait for a lock"),
    kw(
        "redis_connection_string",
        Kind::Text,
        Unset,
        &["REDIS_CONNECTION_STRING"],
        "Redis as a redis:// or rediss:// URL",
    ),
    kw("redis_host", Kind::Text, Unset, &["REDIS_HOST"], "Redis by parts: the host"),
    kw("redis_port", Kind::Whole, Whole(6380), &["REDIS_PORT"], "Redis by parts: the port"),
    kw("redis_password", Kind::Text, Unset, &["REDIS_PASSWORD"], "Redis by parts: the password"),
    kw("redis_ssl", Kind::Flag, Flag(true), &["REDIS_SSL"], "Redis by parts: whether to use TLS"),
    kw(
        "redis_ttl",
        Kind::Whole,
        Whole(1800),
        &["REDIS_TTL_SECONDS", "REDIS_CACHE_TTL"],
        "seconds a clean conversation stays cached after its last use",
    ),
    kw("redis_pool_size", Kind::Whole, Whole(8), &[], "connections in the Redis pool"),
    kw("redis_timeout", Kind::Seconds, Seconds(0.5), &[], "seconds for a Redis connect, command, or pool wait"),
    kw("redis_ca_file", Kind::Path, Unset, &["REDIS_CA_FILE"], "PEM CA file for rediss:// (unset: Mozilla's roots)"),
    kw("redis_cluster", Kind::Flag, Unset, &["REDIS_CLUSTER"], "the cluster key layout (unset: ask the server)"),
    kw(
        "near_cache_bytes",
        Kind::Whole,
        Whole(64 << 20),
        &["NEAR_CACHE_BYTES"],
        "bytes of conversations each manager keeps in the process (0: off)",
    ),
    kw(
        "redis_compression",
        Kind::Compression,
        Text("off"),
        &["REDIS_COMPRESSION"],
        "how saves store transcripts in Redis: off, zlib (the seed's form) or on (zstd)",
    ),
    kw(
        "credential_refresh_margin",
        Kind::Seconds,
        Seconds(180.0),
        &[],
        "seconds before expiry that credentials are renewed",
    ),
    kw("flush_interval", Kind::Seconds, Seconds(10.0), &[], "seconds between background write-backs"),
    kw("background_flush", Kind::Flag, Flag(true), &[], "run the background flusher thread (redis mode)"),
    kw("flush_batch_size", Kind::Whole, Whole(500), &[], "conversations per PostgreSQL transaction in a flush"),
    kw("close_timeout", Kind::Seconds, Seconds(30.0), &[], "seconds close() and the exit hook may spend flushing"),
    kw("redis_credential_provider", Kind::CredentialProvider, Unset, &[], "a callable returning Redis credentials"),
    kw(
        "postgres_credential_provider",
        Kind::CredentialProvider,
        Unset,
        &[],
        "a callable returning PostgreSQL credentials",
    ),
];

/// The settings among [`KEYWORDS`] (all but the credential providers), in order: the names
/// [`Keywords`] holds and [`Resolved::entries`](super::Resolved::entries) lists.
pub const KEYWORD_NAMES: [&str; 27] = names(0);

/// The credential providers among [`KEYWORDS`]: callables, not settings.
pub const PROVIDER_NAMES: [&str; 2] = names(KEYWORD_NAMES.len());

const fn names<const N: usize>(from: usize) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = KEYWORDS[from + i].name;
        i += 1;
    }
    out
}

/// The example app's PostgreSQL variables read beside `POSTGRES_HOST` (`postgres_from_parts`).
pub const POSTGRES_PARTS: [&str; 5] =
    ["POSTGRES_PORT", "POSTGRES_DATABASE", "POSTGRES_ADMIN_LOGIN", "POSTGRES_ADMIN_PASSWORD", "POSTGRES_SSLMODE"];

/// Every environment variable [`Resolved::resolve`](super::Resolved::resolve) reads: each
/// keyword's, in [`KEYWORDS`]' order, then [`POSTGRES_PARTS`] (a test records the reads and holds
/// this list to them; another holds `.env.example` to it).
pub const ENVIRONMENT: [&str; 20] = environment();

const fn environment<const N: usize>() -> [&'static str; N] {
    let mut out = [""; N];
    let (mut n, mut i) = (0, 0);
    while i < KEYWORDS.len() {
        let mut j = 0;
        while j < KEYWORDS[i].env.len() {
            out[n] = KEYWORDS[i].env[j];
            (n, j) = (n + 1, j + 1);
        }
        i += 1;
    }
    let mut j = 0;
    while j < POSTGRES_PARTS.len() {
        out[n] = POSTGRES_PARTS[j];
        (n, j) = (n + 1, j + 1);
    }
    assert!(n == N, "ENVIRONMENT's length is the count of the table's variables");
    out
}

// The resolver's typed copies of three of the table's defaults (a test holds every default the
// resolver applies to the table).

/// Default Redis port with `redis_host`: Azure Cache for Redis's TLS port.
pub const DEFAULT_REDIS_PORT: u16 = 6380;
/// Default seconds a clean conversation stays cached.
pub const DEFAULT_REDIS_TTL: u64 = 1800;
/// Default bound of the near cache: 64 MiB, a few thousand long conversations per process.
pub const DEFAULT_NEAR_CACHE_BYTES: u64 = 64 << 20;
