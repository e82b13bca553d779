//! Connection settings: PostgreSQL connection strings in both libpq forms, libpq's sslmodes over
//! rustls, and the redacted descriptions that are the only way a connection string is ever shown.

pub mod probe;
pub mod resolve;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

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

/// How much of the server's certificate to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Accept any certificate (encryption without authentication).
    None,
    /// Check the chain, not the name.
    Chain,
    /// Check the chain and the host name.
    Full,
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

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The crypto provider, named explicitly so no process-wide default has to be installed.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Root certificates: the PEM file when given, else the Mozilla roots built into the wheel.
pub(crate) fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| Error::config(format!("cannot read the CA file {}", path.display())).with_source(e))?;
            let mut found = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    Error::config(format!("the CA file {} is not valid PEM", path.display())).with_source(e)
                })?;
                roots.add(cert).map_err(|e| {
                    Error::config(format!("the CA file {} holds a bad certificate", path.display())).with_source(e)
                })?;
                found += 1;
            }
            if found == 0 {
                return Err(Error::config(format!("the CA file {} holds no certificate", path.display())));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// A rustls client config that checks as much of the server's certificate as `verification` asks.
pub(crate) fn client_tls_config(verification: Verification, ca_file: Option<&Path>) -> Result<ClientConfig> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("TLS setup failed").with_source(e))?;
    let config = match verification {
        Verification::Full => builder.with_root_certificates(root_store(ca_file)?).with_no_client_auth(),
        Verification::Chain | Verification::None => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(ca_file)?), provider.clone())
                .build()
                .map_err(|e| Error::config("TLS setup failed").with_source(e))?;
            let verifier = RelaxedVerifier { inner: webpki, check_chain: verification == Verification::Chain };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    Ok(config)
}

/// libpq's `verify-ca` (chain only) and `require`/`prefer` (nothing): handshake signatures are
/// still checked, so the session is encrypted to whoever holds the presented key.
#[derive(Debug)]
struct RelaxedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_chain: bool,
}

impl ServerCertVerifier for RelaxedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
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

/// Everything needed to open Redis connections.
#[derive(Clone)]
pub struct RedisSettings {
    /// A clean `redis://` or `rediss://` URL for the driver (holds the password; never printed).
    url: String,
    /// The same without the password.
    redacted: String,
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
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.redacted)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("cluster", &self.cluster)
            .field("near_cache_bytes", &self.near_cache_bytes)
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
        Ok(RedisSettings {
            url,
            redacted,
            ca_file,
            pool_size,
            timeout,
            ttl_seconds,
            cluster: None,
            credentials: None,
            near_cache_bytes: 0,
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
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
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
    }
}
