//! `resolve_settings()`: the settings a `ChatHistoryManager` would open with, and where each came
//! from, resolved by the core (`config::resolve`) for `chat-history config`, the CLI and the
//! example app. Nothing in Python re-reads the environment or parses `repr()`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use pyo3::IntoPyObjectExt;

use crate::config::resolve::{
    DefaultValue, Environment, Given as Value, Keyword, Keywords, Kind, ProcessEnv, Resolved, Shown, ENVIRONMENT,
    KEYWORDS, POSITIONAL,
};
use crate::error::Error;

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

    /// The sslmode PostgreSQL is reached with (`"prefer"` when the connection string names none),
    /// or None when no valid connection string is set.
    #[getter]
    fn postgres_sslmode(&self) -> Option<&'static str> {
        self.inner.postgres_described().map(|s| s.ssl_mode.as_str())
    }

    /// The PostgreSQL host names (or socket folders), without ports; empty when no valid
    /// connection string is set.
    #[getter]
    fn postgres_host_names(&self) -> Vec<String> {
        self.inner.postgres_described().map(|s| s.host_names()).unwrap_or_default()
    }

    /// Whether Redis is reached over TLS, or None when Redis is not configured (or not valid).
    #[getter]
    fn redis_tls(&self) -> Option<bool> {
        self.inner.redis_described().map(|s| s.tls())
    }

    /// Whether Redis's certificate and host name are checked (TLS, and the URL does not opt out
    /// with `#insecure` or `?ssl_cert_reqs=none`); None when Redis is not configured.
    #[getter]
    fn redis_certificate_verified(&self) -> Option<bool> {
        self.inner.redis_described().map(|s| s.verifies_certificate())
    }

    /// The Redis host name (or address), without its port; None when Redis is not configured.
    #[getter]
    fn redis_host_name(&self) -> Option<String> {
        self.inner.redis_described().map(|s| s.host().to_owned())
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
            "mode" => r.mode_name.as_str().into_bound_py_any(py),
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
            "redis_compression" => r.redis_compression.value.as_str().into_bound_py_any(py),
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

/// For `chat-history stats` and `doctor` only (docs/monitoring.md, "The `chat-history` command"): opens the
/// manager to inspect, creating no schema and writing nothing back. Private: not a setting.
const INSPECT_ONLY: &str = "_inspect_only";

/// The keyword arguments a caller passed, converted: each value's type checked here, with the
/// argument named (`InvalidTypeError`), its range by the core (`ConfigurationError`). `None` counts
/// as not given, so the environment or the default applies.
pub(super) struct Given<'py> {
    pub keywords: Keywords,
    pub redis_credential_provider: Option<Bound<'py, PyAny>>,
    pub postgres_credential_provider: Option<Bound<'py, PyAny>>,
    pub inspect_only: bool,
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

fn wrong_type(name: &str, expected: &str, value: &Bound<'_, PyAny>) -> PyErr {
    Error::invalid_type(format!("{name} must be {expected}, got {}", type_name(value))).into()
}

fn text(name: &str, value: &Bound<'_, PyAny>) -> PyResult<String> {
    match value.cast::<PyString>() {
        Ok(s) => Ok(s.to_cow()?.into_owned()),
        Err(_) => Err(wrong_type(name, "a str", value)),
    }
}

fn path(name: &str, value: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    value.extract::<PathBuf>().map_err(|_| wrong_type(name, "a str or an os.PathLike", value))
}

fn flag(name: &str, value: &Bound<'_, PyAny>) -> PyResult<bool> {
    match value.cast::<PyBool>() {
        Ok(b) => Ok(b.is_true()),
        Err(_) => Err(wrong_type(name, "True or False", value)),
    }
}

/// `redis_compression`: True or False (as `"on"` and `"off"`), or a codec's name, which the core
/// checks (`Compression::parse`).
fn compression(name: &str, value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok((if b.is_true() { "on" } else { "off" }).to_owned());
    }
    match value.cast::<PyString>() {
        Ok(s) => Ok(s.to_cow()?.into_owned()),
        Err(_) => Err(wrong_type(name, "True, False or a str", value)),
    }
}

/// A whole number; a bool is refused (`True` is an `int` to Python, never a count to a reader).
fn whole(name: &str, value: &Bound<'_, PyAny>) -> PyResult<i64> {
    if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(wrong_type(name, "an int", value));
    }
    value
        .extract::<i64>()
        .map_err(|_| Error::config(format!("{name} must be a whole number within 64 bits, got {value}")).into())
}

/// Seconds: an int or a float (not a bool); NaN and infinities are the core's to refuse.
fn seconds(name: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    if value.is_instance_of::<PyBool>() || !(value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>()) {
        return Err(wrong_type(name, "a number of seconds (int or float)", value));
    }
    value.extract::<f64>().map_err(|_| Error::config(format!("{name} must be a number of seconds, got {value}")).into())
}

