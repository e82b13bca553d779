//! `AsyncChatHistoryManager`: the API of `ChatHistoryManager` as coroutines (docs/asyncio.md).
//!
//! Each call runs the synchronous core on a bounded pool of blocking threads (`engine`) and hands
//! its result to the caller's event loop: through a socket the loop watches on selector loops
//! (`dispatch`), else through pyo3-async-runtimes' `future_into_py`. The core stays the one tested
//! implementation: arguments are converted on the loop's thread when the method is called, results
//! by the synchronous class's converters, errors by `bindings::error`, so both classes return the
//! same values and raise the same exceptions. docs/asyncio.md ("How it runs") says why a blocking
//! pool rather than a native async driver, and how it is bounded.
//!
//! A cancelled call that has not started is skipped; one that has started runs to its end on its
//! thread. Every core call is whole or nothing (a save is one script in Redis, one transaction in
//! PostgreSQL), so a conversation is never left half-written, whichever way the race goes.
//!
//! No event loop is stored with a manager: each call finds the running loop when it starts, so one
//! manager serves successive `asyncio.run()`s and loops in several threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3_async_runtimes::generic;

mod call;
#[cfg(unix)]
mod dispatch;
mod engine;

use super::convert::{conversation_from_py, fetched_to_py, Id};
use super::manager::PyChatHistoryManager;
use call::{Outcome, Request};
use engine::{engine, CoreRuntime};

use crate::manager::ChatHistory;

/// Aborts a blocking task that has not started when its caller goes away (a cancelled call): a
/// call nobody waits for any more does no work. One that has started runs to its end.
struct AbortOnDrop(tokio::task::JoinHandle<Outcome>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The Python side of a call: converted arguments, started when the coroutine is first awaited.
#[pyclass(name = "_PendingCall", module = "chat_history_rs", frozen)]
pub struct PyPendingCall {
    history: Arc<ChatHistory>,
    request: Mutex<Option<Request>>,
    /// Set when the caller is cancelled: a core call that has not started by then never does.
    cancelled: Arc<AtomicBool>,
}

#[pymethods]
impl PyPendingCall {
    /// Called by the coroutine when it is cancelled (a done-callback on every future would cost
    /// every call a callback; an exception handler costs nothing until it runs).
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Queues the core call and returns the asyncio future of its result, on the running loop.
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let request = self
            .request
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("cannot reuse already awaited coroutine"))?;
        let history = Arc::clone(&self.history);
        let event_loop = pyo3_async_runtimes::get_running_loop(py)?;
        // A near-cache hit is answered here, on the loop's thread: no hop to the pool and back.
        // Anything else (a miss, bad input, a closed manager) takes the normal path, which raises
        // what the synchronous call raises.
        if let Request::Get { conversation_id, user_id } = &request {
            if let Ok(Some(fetched)) = history.get_near(conversation_id, user_id.as_deref()) {
                let future = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
                future.call_method1(pyo3::intern!(py, "set_result"), (fetched_to_py(py, &fetched)?,))?;
                return Ok(future);
            }
        }
        #[cfg(unix)]
        if let Some(mailbox) = dispatch::mailbox(&event_loop)? {
            let future = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
            let cancelled = Arc::clone(&self.cancelled);
            let waiter = future.clone().unbind();
            engine().runtime.spawn_blocking(move || {
                if cancelled.load(Ordering::Acquire) {
                    return; // cancelled before it started: nothing ran, nothing will
                }
                let outcome = Outcome::of(request, &history);
                mailbox.deliver(dispatch::Finished { future: waiter, outcome });
            });
            return Ok(future);
        }
        // The general path, for loops that cannot watch a socket.
        // A cancelled call's future is dropped, which aborts the core call if it has not started.
        let task = AbortOnDrop(engine().runtime.spawn_blocking(move || Outcome::of(request, &history)));
        let locals = pyo3_async_runtimes::TaskLocals::new(event_loop).copy_context(py)?;
        generic::future_into_py_with_locals::<CoreRuntime, _, _>(py, locals, async move {
            let mut task = task;
            // Only this future's drop aborts the task, so a join error has nobody waiting for it.
            (&mut task.0)
                .await
                .map_err(|_| pyo3::exceptions::PyRuntimeError::new_err("chat_history_rs: a core call was cancelled"))
        })
    }
}

