//! `AsyncChatHistoryManager`: the API of `ChatHistoryManager` as coroutines (SPEC section 12).
//!
//! Each call runs the synchronous core on a bounded pool of blocking threads (`engine`) and hands
//! its result to the caller's event loop: through a socket the loop watches on selector loops
//! (`dispatch`), else through pyo3-async-runtimes' `future_into_py`. The core stays the one tested
//! implementation: arguments are converted on the loop's thread when the method is called, results
//! by the synchronous class's converters, errors by `bindings::error`, so both classes return the
//! same values and raise the same exceptions. The README's asyncio section says why a blocking
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
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};
use pyo3_async_runtimes::generic;

#[cfg(unix)]
mod dispatch;
mod engine;

use super::convert::{conversation_from_py, fetched_to_py, listing_to_py, Id};
use super::PyChatHistoryManager;
use engine::{engine, CoreRuntime};

use crate::error::Error;
use crate::manager::{ChatHistory, Fetched};
use crate::model::Conversation;

/// One core call with its arguments already converted, waiting for its event loop.
enum Request {
    List { user_id: Option<String> },
    Get { conversation_id: String, user_id: Option<String> },
    Save { conversation_id: String, user_id: Option<String>, conversation: Conversation },
    Delete { conversation_id: String, user_id: Option<String> },
    Flush,
    Close,
}

impl Request {
    fn run(self, history: &ChatHistory) -> Result<Reply, Error> {
        Ok(match self {
            Request::List { user_id } => Reply::Listing(history.list(user_id.as_deref())?),
            Request::Get { conversation_id, user_id } => {
                Reply::Fetched(history.get(&conversation_id, user_id.as_deref())?)
            }
            Request::Save { conversation_id, user_id, conversation } => {
                history.save(&conversation_id, user_id.as_deref(), &conversation)?;
                Reply::Nothing
            }
            Request::Delete { conversation_id, user_id } => {
                history.delete(&conversation_id, user_id.as_deref())?;
                Reply::Nothing
            }
            Request::Flush => Reply::Count(history.flush()?),
            Request::Close => {
                history.close()?;
                Reply::Nothing
            }
        })
    }
}

/// A core call's result, turned into Python objects on the thread that holds the GIL to resolve
/// the caller's future, by the converters the synchronous class uses.
enum Reply {
    Listing(Vec<(String, Conversation)>),
    Fetched(Option<Fetched>),
    Count(usize),
    Nothing,
}

/// A finished core call: its error stays a core error until the GIL is held, then maps to the
/// `ChatHistoryError` hierarchy in the one place errors are mapped (`bindings::error`).
enum Outcome {
    Done(Result<Reply, Error>),
    /// The core panicked (a bug): the caller gets a RuntimeError rather than waiting forever.
    Panicked,
}

impl Outcome {
    fn of(request: Request, history: &ChatHistory) -> Self {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| request.run(history)))
            .map_or(Outcome::Panicked, Outcome::Done)
    }
}

impl<'py> IntoPyObject<'py> for Outcome {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let Outcome::Done(result) = self else {
            return Err(pyo3::exceptions::PyRuntimeError::new_err("chat_history_rs: a core call panicked"));
        };
        Ok(match result? {
            Reply::Listing(items) => listing_to_py(py, &items)?.into_any(),
            Reply::Fetched(Some(fetched)) => fetched_to_py(py, &fetched)?.into_any(),
            Reply::Fetched(None) | Reply::Nothing => py.None().into_bound(py),
            Reply::Count(n) => n.into_pyobject(py)?.into_any(),
        })
    }
}

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

/// The small Python shims the coroutines are made of: `run(call)` awaits a pending call, so
/// every method returns a real coroutine (`asyncio.create_task` and `inspect.iscoroutine` accept
/// it) that does nothing until awaited, like an `async def`.
struct Shims {
    run: Py<PyAny>,
    fail: Py<PyAny>,
    ready: Py<PyAny>,
}

static SHIMS: PyOnceLock<Shims> = PyOnceLock::new();

fn shims(py: Python<'_>) -> PyResult<&Shims> {
    SHIMS.get_or_try_init(py, || {
        let module = PyModule::from_code(
            py,
            c"from asyncio import CancelledError\n\n\
              async def run(call):\n    try:\n        return await call.start()\n    \
              except CancelledError:\n        call.cancel()\n        raise\n\n\
              async def fail(error):\n    raise error\n\n\
              async def ready(value):\n    return value\n",
            c"<chat_history_rs asyncio shims>",
            c"chat_history_rs._asyncio_shims",
        )?;
        Ok(Shims {
            run: module.getattr("run")?.unbind(),
            fail: module.getattr("fail")?.unbind(),
            ready: module.getattr("ready")?.unbind(),
        })
    })
}

