//! Where a setting's value comes from (keyword argument, environment variable, default), and the
//! reading of one setting: each kind of value parsed and range-checked, the error naming the
//! argument or variable it came from.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Mode;
use crate::error::{Error, Result};

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

pub(super) fn keyword<T>(value: T) -> Sourced<T> {
    Sourced { value, source: Source::Keyword }
}

pub(super) fn default<T>(value: T) -> Sourced<T> {
    Sourced { value, source: Source::Default }
}

pub(super) fn flag(name: &'static str, raw: &str) -> Result<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(format!("{name} must be true or false, got '{raw}'"))),
    }
}

/// The names `mode` and `CHAT_HISTORY_MODE` take: the library's three, and the two the example app
/// (and the seed author's app) already set `CHAT_HISTORY_MODE` to: `local_psql` is postgres and
/// `local_redis` is redis, on a server of the developer's own.
pub fn parse_mode(name: &str, raw: &str) -> Result<Mode> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "local" => Ok(Mode::Local),
        "postgres" | "local_psql" => Ok(Mode::Postgres),
        "redis" | "local_redis" => Ok(Mode::Redis),
        _ => Err(Error::config(format!(
            "{name} must be 'local', 'postgres' or 'redis' (or the example app's 'local_psql' and 'local_redis'), \
             got {raw:?}"
        ))),
    }
}

/// Seconds: a finite number within `min..=max`, named in the error.
pub(super) fn seconds_within(name: &str, value: f64, min: f64, max: f64) -> Result<Duration> {
    if !value.is_finite() || value < min || value > max {
        let range = if min > 0.0 { format!("at least {min}") } else { "0 or more".to_owned() };
        return Err(Error::config(format!(
            "{name} must be a number of seconds, {range} and at most {max}, got {value}"
        )));
    }
    Duration::try_from_secs_f64(value)
        .map_err(|_| Error::config(format!("{name} must be a number of seconds, got {value}")))
}

/// The longest any timeout may be: a day. Longer is a mistake (milliseconds given as seconds), and
/// a wait that long would look like a hang.
pub(super) const MAX_SECONDS: f64 = 86_400.0;

/// What a whole-number setting is, for its error messages, and the values it may take.
#[derive(Clone, Copy)]
pub(super) struct Whole {
    what: &'static str,
    min: i64,
    max: i64,
}

impl Whole {
    const fn new(what: &'static str, min: i64, max: i64) -> Self {
        Whole { what, min, max }
    }

    /// `value` converted when it is within range; else an error naming `name` and showing `shown`
    /// (the value as given: quoted when it came from a variable).
    fn check<T: TryFrom<i64>>(self, name: &str, value: i64, shown: &str) -> Result<T> {
        let Whole { what, min, max } = self;
        if value < min || value > max {
            let range = if max == i64::MAX { format!("at least {min}") } else { format!("from {min} to {max}") };
            return Err(Error::config(format!("{name} must be {what}, {range}, got {shown}")));
        }
        T::try_from(value).map_err(|_| Error::config(format!("{name} must be {what}, got {shown}")))
    }
}

pub(super) const PORT: Whole = Whole::new("a port number", 1, 65_535);

/// The keyword when given, else the first of `vars` that is set (parsed by `parse`), else `fallback`.
pub(super) fn pick<T>(
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

/// As [`pick`] for a whole number: the keyword's value or the variable's is checked against
/// `kind` under its own name.
pub(super) fn pick_whole<T: TryFrom<i64>>(
    keyword_name: &str,
    given: Option<i64>,
    env: &dyn Environment,
    vars: &[&'static str],
    kind: Whole,
    fallback: T,
) -> Result<Sourced<T>> {
    if let Some(value) = given {
        return Ok(keyword(kind.check(keyword_name, value, &value.to_string())?));
    }
    for &name in vars {
        if let Some(raw) = env.var(name) {
            let shown = format!("'{raw}'");
            let value: i64 =
                raw.trim().parse().map_err(|_| Error::config(format!("{name} must be {}, got {shown}", kind.what)))?;
            return Ok(Sourced { value: kind.check(name, value, &shown)?, source: Source::Env(name) });
        }
    }
    Ok(default(fallback))
}

#[allow(clippy::unnecessary_wraps)] // the shape `pick` takes
pub(super) fn text(_: &'static str, raw: &str) -> Result<Option<String>> {
    Ok(Some(raw.trim().to_owned()))
}

#[allow(clippy::unnecessary_wraps)] // the shape `pick` takes
pub(super) fn path(_: &'static str, raw: &str) -> Result<Option<PathBuf>> {
    Ok(Some(PathBuf::from(raw.trim())))
}

pub(super) fn number<T: std::str::FromStr>(what: &'static str) -> impl Fn(&'static str, &str) -> Result<T> {
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
        Some(raw) => {
            let port: i64 = number("a port number")("POSTGRES_PORT", &raw)?;
            PORT.check("POSTGRES_PORT", port, &format!("'{raw}'"))?
        }
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
pub(super) fn name_source(error: &Error, source: Source, keyword: &str) -> Error {
    match source {
        Source::Env(name) => Error::config(format!("{name}: {error}")),
        _ => Error::config(format!("{keyword}: {error}")),
    }
}

/// `history_days` at most about 270 years: PostgreSQL's timestamps end well before `i32::MAX` days
/// back, where `list_conversations` would fail on every call.
pub(super) const DAYS: Whole = Whole::new("a whole number of days", 0, 100_000);
pub(super) const POOL: Whole = Whole::new("a whole number of connections", 1, u32::MAX as i64);
pub(super) const BATCH: Whole = Whole::new("a whole number of conversations", 1, 1_000_000);
pub(super) const TTL: Whole = Whole::new("a whole number of seconds", 1, i64::MAX);
pub(super) const BYTES: Whole = Whole::new("a whole number of bytes", 0, i64::MAX);