/// Converts `kwargs` (every argument by name; `caller` names the callable for an unknown one).
/// `providers`: whether the credential providers (and the private `_inspect_only`) are taken.
pub(super) fn given<'py>(kwargs: &Bound<'py, PyDict>, caller: &str, providers: bool) -> PyResult<Given<'py>> {
    let mut out = Given {
        keywords: Keywords::default(),
        redis_credential_provider: None,
        postgres_credential_provider: None,
        inspect_only: false,
    };
    for (key, value) in kwargs.iter() {
        let name = text("a keyword argument's name", &key)?;
        let name = name.as_str();
        let keyword = KEYWORDS.iter().find(|k| k.name == name && (providers || k.kind != Kind::CredentialProvider));
        if (keyword.is_some() || (providers && name == INSPECT_ONLY)) && value.is_none() {
            continue;
        }
        let given = match keyword.map(|k| k.kind) {
            Some(Kind::Mode | Kind::Text) => Value::Text(text(name, &value)?),
            Some(Kind::Path) => Value::Path(path(name, &value)?),
            Some(Kind::Whole) => Value::Whole(whole(name, &value)?),
            Some(Kind::Seconds) => Value::Seconds(seconds(name, &value)?),
            Some(Kind::Flag) => Value::Flag(flag(name, &value)?),
            Some(Kind::Compression) => Value::Text(compression(name, &value)?),
            // Checked to be callable where it is wrapped (a ConfigurationError, as it always was).
            Some(Kind::CredentialProvider) => {
                if name == "redis_credential_provider" {
                    out.redis_credential_provider = Some(value);
                } else {
                    out.postgres_credential_provider = Some(value);
                }
                continue;
            }
            None if providers && name == INSPECT_ONLY => {
                out.inspect_only = flag(name, &value)?;
                continue;
            }
            // Python's own wording for an unknown keyword argument.
            None => return Err(PyTypeError::new_err(format!("{caller} got an unexpected keyword argument '{name}'"))),
        };
        if !out.keywords.set(name, given) {
            return Err(Error::config(format!("{name}: the binding and the keyword table disagree on its kind")).into());
        }
    }
    Ok(out)
}

/// The settings `ChatHistoryManager(**kwargs)` would open with, and where each came from, read
/// from `environ` (a mapping; default: the process's environment). Credential providers are not
/// settings here: they are callables a caller passes to the manager itself.
#[pyfunction]
#[pyo3(signature = (environ = None, **kwargs))]
fn resolve_settings(
    environ: Option<&Bound<'_, PyAny>>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyResolvedSettings> {
    let keywords = match kwargs {
        Some(kwargs) => given(kwargs, "resolve_settings()", false)?.keywords,
        None => Keywords::default(),
    };
    let env: Box<dyn Environment> = match environ {
        Some(environ) => Box::new(mapping(environ)?),
        None => Box::new(ProcessEnv),
    };
    Ok(PyResolvedSettings { inner: Resolved::resolve(keywords, env.as_ref())? })
}

/// The annotation the stubs give a keyword argument of this kind (inside `Optional[...]`).
fn annotation(kind: Kind) -> &'static str {
    match kind {
        Kind::Mode => "Mode",
        Kind::Text => "str",
        Kind::Path => "Union[str, os.PathLike[str]]",
        Kind::Whole => "int",
        Kind::Seconds => "float",
        Kind::Flag => "bool",
        Kind::Compression => "Union[bool, str]",
        Kind::CredentialProvider => "CredentialProvider",
    }
}

/// One row of the keyword table as Python sees it. A default the table cannot hold as a value
/// (the current directory) is None.
fn keyword_to_py<'py>(py: Python<'py>, k: &Keyword) -> PyResult<Bound<'py, PyTuple>> {
    let default = match k.default {
        DefaultValue::Unset | DefaultValue::CurrentDirectory => py.None().into_bound(py),
        DefaultValue::Flag(b) => b.into_bound_py_any(py)?,
        DefaultValue::Whole(n) => n.into_bound_py_any(py)?,
        DefaultValue::Seconds(s) => s.into_bound_py_any(py)?,
        DefaultValue::Text(t) => t.into_bound_py_any(py)?,
    };
    let items: [Bound<'py, PyAny>; 5] = [
        k.name.into_bound_py_any(py)?,
        annotation(k.kind).into_bound_py_any(py)?,
        default,
        PyTuple::new(py, k.env)?.into_any(),
        k.doc.into_bound_py_any(py)?,
    ];
    PyTuple::new(py, items)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyResolvedSettings>()?;
    m.add_function(wrap_pyfunction!(resolve_settings, m)?)?;
    // The keyword table (`config::resolve::KEYWORDS`), for the tests that hold the pyo3 signatures,
    // the stubs and the README's table to it: (name, annotation, default, variables, doc) each.
    let table: Vec<Bound<'_, PyTuple>> = KEYWORDS.iter().map(|k| keyword_to_py(m.py(), k)).collect::<PyResult<_>>()?;
    m.add("_KEYWORDS", PyTuple::new(m.py(), table)?)?;
    m.add("_POSITIONAL_KEYWORDS", POSITIONAL)?;
    let names: Vec<&str> = KEYWORDS.iter().map(|k| k.name).collect();
    m.add("_MANAGER_KEYWORDS", PyTuple::new(m.py(), names)?)?;
    // The variables the core reads, for the test that holds `.env.example` to them.
    m.add("_ENVIRONMENT_VARIABLES", PyTuple::new(m.py(), ENVIRONMENT)?)?;
    Ok(())
}
