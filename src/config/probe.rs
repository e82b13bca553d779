//! Tells a misconfigured Redis from one that is down, when the first contact failed. A wrong
//! password, TLS on one side only, a certificate that does not verify, a database number on a
//! cluster or a server that is not Redis will not fix themselves: they are a `ConfigurationError`
//! at construction (the README, "Misconfiguration or outage"). A server that refuses connections or
//! does not answer may come back: that is an outage, and the manager falls back to PostgreSQL.
//!
//! The redis crate reports a plain server behind `rediss://` as a read timeout (the server waits
//! for a newline the TLS handshake never sends) and a TLS server behind `redis://` as a reset: both
//! look like an outage, so a failure of that shape is followed by a second, raw look at the port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use redis::{ConnectionAddr, RedisError};
use rustls::pki_types::ServerName;

use super::{client_tls_config, RedisSettings, Verification};
use crate::error::Error;

/// What a failed first contact with Redis means.
#[derive(Debug)]
pub enum Diagnosis {
    /// A fresh connection works: the failure has passed, or it lies beyond the login (the text of
    /// the original failure says what).
    Reachable,
    /// Down or unreachable for now (refused, timed out, dropped): fall back to PostgreSQL. The
    /// text says why, for the log and `stats()`.
    Outage(String),
    /// The settings do not fit the server: a `ConfigurationError` naming the cause, never a secret.
    Misconfigured(Error),
}

/// Connects to Redis once, as the pool would, and says what a failure means. `failure` is the
/// pool's own error text, classified too (an ACL that refuses the scripts shows only there).
#[must_use]
pub fn diagnose(settings: &RedisSettings, failure: &str) -> Diagnosis {
    let url = settings.redacted();
    if let Some(cause) = classify_text(failure, settings) {
        return Diagnosis::Misconfigured(Error::config(format!("Redis at {url}: {cause}")));
    }
    let client = match client(settings) {
        Ok(client) => client,
        Err(why) => return Diagnosis::Outage(why),
    };
    let info = client.get_connection_info().clone();
    let (host, port, tls) = match info.addr() {
        ConnectionAddr::Tcp(host, port) => (host.clone(), *port, false),
        ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port, true),
        // Not a form `RedisSettings` produces.
        _ => return Diagnosis::Outage(failure.to_owned()),
    };
    let timeout = settings.timeout;
    // The address first: a port that refuses or a host that does not answer is an outage, and
    // nothing more can be learnt from it.
    let addr = match tcp_connect(&host, port, timeout) {
        Ok(addr) => addr,
        Err(why) => return Diagnosis::Outage(why),
    };
    let attempt = client.get_connection_with_timeout(timeout).and_then(|mut con| {
        con.set_read_timeout(Some(timeout))?;
        redis::cmd("PING").query::<()>(&mut con)
    });
    let error = match attempt {
        Ok(()) => return Diagnosis::Reachable,
        Err(e) => e,
    };
    if let Some(cause) = classify(&error, settings, info.redis_settings().db()) {
        return Diagnosis::Misconfigured(Error::config(format!("Redis at {url}: {cause}")));
    }
    let detail = error.to_string();
    let transport = error.is_timeout() || error.is_connection_dropped() || error.is_io_error();
    if !transport {
        return Diagnosis::Outage(detail);
    }
    // A second, raw look at the port: what does it speak?
    // The redis crate's own words for these (a read timeout, a reset) would only mislead.
    let cause: Option<&str> = if tls && speaks_plain_redis(addr, timeout) {
        Some("the server speaks plain Redis, not TLS: use a redis:// URL (or redis_ssl=False, REDIS_SSL=false)")
    } else if !tls && speaks_tls(addr, &host, timeout) {
        Some("the server speaks TLS: use a rediss:// URL (or redis_ssl=True, REDIS_SSL=true)")
    } else if is_postgres(addr, timeout) {
        Some("the server is PostgreSQL, not Redis (it answered PostgreSQL's SSL request): check the host and port")
    } else {
        None
    };
    match cause {
        Some(cause) => Diagnosis::Misconfigured(Error::config(format!("Redis at {url}: {cause}"))),
        None => Diagnosis::Outage(detail),
    }
}

