//! The fast path back to a selector event loop (asyncio's default on Linux and macOS, uvloop): results
//! of core calls wait in a per-loop inbox, and the first one into an empty inbox rings a socket the
//! loop watches (`loop.add_reader`). The loop then resolves every waiting future in one callback,
//! holding the GIL it already has.
//!
//! Why not pyo3-async-runtimes' path for every loop: it hops to a tokio task and to a thread that
//! takes the GIL for each result, then wakes the loop through `call_soon_threadsafe` once per
//! result; here a result costs a write to a socket and no GIL on the core's threads, and a burst
//! of results costs one wake-up (the measurements: docs/benchmarks.md). Loops that cannot watch a socket (Windows' proactor loop) keep
//! pyo3-async-runtimes' path.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyNotImplementedError, PyTypeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyWeakrefReference;

use super::call::Outcome;

/// A finished core call and the future waiting for it.
pub(super) struct Finished {
    pub future: Py<PyAny>,
    pub outcome: Outcome,
}

#[derive(Default)]
struct Inbox {
    items: Vec<Finished>,
    /// A byte is on its way to the loop, so later results need not send another.
    rung: bool,
}

/// Where the core's threads leave results for one event loop.
pub(super) struct Mailbox {
    inbox: Mutex<Inbox>,
    bell: UnixStream,
}

impl Mailbox {
    /// Leaves a result for the loop; the first into an empty inbox wakes the loop.
    pub(super) fn deliver(&self, finished: Finished) {
        let ring = {
            let mut inbox = self.inbox.lock().unwrap_or_else(PoisonError::into_inner);
            inbox.items.push(finished);
            !std::mem::replace(&mut inbox.rung, true)
        };
        if ring {
            // A full socket buffer (WouldBlock) already holds a wake-up; a closed one means the
            // loop is gone and nobody waits for the result.
            let _ = (&self.bell).write(&[1]);
        }
    }
}

/// One event loop's end of the mailbox: `drain` is the loop's reader callback.
#[pyclass(module = "chat_history_rs", frozen)]
pub(super) struct PyLoopDispatcher {
    mailbox: Arc<Mailbox>,
    reader: UnixStream,
}