/// Turns the fast path back to selector event loops on or off (tests use it to exercise the general
/// path, pyo3-async-runtimes' `future_into_py`, on the default loop).
#[pyfunction]
pub fn _set_asyncio_fast_path(enabled: bool) {
    #[cfg(unix)]
    dispatch::ENABLED.store(enabled, Ordering::Relaxed);
    #[cfg(not(unix))]
    let _ = enabled;
}

/// The core of `AsyncChatHistoryManager`: each method converts its arguments (raising what the
/// synchronous class raises for them) and returns the pending call that the coroutines of
/// python/chat_history_rs/_asyncio.py await.
#[pyclass(name = "_AsyncCore", module = "chat_history_rs", frozen)]
pub struct PyAsyncCore {
    sync: Py<PyChatHistoryManager>,
}

impl PyAsyncCore {
    fn pending(&self, request: Request) -> PyPendingCall {
        PyPendingCall {
            history: Arc::clone(&self.sync.get().inner),
            request: Mutex::new(Some(request)),
            cancelled: Arc::default(),
        }
    }
}

// pyo3 extracts arguments by value; `Id`s are read, not consumed.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl PyAsyncCore {
    /// Takes exactly `ChatHistoryManager`'s arguments and environment variables (it builds one).
    #[new]
    #[pyo3(signature = (*args, **kwargs))]
    fn new(py: Python<'_>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let sync = py.get_type::<PyChatHistoryManager>().call(args, kwargs)?.cast_into::<PyChatHistoryManager>()?;
        Ok(PyAsyncCore { sync: sync.unbind() })
    }

    #[getter]
    fn mode(&self) -> &'static str {
        self.sync.get().mode()
    }

    /// The synchronous manager, for the rare operator calls (conflict copies) that run on the
    /// event loop's default executor rather than the core pool.
    #[getter]
    fn _sync(&self, py: Python<'_>) -> Py<PyChatHistoryManager> {
        self.sync.clone_ref(py)
    }

    #[getter]
    fn redis_enabled(&self) -> bool {
        self.sync.get().redis_enabled
    }

    #[getter]
    fn postgres_backend(&self, py: Python<'_>) -> Option<Py<super::manager::PyPostgresBackend>> {
        self.sync.get().postgres_backend(py)
    }

    #[getter]
    fn redis_backend(&self, py: Python<'_>) -> Option<Py<super::manager::PyRedisBackend>> {
        self.sync.get().redis_backend(py)
    }

    #[pyo3(signature = (user_id = None))]
    fn list_conversations(&self, user_id: Option<Id>) -> PyPendingCall {
        self.pending(Request::List { user_id: user_id.map(|id| id.0) })
    }

    #[pyo3(signature = (conversation_id, user_id = None))]
    fn get_conversation(&self, conversation_id: Id, user_id: Option<Id>) -> PyPendingCall {
        self.pending(Request::Get { conversation_id: conversation_id.0, user_id: user_id.map(|id| id.0) })
    }

    #[pyo3(signature = (conversation_id, conversation, user_id = None))]
    fn save_conversation(
        &self,
        conversation_id: Id,
        conversation: &Bound<'_, PyAny>,
        user_id: Option<Id>,
    ) -> PyResult<PyPendingCall> {
        let conversation = conversation_from_py(&conversation_id, conversation)?;
        Ok(self.pending(Request::Save {
            conversation_id: conversation_id.0,
            user_id: user_id.map(|id| id.0),
            conversation,
        }))
    }

    #[pyo3(signature = (conversation_id, user_id = None))]
    fn delete_conversation(&self, conversation_id: Id, user_id: Option<Id>) -> PyPendingCall {
        self.pending(Request::Delete { conversation_id: conversation_id.0, user_id: user_id.map(|id| id.0) })
    }

    fn flush_dirty_conversations(&self) -> PyPendingCall {
        self.pending(Request::Flush)
    }

    fn close(&self) -> PyPendingCall {
        self.pending(Request::Close)
    }

    /// Synchronous: it reads counters (and, in redis mode, asks Redis for its memory).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.sync.get().stats(py)
    }

    fn __repr__(&self) -> String {
        format!("Async{}", self.sync.get().repr)
    }
}

/// Adds the core of `AsyncChatHistoryManager` to the module. The class itself is Python
/// (python/chat_history_rs/_asyncio.py), so that its methods are true `async def`s
/// (`inspect.iscoroutinefunction` holds, as frameworks that dispatch on it expect) over `_AsyncCore`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyAsyncCore>()
}