/// The client the pool would use: the URL, its CA file, and the provider's login when there is one.
fn client(settings: &RedisSettings) -> Result<redis::Client, String> {
    let client = match &settings.ca_file {
        None => redis::Client::open(settings.url()),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
            redis::Client::build_with_tls(
                settings.url(),
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem) },
            )
        }
    }
    .map_err(|e| e.to_string())?;
    let Some(provider) = &settings.credentials else { return Ok(client) };
    // A provider that fails (its identity service unreachable, say) is an outage, as at any
    // later connection.
    let (login, _) = provider.fetch()?;
    let info = client.get_connection_info().clone();
    let user = if login.username.is_empty() { "default".to_owned() } else { login.username.clone() };
    let redis = info.redis_settings().clone().set_username(user).set_password(login.password.clone());
    redis::Client::open(info.set_redis_settings(redis)).map_err(|e| e.to_string())
}

/// The first of the host's addresses that accepts a TCP connection (closed again at once).
fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> =
        (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?.collect();
    let mut last = format!("{host}:{port} has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => return Ok(addr),
            Err(e) => last = format!("cannot connect to {host}:{port}: {e}"),
        }
    }
    Err(last)
}

/// A failure that settings caused, from the redis crate's error: the cause for the message, or
/// `None` for anything an outage could explain.
fn classify(error: &RedisError, settings: &RedisSettings, db: i64) -> Option<String> {
    if error.kind() == redis::ErrorKind::AuthenticationFailed && settings.credentials.is_some() {
        // The pool reports a provider that raised the same way; a provider's failure is an outage.
        let text = error.to_string();
        if text.contains("no Redis credentials") {
            return None;
        }
    }
    if error.kind() == redis::ErrorKind::AuthenticationFailed {
        return Some(login_refused(&error.to_string(), settings));
    }
    if matches!(error.kind(), redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType) {
        return Some(format!(
            "the server does not speak Redis's protocol ({}): check the host and port",
            first_line(&error.to_string())
        ));
    }
    let text = error.to_string();
    if text.contains("SELECT is not allowed in cluster mode") {
        return Some(format!(
            "database {db} on a Redis Cluster, which has only database 0: remove '/{db}' from the URL"
        ));
    }
    if text.contains("DB index is out of range") {
        return Some(format!("database {db} does not exist on this server ({})", first_line(&text)));
    }
    classify_text(&text, settings)
}

/// The causes that can be told from an error's text alone (the pool keeps only the text).
fn classify_text(text: &str, settings: &RedisSettings) -> Option<String> {
    let line = first_line(text);
    if ["WRONGPASS", "NOAUTH", "invalid password", "Password authentication failed", "invalid username-password"]
        .iter()
        .any(|marker| text.contains(marker))
    {
        return Some(login_refused(line, settings));
    }
    if text.contains("NOPERM") {
        return Some(format!(
            "the login was accepted but its ACL refuses a command this library needs ({line}): allow the user \
             +@all on the library's keys, or at least scripts, hashes, sets, sorted sets, PUBLISH, SUBSCRIBE and \
             CLIENT TRACKING"
        ));
    }
    if text.contains("invalid peer certificate") || text.contains("certificate verify failed") {
        return Some(format!(
            "TLS failed: the server's certificate does not verify ({line}); give the CA that signed it as \
             redis_ca_file (REDIS_CA_FILE), and use the host name the certificate names"
        ));
    }
    if text.contains("peer is incompatible") || text.contains("received fatal alert") {
        return Some(format!("TLS failed: the server refused the handshake ({line})"));
    }
    None
}