#[pymethods]
impl PyLoopDispatcher {
    /// Resolves the futures whose results have arrived, for at most `DRAIN_BUDGET` at a time: the
    /// rest wait for the next turn of the loop, so a burst of results never stalls the loop's other
    /// tasks for long.
    fn drain(&self, py: Python<'_>) {
        // Usually one byte is waiting (only an empty inbox rings); a short read means none is left.
        let mut buf = [0u8; 64];
        while matches!((&self.reader).read(&mut buf), Ok(n) if n == buf.len()) {}
        let mut items = {
            let mut inbox = self.mailbox.inbox.lock().unwrap_or_else(PoisonError::into_inner);
            inbox.rung = false;
            std::mem::take(&mut inbox.items)
        }
        .into_iter();
        let deadline = Instant::now() + DRAIN_BUDGET;
        for Finished { future, outcome } in items.by_ref() {
            let future = future.bind(py);
            if let Err(e) = resolve(future, outcome) {
                e.write_unraisable(py, Some(future));
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let rest: Vec<Finished> = items.collect();
        if !rest.is_empty() {
            let ring = {
                let mut inbox = self.mailbox.inbox.lock().unwrap_or_else(PoisonError::into_inner);
                let newer = std::mem::replace(&mut inbox.items, rest);
                inbox.items.extend(newer);
                !std::mem::replace(&mut inbox.rung, true)
            };
            if ring {
                let _ = (&self.mailbox.bell).write(&[1]);
            }
        }
    }
}

/// How long one turn of the loop spends resolving futures before it lets other callbacks run.
const DRAIN_BUDGET: Duration = Duration::from_millis(2);

fn resolve(future: &Bound<'_, PyAny>, outcome: Outcome) -> PyResult<()> {
    let py = future.py();
    // Cancelled while the call ran: the call's effect stands, its result has nobody to go to.
    if future.call_method0(intern!(py, "done"))?.is_truthy()? {
        return Ok(());
    }
    match outcome.into_pyobject(py) {
        Ok(value) => future.call_method1(intern!(py, "set_result"), (value,))?,
        Err(error) => future.call_method1(intern!(py, "set_exception"), (error.into_value(py),))?,
    };
    Ok(())
}

/// Every loop's dispatcher, in a `weakref.WeakKeyDictionary` so a loop that is gone takes its
/// dispatcher (and its sockets) with it. `None` marks a loop that cannot take the fast path.
static DISPATCHERS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Whether loops may take this path; tests turn it off to check the general path.
pub(super) static ENABLED: AtomicBool = AtomicBool::new(true);

/// The mailbox of `event_loop`, set up on first use; None when the loop cannot watch a socket.
pub(super) fn mailbox(event_loop: &Bound<'_, PyAny>) -> PyResult<Option<Arc<Mailbox>>> {
    if !ENABLED.load(Ordering::Relaxed) {
        return Ok(None);
    }
    // A thread runs one loop at a time, usually the same one for many calls: remember it (weakly,
    // so a closed loop can still go away) and skip the registry.
    let cached = LAST.with_borrow(|last| {
        last.as_ref()
            .filter(|(weak, _)| weak.bind(event_loop.py()).upgrade().is_some_and(|l| l.is(event_loop)))
            .map(|(_, mailbox)| Arc::clone(mailbox))
    });
    if cached.is_some() {
        return Ok(cached);
    }
    let found = lookup(event_loop)?;
    if let Some(mailbox) = &found {
        let weak = PyWeakrefReference::new(event_loop)?.unbind();
        LAST.with_borrow_mut(|last| *last = Some((weak, Arc::clone(mailbox))));
    }
    Ok(found)
}

thread_local! {
    /// The loop this thread used last, and its mailbox.
    static LAST: RefCell<Option<(Py<PyWeakrefReference>, Arc<Mailbox>)>> = const { RefCell::new(None) };
}

fn lookup(event_loop: &Bound<'_, PyAny>) -> PyResult<Option<Arc<Mailbox>>> {
    let py = event_loop.py();
    let registry = DISPATCHERS
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import(intern!(py, "weakref"))?.getattr(intern!(py, "WeakKeyDictionary"))?.call0()?.unbind(),
            )
        })?
        .bind(py);
    let known = match registry.call_method1(intern!(py, "get"), (event_loop,)) {
        Ok(known) => known,
        // A loop that cannot be weakly referenced is never registered; it takes the general path.
        Err(e) if e.is_instance_of::<PyTypeError>(py) => return Ok(None),
        Err(e) => return Err(e),
    };
    if let Ok(dispatcher) = known.cast::<PyLoopDispatcher>() {
        return Ok(Some(Arc::clone(&dispatcher.get().mailbox)));
    }
    if known.is_none() && registry.contains(event_loop)? {
        return Ok(None);
    }
    let (reader, bell) = UnixStream::pair().map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?;
    for end in [&reader, &bell] {
        end.set_nonblocking(true).map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?;
    }
    let fd = reader.as_raw_fd();
    let mailbox = Arc::new(Mailbox { inbox: Mutex::new(Inbox::default()), bell });
    let dispatcher = Bound::new(py, PyLoopDispatcher { mailbox: Arc::clone(&mailbox), reader })?;
    match event_loop.call_method1(intern!(py, "add_reader"), (fd, dispatcher.getattr(intern!(py, "drain"))?)) {
        Ok(_) => {
            registry.set_item(event_loop, dispatcher)?;
            Ok(Some(mailbox))
        }
        Err(e) if e.is_instance_of::<PyNotImplementedError>(py) => {
            registry.set_item(event_loop, py.None())?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
