//! The pyo3 binding layer: argument parsing, dict <-> struct conversion, and the GIL released
//! around every call that touches a disk or a network. No storage logic lives here.

mod convert;
mod error;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::PostgresSettings;
use crate::error::Error;
use crate::manager::{self, ChatHistory, Mode, Settings};
use crate::store::postgres::PostgresStore;
use convert::{conversation_from_py, conversation_to_py, listing_to_py};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_flag(name: &str) -> Result<Option<bool>, Error> {
    env(name)
        .map(|v| match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(Error::config(format!("{name} must be true or false, got {v:?}"))),
        })
        .transpose()
}

fn seconds(name: &str, value: f64) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(value).map_err(|_| Error::config(format!("{name} must be a positive number of seconds, got {value}")))
}

/// Stores LLM chat conversations as local JSON files, in PostgreSQL, or in Redis over PostgreSQL.
#[pyclass(name = "ChatHistoryManager", module = "chat_history_rs", frozen)]
pub struct PyChatHistoryManager {
    inner: Arc<ChatHistory>,
    redis_enabled: bool,
    postgres_backend: Option<Py<PyPostgresBackend>>,
    repr: String,
}

#[pymethods]
impl PyChatHistoryManager {
    #[new]
    #[pyo3(signature = (
        mode = "local",
        base_dir = None,
        connection_string = None,
        history_days = 7,
        redis_enabled = None,
        *,
        postgres_pool_size = 4,
        postgres_connect_timeout = 5.0,
        postgres_ca_file = None,
    ))]
    fn new(
        py: Python<'_>,
        mode: &str,
        base_dir: Option<PathBuf>,
        connection_string: Option<String>,
        history_days: i32,
        redis_enabled: Option<bool>,
        postgres_pool_size: u32,
        postgres_connect_timeout: f64,
        postgres_ca_file: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut mode = Mode::parse(mode)?;
        // Keyword arguments win over the environment (SPEC section 2, "Configuration").
        let redis_requested = match redis_enabled {
            Some(flag) => flag,
            None => env_flag("REDIS_ENABLED")?.unwrap_or(false),
        };
        match (mode, redis_requested) {
            (Mode::Postgres, true) => mode = Mode::Redis,
            (Mode::Local, true) if redis_enabled == Some(true) => {
                return Err(Error::config("redis_enabled=True needs mode='postgres': Redis caches PostgreSQL, not local files").into())
            }
            (Mode::Local, true) => log::warn!("REDIS_ENABLED is set but mode is 'local': Redis is not used"),
            _ => {}
        }
        let postgres = match mode {
            Mode::Local => None,
            Mode::Postgres | Mode::Redis => {
                let url = connection_string.or_else(|| env("DATABASE_URL")).ok_or_else(|| {
                    Error::config(format!(
                        "{} mode needs a PostgreSQL connection string: pass connection_string=... or set DATABASE_URL",
                        mode.as_str()
                    ))
                })?;
                let timeout = seconds("postgres_connect_timeout", postgres_connect_timeout)?;
                Some(PostgresSettings::parse(&url, postgres_ca_file, postgres_pool_size, timeout)?)
            }
        };
        let base_dir = match base_dir {
            Some(dir) => dir,
            None => std::env::current_dir().map_err(|e| Error::config("cannot read the current directory").with_source(e))?,
        };
        let repr = match &postgres {
            Some(pg) => format!("ChatHistoryManager(mode={:?}, postgres={:?})", mode.as_str(), pg.redacted()),
            None => format!("ChatHistoryManager(mode=\"local\", base_dir={:?})", base_dir.display().to_string()),
        };
        let settings = Settings { mode, base_dir, postgres, history_days };
        let inner = py.detach(|| ChatHistory::open(settings))?;
        let postgres_backend = match mode {
            Mode::Local => None,
            _ => Some(Py::new(py, PyPostgresBackend { inner: Arc::clone(&inner), history_days })?),
        };
        Ok(PyChatHistoryManager { inner, redis_enabled: mode == Mode::Redis, postgres_backend, repr })
    }

    /// `"local"`, `"postgres"` or `"redis"`.
    #[getter]
    fn mode(&self) -> &'static str {
        match self.inner.mode() {
            Mode::Redis => "postgres",
            other => other.as_str(),
        }
    }

    /// Whether the Redis tier is in use.
    #[getter]
    fn redis_enabled(&self) -> bool {
        self.redis_enabled
    }

    /// The PostgreSQL store with the seed's method names, or None in local mode.
    #[getter]
    fn postgres_backend(&self, py: Python<'_>) -> Option<Py<PyPostgresBackend>> {
        self.postgres_backend.as_ref().map(|b| b.clone_ref(py))
    }

    /// The Redis cache with the seed's method names, or None without Redis.
    #[getter]
    fn redis_backend(&self) -> Option<()> {
        None
    }

    #[pyo3(signature = (user_id = None))]
    fn list_conversations<'py>(&self, py: Python<'py>, user_id: Option<&str>) -> PyResult<Bound<'py, PyAny>> {
        let items = py.detach(|| self.inner.list(user_id))?;
        Ok(listing_to_py(py, &items)?.into_any())
    }

    #[pyo3(signature = (conversation_id, user_id = None))]
    fn get_conversation<'py>(&self, py: Python<'py>, conversation_id: &str, user_id: Option<&str>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let conv = py.detach(|| self.inner.get(conversation_id, user_id))?;
        conv.map(|c| conversation_to_py(py, &c)).transpose()
    }

    #[pyo3(signature = (conversation_id, conversation, user_id = None))]
    fn save_conversation(&self, py: Python<'_>, conversation_id: &str, conversation: &Bound<'_, PyAny>, user_id: Option<&str>) -> PyResult<()> {
        let conv = conversation_from_py(conversation_id, conversation)?;
        py.detach(|| self.inner.save(conversation_id, user_id, &conv))?;
        Ok(())
    }

    #[pyo3(signature = (conversation_id, user_id = None))]
    fn delete_conversation(&self, py: Python<'_>, conversation_id: &str, user_id: Option<&str>) -> PyResult<()> {
        py.detach(|| self.inner.delete(conversation_id, user_id))?;
        Ok(())
    }

    fn flush_dirty_conversations(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(py.detach(|| self.inner.flush())?)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.inner.close())?)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let dict = PyDict::new(py);
        dict.set_item("mode", s.mode)?;
        dict.set_item("reads", s.reads)?;
        dict.set_item("lists", s.lists)?;
        dict.set_item("saves", s.saves)?;
        dict.set_item("deletes", s.deletes)?;
        dict.set_item("errors", s.errors)?;
        dict.set_item("closed", s.closed)?;
        Ok(dict)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        self.repr.clone()
    }
}

