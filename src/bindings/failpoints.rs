//! Failpoints for tests: `_core._failpoints_enabled()`, and with the `failpoints` feature
//! (`make test` builds with it; wheels never do) functions that pause the product at a named point
//! until the test releases it, so a test forces an interleaving instead of hoping for it.
//!
//! Points: `flush.after_read` (a flush read the dirty hashes, before PostgreSQL),
//! `flush.before_settle` (PostgreSQL written, Redis not yet settled), `flush.between_batches`,
//! `delete.after_postgres` (PostgreSQL deleted, Redis not yet), `feed.turn` (the change feed's
//! follower, before each turn), `near.invalidate.locked` (a tracking thread applying invalidations,
//! holding its near cache's lock); and `save.lose_staged`, which with
//! `return` stages a save's fields under another name, as if Redis evicted the staged copy before
//! the script ran.

use pyo3::prelude::*;

/// Whether this build has failpoints.
#[pyfunction]
fn _failpoints_enabled() -> bool {
    cfg!(feature = "failpoints")
}

#[cfg(feature = "failpoints")]
mod enabled {
    use std::collections::HashMap;
    use std::sync::{Condvar, LazyLock, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use pyo3::exceptions::PyRuntimeError;
    use pyo3::prelude::*;

    /// Per point: times reached, whether threads reaching it wait, and how many of the hits do.
    #[derive(Default)]
    struct Point {
        hits: u64,
        paused: bool,
        pause_first: u64,
    }

    static POINTS: LazyLock<(Mutex<HashMap<String, Point>>, Condvar)> = LazyLock::new(Default::default);

    fn points() -> std::sync::MutexGuard<'static, HashMap<String, Point>> {
        POINTS.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Threads that reach `name` count a hit, and the first `count` of them (all, by default) wait
    /// there until [`_failpoint_release`].
    #[pyfunction]
    #[pyo3(signature = (name, count = u64::MAX))]
    pub fn _failpoint_pause(name: String, count: u64) -> PyResult<()> {
        {
            let mut map = points();
            let point = map.entry(name.clone()).or_default();
            point.paused = true;
            point.hits = 0;
            point.pause_first = count;
        }
        let point = name.clone();
        fail::cfg_callback(name, move || {
            let (lock, condvar) = &*POINTS;
            let mut map = lock.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = map.entry(point.clone()).or_default();
            entry.hits += 1;
            let waits = entry.hits <= entry.pause_first;
            condvar.notify_all();
            while waits && map.get(&point).is_some_and(|p| p.paused) {
                map = condvar.wait(map).unwrap_or_else(PoisonError::into_inner);
            }
        })
        .map_err(PyRuntimeError::new_err)
    }

    /// Configures `name` with the fail crate's own action syntax (`"1*return"`, `"off"`...).
    #[pyfunction]
    pub fn _failpoint_set(name: String, actions: &str) -> PyResult<()> {
        points().entry(name.clone()).or_default();
        fail::cfg(name, actions).map_err(PyRuntimeError::new_err)
    }

    /// Waits (releasing the GIL) until `name` was reached `hits` times; false at the timeout.
    #[pyfunction]
    pub fn _failpoint_wait(py: Python<'_>, name: &str, hits: u64, timeout: f64) -> bool {
        py.detach(|| {
            let deadline = Instant::now() + Duration::from_secs_f64(timeout);
            let (lock, condvar) = &*POINTS;
            let mut map = lock.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if map.get(name).is_some_and(|p| p.hits >= hits) {
                    return true;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                map = condvar.wait_timeout(map, left).unwrap_or_else(PoisonError::into_inner).0;
            }
        })
    }

    /// Lets the threads waiting at `name` go on, and turns the point off.
    #[pyfunction]
    pub fn _failpoint_release(name: &str) {
        release(name);
    }

    fn release(name: &str) {
        fail::remove(name);
        let (_, condvar) = &*POINTS;
        if let Some(point) = points().get_mut(name) {
            point.paused = false;
        }
        condvar.notify_all();
    }

    /// How many times `name` was reached since it was paused.
    #[pyfunction]
    pub fn _failpoint_hits(name: &str) -> u64 {
        points().get(name).map_or(0, |p| p.hits)
    }

    /// Forgets every point (between tests).
    #[pyfunction]
    pub fn _failpoints_reset() {
        let names: Vec<String> = points().keys().cloned().collect();
        for name in names {
            release(&name);
        }
        points().clear();
    }
}

/// Adds the functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_failpoints_enabled, m)?)?;
    #[cfg(feature = "failpoints")]
    {
        m.add_function(wrap_pyfunction!(enabled::_failpoint_pause, m)?)?;
        m.add_function(wrap_pyfunction!(enabled::_failpoint_wait, m)?)?;
        m.add_function(wrap_pyfunction!(enabled::_failpoint_set, m)?)?;
        m.add_function(wrap_pyfunction!(enabled::_failpoint_release, m)?)?;
        m.add_function(wrap_pyfunction!(enabled::_failpoint_hits, m)?)?;
        m.add_function(wrap_pyfunction!(enabled::_failpoints_reset, m)?)?;
    }
    Ok(())
}
