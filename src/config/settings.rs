//! What a manager is built from: the mode and the resolved settings.

use std::path::PathBuf;
use std::time::Duration;

use super::postgres::PostgresSettings;
use super::redis::RedisSettings;
use crate::error::{Error, Result};

/// Where conversations live (the README's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// JSON files in `<base_dir>/.chat_history`.
    Local,
    /// PostgreSQL only.
    Postgres,
    /// Redis in front of PostgreSQL with write-back (`mode="postgres", redis_enabled=True`).
    Redis,
}

impl Mode {
    /// `"local"`, `"postgres"` or `"redis"`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "local" => Ok(Mode::Local),
            "postgres" => Ok(Mode::Postgres),
            "redis" => Ok(Mode::Redis),
            other => Err(Error::config(format!("mode must be 'local', 'postgres' or 'redis', got {other:?}"))),
        }
    }

    /// The name `parse` takes.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Postgres => "postgres",
            Mode::Redis => "redis",
        }
    }
}

/// What a manager is built from; the binding layer fills it from keyword arguments and the
/// environment.
#[derive(Clone)]
pub struct Settings {
    /// The storage mode.
    pub mode: Mode,
    /// Local mode's folder (the `.chat_history` folder is created inside).
    pub base_dir: PathBuf,
    /// PostgreSQL settings (postgres and redis modes).
    pub postgres: Option<PostgresSettings>,
    /// `list_conversations` returns conversations created in the last this many days.
    pub history_days: i32,
    /// Redis settings (redis mode).
    pub redis: Option<RedisSettings>,
    /// How often the background flusher runs; `None` turns it off.
    pub flush_interval: Option<Duration>,
    /// Conversations per PostgreSQL transaction in a flush.
    pub flush_batch_size: usize,
    /// How long `close()` may spend flushing before it gives up and logs what is left.
    pub close_timeout: Duration,
    /// Opened only to look (`chat-history stats` and `doctor`): the schema is neither created nor
    /// migrated, and nothing is written back (no background flusher, no flush on close or at exit).
    pub inspect_only: bool,
}

impl Settings {
    /// Local mode in `base_dir`, everything else at its default.
    #[must_use]
    pub fn local(base_dir: PathBuf) -> Self {
        Settings {
            mode: Mode::Local,
            base_dir,
            postgres: None,
            history_days: 7,
            redis: None,
            flush_interval: None,
            flush_batch_size: 500,
            close_timeout: Duration::from_secs(30),
            inspect_only: false,
        }
    }
}
