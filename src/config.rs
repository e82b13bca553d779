//! Connection settings: PostgreSQL connection strings in both libpq forms, libpq's sslmodes over
//! rustls, and the redacted descriptions that are the only way a connection string is ever shown.
//!
//! A façade over private modules: [`postgres`] and [`redis`] settings, [`tls`] (rustls),
//! [`settings`] (what a manager is built from), plus the resolver of keyword arguments and the
//! environment ([`resolve`]) and the misconfiguration probe ([`probe`]).

mod postgres;
pub mod probe;
mod redis;
pub mod resolve;
mod settings;
mod tls;
mod url;

pub use postgres::{PostgresSettings, SslMode, DEFAULT_LOCK_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT};
pub use redis::{Compression, RedisSettings};
pub use settings::{Mode, Settings};
pub(crate) use tls::client_tls_config;
pub use tls::Verification;
