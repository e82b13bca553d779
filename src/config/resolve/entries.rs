//! The settings as `chat-history config` shows them: each value redacted, with its source.

use std::path::PathBuf;
use std::time::Duration;

use super::resolved::Resolved;
use super::source::Source;
use crate::config::RedisSettings;

/// A value as `chat-history config` shows it: passwords never.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    /// Not set, and no default.
    Unset,
    /// A flag.
    Bool(bool),
    /// A count or a port.
    Int(i64),
    /// Seconds.
    Seconds(f64),
    /// Text with no secret in it (a redacted URL, a path, a mode).
    Text(String),
    /// A secret that is set; its value is never shown.
    Redacted,
}

/// One line of `chat-history config`.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The keyword argument's name.
    pub name: &'static str,
    /// The value, redacted.
    pub value: Shown,
    /// Where it came from.
    pub source: Source,
}

impl Resolved {
    /// Every setting as `chat-history config` shows it, in the README table's order. Connection
    /// strings are shown redacted (or as hidden when they do not parse), passwords never.
    #[must_use]
    pub fn entries(&self) -> Vec<Entry> {
        fn secs(d: Duration) -> Shown {
            Shown::Seconds(d.as_secs_f64())
        }
        fn opt_path(p: Option<&PathBuf>) -> Shown {
            p.map_or(Shown::Unset, |p| Shown::Text(p.display().to_string()))
        }
        let hidden = |value: Option<String>, set: bool| match (value, set) {
            (Some(text), _) => Shown::Text(text),
            (None, true) => Shown::Text("(set, but not valid; value hidden)".to_owned()),
            (None, false) => Shown::Unset,
        };
        let redis_url = self.redis_connection_string.value.as_deref().and_then(|url| {
            let parsed = RedisSettings::from_url(url, None, 1, Duration::from_secs(1), 1).ok()?;
            Some(parsed.redacted().to_owned())
        });
        let int = |n: i64| Shown::Int(n);
        let rows: Vec<(&'static str, Shown, Source)> = vec![
            ("mode", Shown::Text(self.mode_name.clone()), self.requested_mode.source),
            ("base_dir", Shown::Text(self.base_dir.value.display().to_string()), self.base_dir.source),
            (
                "connection_string",
                hidden(self.postgres_redacted(), self.connection_string.value.is_some()),
                self.connection_string.source,
            ),
            ("history_days", int(self.history_days.value.into()), self.history_days.source),
            ("redis_enabled", Shown::Bool(self.redis_enabled.value), self.redis_enabled.source),
            ("postgres_pool_size", int(self.postgres_pool_size.value.into()), self.postgres_pool_size.source),
            (
                "postgres_connect_timeout",
                secs(self.postgres_connect_timeout.value),
                self.postgres_connect_timeout.source,
            ),
            ("postgres_ca_file", opt_path(self.postgres_ca_file.value.as_ref()), self.postgres_ca_file.source),
            (
                "postgres_statement_timeout",
                secs(self.postgres_statement_timeout.value),
                self.postgres_statement_timeout.source,
            ),
            ("postgres_lock_timeout", secs(self.postgres_lock_timeout.value), self.postgres_lock_timeout.source),
            (
                "redis_connection_string",
                hidden(redis_url, self.redis_connection_string.value.is_some()),
                self.redis_connection_string.source,
            ),
            ("redis_host", self.redis_host.value.clone().map_or(Shown::Unset, Shown::Text), self.redis_host.source),
            ("redis_port", int(self.redis_port.value.into()), self.redis_port.source),
            (
                "redis_password",
                if self.redis_password.value.is_some() { Shown::Redacted } else { Shown::Unset },
                self.redis_password.source,
            ),
            ("redis_ssl", Shown::Bool(self.redis_ssl.value), self.redis_ssl.source),
            ("redis_ttl", int(i64::try_from(self.redis_ttl.value).unwrap_or(i64::MAX)), self.redis_ttl.source),
            ("redis_pool_size", int(self.redis_pool_size.value.into()), self.redis_pool_size.source),
            ("redis_timeout", secs(self.redis_timeout.value), self.redis_timeout.source),
            ("redis_ca_file", opt_path(self.redis_ca_file.value.as_ref()), self.redis_ca_file.source),
            ("redis_cluster", self.redis_cluster.value.map_or(Shown::Unset, Shown::Bool), self.redis_cluster.source),
            (
                "near_cache_bytes",
                int(i64::try_from(self.near_cache_bytes.value).unwrap_or(i64::MAX)),
                self.near_cache_bytes.source,
            ),
            (
                "credential_refresh_margin",
                secs(self.credential_refresh_margin.value),
                self.credential_refresh_margin.source,
            ),
            ("flush_interval", secs(self.flush_interval.value), self.flush_interval.source),
            ("background_flush", Shown::Bool(self.background_flush.value), self.background_flush.source),
            (
                "flush_batch_size",
                int(i64::try_from(self.flush_batch_size.value).unwrap_or(i64::MAX)),
                self.flush_batch_size.source,
            ),
            ("close_timeout", secs(self.close_timeout.value), self.close_timeout.source),
        ];
        rows.into_iter().map(|(name, value, source)| Entry { name, value, source }).collect()
    }
}
