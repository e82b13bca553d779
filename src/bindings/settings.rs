//! `resolve_settings()`: the settings a `ChatHistoryManager` would open with, and where each came
//! from, resolved by the core (`config::resolve`) for `chat-history config`, the CLI and the
//! example app. Nothing in Python re-reads the environment or parses `repr()`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3::IntoPyObjectExt;

use crate::config::resolve::{Environment, Keywords, ProcessEnv, Resolved, Shown};

/// A manager's settings, resolved: keyword argument, else environment variable, else default.
/// Holds passwords; its `repr()` and `entries()` never show them.
#[pyclass(name = "ResolvedSettings", module = "chat_history_rs", frozen)]
pub struct PyResolvedSettings {
    inner: Resolved,
}

fn shown_to_py<'py>(py: Python<'py>, shown: &Shown) -> PyResult<Bound<'py, PyAny>> {
    match shown {
        Shown::Unset => Ok(py.None().into_bound(py)),
        Shown::Bool(b) => b.into_bound_py_any(py),
        Shown::Int(n) => n.into_bound_py_any(py),
        Shown::Seconds(s) => s.into_bound_py_any(py),
        Shown::Text(t) => t.into_bound_py_any(py),
        Shown::Redacted => "<redacted>".into_bound_py_any(py),
    }
}

fn path_to_py<'py>(py: Python<'py>, path: Option<&PathBuf>) -> PyResult<Bound<'py, PyAny>> {
    path.map(|p| p.display().to_string()).into_bound_py_any(py)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[pymethods]
impl PyResolvedSettings {
    /// The mode a manager would open in: `"local"`, `"postgres"` or `"redis"` (postgres with
    /// `redis_enabled`). Raises ConfigurationError for `redis_enabled=True` with local mode.
    #[getter]
    fn mode(&self) -> PyResult<&'static str> {
        Ok(self.inner.mode()?.as_str())
    }

    /// The PostgreSQL connection string without its password, or None when none is set (or it
    /// does not parse).
    #[getter]
    fn postgres_url(&self) -> Option<String> {
        self.inner.postgres_redacted()
    }

    /// The Redis URL without its password, or None when Redis is not configured (or the URL does
    /// not parse).
    #[getter]
    fn redis_url(&self) -> Option<String> {
        self.inner.redis_redacted()
    }

    /// Whether a Redis location is set (`redis_connection_string` or `redis_host`, by keyword or
    /// environment), whatever `redis_enabled` says.
    #[getter]
    fn redis_configured(&self) -> bool {
        self.inner.redis_connection_string.value.is_some() || self.inner.redis_host.value.is_some()
    }

    /// `[{"name", "value", "source"}, ...]` in the README table's order: `value` redacted (connection
    /// strings without passwords, `"<redacted>"` for a password that is set, None when unset),
    /// `source` one of `"keyword"`, `"env NAME"`, `"default"`.
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for entry in self.inner.entries() {
            let dict = PyDict::new(py);
            dict.set_item("name", entry.name)?;
            dict.set_item("value", shown_to_py(py, &entry.value)?)?;
            dict.set_item("source", entry.source.to_string())?;
            list.append(dict)?;
        }
        Ok(list)
    }

    /// Where the setting `name` (a keyword argument's name) came from: `"keyword"`,
    /// `"env NAME"` or `"default"`.
    fn source(&self, name: &str) -> PyResult<String> {
        self.inner
            .entries()
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.source.to_string())
            .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(name.to_owned()))
    }

    /// The value of the setting `name` as a keyword argument takes it. Connection strings and
    /// passwords come back whole, for passing to `ChatHistoryManager`: never print them.
    fn value<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let r = &self.inner;
        match name {
            "mode" => r.requested_mode.value.as_str().into_bound_py_any(py),
            "base_dir" => path_to_py(py, Some(&r.base_dir.value)),
            "connection_string" => r.connection_string.value.clone().into_bound_py_any(py),
            "history_days" => r.history_days.value.into_bound_py_any(py),
            "redis_enabled" => r.redis_enabled.value.into_bound_py_any(py),
            "postgres_pool_size" => r.postgres_pool_size.value.into_bound_py_any(py),
            "postgres_connect_timeout" => secs(r.postgres_connect_timeout.value).into_bound_py_any(py),
            "postgres_ca_file" => path_to_py(py, r.postgres_ca_file.value.as_ref()),
            "postgres_statement_timeout" => secs(r.postgres_statement_timeout.value).into_bound_py_any(py),
            "postgres_lock_timeout" => secs(r.postgres_lock_timeout.value).into_bound_py_any(py),
            "redis_connection_string" => r.redis_connection_string.value.clone().into_bound_py_any(py),
            "redis_host" => r.redis_host.value.clone().into_bound_py_any(py),
            "redis_password" => r.redis_password.value.clone().into_bound_py_any(py),
            "redis_port" => r.redis_port.value.into_bound_py_any(py),
            "redis_ssl" => r.redis_ssl.value.into_bound_py_any(py),
            "redis_ttl" => r.redis_ttl.value.into_bound_py_any(py),
            "redis_pool_size" => r.redis_pool_size.value.into_bound_py_any(py),
            "redis_timeout" => secs(r.redis_timeout.value).into_bound_py_any(py),
            "redis_ca_file" => path_to_py(py, r.redis_ca_file.value.as_ref()),
            "redis_cluster" => r.redis_cluster.value.into_bound_py_any(py),
            "near_cache_bytes" => r.near_cache_bytes.value.into_bound_py_any(py),
            "credential_refresh_margin" => secs(r.credential_refresh_margin.value).into_bound_py_any(py),
            "flush_interval" => secs(r.flush_interval.value).into_bound_py_any(py),
            "background_flush" => r.background_flush.value.into_bound_py_any(py),
            "flush_batch_size" => r.flush_batch_size.value.into_bound_py_any(py),
            "close_timeout" => secs(r.close_timeout.value).into_bound_py_any(py),
            other => Err(pyo3::exceptions::PyKeyError::new_err(other.to_owned())),
        }
    }

    /// Checks what a manager would check before connecting (a connection string that parses, Redis
    /// configured in redis mode...): raises ConfigurationError naming what is wrong.
    fn check(&self) -> PyResult<()> {
        self.inner.settings()?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        let mode = self.inner.mode().map_or("invalid", |m| m.as_str());
        format!(
            "ResolvedSettings(mode={mode:?}, postgres={:?}, redis={:?})",
            self.inner.postgres_redacted(),
            self.inner.redis_redacted()
        )
    }
}

