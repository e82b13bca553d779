//! The pyo3 binding layer: argument parsing, dict <-> struct conversion, and the GIL released
//! around every call that touches a disk or a network. No storage logic lives here.

mod asyncio;
mod convert;
mod credentials;
mod error;
mod failpoints;
mod manager;
mod settings;

use pyo3::prelude::*;

use crate::{manager as core_manager, process};
use manager::{PyChatHistoryManager, PyPostgresBackend, PyRedisBackend};

/// Runs before a fork (`os.register_at_fork`): new calls of any manager wait, and the calls in
/// flight get up to 5 s to end, so the child is not copied from a thread half-way through one.
#[pyfunction]
fn _before_fork(py: Python<'_>) {
    let in_flight = py.detach(|| process::before_fork(std::time::Duration::from_secs(5)));
    if in_flight > 0 {
        log::warn!(
            "fork: {in_flight} chat-history calls were still in flight after 5 s; the child may inherit their locks"
        );
    }
}

/// Runs in the parent after a fork: the calls that waited go on.
#[pyfunction]
fn _after_fork_in_parent() {
    process::after_fork_in_parent();
}

/// Runs in a forked child (`os.register_at_fork`): managers open their own connections.
#[pyfunction]
fn _after_fork_in_child() {
    process::after_fork_in_child();
}

/// Closes every live manager, flushing what is dirty: the package's `atexit` hook.
#[pyfunction]
fn _close_all(py: Python<'_>) {
    py.detach(core_manager::close_all);
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
    m.add_class::<PyRedisBackend>()?;
    settings::register(m)?;
    asyncio::register(m)?;
    m.add_function(wrap_pyfunction!(_close_all, m)?)?;
    m.add_function(wrap_pyfunction!(_after_fork_in_child, m)?)?;
    m.add_function(wrap_pyfunction!(_before_fork, m)?)?;
    m.add_function(wrap_pyfunction!(_after_fork_in_parent, m)?)?;
    failpoints::register(m)?;
    m.add_function(wrap_pyfunction!(asyncio::_set_asyncio_fast_path, m)?)?;
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
