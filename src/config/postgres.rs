//! PostgreSQL connection strings in both libpq forms, and their redacted descriptions.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use rustls::ClientConfig;

use super::tls::{client_tls_config, Verification};
use super::url::percent_decode;
use crate::credentials::CredentialProvider;
use crate::error::{Error, Result};

/// libpq's `sslmode`, all six of them. tokio-postgres knows three; the verifying ones are
/// `require` on the wire plus a verifier in the rustls config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// libpq tries plain first; we treat it as `prefer` (TLS when offered, unverified).
    Allow,
    /// TLS when the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS or fail; the certificate is not checked (libpq: unless a root CA file is given).
    Require,
    /// TLS, the chain checked against the CA roots, the host name not.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

impl SslMode {
    /// The name libpq gives it (`"verify-full"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        ssl_mode_name(self)
    }

    fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::config(format!(
                    "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full; got {other:?}"
                )))
            }
        })
    }

    fn wire(self) -> postgres::config::SslMode {
        match self {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => postgres::config::SslMode::Require,
        }
    }
}

/// Everything needed to open PostgreSQL connections.
#[derive(Clone)]
pub struct PostgresSettings {
    /// The parsed driver config (holds the password; never printed).
    pub config: postgres::Config,
    /// The sslmode as libpq spells it.
    pub ssl_mode: SslMode,
    /// A PEM file of CA certificates that replaces the built-in Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool (at most).
    pub pool_size: u32,
    /// How long a connect, or a wait for a pooled connection, may take.
    pub connect_timeout: Duration,
    /// The longest any statement may run (`statement_timeout`, per session).
    pub statement_timeout: Duration,
    /// The longest any statement may wait for a lock (`lock_timeout`, per session).
    pub lock_timeout: Duration,
    /// Gives the user and password of every new connection instead of the connection string's
    /// (`postgres_credential_provider`); connections are recycled before the credentials expire.
    pub credentials: Option<CredentialProvider>,
}

/// Default [`PostgresSettings::statement_timeout`].
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`PostgresSettings::lock_timeout`].
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &self.redacted())
            .field("ssl_mode", &self.ssl_mode)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("credentials", &self.credentials.as_ref().map(CredentialProvider::name))
            // `config` holds the password: shown only through `redacted()` above.
            .finish_non_exhaustive()
    }
}

impl PostgresSettings {
    /// Parses a connection string in URL (`postgresql://user:pw@host:5432/db?sslmode=require`) or
    /// key=value (`host=h port=5432 dbname=db sslmode=verify-full`) form.
    pub fn parse(
        connection_string: &str,
        ca_file: Option<PathBuf>,
        pool_size: u32,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let mut ssl_mode = None;
        let mut root_cert = None;
        let stripped = strip_params(connection_string, &mut |key, value| match key {
            "sslmode" => {
                ssl_mode = Some(value.to_owned());
                true
            }
            "sslrootcert" => {
                root_cert = Some(value.to_owned());
                true
            }
            _ => false,
        })?;
        let mut config = postgres::Config::from_str(&stripped)
            // The driver's parse errors name the bad option, never echo the string itself.
            .map_err(|e| Error::config("the PostgreSQL connection string is not valid").with_source(e))?;
        let ssl_mode = ssl_mode.as_deref().map_or(Ok(SslMode::Prefer), SslMode::parse)?;
        config.ssl_mode(ssl_mode.wire());
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("chat_history_rs");
        }
        if pool_size == 0 {
            return Err(Error::config("postgres_pool_size must be at least 1"));
        }
        // An explicit argument wins over the string's sslrootcert, as keyword arguments win elsewhere.
        let ca_file = ca_file.or_else(|| root_cert.filter(|p| p != "system").map(PathBuf::from));
        Ok(PostgresSettings {
            config,
            ssl_mode,
            ca_file,
            pool_size,
            connect_timeout,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            credentials: None,
        })
    }

    /// What is checked of the server's certificate. libpq: `require` with a root CA file verifies
    /// the chain like `verify-ca`.
    #[must_use]
    pub fn verification(&self) -> Verification {
        match self.ssl_mode {
            SslMode::VerifyFull => Verification::Full,
            SslMode::VerifyCa => Verification::Chain,
            SslMode::Require if self.ca_file.is_some() => Verification::Chain,
            _ => Verification::None,
        }
    }

    /// The rustls config for this sslmode.
    pub fn tls_config(&self) -> Result<ClientConfig> {
        client_tls_config(self.verification(), self.ca_file.as_deref())
    }

    /// The host names (or socket folders) to connect to, without ports: `chat-history doctor` warns
    /// when one that is not this machine is reached without TLS.
    #[must_use]
    pub fn host_names(&self) -> Vec<String> {
        let hosts = self.config.get_hosts().iter();
        hosts
            .map(|host| match host {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect()
    }

    /// `postgresql://user@host:port/db?sslmode=...`, without the password: for logs and `repr()`.
    #[must_use]
    pub fn redacted(&self) -> String {
        let mut out = String::from("postgresql://");
        if let Some(user) = self.config.get_user() {
            let _ = write!(out, "{user}@");
        }
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let name = match host {
                    postgres::config::Host::Tcp(name) => name.clone(),
                    postgres::config::Host::Unix(path) => path.display().to_string(),
                };
                match self.config.get_ports().get(i).or_else(|| self.config.get_ports().first()) {
                    Some(port) => format!("{name}:{port}"),
                    None => name,
                }
            })
            .collect();
        out.push_str(&hosts.join(","));
        if let Some(db) = self.config.get_dbname() {
            let _ = write!(out, "/{db}");
        }
        let _ = write!(out, "?sslmode={}", ssl_mode_name(self.ssl_mode));
        out
    }
}

