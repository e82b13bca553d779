//! Redis connection settings: URLs and the seed's host/port/password form, and their redacted
//! descriptions.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use super::url::{percent_decode, percent_encode};
use crate::credentials::CredentialProvider;
use crate::error::{Error, Result};

/// Everything needed to open Redis connections.
#[derive(Clone)]
pub struct RedisSettings {
    /// A clean `redis://` or `rediss://` URL for the driver (holds the password; never printed).
    url: String,
    /// The same without the password.
    redacted: String,
    /// Whether connections use TLS (`rediss://`).
    tls: bool,
    /// Whether the server's certificate and name are checked (TLS without `#insecure`).
    verified: bool,
    /// The host name, without the port.
    host: String,
    /// A PEM file of CA certificates that replaces the built-in Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool (at most).
    pub pool_size: u32,
    /// Connect, read and write timeout of every Redis call; also how long a call waits for a
    /// pooled connection. Kept short: a dead Redis must not stall the app (docs/design.md, "Faults").
    pub timeout: Duration,
    /// Seconds a clean conversation stays cached after its last use.
    pub ttl_seconds: u64,
    /// `None`: ask the server whether it is a cluster; `Some(true)`: use the cluster layout (and a
    /// cluster connection when the server is one); `Some(false)`: the seed layout on one node.
    pub cluster: Option<bool>,
    /// Gives the user and password of every new connection instead of the URL's
    /// (`redis_credential_provider`); connections authenticate again before the credentials expire.
    pub credentials: Option<CredentialProvider>,
    /// Bytes the near cache may hold (`near_cache_bytes`); 0 turns it off.
    pub near_cache_bytes: u64,
    /// How a save stores the transcript (`redis_compression`); every reader takes every form.
    pub compression: Compression,
}

/// How the `messages` field of a conversation's hash is stored (`redis_compression`,
/// `REDIS_COMPRESSION`; docs/design.md, "Compressed transcripts"). Whatever a writer's setting,
/// every reader takes all three forms, told apart by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// The JSON text, as the seed design stores it (the default: seed-design instances read it).
    #[default]
    Off,
    /// The seed plan's optional form: base64 of zlib of the JSON text, which a seed instance with
    /// that option reads.
    Zlib,
    /// The library's own: a zstd frame of the JSON text (`True`, `"on"`), the best codec measured
    /// (docs/benchmarks.md, "Compressed transcripts").
    Zstd,
}

impl Compression {
    /// What `redis_compression` and `REDIS_COMPRESSION` accept, case and surrounding spaces aside:
    /// off: `off`, `none`, `false`, `no`, `0` (a keyword's `False`); the seed's form: `zlib`; the
    /// best codec: `on`, `true`, `yes`, `1` (a keyword's `True`) or its name, `zstd`. `name` (the
    /// argument or the variable) is named in the error, with the values accepted.
    pub fn parse(name: &str, raw: &str) -> Result<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "false" | "no" | "0" => Ok(Compression::Off),
            "zlib" => Ok(Compression::Zlib),
            "on" | "true" | "yes" | "1" | "zstd" => Ok(Compression::Zstd),
            _ => Err(Error::config(format!(
                "{name} must be 'off' (or False, 'none'), 'zlib' (the seed plan's base64 of zlib) or 'on' \
                 (or True, 'zstd': the best codec), got '{raw}'"
            ))),
        }
    }

    /// The canonical name: `"off"`, `"zlib"` or `"zstd"` (what `chat-history config` shows).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Off => "off",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.redacted)
            .field("tls", &self.tls)
            .field("verified", &self.verified)
            .field("host", &self.host)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("cluster", &self.cluster)
            .field("near_cache_bytes", &self.near_cache_bytes)
            .field("compression", &self.compression)
            .field("credentials", &self.credentials.as_ref().map(CredentialProvider::name))
            .finish()
    }
}

