//! Every setting of a manager resolved once, with where its value came from: the keyword argument
//! when one was given, else the environment variable, else the default (the README,
//! "Configuration"). The binding's constructors, `chat-history` and the example app all read their
//! settings through [`Resolved`], so they cannot drift apart.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::{PostgresSettings, RedisSettings};
use crate::error::{Error, Result};
use crate::manager::{Mode, Settings};

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A keyword argument (a command-line flag, for `chat-history`).
    Keyword,
    /// This environment variable.
    Env(&'static str),
    /// Nothing set it.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Keyword => f.write_str("keyword"),
            Source::Env(name) => write!(f, "env {name}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// A value and where it came from.
#[derive(Clone)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub source: Source,
}

/// Reads an environment variable; blank counts as unset.
pub trait Environment {
    /// The variable's value, or `None` when it is unset or blank.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process's own environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

/// A given mapping instead of the process's environment (the example app passes its own).
impl<S: std::hash::BuildHasher> Environment for HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.trim().is_empty()).cloned()
    }
}

/// The keyword arguments as a caller gave them; `None` where one was not given.
#[derive(Default, Clone)]
#[allow(missing_docs)] // each field is the keyword argument of the same name (the README's table)
pub struct Keywords {
    pub mode: Option<String>,
    pub base_dir: Option<PathBuf>,
    pub connection_string: Option<String>,
    pub history_days: Option<i32>,
    pub redis_enabled: Option<bool>,
    pub postgres_pool_size: Option<u32>,
    pub postgres_connect_timeout: Option<f64>,
    pub postgres_ca_file: Option<PathBuf>,
    pub postgres_statement_timeout: Option<f64>,
    pub postgres_lock_timeout: Option<f64>,
    pub redis_connection_string: Option<String>,
    pub redis_host: Option<String>,
    pub redis_password: Option<String>,
    pub redis_port: Option<u16>,
    pub redis_ssl: Option<bool>,
    pub redis_ttl: Option<u64>,
    pub redis_pool_size: Option<u32>,
    pub redis_timeout: Option<f64>,
    pub redis_ca_file: Option<PathBuf>,
    pub redis_cluster: Option<bool>,
    pub near_cache_bytes: Option<u64>,
    pub credential_refresh_margin: Option<f64>,
    pub flush_interval: Option<f64>,
    pub background_flush: Option<bool>,
    pub flush_batch_size: Option<usize>,
    pub close_timeout: Option<f64>,
}

/// Every setting, resolved. Holds passwords: it has no `Debug`, and [`Resolved::entries`] is the
/// only way to show it.
#[derive(Clone)]
#[allow(missing_docs)] // each field is the setting of the same name (the README's table)
pub struct Resolved {
    /// The mode as asked for; [`Resolved::mode`] applies `redis_enabled` to it.
    pub requested_mode: Sourced<Mode>,
    pub base_dir: Sourced<PathBuf>,
    pub connection_string: Sourced<Option<String>>,
    pub history_days: Sourced<i32>,
    pub redis_enabled: Sourced<bool>,
    pub postgres_pool_size: Sourced<u32>,
    pub postgres_connect_timeout: Sourced<Duration>,
    pub postgres_ca_file: Sourced<Option<PathBuf>>,
    pub postgres_statement_timeout: Sourced<Duration>,
    pub postgres_lock_timeout: Sourced<Duration>,
    pub redis_connection_string: Sourced<Option<String>>,
    pub redis_host: Sourced<Option<String>>,
    pub redis_password: Sourced<Option<String>>,
    pub redis_port: Sourced<u16>,
    pub redis_ssl: Sourced<bool>,
    pub redis_ttl: Sourced<u64>,
    pub redis_pool_size: Sourced<u32>,
    pub redis_timeout: Sourced<Duration>,
    pub redis_ca_file: Sourced<Option<PathBuf>>,
    pub redis_cluster: Sourced<Option<bool>>,
    pub near_cache_bytes: Sourced<u64>,
    pub credential_refresh_margin: Sourced<Duration>,
    pub flush_interval: Sourced<Duration>,
    pub background_flush: Sourced<bool>,
    pub flush_batch_size: Sourced<usize>,
    pub close_timeout: Sourced<Duration>,
}

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

/// Default Redis port with `redis_host`: Azure Cache for Redis's TLS port.
pub const DEFAULT_REDIS_PORT: u16 = 6380;
/// Default seconds a clean conversation stays cached.
pub const DEFAULT_REDIS_TTL: u64 = 1800;
/// Default bound of the near cache: 64 MiB, a few thousand long conversations per process.
pub const DEFAULT_NEAR_CACHE_BYTES: u64 = 64 << 20;