fn ssl_mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// Removes the parameters `take` claims (it sees each key and decoded value) from a connection
/// string in either form, returning the rest in a form `postgres::Config` parses.
fn strip_params(connection_string: &str, take: &mut dyn FnMut(&str, &str) -> bool) -> Result<String> {
    let trimmed = connection_string.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = trimmed.split_once('?') else {
            return Ok(trimmed.to_owned());
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(&percent_decode(key), &percent_decode(value))
            })
            .collect();
        return Ok(if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) });
    }
    let mut kept = String::new();
    for (key, value) in parse_key_values(trimmed)? {
        if !take(&key, &value) {
            let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
            let _ = write!(kept, "{key}='{escaped}' ");
        }
    }
    Ok(kept)
}

/// libpq's `key = value` grammar: values bare or single-quoted, backslash escapes in both.
fn parse_key_values(text: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
    };
    loop {
        skip_ws(&mut chars);
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        skip_ws(&mut chars);
        if chars.next() != Some('=') {
            return Err(Error::config(format!(
                "the PostgreSQL connection string is not valid: expected '=' after {key:?} (use key=value pairs or a postgresql:// URL)"
            )));
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(Error::config(format!(
                            "the PostgreSQL connection string is not valid: unterminated quote in the value of {key:?}"
                        )))
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(s: &str) -> Result<PostgresSettings> {
        PostgresSettings::parse(s, None, 4, Duration::from_secs(5))
    }

    #[test]
    fn url_form_with_libpq_sslmodes() {
        let s =
            parse("postgresql://app:s3cret@db.example.com:6432/chat?sslmode=verify-full&application_name=x").unwrap();
        assert_eq!(s.ssl_mode, SslMode::VerifyFull);
        assert_eq!(s.verification(), Verification::Full);
        assert_eq!(s.config.get_ssl_mode(), postgres::config::SslMode::Require);
        assert_eq!(s.config.get_dbname(), Some("chat"));
        assert_eq!(s.config.get_ports(), &[6432]);
        assert_eq!(s.redacted(), "postgresql://app@db.example.com:6432/chat?sslmode=verify-full");
    }

    #[test]
    fn key_value_form_with_quotes() {
        let s =
            parse("host=localhost port=5433 user=app password='it\\'s pw' dbname=chat sslmode = verify-ca").unwrap();
        assert_eq!(s.ssl_mode, SslMode::VerifyCa);
        assert_eq!(s.verification(), Verification::Chain);
        assert_eq!(s.config.get_user(), Some("app"));
        assert_eq!(s.config.get_dbname(), Some("chat"));
        assert_eq!(s.config.get_password(), Some(&b"it's pw"[..]));
        assert!(!s.redacted().contains("pw"));
    }

    #[test]
    fn require_with_a_root_cert_checks_the_chain() {
        let s = parse("host=h sslmode=require sslrootcert=/tmp/ca.pem").unwrap();
        assert_eq!(s.ca_file.as_deref(), Some(Path::new("/tmp/ca.pem")));
        assert_eq!(s.verification(), Verification::Chain);
        let plain = parse("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(plain.verification(), Verification::None);
    }

    #[test]
    fn default_is_prefer_and_bad_modes_are_refused() {
        assert_eq!(parse("host=h").unwrap().ssl_mode, SslMode::Prefer);
        let err = parse("postgresql://u:hunter2@h/db?sslmode=sometimes").unwrap_err();
        assert!(err.to_string().contains("sslmode"));
        assert!(!err.to_string().contains("hunter2"));
        assert!(parse("host=h password='open").is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("-c%20TimeZone%3DAsia/Tokyo"), "-c TimeZone=Asia/Tokyo");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