/// PostgreSQL with the seed's `PostgreSQLBackend` method names and argument orders.
#[pyclass(name = "PostgresBackend", module = "chat_history_rs", frozen)]
pub struct PyPostgresBackend {
    inner: Arc<ChatHistory>,
    history_days: i32,
}

impl PyPostgresBackend {
    fn store(&self) -> Result<Arc<PostgresStore>, Error> {
        self.inner.postgres()?.ok_or_else(|| Error::config("this manager has no PostgreSQL store"))
    }
}

#[pymethods]
impl PyPostgresBackend {
    fn get_conversation<'py>(&self, py: Python<'py>, conversation_id: &str, user_id: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        crate::validate::conversation_id(conversation_id)?;
        crate::validate::user_id(user_id)?;
        let conv = py.detach(|| self.store()?.get(conversation_id, user_id))?;
        conv.map(|c| conversation_to_py(py, &c)).transpose()
    }

    fn save_conversation(&self, py: Python<'_>, conversation_id: &str, user_id: &str, conversation: &Bound<'_, PyAny>) -> PyResult<()> {
        crate::validate::conversation_id(conversation_id)?;
        crate::validate::user_id(user_id)?;
        let conv = conversation_from_py(conversation_id, conversation)?;
        crate::validate::conversation(conversation_id, &conv)?;
        py.detach(|| self.store()?.save(conversation_id, user_id, &conv))?;
        Ok(())
    }

    #[pyo3(signature = (user_id, days = None))]
    fn list_conversations<'py>(&self, py: Python<'py>, user_id: &str, days: Option<i32>) -> PyResult<Bound<'py, PyAny>> {
        crate::validate::user_id(user_id)?;
        let days = days.unwrap_or(self.history_days);
        let items = py.detach(|| self.store()?.list(user_id, days))?;
        Ok(listing_to_py(py, &items)?.into_any())
    }

    fn delete_conversation(&self, py: Python<'_>, conversation_id: &str, user_id: &str) -> PyResult<()> {
        crate::validate::conversation_id(conversation_id)?;
        crate::validate::user_id(user_id)?;
        py.detach(|| self.store()?.delete(conversation_id, user_id))?;
        Ok(())
    }

    fn __repr__(&self) -> PyResult<String> {
        Ok(format!("PostgresBackend({:?})", self.store()?.redacted_url()))
    }
}

/// Closes every live manager, flushing what is dirty: the package's `atexit` hook.
#[pyfunction]
fn _close_all(py: Python<'_>) {
    py.detach(manager::close_all);
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // Only our own records reach Python below WARNING: the drivers log per statement at debug
    // level, and every record that passes costs a trip into Python.
    let _ = pyo3_log::Logger::new(py, pyo3_log::Caching::Nothing)?
        .filter(log::LevelFilter::Warn)
        .filter_target("chat_history_rs".to_owned(), log::LevelFilter::Debug)
        .install();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyChatHistoryManager>()?;
    m.add_class::<PyPostgresBackend>()?;
    m.add_function(wrap_pyfunction!(_close_all, m)?)?;
    let e = error::exceptions(py)?;
    m.add("ChatHistoryError", e.base.bind(py))?;
    m.add("ConfigurationError", e.configuration.bind(py))?;
    m.add("ValidationError", e.validation.bind(py))?;
    m.add("InvalidTypeError", e.invalid_type.bind(py))?;
    m.add("OwnershipError", e.ownership.bind(py))?;
    m.add("UnavailableError", e.unavailable.bind(py))?;
    m.add("DatabaseError", e.database.bind(py))?;
    m.add("LocalStorageError", e.local_storage.bind(py))?;
    m.add("ClosedError", e.closed.bind(py))?;
    Ok(())
}
