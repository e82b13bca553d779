//! One core call of `AsyncChatHistoryManager`: its arguments, converted when the method is called
//! ([`Request`]), and its outcome, turned into Python objects once the GIL is held ([`Outcome`]).

use pyo3::prelude::*;

use crate::bindings::convert::{fetched_to_py, listing_to_py};
use crate::error::Error;
use crate::manager::{ChatHistory, Fetched};
use crate::model::Conversation;

/// One core call with its arguments already converted, waiting for its event loop.
pub(super) enum Request {
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
pub(super) enum Reply {
    Listing(Vec<(String, Conversation)>),
    Fetched(Option<Fetched>),
    Count(usize),
    Nothing,
}

/// A finished core call: its error stays a core error until the GIL is held, then maps to the
/// `ChatHistoryError` hierarchy in the one place errors are mapped (`bindings::error`).
pub(super) enum Outcome {
    Done(Result<Reply, Error>),
    /// The core panicked (a bug): the caller gets a RuntimeError rather than waiting forever.
    Panicked,
}

impl Outcome {
    pub(super) fn of(request: Request, history: &ChatHistory) -> Self {
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
