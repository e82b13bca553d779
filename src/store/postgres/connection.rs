//! The pool's connections: how one is opened (credentials, session bounds), when one is retired,
//! the statements prepared on it, and what a driver error means (unavailable or refused).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use postgres::types::{ToSql, Type};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::credentials::{CredentialProvider, Lease};
use crate::error::{Backend, Error, ErrorKind};

pub(super) type Pool = crate::pool::Pool<Connector>;
pub(super) type PooledClient = crate::pool::Pooled<Connector>;

/// Opens connections for the pool. Our own rather than r2d2_postgres's, for the statement cache.
pub(super) struct Connector {
    pub(super) config: postgres::Config,
    pub(super) tls: MakeRustlsConnect,
    /// `SET`s run on every new connection: the bounds on statements and lock waits.
    pub(super) session: String,
    /// `postgres_credential_provider`: the user and password of every new connection.
    pub(super) credentials: Option<CredentialProvider>,
}

/// Why a connection could not be opened: the driver's error, or the credential provider's.
#[derive(Debug)]
pub(super) enum ConnectError {
    Postgres(postgres::Error),
    /// What the provider raised, naming it (never what it returned).
    Credentials(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Postgres(e) => e.fmt(f),
            ConnectError::Credentials(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Postgres(e) => e.source(),
            ConnectError::Credentials(_) => None,
        }
    }
}

impl From<postgres::Error> for ConnectError {
    fn from(e: postgres::Error) -> Self {
        ConnectError::Postgres(e)
    }
}

/// The server ended the session with this error (`pg_terminate_backend`, a shutdown, a restart in
/// progress): the FATAL arrives before the client sees its socket close, so `is_closed()` alone
/// would return the error to the caller instead of trying a fresh connection.
pub(super) fn session_ended(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    e.code().is_some_and(|code| {
        [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW].contains(code)
    })
}

impl r2d2::ManageConnection for Connector {
    type Connection = Connection;
    type Error = ConnectError;

    fn connect(&self) -> Result<Connection, ConnectError> {
        let (mut client, lease) = match &self.credentials {
            None => (self.config.connect(self.tls.clone())?, Lease::forever()),
            Some(provider) => {
                let (login, lease) = provider.fetch().map_err(ConnectError::Credentials)?;
                let mut config = self.config.clone();
                // An empty username keeps the connection string's user.
                if !login.username.is_empty() {
                    config.user(&login.username);
                }
                config.password(&login.password);
                (config.connect(self.tls.clone())?, lease)
            }
        };
        // Set per session rather than as startup `options`, which poolers such as PgBouncer refuse.
        client.batch_execute(&self.session)?;
        Ok(Connection { client, statements: HashMap::new(), lease, ending: false })
    }

    fn is_valid(&self, conn: &mut Connection) -> Result<(), ConnectError> {
        Ok(conn.client.simple_query("").map(|_| ())?)
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        // PostgreSQL checks credentials only at connect, but Azure closes sessions whose token
        // expired: a connection is retired before then (see `PostgresStore::checkout`).
        conn.ending || conn.client.is_closed() || conn.lease.due(SystemTime::now())
    }
}

/// A client and the statements prepared on it. Every statement here is a fixed string, prepared
/// once per connection: a statement sent unprepared is parsed and planned again on every call,
/// which was most of a PostgreSQL read's time.
pub(super) struct Connection {
    pub(super) client: postgres::Client,
    /// Keyed by the address of the `'static` SQL text: hashing the text itself (up to 2 KB) on
    /// every call would cost more than the lookup saves.
    statements: HashMap<usize, postgres::Statement>,
    /// When the credentials it logged in with are due for renewal.
    pub(super) lease: Lease,
    /// The server said it is ending this session (an administrator's or a shutdown's FATAL): the
    /// socket may not look closed yet, but the connection is not handed out again.
    pub(super) ending: bool,
}

impl Connection {
    fn statement(
        &mut self,
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<postgres::Statement, postgres::Error> {
        let key = sql.as_ptr() as usize;
        if let Some(statement) = self.statements.get(&key) {
            return Ok(statement.clone());
        }
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let statement = self.client.prepare_typed(sql, &types)?;
        self.statements.insert(key, statement.clone());
        Ok(statement)
    }

    pub(super) fn query(
        &mut self,
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let statement = self.statement(sql, params)?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        self.client.query(&statement, &values)
    }

    /// The ids' locks (`lock`: [`super::sql::LOCK_IDS`] or [`super::sql::LOCK_IDS_FOR_FLUSH`]) then
    /// `sql`, in one transaction.
    pub(super) fn locked_query(
        &mut self,
        lock: &'static str,
        ids: &(dyn ToSql + Sync),
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let lock = self.statement(lock, &[(ids, Type::TEXT_ARRAY)])?;
        let statement = self.statement(sql, params)?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        let mut tx = self.client.transaction()?;
        tx.execute(&lock, &[ids])?;
        let rows = tx.query(&statement, &values)?;
        tx.commit()?;
        Ok(rows)
    }
}

/// Logs every connection that could not be opened, and keeps the last one's whole chain of
/// causes: the driver's own message often says only "db error", not why (a refused login, say).
#[derive(Debug, Default, Clone)]
pub(super) struct PoolErrorLog {
    pub(super) last: Arc<Mutex<Option<String>>>,
}

impl r2d2::HandleError<ConnectError> for PoolErrorLog {
    fn handle_error(&self, error: ConnectError) {
        let text = error_chain(&error);
        log::warn!("PostgreSQL connection failed: {text}");
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(text);
    }
}

/// Classifies a driver error: the server refusing a statement is a database error; anything that
/// means "no usable connection" (I/O, closed socket, TLS, login refused, shutting down) is
/// unavailability, so it can never be mistaken for "not found".
pub(super) fn pg_error(error: &postgres::Error) -> Error {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        // 08: connection exception; 57P0x: shutdown / cannot connect now; 53300: too many
        // connections; 28: authentication failed.
        // 55P03 / 57014: a lock wait or a statement ran past lock_timeout / statement_timeout, or a
        // query was cancelled: transient, so a flush keeps the data dirty and a read says why.
        let unavailable = code.starts_with("08")
            || code.starts_with("57P")
            || code == "53300"
            || code.starts_with("28")
            || code == "55P03"
            || code == "57014";
        if unavailable && (code == "55P03" || code == "57014") {
            return Error::new(
                ErrorKind::Unavailable(Backend::Postgres),
                format!("PostgreSQL is unavailable: {} (lock_timeout / statement_timeout)", db.message()),
            )
            .with_source(error_chain(error));
        }
        if !unavailable {
            return Error::new(
                ErrorKind::Database(Backend::Postgres),
                format!("PostgreSQL refused the statement: {}", db.message()),
            )
            .with_source(error_chain(error));
        }
    }
    Error::new(ErrorKind::Unavailable(Backend::Postgres), "PostgreSQL is unavailable").with_source(error_chain(error))
}

/// The error and its causes on one line: rust-postgres puts the useful part ("Connection refused")
/// in the source.
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