/// The asyncio twin of `ChatHistoryManager`: same constructor, same methods, each a coroutine.
#[pyclass(name = "AsyncChatHistoryManager", module = "chat_history_rs", frozen)]
pub struct PyAsyncChatHistoryManager {
    sync: Py<PyChatHistoryManager>,
}

impl PyAsyncChatHistoryManager {
    fn history(&self) -> &Arc<ChatHistory> {
        &self.sync.get().inner
    }

    /// The coroutine of one call; a conversion that failed raises when it is awaited, as the body
    /// of an `async def` would.
    fn call<'py>(&self, py: Python<'py>, request: PyResult<Request>) -> PyResult<Bound<'py, PyAny>> {
        let shims = shims(py)?;
        match request {
            Ok(request) => {
                let pending = PyPendingCall {
                    history: Arc::clone(self.history()),
                    request: Mutex::new(Some(request)),
                    cancelled: Arc::default(),
                };
                shims.run.bind(py).call1((Bound::new(py, pending)?,))
            }
            Err(error) => shims.fail.bind(py).call1((error.into_value(py),)),
        }
    }
}

fn id(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    value.filter(|v| !v.is_none()).map(|v| v.extract::<Id>().map(|id| id.0)).transpose()
}

// Ids are taken as Python objects and extracted in `call`'s request, so a wrong type raises
// `InvalidTypeError` when awaited, as the synchronous class raises it when called.
#[pymethods]
impl PyAsyncChatHistoryManager {
    /// Takes exactly `ChatHistoryManager`'s arguments and environment variables; it connects (and
    /// creates the schema when missing) before returning, as `ChatHistoryManager` does.
    #[new]
    #[pyo3(signature = (*args, **kwargs))]
    fn new(py: Python<'_>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let sync = py.get_type::<PyChatHistoryManager>().call(args, kwargs)?.cast_into::<PyChatHistoryManager>()?;
        Ok(PyAsyncChatHistoryManager { sync: sync.unbind() })
    }

    /// `"local"` or `"postgres"` (Redis is a tier of postgres mode).
    #[getter]
    fn mode(&self) -> &'static str {
        self.sync.get().mode()
    }

    /// Whether the Redis tier is in use.
    #[getter]
    fn redis_enabled(&self) -> bool {
        self.sync.get().redis_enabled
    }

    /// The PostgreSQL store with the seed's (synchronous) method names, or None in local mode.
    #[getter]
    fn postgres_backend(&self, py: Python<'_>) -> Option<Py<super::PyPostgresBackend>> {
        self.sync.get().postgres_backend(py)
    }

    /// The Redis cache with the seed's (synchronous) method names, or None without Redis.
    #[getter]
    fn redis_backend(&self, py: Python<'_>) -> Option<Py<super::PyRedisBackend>> {
        self.sync.get().redis_backend(py)
    }

    #[pyo3(signature = (user_id = None))]
    fn list_conversations<'py>(
        &self,
        py: Python<'py>,
        user_id: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, id(user_id).map(|user_id| Request::List { user_id }))
    }

    #[pyo3(signature = (conversation_id, user_id = None))]
    fn get_conversation<'py>(
        &self,
        py: Python<'py>,
        conversation_id: &Bound<'py, PyAny>,
        user_id: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request =
            (|| Ok(Request::Get { conversation_id: conversation_id.extract::<Id>()?.0, user_id: id(user_id)? }))();
        self.call(py, request)
    }

    #[pyo3(signature = (conversation_id, conversation, user_id = None))]
    fn save_conversation<'py>(
        &self,
        py: Python<'py>,
        conversation_id: &Bound<'py, PyAny>,
        conversation: &Bound<'py, PyAny>,
        user_id: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = (|| {
            let conversation_id = conversation_id.extract::<Id>()?.0;
            let conversation = conversation_from_py(&conversation_id, conversation)?;
            Ok(Request::Save { conversation_id, user_id: id(user_id)?, conversation })
        })();
        self.call(py, request)
    }

    #[pyo3(signature = (conversation_id, user_id = None))]
    fn delete_conversation<'py>(
        &self,
        py: Python<'py>,
        conversation_id: &Bound<'py, PyAny>,
        user_id: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request =
            (|| Ok(Request::Delete { conversation_id: conversation_id.extract::<Id>()?.0, user_id: id(user_id)? }))();
        self.call(py, request)
    }

    fn flush_dirty_conversations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, Ok(Request::Flush))
    }

    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, Ok(Request::Close))
    }

    /// Synchronous, as it only reads counters (and, in redis mode, asks Redis for its memory).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.sync.get().stats(py)
    }

    fn __aenter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        shims(slf.py())?.ready.bind(slf.py()).call1((slf,))
    }

    #[pyo3(signature = (*_args))]
    fn __aexit__<'py>(&self, py: Python<'py>, _args: &Bound<'py, PyTuple>) -> PyResult<Bound<'py, PyAny>> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!("Async{}", self.sync.get().repr)
    }
}