fn login_refused(detail: &str, settings: &RedisSettings) -> String {
    let whose = if settings.credentials.is_some() {
        "redis_credential_provider's credentials"
    } else {
        "the password (in the URL, or redis_password / REDIS_PASSWORD) and, for an ACL user, the user name"
    };
    format!("the server refused the login ({}): check {whose}", first_line(detail).trim())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Whether the port answers a plain-text PING as Redis does (`+PONG`, or an error such as `-NOAUTH`).
fn speaks_plain_redis(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else { return false };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0_u8; 64];
    matches!(stream.read(&mut reply), Ok(n) if n > 0 && matches!(reply[0], b'+' | b'-') && reply[..n].ends_with(b"\r\n"))
}

/// Whether the port completes (or answers with an alert) a TLS handshake, certificate unchecked.
fn speaks_tls(addr: SocketAddr, host: &str, timeout: Duration) -> bool {
    let Ok(config) = client_tls_config(Verification::None, None) else { return false };
    let name = ServerName::try_from(host.to_owned()).unwrap_or_else(|_| ServerName::from(addr.ip()));
    let Ok(mut tls) = rustls::ClientConnection::new(Arc::new(config), name) else { return false };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else { return false };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    while tls.is_handshaking() {
        match tls.complete_io(&mut stream) {
            Ok((0, 0)) => return false,
            Ok(_) => {}
            // A server that answers with an alert (it wants a client certificate, say) speaks TLS.
            Err(e) => return e.to_string().contains("received fatal alert"),
        }
    }
    true
}

/// Whether the port answers PostgreSQL's SSLRequest with its one-byte `S` or `N`: someone gave the
/// database's address as Redis's (PostgreSQL closes on Redis's own bytes without a word).
fn is_postgres(addr: SocketAddr, timeout: Duration) -> bool {
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else { return false };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream.write_all(&SSL_REQUEST).is_err() {
        return false;
    }
    let mut reply = [0_u8; 2];
    matches!(stream.read(&mut reply), Ok(1) if matches!(reply[0], b'S' | b'N'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> RedisSettings {
        RedisSettings::from_url(url, None, 2, Duration::from_millis(300), 60).unwrap()
    }

    #[test]
    fn login_and_tls_failures_are_told_by_their_text_without_the_secret() {
        let s = settings("redis://:hunter2@127.0.0.1:1/0");
        for text in [
            "Password authentication failed - AuthenticationFailed",
            "WRONGPASS invalid username-password pair or user is disabled.",
            "\"NOAUTH\": Authentication required.",
        ] {
            let cause = classify_text(text, &s).unwrap();
            assert!(cause.starts_with("the server refused the login"), "{cause}");
            assert!(!cause.contains("hunter2"));
        }
        assert!(classify_text("invalid peer certificate: UnknownIssuer", &s).unwrap().contains("redis_ca_file"));
        assert!(classify_text("Connection refused (os error 111)", &s).is_none());
        assert!(classify_text("every pooled connection stayed in use for 500 ms", &s).is_none());
    }

    #[test]
    fn a_closed_port_is_an_outage() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let s = settings(&format!("redis://127.0.0.1:{port}/0"));
        assert!(matches!(diagnose(&s, "Connection refused"), Diagnosis::Outage(_)));
    }

    #[test]
    fn a_server_that_is_not_redis_is_a_misconfiguration() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut buf = [0_u8; 256];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            }
            // The TCP probe's own connection comes first; keep answering the next ones the same way.
            for stream in listener.incoming().take(3).flatten() {
                let mut stream = stream;
                let mut buf = [0_u8; 256];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            }
        });
        let s = settings(&format!("redis://127.0.0.1:{port}/0"));
        match diagnose(&s, "Parse error") {
            Diagnosis::Misconfigured(e) => assert!(e.to_string().contains("does not speak Redis"), "{e}"),
            other => panic!("{other:?}"),
        }
        drop(server);
    }
}