impl RedisSettings {
    /// Parses `redis://[:password@]host[:port][/db]` or `rediss://...`, including Azure's form
    /// `rediss://:<key>@<name>.redis.cache.windows.net:6380/0?ssl=true` whose base64 key may hold
    /// `/` and `+` unescaped. Certificate checks are on for `rediss://` unless the URL opts out
    /// with `#insecure` or `?ssl_cert_reqs=none`.
    pub fn from_url(
        url: &str,
        ca_file: Option<PathBuf>,
        pool_size: u32,
        timeout: Duration,
        ttl_seconds: u64,
    ) -> Result<Self> {
        let url = url.trim();
        let invalid = |why: &str| Error::config(format!("the Redis connection string is not valid: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| invalid("expected redis:// or rediss://"))?;
        let mut tls = match scheme {
            "redis" => false,
            "rediss" => true,
            _ => return Err(invalid("expected redis:// or rediss://")),
        };
        let (rest, fragment) = match rest.rsplit_once('#') {
            Some((rest, fragment)) if !fragment.contains('@') => (rest, Some(fragment)),
            _ => (rest, None),
        };
        let mut insecure = fragment == Some("insecure");
        // The password may hold '/', so the authority ends at the last '@', then at the first '/'.
        let (userinfo, hostpart) = match rest.rsplit_once('@') {
            Some((userinfo, hostpart)) => (Some(userinfo), hostpart),
            None => (None, rest),
        };
        let (hostpart, query) = hostpart.split_once('?').unwrap_or((hostpart, ""));
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match (key, value.to_ascii_lowercase().as_str()) {
                ("ssl", "true") => tls = true,
                ("ssl_cert_reqs", "none") => insecure = true,
                _ => {}
            }
        }
        let (authority, db) = hostpart.split_once('/').unwrap_or((hostpart, ""));
        if authority.is_empty() {
            return Err(invalid("missing host name"));
        }
        let db =
            if db.is_empty() { 0 } else { db.parse::<u32>().map_err(|_| invalid("the database must be a number"))? };
        // Percent-escapes are decoded, as redis-py does; a raw base64 key has no '%' to decode.
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                Some((user, password)) => {
                    ((!user.is_empty()).then(|| percent_decode(user)), Some(percent_decode(password)))
                }
                None => (Some(percent_decode(info)), None),
            },
        };
        Self::build(
            tls,
            insecure,
            authority,
            db,
            user.as_deref(),
            password.as_deref(),
            ca_file,
            pool_size,
            timeout,
            ttl_seconds,
        )
    }

    /// Redis by parts (`redis_host`, `redis_port`, `redis_password`, `redis_ssl`), as the app's
    /// later configuration gives it.
    pub fn from_parts(
        host: &str,
        port: u16,
        password: Option<&str>,
        ssl: bool,
        ca_file: Option<PathBuf>,
        pool_size: u32,
        timeout: Duration,
        ttl_seconds: u64,
    ) -> Result<Self> {
        Self::build(ssl, false, &format!("{host}:{port}"), 0, None, password, ca_file, pool_size, timeout, ttl_seconds)
    }

    fn build(
        tls: bool,
        insecure: bool,
        hostport: &str,
        db: u32,
        user: Option<&str>,
        password: Option<&str>,
        ca_file: Option<PathBuf>,
        pool_size: u32,
        timeout: Duration,
        ttl_seconds: u64,
    ) -> Result<Self> {
        if pool_size == 0 {
            return Err(Error::config("redis_pool_size must be at least 1"));
        }
        if ttl_seconds == 0 {
            return Err(Error::config("redis_ttl must be at least 1 second"));
        }
        let scheme = if tls { "rediss" } else { "redis" };
        let mut url = format!("{scheme}://");
        if user.is_some() || password.is_some() {
            url.push_str(&percent_encode(user.unwrap_or("")));
            if let Some(password) = password {
                url.push(':');
                url.push_str(&percent_encode(password));
            }
            url.push('@');
        }
        let _ = write!(url, "{hostport}/{db}");
        if insecure {
            url.push_str("#insecure");
        }
        let redacted = format!("{scheme}://{hostport}/{db}{}", if insecure { "#insecure" } else { "" });
        // `[::1]:6379`, `h:6379` or a bare host: the port is what follows the last ':' after any ']'.
        let host = match hostport.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => host,
            _ => hostport,
        };
        Ok(RedisSettings {
            url,
            redacted,
            tls,
            verified: tls && !insecure,
            host: host.to_owned(),
            ca_file,
            pool_size,
            timeout,
            ttl_seconds,
            cluster: None,
            credentials: None,
            near_cache_bytes: 0,
            compression: Compression::Off,
        })
    }

    /// The URL for the driver. Holds the password: never log or show it.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL without the password: for logs, `repr()` and `stats()`.
    #[must_use]
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Whether connections use TLS (`rediss://`, or `redis_ssl=True`).
    #[must_use]
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Whether the server's certificate and host name are checked: TLS, and the URL did not opt
    /// out (`#insecure`, `?ssl_cert_reqs=none`).
    #[must_use]
    pub fn verifies_certificate(&self) -> bool {
        self.verified
    }

    /// The host name (or address) the URL names, without its port.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }
}

