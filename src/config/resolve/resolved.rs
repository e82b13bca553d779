//! Every setting resolved from the keywords and the environment, and what a manager is built from.

use std::path::PathBuf;
use std::time::Duration;

use super::keywords::{Keywords, DEFAULT_NEAR_CACHE_BYTES, DEFAULT_REDIS_PORT, DEFAULT_REDIS_TTL};
use super::source::{
    default, flag, keyword, name_source, parse_mode, path, pick, pick_whole, postgres_from_parts, seconds_within, text,
    Environment, Source, Sourced, BATCH, BYTES, DAYS, MAX_SECONDS, POOL, PORT, TTL,
};
use crate::config::{Compression, Mode, PostgresSettings, RedisSettings, Settings};
use crate::error::{Error, Result};

/// Every setting, resolved. Holds passwords: it has no `Debug`, and [`Resolved::entries`] is the
/// only way to show it.
#[derive(Clone)]
#[allow(missing_docs)] // each field is the setting of the same name (the README's table)
pub struct Resolved {
    /// The mode as asked for; [`Resolved::mode`] applies `redis_enabled` to it.
    pub requested_mode: Sourced<Mode>,
    /// The mode's name as given (`"local_redis"`, say), lower-cased: the example app tells its
    /// local test modes from the production ones by it.
    pub mode_name: String,
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
    pub redis_compression: Sourced<Compression>,
    pub credential_refresh_margin: Sourced<Duration>,
    pub flush_interval: Sourced<Duration>,
    pub background_flush: Sourced<bool>,
    pub flush_batch_size: Sourced<usize>,
    pub close_timeout: Sourced<Duration>,
}

/// `redis_compression`: the keyword as given (a `True` or `False` as `"on"` or `"off"`), else
/// `REDIS_COMPRESSION`, else off; a value [`Compression::parse`] does not take names its source.
fn compression(given: Option<&str>, env: &dyn Environment) -> Result<Sourced<Compression>> {
    match given {
        Some(raw) => Ok(keyword(Compression::parse("redis_compression", raw)?)),
        None => pick(None, env, &["REDIS_COMPRESSION"], Compression::parse, Compression::Off),
    }
}

impl Resolved {
    /// Resolves every setting: keyword argument, else environment variable, else default. A bad
    /// value is an error naming the argument or the variable it came from.
    pub fn resolve(kw: Keywords, env: &dyn Environment) -> Result<Self> {
        let (requested_mode, mode_name) = match kw.mode {
            Some(name) => (keyword(parse_mode("mode", &name)?), name.trim().to_ascii_lowercase()),
            None => match env.var("CHAT_HISTORY_MODE") {
                Some(raw) => (
                    Sourced { value: parse_mode("CHAT_HISTORY_MODE", &raw)?, source: Source::Env("CHAT_HISTORY_MODE") },
                    raw.trim().to_ascii_lowercase(),
                ),
                None => (default(Mode::Local), "local".to_owned()),
            },
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
        // A timeout of 0 would count Redis as down on every call, or mean "no limit" to PostgreSQL:
        // every bound but the two that may be 0 must be at least a millisecond. Defaults are
        // checked too, so none can slip past the rule its keyword is held to.
        let secs = |name: &'static str, given: Option<f64>, fallback: f64, min: f64| -> Result<Sourced<Duration>> {
            Ok(match given {
                Some(value) => keyword(seconds_within(name, value, min, MAX_SECONDS)?),
                None => default(seconds_within(name, fallback, min, MAX_SECONDS)?),
            })
        };
        Ok(Resolved {
            requested_mode,
            mode_name,
            base_dir,
            connection_string,
            history_days: pick_whole("history_days", kw.history_days, env, &[], DAYS, 7)?,
            redis_enabled: pick(kw.redis_enabled, env, &["REDIS_ENABLED"], flag, false)?,
            postgres_pool_size: pick_whole("postgres_pool_size", kw.postgres_pool_size, env, &[], POOL, 4)?,
            postgres_connect_timeout: secs("postgres_connect_timeout", kw.postgres_connect_timeout, 5.0, 0.001)?,
            postgres_ca_file: kw.postgres_ca_file.map_or_else(|| default(None), |p| keyword(Some(p))),
            postgres_statement_timeout: secs("postgres_statement_timeout", kw.postgres_statement_timeout, 30.0, 0.001)?,
            postgres_lock_timeout: secs("postgres_lock_timeout", kw.postgres_lock_timeout, 5.0, 0.001)?,
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
            redis_port: pick_whole("redis_port", kw.redis_port, env, &["REDIS_PORT"], PORT, DEFAULT_REDIS_PORT)?,
            redis_ssl: pick(kw.redis_ssl, env, &["REDIS_SSL"], flag, true)?,
            redis_ttl: pick_whole(
                "redis_ttl",
                kw.redis_ttl,
                env,
                &["REDIS_TTL_SECONDS", "REDIS_CACHE_TTL"],
                TTL,
                DEFAULT_REDIS_TTL,
            )?,
            redis_pool_size: pick_whole("redis_pool_size", kw.redis_pool_size, env, &[], POOL, 8)?,
            redis_timeout: secs("redis_timeout", kw.redis_timeout, 0.5, 0.001)?,
            redis_ca_file: pick(kw.redis_ca_file.map(Some), env, &["REDIS_CA_FILE"], path, None)?,
            redis_cluster: pick(
                kw.redis_cluster.map(Some),
                env,
                &["REDIS_CLUSTER"],
                |name, raw| flag(name, raw).map(Some),
                None,
            )?,
            near_cache_bytes: pick_whole(
                "near_cache_bytes",
                kw.near_cache_bytes,
                env,
                &["NEAR_CACHE_BYTES"],
                BYTES,
                DEFAULT_NEAR_CACHE_BYTES,
            )?,
            redis_compression: compression(kw.redis_compression.as_deref(), env)?,
            credential_refresh_margin: secs("credential_refresh_margin", kw.credential_refresh_margin, 180.0, 0.0)?,
            flush_interval: secs("flush_interval", kw.flush_interval, 10.0, 0.001)?,
            background_flush: kw.background_flush.map_or_else(|| default(true), keyword),
            flush_batch_size: pick_whole("flush_batch_size", kw.flush_batch_size, env, &[], BATCH, 500)?,
            close_timeout: secs("close_timeout", kw.close_timeout, 30.0, 0.0)?,
        })
    }

