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
                "redis_compression",
                Shown::Text(self.redis_compression.value.as_str().to_owned()),
                self.redis_compression.source,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::keywords::{DefaultValue, Given, Keywords, Kind, KEYWORDS, KEYWORD_NAMES, PROVIDER_NAMES};
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// A value of `kind` every setting of that kind takes, as a variable and as a keyword.
    fn sample(kind: Kind) -> (&'static str, Given) {
        match kind {
            Kind::Mode => ("postgres", Given::Text("postgres".into())),
            Kind::Text => ("x", Given::Text("x".into())),
            Kind::Path => ("/tmp/x", Given::Path("/tmp/x".into())),
            Kind::Whole => ("3", Given::Whole(3)),
            Kind::Seconds => ("1", Given::Seconds(1.0)),
            Kind::Flag => ("true", Given::Flag(true)),
            Kind::Compression => ("zlib", Given::Text("zlib".into())),
            Kind::CredentialProvider => unreachable!("not a setting"),
        }
    }

    #[test]
    fn the_resolver_follows_the_keyword_table() {
        let (settings, providers) = KEYWORDS.split_at(KEYWORD_NAMES.len());
        assert!(providers.iter().all(|k| k.kind == Kind::CredentialProvider && k.env.is_empty()));
        assert_eq!(providers.iter().map(|k| k.name).collect::<Vec<_>>(), PROVIDER_NAMES);
        assert!(settings.iter().all(|k| k.kind != Kind::CredentialProvider));

        // Names, order and defaults: what nothing sets is the table's default.
        let r = Resolved::resolve(Keywords::default(), &env(&[])).unwrap();
        let cwd = std::env::current_dir().unwrap().display().to_string();
        let entries = r.entries();
        assert_eq!(entries.iter().map(|e| e.name).collect::<Vec<_>>(), KEYWORD_NAMES);
        for (entry, k) in entries.iter().zip(settings) {
            let want = match k.default {
                DefaultValue::Unset => Shown::Unset,
                DefaultValue::CurrentDirectory => Shown::Text(cwd.clone()),
                DefaultValue::Flag(b) => Shown::Bool(b),
                DefaultValue::Whole(n) => Shown::Int(n),
                DefaultValue::Seconds(s) => Shown::Seconds(s),
                DefaultValue::Text(t) => Shown::Text(t.to_owned()),
            };
            assert_eq!((&entry.value, entry.source), (&want, Source::Default), "{}", k.name);
        }

        // Variables: each sets its setting and no other, the first of them set winning.
        for k in settings {
            for (i, &var) in k.env.iter().enumerate() {
                let raw = sample(k.kind).0;
                let pairs: Vec<(&str, &str)> = k.env[i..].iter().map(|&v| (v, raw)).collect();
                let r = Resolved::resolve(Keywords::default(), &env(&pairs)).unwrap();
                for e in r.entries() {
                    let want = if e.name == k.name { Source::Env(var) } else { Source::Default };
                    assert_eq!(e.source, want, "{var} and {}", e.name);
                }
            }
        }

        // Keywords: each name the table lists is set by a value of its kind, and only that setting.
        for k in settings {
            let mut kw = Keywords::default();
            assert!(kw.set(k.name, sample(k.kind).1), "{}", k.name);
            let r = Resolved::resolve(kw, &env(&[])).unwrap();
            for e in r.entries() {
                let want = if e.name == k.name { Source::Keyword } else { Source::Default };
                assert_eq!(e.source, want, "{} given, {}", k.name, e.name);
            }
        }
        assert!(!Keywords::default().set("redis_pool", Given::Whole(3)));
        assert!(!Keywords::default().set("redis_port", Given::Text("3".into())));
    }
}