#[cfg(test)]
mod redis_tests {
    use super::*;

    fn parse(url: &str) -> RedisSettings {
        RedisSettings::from_url(url, None, 4, Duration::from_millis(500), 1800).unwrap()
    }

    #[test]
    fn azure_form_with_a_raw_base64_key() {
        let s = parse("rediss://:ab/cd+ef==@name.redis.cache.windows.net:6380/0?ssl=true");
        assert_eq!(s.url(), "rediss://:ab%2Fcd%2Bef%3D%3D@name.redis.cache.windows.net:6380/0");
        assert_eq!(s.redacted(), "rediss://name.redis.cache.windows.net:6380/0");
    }

    #[test]
    fn plain_and_opt_out_forms() {
        assert_eq!(parse("redis://127.0.0.1:6379").url(), "redis://127.0.0.1:6379/0");
        assert_eq!(parse("redis://user:pw@h:1/2").url(), "redis://user:pw@h:1/2");
        assert_eq!(parse("redis://:a%3Ab%40c@h:1/0").url(), "redis://:a%3Ab%40c@h:1/0");
        assert_eq!(parse("redis://:a%2Fb@h:1/0").url(), parse("redis://:a/b@h:1/0").url());
        assert!(parse("rediss://h:6380/0#insecure").url().ends_with("#insecure"));
        assert!(parse("rediss://h:6380/0?ssl_cert_reqs=none").url().ends_with("#insecure"));
        assert!(RedisSettings::from_url("http://h", None, 4, Duration::from_secs(1), 1).is_err());
    }

    #[test]
    fn by_parts() {
        let s = RedisSettings::from_parts("h.example", 6380, Some("k/ey"), true, None, 4, Duration::from_secs(1), 1800)
            .unwrap();
        assert_eq!(s.url(), "rediss://:k%2Fey@h.example:6380/0");
        assert!(!format!("{s:?}").contains("k/ey"));
        assert!(s.tls() && s.verifies_certificate());
        assert_eq!(s.host(), "h.example");
    }

    #[test]
    fn tls_and_host_as_doctor_sees_them() {
        let s = parse("rediss://:pw@[::1]:6380/0#insecure");
        assert!(s.tls() && !s.verifies_certificate());
        assert_eq!(s.host(), "[::1]");
        let s = parse("redis://cache.example/0");
        assert!(!s.tls() && !s.verifies_certificate());
        assert_eq!(s.host(), "cache.example");
        assert_eq!(parse("redis://cache.example:6379?ssl=true").host(), "cache.example");
        assert!(parse("redis://cache.example:6379?ssl=true").verifies_certificate());
    }
}