    /// The mode a manager opens in. `redis_enabled`, when set (keyword or `REDIS_ENABLED`), decides
    /// whether a PostgreSQL mode uses Redis: true adds it to postgres mode (the Phase 2 switch),
    /// false takes it from redis mode (the seed's rollback switch); unset, the mode decides.
    /// `redis_enabled=True` with local mode is an error; `REDIS_ENABLED` with local mode is ignored
    /// (with a warning), as the seed's app ignored it.
    pub fn mode(&self) -> Result<Mode> {
        let set = self.redis_enabled.source != Source::Default;
        match (self.requested_mode.value, self.redis_enabled.value) {
            (Mode::Postgres, true) => Ok(Mode::Redis),
            (Mode::Redis, false) if set => Ok(Mode::Postgres),
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
        settings.compression = self.redis_compression.value;
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
        let flush_interval = self.background_flush.value.then_some(self.flush_interval.value);
        Ok(Settings {
            mode: self.mode()?,
            base_dir: self.base_dir.value.clone(),
            postgres: self.postgres_settings()?,
            history_days: self.history_days.value,
            redis: self.redis_settings()?,
            flush_interval,
            flush_batch_size: self.flush_batch_size.value,
            close_timeout: self.close_timeout.value,
            inspect_only: false,
        })
    }

    /// PostgreSQL's settings when a connection string is set and valid, whatever the mode: what
    /// `chat-history` shows of them (the redacted URL, the sslmode, the hosts).
    #[must_use]
    pub fn postgres_described(&self) -> Option<PostgresSettings> {
        let url = self.connection_string.value.as_deref()?;
        self.parse_postgres(url).ok()
    }

    /// Redis's settings when Redis is configured and valid, whatever the mode: what `chat-history`
    /// shows of them (the redacted URL, TLS, the host).
    #[must_use]
    pub fn redis_described(&self) -> Option<RedisSettings> {
        self.parse_redis().ok().flatten()
    }

    /// The redacted PostgreSQL URL, when a connection string is set and valid.
    #[must_use]
    pub fn postgres_redacted(&self) -> Option<String> {
        self.postgres_described().map(|s| s.redacted())
    }

    /// The redacted Redis URL, when Redis is configured and valid.
    #[must_use]
    pub fn redis_redacted(&self) -> Option<String> {
        self.redis_described().map(|s| s.redacted().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::keywords::{ENVIRONMENT, KEYWORD_NAMES};
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
    fn chat_history_mode_chooses_the_mode_when_no_keyword_does() {
        let resolve = |kw: Keywords, pairs: &[(&str, &str)]| Resolved::resolve(kw, &env(pairs)).unwrap();
        let db = ("DATABASE_URL", "postgresql://h/db");
        let r = resolve(Keywords::default(), &[]);
        assert_eq!((r.mode().unwrap(), r.requested_mode.source), (Mode::Local, Source::Default));
        let r = resolve(Keywords::default(), &[("CHAT_HISTORY_MODE", "redis"), db]);
        assert_eq!(r.mode().unwrap(), Mode::Redis);
        assert_eq!(r.requested_mode.source, Source::Env("CHAT_HISTORY_MODE"));
        for (name, mode) in [
            ("local", Mode::Local),
            ("postgres", Mode::Postgres),
            ("local_psql", Mode::Postgres),
            ("Local_Redis", Mode::Redis),
        ] {
            let r = resolve(Keywords::default(), &[("CHAT_HISTORY_MODE", name), db]);
            assert_eq!(r.mode().unwrap(), mode, "{name}");
            assert_eq!(r.mode_name, name.to_ascii_lowercase());
        }
        let kw = Keywords { mode: Some("local".into()), ..Keywords::default() };
        let r = resolve(kw, &[("CHAT_HISTORY_MODE", "redis"), db]);
        assert_eq!((r.mode().unwrap(), r.requested_mode.source), (Mode::Local, Source::Keyword));
        let err = Resolved::resolve(Keywords::default(), &env(&[("CHAT_HISTORY_MODE", "cloud")])).err().unwrap();
        assert!(err.to_string().starts_with("CHAT_HISTORY_MODE must be"), "{err}");
    }

    #[test]
    fn redis_enabled_when_set_adds_or_removes_redis() {
        let mode =
            |pairs: &[(&str, &str)]| Resolved::resolve(Keywords::default(), &env(pairs)).unwrap().mode().unwrap();
        assert_eq!(mode(&[("CHAT_HISTORY_MODE", "postgres"), ("REDIS_ENABLED", "true")]), Mode::Redis);
        assert_eq!(mode(&[("CHAT_HISTORY_MODE", "redis"), ("REDIS_ENABLED", "false")]), Mode::Postgres);
        assert_eq!(mode(&[("CHAT_HISTORY_MODE", "redis")]), Mode::Redis);
        assert_eq!(mode(&[("CHAT_HISTORY_MODE", "local"), ("REDIS_ENABLED", "true")]), Mode::Local);
    }

    #[test]
    fn every_bad_number_is_refused_by_name() {
        let err = |kw: Keywords| Resolved::resolve(kw, &env(&[])).err().map(|e| e.to_string()).unwrap_or_default();
        let d = Keywords::default;
        let cases: Vec<(&str, Keywords)> = vec![
            ("near_cache_bytes", Keywords { near_cache_bytes: Some(-1), ..d() }),
            ("redis_pool_size", Keywords { redis_pool_size: Some(-2), ..d() }),
            ("redis_pool_size", Keywords { redis_pool_size: Some(0), ..d() }),
            ("postgres_pool_size", Keywords { postgres_pool_size: Some(0), ..d() }),
            ("redis_timeout", Keywords { redis_timeout: Some(0.0), ..d() }),
            ("redis_timeout", Keywords { redis_timeout: Some(f64::NAN), ..d() }),
            ("postgres_connect_timeout", Keywords { postgres_connect_timeout: Some(-1.0), ..d() }),
            ("postgres_statement_timeout", Keywords { postgres_statement_timeout: Some(0.0), ..d() }),
            ("postgres_lock_timeout", Keywords { postgres_lock_timeout: Some(f64::INFINITY), ..d() }),
            ("credential_refresh_margin", Keywords { credential_refresh_margin: Some(-0.5), ..d() }),
            ("flush_interval", Keywords { flush_interval: Some(0.0), ..d() }),
            ("close_timeout", Keywords { close_timeout: Some(-1.0), ..d() }),
            ("history_days", Keywords { history_days: Some(-1), ..d() }),
            ("redis_port", Keywords { redis_port: Some(0), ..d() }),
            ("redis_port", Keywords { redis_port: Some(70_000), ..d() }),
            ("redis_ttl", Keywords { redis_ttl: Some(0), ..d() }),
            ("flush_batch_size", Keywords { flush_batch_size: Some(0), ..d() }),
        ];
        for (name, kw) in cases {
            let message = err(kw);
            assert!(message.starts_with(&format!("{name} must be")), "{name}: {message:?}");
        }
        let from_env = |pairs: &[(&str, &str)]| {
            Resolved::resolve(Keywords::default(), &env(pairs)).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(from_env(&[("NEAR_CACHE_BYTES", "-1")]).starts_with("NEAR_CACHE_BYTES must be"));
        assert!(from_env(&[("REDIS_PORT", "0")]).starts_with("REDIS_PORT must be"));
        assert!(from_env(&[("REDIS_TTL_SECONDS", "0")]).starts_with("REDIS_TTL_SECONDS must be"));
    }

    /// An environment that remembers which variables were asked for.
    struct Recording(std::cell::RefCell<std::collections::BTreeSet<String>>, HashMap<String, String>);

    impl Environment for Recording {
        fn var(&self, name: &str) -> Option<String> {
            self.0.borrow_mut().insert(name.to_owned());
            self.1.var(name)
        }
    }

    #[test]
    fn environment_lists_every_variable_read() {
        let mut read = std::cell::RefCell::new(std::collections::BTreeSet::new());
        for pairs in [&[][..], &[("POSTGRES_HOST", "h")][..]] {
            let recording = Recording(read, env(pairs));
            Resolved::resolve(Keywords::default(), &recording).unwrap();
            read = recording.0;
        }
        let listed: std::collections::BTreeSet<String> = ENVIRONMENT.iter().map(|&n| n.to_owned()).collect();
        assert_eq!(read.into_inner(), listed);
    }

    #[test]
    fn the_keyword_names_are_the_entries() {
        let r = Resolved::resolve(Keywords::default(), &env(&[])).unwrap();
        let names: Vec<&str> = r.entries().iter().map(|e| e.name).collect();
        assert_eq!(names, KEYWORD_NAMES);
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