fn keyword<T>(value: T) -> Sourced<T> {
    Sourced { value, source: Source::Keyword }
}

fn default<T>(value: T) -> Sourced<T> {
    Sourced { value, source: Source::Default }
}

fn flag(name: &'static str, raw: &str) -> Result<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(format!("{name} must be true or false, got '{raw}'"))),
    }
}

fn seconds(name: &str, value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| Error::config(format!("{name} must be a positive number of seconds, got {value}")))
}

/// A bound that must be more than zero: PostgreSQL reads 0 as "no limit".
fn positive_seconds(name: &str, value: f64) -> Result<Duration> {
    let duration = seconds(name, value)?;
    if duration < Duration::from_millis(1) {
        return Err(Error::config(format!("{name} must be at least 0.001 seconds, got {value}")));
    }
    Ok(duration)
}

/// The keyword when given, else the first of `vars` that is set (parsed by `parse`), else `fallback`.
fn pick<T>(
    given: Option<T>,
    env: &dyn Environment,
    vars: &[&'static str],
    parse: impl Fn(&'static str, &str) -> Result<T>,
    fallback: T,
) -> Result<Sourced<T>> {
    if let Some(value) = given {
        return Ok(keyword(value));
    }
    for &name in vars {
        if let Some(raw) = env.var(name) {
            return Ok(Sourced { value: parse(name, &raw)?, source: Source::Env(name) });
        }
    }
    Ok(default(fallback))
}

#[allow(clippy::unnecessary_wraps)] // the shape `pick` takes
fn text(_: &'static str, raw: &str) -> Result<Option<String>> {
    Ok(Some(raw.trim().to_owned()))
}

#[allow(clippy::unnecessary_wraps)] // the shape `pick` takes
fn path(_: &'static str, raw: &str) -> Result<Option<PathBuf>> {
    Ok(Some(PathBuf::from(raw.trim())))
}

fn number<T: std::str::FromStr>(what: &'static str) -> impl Fn(&'static str, &str) -> Result<T> {
    move |name, raw| raw.trim().parse().map_err(|_| Error::config(format!("{name} must be {what}, got '{raw}'")))
}

/// The example app's PostgreSQL variables (`POSTGRES_HOST` and friends) as a libpq key=value
/// string; `None` without `POSTGRES_HOST`. `sslmode` defaults to `require`, which Azure Database
/// for PostgreSQL demands, except for a server on this machine (`prefer`).
pub fn postgres_from_parts(env: &dyn Environment) -> Result<Option<String>> {
    let Some(host) = env.var("POSTGRES_HOST").map(|h| h.trim().to_owned()) else {
        return Ok(None);
    };
    let port: u16 = match env.var("POSTGRES_PORT") {
        Some(raw) => number("a port number")("POSTGRES_PORT", &raw)?,
        None => 5432,
    };
    let local = matches!(host.as_str(), "localhost" | "127.0.0.1" | "::1") || host.starts_with('/');
    let parts = [
        ("host", Some(host.clone())),
        ("port", Some(port.to_string())),
        ("dbname", Some(env.var("POSTGRES_DATABASE").unwrap_or_else(|| "postgres".to_owned()))),
        ("user", Some(env.var("POSTGRES_ADMIN_LOGIN").unwrap_or_else(|| "postgres".to_owned()))),
        ("password", env.var("POSTGRES_ADMIN_PASSWORD")),
        (
            "sslmode",
            Some(env.var("POSTGRES_SSLMODE").unwrap_or_else(|| (if local { "prefer" } else { "require" }).to_owned())),
        ),
    ];
    let pairs: Vec<String> =
        parts.iter().filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={}", libpq_quote(v)))).collect();
    Ok(Some(pairs.join(" ")))
}

/// libpq's key=value grammar: a value with spaces, quotes or backslashes goes in single quotes.
fn libpq_quote(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A connection string's error names the argument or variable it came from (never its value).
fn name_source(error: &Error, source: Source, keyword: &str) -> Error {
    match source {
        Source::Env(name) => Error::config(format!("{name}: {error}")),
        _ => Error::config(format!("{keyword}: {error}")),
    }
}

impl Resolved {
    /// Resolves every setting: keyword argument, else environment variable, else default. A bad
    /// value is an error naming the argument or the variable it came from.
    pub fn resolve(kw: Keywords, env: &dyn Environment) -> Result<Self> {
        let requested_mode = match kw.mode {
            Some(mode) => keyword(Mode::parse(&mode)?),
            None => default(Mode::Local),
        };
        let base_dir = match kw.base_dir {
            Some(dir) => keyword(dir),
            None => default(
                std::env::current_dir()
                    .map_err(|e| Error::config("cannot read the current directory").with_source(e))?,
            ),
        };
        let connection_string = match kw.connection_string {
            Some(url) => keyword(Some(url)),
            None => match env.var("DATABASE_URL") {
                Some(url) => Sourced { value: Some(url.trim().to_owned()), source: Source::Env("DATABASE_URL") },
                None => match postgres_from_parts(env)? {
                    Some(dsn) => Sourced { value: Some(dsn), source: Source::Env("POSTGRES_HOST") },
                    None => default(None),
                },
            },
        };
        let secs =
            |name: &'static str, given: Option<f64>, fallback: f64, positive: bool| -> Result<Sourced<Duration>> {
                let check = if positive { positive_seconds } else { seconds };
                Ok(match given {
                    Some(value) => keyword(check(name, value)?),
                    None => default(check(name, fallback)?),
                })
            };
        let given = |value: Option<u32>, fallback: u32| value.map_or_else(|| default(fallback), keyword);
        Ok(Resolved {
            requested_mode,
            base_dir,
            connection_string,
            history_days: kw.history_days.map_or_else(|| default(7), keyword),
            redis_enabled: pick(kw.redis_enabled, env, &["REDIS_ENABLED"], flag, false)?,
            postgres_pool_size: given(kw.postgres_pool_size, 4),
            postgres_connect_timeout: secs("postgres_connect_timeout", kw.postgres_connect_timeout, 5.0, false)?,
            postgres_ca_file: kw.postgres_ca_file.map_or_else(|| default(None), |p| keyword(Some(p))),
            postgres_statement_timeout: secs("postgres_statement_timeout", kw.postgres_statement_timeout, 30.0, true)?,
            postgres_lock_timeout: secs("postgres_lock_timeout", kw.postgres_lock_timeout, 5.0, true)?,
            // A URL given as a keyword wins over Redis by parts; between the environment's two
            // forms, REDIS_CONNECTION_STRING wins too (`Resolved::redis_settings`).
            redis_connection_string: pick(
                kw.redis_connection_string.map(Some),
                env,
                &["REDIS_CONNECTION_STRING"],
                text,
                None,
            )?,
            redis_host: pick(kw.redis_host.map(Some), env, &["REDIS_HOST"], text, None)?,
            redis_password: pick(
                kw.redis_password.map(Some),
                env,
                &["REDIS_PASSWORD"],
                |_, raw| Ok(Some(raw.to_owned())),
                None,
            )?,
            redis_port: pick(kw.redis_port, env, &["REDIS_PORT"], number("a port number"), DEFAULT_REDIS_PORT)?,
            redis_ssl: pick(kw.redis_ssl, env, &["REDIS_SSL"], flag, true)?,
            redis_ttl: pick(
                kw.redis_ttl,
                env,
                &["REDIS_TTL_SECONDS", "REDIS_CACHE_TTL"],
                number("a whole number of seconds"),
                DEFAULT_REDIS_TTL,
            )?,
            redis_pool_size: given(kw.redis_pool_size, 8),
            redis_timeout: secs("redis_timeout", kw.redis_timeout, 0.5, false)?,
            redis_ca_file: pick(kw.redis_ca_file.map(Some), env, &["REDIS_CA_FILE"], path, None)?,
            redis_cluster: pick(
                kw.redis_cluster.map(Some),
                env,
                &["REDIS_CLUSTER"],
                |name, raw| flag(name, raw).map(Some),
                None,
            )?,
            near_cache_bytes: pick(
                kw.near_cache_bytes,
                env,
                &["NEAR_CACHE_BYTES"],
                number("a whole number of bytes"),
                DEFAULT_NEAR_CACHE_BYTES,
            )?,
            credential_refresh_margin: secs("credential_refresh_margin", kw.credential_refresh_margin, 180.0, false)?,
            flush_interval: secs("flush_interval", kw.flush_interval, 10.0, false)?,
            background_flush: kw.background_flush.map_or_else(|| default(true), keyword),
            flush_batch_size: kw.flush_batch_size.map_or_else(|| default(500), keyword),
            close_timeout: secs("close_timeout", kw.close_timeout, 30.0, false)?,
        })
    }

    /// The mode a manager opens in: `mode="postgres"` with `redis_enabled` is redis mode.
    /// `redis_enabled=True` with local mode is an error; `REDIS_ENABLED` with local mode is ignored
    /// (with a warning), as the seed's app ignored it.
    pub fn mode(&self) -> Result<Mode> {
        match (self.requested_mode.value, self.redis_enabled.value) {
            (Mode::Postgres, true) => Ok(Mode::Redis),
            (Mode::Local, true) if self.redis_enabled.source == Source::Keyword => {
                Err(Error::config("redis_enabled=True needs mode='postgres': Redis caches PostgreSQL, not local files"))
            }
            (mode, _) => Ok(mode),
        }
    }

    /// PostgreSQL's settings in postgres and redis modes; `None` in local mode.
    pub fn postgres_settings(&self) -> Result<Option<PostgresSettings>> {
        let mode = self.mode()?;
        if mode == Mode::Local {
            return Ok(None);
        }
        let url = self.connection_string.value.as_deref().ok_or_else(|| {
            Error::config(format!(
                "{} mode needs a PostgreSQL connection string: pass connection_string=... or set DATABASE_URL",
                mode.as_str()
            ))
        })?;
        self.parse_postgres(url).map(Some)
    }

    fn parse_postgres(&self, url: &str) -> Result<PostgresSettings> {
        let mut settings = PostgresSettings::parse(
            url,
            self.postgres_ca_file.value.clone(),
            self.postgres_pool_size.value,
            self.postgres_connect_timeout.value,
        )
        .map_err(|e| name_source(&e, self.connection_string.source, "connection_string"))?;
        settings.statement_timeout = self.postgres_statement_timeout.value;
        settings.lock_timeout = self.postgres_lock_timeout.value;
        Ok(settings)
    }

    /// Redis's settings in redis mode; `None` otherwise.
    pub fn redis_settings(&self) -> Result<Option<RedisSettings>> {
        if self.mode()? != Mode::Redis {
            return Ok(None);
        }
        let mut settings = self.parse_redis()?.ok_or_else(|| {
            Error::config(
                "redis mode needs Redis: pass redis_connection_string=... or redis_host=..., or set REDIS_CONNECTION_STRING",
            )
        })?;
        settings.cluster = self.redis_cluster.value;
        settings.near_cache_bytes = self.near_cache_bytes.value;
        Ok(Some(settings))
    }

    /// Which of Redis's two forms is used: a URL given as a keyword, else a host given as a
    /// keyword, else REDIS_CONNECTION_STRING, else REDIS_HOST.
    fn redis_by_url(&self) -> Option<bool> {
        let url = self.redis_connection_string.value.as_ref().map(|_| self.redis_connection_string.source);
        let host = self.redis_host.value.as_ref().map(|_| self.redis_host.source);
        match (url, host) {
            (Some(Source::Keyword), _) => Some(true),
            (_, Some(Source::Keyword)) | (None, Some(_)) => Some(false),
            (Some(_), _) => Some(true),
            (None, None) => None,
        }
    }

    fn parse_redis(&self) -> Result<Option<RedisSettings>> {
        let ca_file = self.redis_ca_file.value.clone();
        let (pool, timeout, ttl) = (self.redis_pool_size.value, self.redis_timeout.value, self.redis_ttl.value);
        match self.redis_by_url() {
            None => Ok(None),
            Some(true) => {
                let url = self.redis_connection_string.value.as_deref().unwrap_or_default();
                RedisSettings::from_url(url, ca_file, pool, timeout, ttl)
                    .map(Some)
                    .map_err(|e| name_source(&e, self.redis_connection_string.source, "redis_connection_string"))
            }
            Some(false) => RedisSettings::from_parts(
                self.redis_host.value.as_deref().unwrap_or_default(),
                self.redis_port.value,
                self.redis_password.value.as_deref(),
                self.redis_ssl.value,
                ca_file,
                pool,
                timeout,
                ttl,
            )
            .map(Some),
        }
    }

    /// What a manager is built from. Credential providers are the caller's to add.
    pub fn settings(&self) -> Result<Settings> {
        let flush_interval = if self.background_flush.value {
            if self.flush_interval.value.is_zero() {
                return Err(Error::config("flush_interval must be more than 0 seconds"));
            }
            Some(self.flush_interval.value)
        } else {
            None
        };
        Ok(Settings {
            mode: self.mode()?,
            base_dir: self.base_dir.value.clone(),
            postgres: self.postgres_settings()?,
            history_days: self.history_days.value,
            redis: self.redis_settings()?,
            flush_interval,
            flush_batch_size: self.flush_batch_size.value,
            close_timeout: self.close_timeout.value,
        })
    }

    /// The redacted PostgreSQL URL, when a connection string is set and valid.
    #[must_use]
    pub fn postgres_redacted(&self) -> Option<String> {
        let url = self.connection_string.value.as_deref()?;
        self.parse_postgres(url).ok().map(|s| s.redacted())
    }

    /// The redacted Redis URL, when Redis is configured and valid.
    #[must_use]
    pub fn redis_redacted(&self) -> Option<String> {
        self.parse_redis().ok().flatten().map(|s| s.redacted().to_owned())
    }

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
            ("mode", Shown::Text(self.requested_mode.value.as_str().to_owned()), self.requested_mode.source),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn keyword_beats_environment_beats_default() {
        let vars = env(&[("REDIS_CACHE_TTL", "60"), ("REDIS_PORT", "7000"), ("DATABASE_URL", "postgresql://e/db")]);
        let r = Resolved::resolve(Keywords { redis_ttl: Some(5), ..Keywords::default() }, &vars).unwrap();
        assert_eq!((r.redis_ttl.value, r.redis_ttl.source), (5, Source::Keyword));
        assert_eq!((r.redis_port.value, r.redis_port.source), (7000, Source::Env("REDIS_PORT")));
        assert_eq!((r.redis_ssl.value, r.redis_ssl.source), (true, Source::Default));
        assert_eq!(r.connection_string.source, Source::Env("DATABASE_URL"));
        let r = Resolved::resolve(Keywords::default(), &vars).unwrap();
        assert_eq!((r.redis_ttl.value, r.redis_ttl.source), (60, Source::Env("REDIS_CACHE_TTL")));
        let both = env(&[("REDIS_CACHE_TTL", "60"), ("REDIS_TTL_SECONDS", "70")]);
        let r = Resolved::resolve(Keywords::default(), &both).unwrap();
        assert_eq!((r.redis_ttl.value, r.redis_ttl.source), (70, Source::Env("REDIS_TTL_SECONDS")));
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = |pairs| Resolved::resolve(Keywords::default(), &env(pairs)).err().unwrap().to_string();
        assert!(err(&[("REDIS_TTL_SECONDS", "soon")]).contains("REDIS_TTL_SECONDS"));
        assert!(err(&[("REDIS_CACHE_TTL", "soon")]).contains("REDIS_CACHE_TTL"));
        assert!(err(&[("REDIS_ENABLED", "maybe")]).contains("REDIS_ENABLED"));
        assert!(err(&[("POSTGRES_HOST", "h"), ("POSTGRES_PORT", "x")]).contains("POSTGRES_PORT"));
    }

    #[test]
    fn the_url_in_the_environment_wins_over_redis_by_parts_in_the_environment() {
        let vars = env(&[
            ("REDIS_HOST", "parts.example"),
            ("REDIS_CONNECTION_STRING", "redis://url.example:1/0"),
            ("REDIS_ENABLED", "1"),
            ("DATABASE_URL", "postgresql://h/db"),
        ]);
        let kw = Keywords { mode: Some("postgres".into()), ..Keywords::default() };
        let r = Resolved::resolve(kw.clone(), &vars).unwrap();
        assert_eq!(r.redis_redacted().as_deref(), Some("redis://url.example:1/0"));
        let kw = Keywords { redis_host: Some("kw.example".into()), ..kw };
        let r = Resolved::resolve(kw, &vars).unwrap();
        assert_eq!(r.redis_redacted().as_deref(), Some("rediss://kw.example:6380/0"));
    }

    #[test]
    fn postgres_parts_and_no_secret_in_entries() {
        let vars = env(&[
            ("POSTGRES_HOST", "db.example.com"),
            ("POSTGRES_ADMIN_LOGIN", "chat"),
            ("POSTGRES_ADMIN_PASSWORD", "p w'\\x"),
            ("REDIS_PASSWORD", "hunter2"),
            ("REDIS_CONNECTION_STRING", "rediss://:hunter3@h:6380/0"),
        ]);
        let r = Resolved::resolve(Keywords::default(), &vars).unwrap();
        assert_eq!(
            r.connection_string.value.as_deref(),
            Some(r"host=db.example.com port=5432 dbname=postgres user=chat password='p w\'\\x' sslmode=require")
        );
        let shown = format!("{:?}", r.entries());
        assert!(!shown.contains("p w") && !shown.contains("hunter"), "{shown}");
        assert!(shown.contains("postgresql://chat@db.example.com:5432/postgres?sslmode=require"), "{shown}");
    }
}
