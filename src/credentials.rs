//! Credentials that expire (docs/credentials.md): a provider the caller gives, called whenever a
//! connection opens or must authenticate again, and the rule for when a connection's credentials
//! are due for renewal. No Python here: the binding layer wraps a Python callable as a
//! [`CredentialProvider`].
//!
//! What a provider returns is a secret: [`Credentials`] prints neither its username nor its
//! password, and a provider's failure is described by what it raised, never by what it returned.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long before a reported expiry credentials are renewed unless configured otherwise. Azure
/// asks for at least three minutes (its token refresh guidance for Redis and PostgreSQL).
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(180);

/// A username and password, and when they stop working if the provider said.
#[derive(Clone)]
pub struct Credentials {
    /// The user to log in as (Redis ACL user, PostgreSQL role). Empty: Redis's `AUTH password`.
    pub username: String,
    /// The password or access token.
    pub password: String,
    /// When the server stops accepting them; `None`: they do not expire.
    pub expires_at: Option<SystemTime>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Even the username: a provider's result is not shown anywhere (docs/credentials.md).
        f.debug_struct("Credentials").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// The function behind a provider: `Err` says why it failed (what it raised), never what it returned.
pub type ProvideFn = dyn Fn() -> Result<Credentials, String> + Send + Sync;

/// A named source of credentials, shared by every connection of one pool.
#[derive(Clone)]
pub struct CredentialProvider {
    name: &'static str,
    provide: Arc<ProvideFn>,
    margin: Duration,
}

impl std::fmt::Debug for CredentialProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialProvider")
            .field("name", &self.name)
            .field("margin", &self.margin)
            .finish_non_exhaustive()
    }
}

impl CredentialProvider {
    /// `name` is how errors and logs refer to it: the keyword it was given as.
    pub fn new(name: &'static str, provide: impl Fn() -> Result<Credentials, String> + Send + Sync + 'static) -> Self {
        CredentialProvider { name, provide: Arc::new(provide), margin: DEFAULT_REFRESH_MARGIN }
    }

    /// Renew credentials this long before their reported expiry.
    #[must_use]
    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// The keyword it was given as.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Calls the provider. The error names it: `redis_credential_provider raised ValueError: ...`.
    pub fn fetch(&self) -> Result<(Credentials, Lease), String> {
        let obtained = SystemTime::now();
        let credentials = (self.provide)().map_err(|why| format!("{} {why}", self.name))?;
        let lease = Lease::new(obtained, credentials.expires_at, self.margin);
        Ok((credentials, lease))
    }
}

/// When a connection's credentials are due for renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    refresh_at: Option<SystemTime>,
    expires_at: Option<SystemTime>,
}

impl Lease {
    /// Credentials obtained at `obtained` that expire at `expires_at`: due `margin` before the
    /// expiry, or halfway through their life when that is shorter than twice the margin, so a
    /// provider handing out short-lived credentials is not called on every use.
    #[must_use]
    pub fn new(obtained: SystemTime, expires_at: Option<SystemTime>, margin: Duration) -> Self {
        let refresh_at = expires_at.map(|expiry| {
            let life = expiry.duration_since(obtained).unwrap_or(Duration::ZERO);
            expiry.checked_sub(margin.min(life / 2)).unwrap_or(expiry)
        });
        Lease { refresh_at, expires_at }
    }

    /// Credentials without an expiry: never due.
    #[must_use]
    pub fn forever() -> Self {
        Lease { refresh_at: None, expires_at: None }
    }

    /// Whether the credentials should be renewed now.
    #[must_use]
    pub fn due(&self, now: SystemTime) -> bool {
        self.refresh_at.is_some_and(|at| now >= at)
    }

    /// Whether the server no longer accepts them.
    #[must_use]
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(seconds: u64) -> SystemTime {
        T0 + Duration::from_secs(seconds)
    }

    #[test]
    fn due_a_margin_before_a_long_expiry() {
        let lease = Lease::new(at(0), Some(at(3600)), Duration::from_secs(180));
        assert!(!lease.due(at(3419)));
        assert!(lease.due(at(3420)));
        assert!(!lease.expired(at(3599)));
        assert!(lease.expired(at(3600)));
    }

    #[test]
    fn short_lives_are_renewed_halfway() {
        let lease = Lease::new(at(100), Some(at(110)), Duration::from_secs(180));
        assert!(!lease.due(at(104)));
        assert!(lease.due(at(105)));
    }

    #[test]
    fn no_expiry_is_never_due_and_a_past_one_at_once() {
        assert!(!Lease::new(at(0), None, Duration::from_secs(180)).due(at(u64::from(u32::MAX))));
        assert!(!Lease::forever().expired(at(1)));
        let past = Lease::new(at(50), Some(at(40)), Duration::from_secs(180));
        assert!(past.due(at(50)));
        assert!(past.expired(at(50)));
    }

    #[test]
    fn errors_name_the_provider_and_debug_shows_no_secret() {
        let failing = CredentialProvider::new("postgres_credential_provider", || Err("raised ValueError: no".into()));
        assert_eq!(failing.fetch().unwrap_err(), "postgres_credential_provider raised ValueError: no");
        let working = CredentialProvider::new("redis_credential_provider", || {
            Ok(Credentials { username: "app-user".into(), password: "s3cret".into(), expires_at: Some(at(10)) })
        });
        let (credentials, _) = working.fetch().unwrap();
        let shown = format!("{credentials:?} {working:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("app-user"), "{shown}");
    }
}