/// A caller's mapping (os.environ or a dict) as the core reads an environment.
fn mapping(environ: &Bound<'_, PyAny>) -> PyResult<HashMap<String, String>> {
    let mut vars = HashMap::new();
    for item in environ.call_method0("items")?.try_iter()? {
        let (key, value): (String, String) = item?.extract()?;
        vars.insert(key, value);
    }
    Ok(vars)
}

/// The settings `ChatHistoryManager(**kwargs)` would open with, and where each came from, read
/// from `environ` (a mapping; default: the process's environment). Credential providers are not
/// settings here: they are callables a caller passes to the manager itself.
#[pyfunction]
#[pyo3(signature = (
    environ = None,
    *,
    mode = None,
    base_dir = None,
    connection_string = None,
    history_days = None,
    redis_enabled = None,
    postgres_pool_size = None,
    postgres_connect_timeout = None,
    postgres_ca_file = None,
    postgres_statement_timeout = None,
    postgres_lock_timeout = None,
    redis_connection_string = None,
    redis_host = None,
    redis_password = None,
    redis_port = None,
    redis_ssl = None,
    redis_ttl = None,
    redis_pool_size = None,
    redis_timeout = None,
    redis_ca_file = None,
    redis_cluster = None,
    near_cache_bytes = None,
    credential_refresh_margin = None,
    flush_interval = None,
    background_flush = None,
    flush_batch_size = None,
    close_timeout = None,
))]
fn resolve_settings(
    environ: Option<&Bound<'_, PyAny>>,
    mode: Option<String>,
    base_dir: Option<PathBuf>,
    connection_string: Option<String>,
    history_days: Option<i32>,
    redis_enabled: Option<bool>,
    postgres_pool_size: Option<u32>,
    postgres_connect_timeout: Option<f64>,
    postgres_ca_file: Option<PathBuf>,
    postgres_statement_timeout: Option<f64>,
    postgres_lock_timeout: Option<f64>,
    redis_connection_string: Option<String>,
    redis_host: Option<String>,
    redis_password: Option<String>,
    redis_port: Option<u16>,
    redis_ssl: Option<bool>,
    redis_ttl: Option<u64>,
    redis_pool_size: Option<u32>,
    redis_timeout: Option<f64>,
    redis_ca_file: Option<PathBuf>,
    redis_cluster: Option<bool>,
    near_cache_bytes: Option<u64>,
    credential_refresh_margin: Option<f64>,
    flush_interval: Option<f64>,
    background_flush: Option<bool>,
    flush_batch_size: Option<usize>,
    close_timeout: Option<f64>,
) -> PyResult<PyResolvedSettings> {
    let keywords = Keywords {
        mode,
        base_dir,
        connection_string,
        history_days,
        redis_enabled,
        postgres_pool_size,
        postgres_connect_timeout,
        postgres_ca_file,
        postgres_statement_timeout,
        postgres_lock_timeout,
        redis_connection_string,
        redis_host,
        redis_password,
        redis_port,
        redis_ssl,
        redis_ttl,
        redis_pool_size,
        redis_timeout,
        redis_ca_file,
        redis_cluster,
        near_cache_bytes,
        credential_refresh_margin,
        flush_interval,
        background_flush,
        flush_batch_size,
        close_timeout,
    };
    let env: Box<dyn Environment> = match environ {
        Some(environ) => Box::new(mapping(environ)?),
        None => Box::new(ProcessEnv),
    };
    Ok(PyResolvedSettings { inner: Resolved::resolve(keywords, env.as_ref())? })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyResolvedSettings>()?;
    m.add_function(wrap_pyfunction!(resolve_settings, m)?)?;
    Ok(())
}
