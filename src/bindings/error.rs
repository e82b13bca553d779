//! The Python exception hierarchy, and the one place core errors become Python exceptions.
//!
//! Every class derives from `ChatHistoryError` *and* the built-in a caller would already catch,
//! so `except ValueError:` around a Phase 1 call keeps working. pyo3's `create_exception!` takes a
//! single base, so the classes are made with `type(name, bases, namespace)` at import.

use pyo3::exceptions::{
    PyConnectionError, PyException, PyOSError, PyPermissionError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::{Error, ErrorKind};

/// The exception classes, created once per interpreter.
pub(crate) struct Exceptions {
    pub base: Py<PyType>,
    pub configuration: Py<PyType>,
    pub validation: Py<PyType>,
    pub invalid_type: Py<PyType>,
    pub ownership: Py<PyType>,
    pub unavailable: Py<PyType>,
    pub database: Py<PyType>,
    pub local_storage: Py<PyType>,
    pub closed: Py<PyType>,
}

static EXCEPTIONS: PyOnceLock<Exceptions> = PyOnceLock::new();

fn make(py: Python<'_>, name: &str, bases: &[Bound<'_, PyType>], doc: &str) -> PyResult<Py<PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__module__", "chat_history_rs")?;
    namespace.set_item("__doc__", doc)?;
    let bases = PyTuple::new(py, bases)?;
    let class = py.get_type::<PyType>().call1((name, bases, namespace))?;
    Ok(class.cast_into::<PyType>()?.unbind())
}

pub(crate) fn exceptions(py: Python<'_>) -> PyResult<&Exceptions> {
    EXCEPTIONS.get_or_try_init(py, || {
        let base = make(
            py,
            "ChatHistoryError",
            &[py.get_type::<PyException>()],
            "Base class of every error chat_history_rs raises.",
        )?;
        let b = base.bind(py).clone();
        Ok(Exceptions {
            configuration: make(
                py,
                "ConfigurationError",
                &[b.clone(), py.get_type::<PyValueError>()],
                "Bad settings: unknown mode, missing or malformed connection string, unreadable CA file.",
            )?,
            validation: make(
                py,
                "ValidationError",
                &[b.clone(), py.get_type::<PyValueError>()],
                "A value that PostgreSQL would refuse; nothing was stored.",
            )?,
            invalid_type: make(
                py,
                "InvalidTypeError",
                &[b.clone(), py.get_type::<PyTypeError>()],
                "A value of the wrong type; nothing was stored.",
            )?,
            ownership: make(
                py,
                "OwnershipError",
                &[b.clone(), py.get_type::<PyPermissionError>()],
                "The conversation id belongs to another user; nothing was changed.",
            )?,
            unavailable: make(
                py,
                "UnavailableError",
                &[b.clone(), py.get_type::<PyConnectionError>()],
                "PostgreSQL or Redis could not be reached; the message names which.",
            )?,
            database: make(
                py,
                "DatabaseError",
                std::slice::from_ref(&b),
                "The database was reached and refused the operation.",
            )?,
            local_storage: make(
                py,
                "LocalStorageError",
                &[b.clone(), py.get_type::<PyOSError>()],
                "A local-mode file could not be read or written.",
            )?,
            closed: make(
                py,
                "ClosedError",
                &[b, py.get_type::<PyRuntimeError>()],
                "The ChatHistoryManager was used after close().",
            )?,
            base,
        })
    })
}

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        Python::attach(|py| {
            let classes = match exceptions(py) {
                Ok(classes) => classes,
                Err(e) => return e,
            };
            let class = match error.kind() {
                ErrorKind::Config => &classes.configuration,
                ErrorKind::Validation => &classes.validation,
                ErrorKind::InvalidType => &classes.invalid_type,
                ErrorKind::Ownership => &classes.ownership,
                ErrorKind::Unavailable(_) => &classes.unavailable,
                ErrorKind::Database(_) => &classes.database,
                ErrorKind::Io => &classes.local_storage,
                ErrorKind::Closed => &classes.closed,
            };
            PyErr::from_type(class.bind(py).clone(), error.to_string())
        })
    }
}
