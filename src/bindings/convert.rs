//! dict <-> struct conversion. Types are checked here (the core sees only typed values), so a
//! wrong type is a `TypeError` and a wrong value, found by `validate`, a `ValueError`.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::cache::CachedConversation;
use crate::error::{Error, Result};
use crate::manager::Fetched;
use crate::model::{Conversation, Message, Role, Timestamp};

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// A field's name for messages; built only when there is an error to report.
#[derive(Clone, Copy)]
enum Field<'a> {
    Top(&'a str),
    Message(usize, &'a str),
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Top(name) => f.write_str(name),
            Field::Message(index, name) => write!(f, "messages[{index}].{name}"),
        }
    }
}

fn string(conversation_id: &str, field: Field<'_>, value: &Bound<'_, PyAny>) -> Result<String> {
    let text = value.cast::<PyString>().map_err(|_| {
        Error::invalid_type(format!(
            "conversation {conversation_id:?}: {field} must be a str, got {}",
            type_name(value)
        ))
    })?;
    text.to_cow()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| Error::validation(format!("conversation {conversation_id:?}: {field} is not valid Unicode")))
}

/// An id argument (`conversation_id`, `user_id`): a `str`, else our `InvalidTypeError` (pyo3's own
/// extraction would raise a plain `TypeError`, outside the `ChatHistoryError` hierarchy).
pub(crate) struct Id(pub String);

impl<'a, 'py> FromPyObject<'a, 'py> for Id {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.cast::<PyString>() {
            Ok(text) => Ok(Id(text.to_cow()?.into_owned())),
            Err(_) => Err(Error::invalid_type(format!("ids must be str, got {}", type_name(&obj))).into()),
        }
    }
}

impl std::ops::Deref for Id {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// A timestamp field: an ISO 8601 string or a `datetime` (naive taken as UTC); absent or `None`
/// means now.
fn timestamp(conversation_id: &str, field: Field<'_>, value: Option<Bound<'_, PyAny>>) -> Result<Timestamp> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(Timestamp::now());
    };
    let prefix = || format!("conversation {conversation_id:?}: {field}");
    if let Ok(text) = value.cast::<PyString>() {
        let text = text.to_cow().map_err(|_| Error::validation(format!("{} is not valid Unicode", prefix())))?;
        return Timestamp::parse(&text).map_err(|e| Error::validation(format!("{}: {e}", prefix())));
    }
    let is_datetime = value
        .py()
        .import(intern!(value.py(), "datetime"))
        .and_then(|m| m.getattr(intern!(value.py(), "datetime")))
        .and_then(|class| value.is_instance(&class))
        .unwrap_or(false);
    if !is_datetime {
        return Err(Error::invalid_type(format!(
            "{} must be an ISO 8601 str or a datetime, got {}",
            prefix(),
            type_name(&value)
        )));
    }
    let text: String = value
        .call_method0(intern!(value.py(), "isoformat"))
        .and_then(|v| v.extract())
        .map_err(|e| Error::validation(format!("{}: isoformat() failed: {e}", prefix())))?;
    Timestamp::parse(&text).map_err(|e| Error::validation(format!("{}: {e}", prefix())))
}

fn required<'py>(
    conversation_id: &str,
    dict: &Bound<'py, PyDict>,
    key: &Bound<'py, PyString>,
    field: Field<'_>,
) -> Result<Bound<'py, PyAny>> {
    dict.get_item(key)
        .ok()
        .flatten()
        .ok_or_else(|| Error::validation(format!("conversation {conversation_id:?}: {field} is required")))
}

fn message(conversation_id: &str, index: usize, value: &Bound<'_, PyAny>) -> Result<Message> {
    let py = value.py();
    let field = |name| Field::Message(index, name);
    let dict = value.cast::<PyDict>().map_err(|_| {
        Error::invalid_type(format!(
            "conversation {conversation_id:?}: messages[{index}] must be a dict, got {}",
            type_name(value)
        ))
    })?;
    let role_text =
        string(conversation_id, field("role"), &required(conversation_id, dict, intern!(py, "role"), field("role"))?)?;
    let role = Role::parse(&role_text).ok_or_else(|| {
        Error::validation(format!(
            "conversation {conversation_id:?}: {} must be 'user' or 'assistant', got {role_text:?}",
            field("role")
        ))
    })?;
    let content = string(
        conversation_id,
        field("content"),
        &required(conversation_id, dict, intern!(py, "content"), field("content"))?,
    )?;
    let time = timestamp(conversation_id, field("time"), dict.get_item(intern!(py, "time")).ok().flatten())?;
    Ok(Message { role, content, time })
}

/// The app's conversation dict as a [`Conversation`], with defaults for missing timestamps.
pub(crate) fn conversation_from_py(conversation_id: &str, value: &Bound<'_, PyAny>) -> Result<Conversation> {
    let py = value.py();
    let dict = value.cast::<PyDict>().map_err(|_| {
        Error::invalid_type(format!(
            "conversation {conversation_id:?}: the conversation must be a dict, got {}",
            type_name(value)
        ))
    })?;
    let title = string(
        conversation_id,
        Field::Top("title"),
        &required(conversation_id, dict, intern!(py, "title"), Field::Top("title"))?,
    )?;
    let model = string(
        conversation_id,
        Field::Top("model"),
        &required(conversation_id, dict, intern!(py, "model"), Field::Top("model"))?,
    )?;
    let messages = match dict.get_item(intern!(py, "messages")).ok().flatten() {
        None => Vec::new(),
        Some(list) => {
            let list = list.cast::<PyList>().map_err(|_| {
                Error::invalid_type(format!(
                    "conversation {conversation_id:?}: messages must be a list, got {}",
                    type_name(&list)
                ))
            })?;
            let mut messages = Vec::with_capacity(list.len());
            for (index, item) in list.iter().enumerate() {
                messages.push(message(conversation_id, index, &item)?);
            }
            messages
        }
    };
    let created_at =
        timestamp(conversation_id, Field::Top("created_at"), dict.get_item(intern!(py, "created_at")).ok().flatten())?;
    let last_modified = timestamp(
        conversation_id,
        Field::Top("last_modified"),
        dict.get_item(intern!(py, "last_modified")).ok().flatten(),
    )?;
    Ok(Conversation { title, model, messages, created_at, last_modified })
}

/// The app's conversation dict around an already built messages list, keys in the app's order.
fn conversation_dict<'py>(
    py: Python<'py>,
    title: &str,
    model: &str,
    messages: Bound<'py, PyList>,
    created_at: Timestamp,
    last_modified: Timestamp,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item(intern!(py, "title"), title)?;
    dict.set_item(intern!(py, "model"), model)?;
    dict.set_item(intern!(py, "messages"), messages)?;
    created_at.with_text(|t| dict.set_item(intern!(py, "created_at"), t))?;
    last_modified.with_text(|t| dict.set_item(intern!(py, "last_modified"), t))?;
    Ok(dict)
}

/// Builds message dicts by copying a template per role with its keys already in place: copying a
/// small dict reuses its key table, where building one inserts (and may resize) key by key.
struct MessageDicts<'py> {
    py: Python<'py>,
    user: Bound<'py, PyDict>,
    assistant: Bound<'py, PyDict>,
}

impl<'py> MessageDicts<'py> {
    fn new(py: Python<'py>) -> PyResult<Self> {
        let template = |role| -> PyResult<Bound<'py, PyDict>> {
            let t = PyDict::new(py);
            t.set_item(intern!(py, "role"), role_str(py, role))?;
            t.set_item(intern!(py, "content"), intern!(py, ""))?;
            t.set_item(intern!(py, "time"), intern!(py, ""))?;
            Ok(t)
        };
        Ok(MessageDicts { py, user: template(Role::User)?, assistant: template(Role::Assistant)? })
    }

    fn dict(&self, role: Role, content: &str, time: &str) -> PyResult<Bound<'py, PyDict>> {
        let item = match role {
            Role::User => self.user.copy()?,
            Role::Assistant => self.assistant.copy()?,
        };
        item.set_item(intern!(self.py, "content"), content)?;
        item.set_item(intern!(self.py, "time"), time)?;
        Ok(item)
    }
}

/// The role as an interned Python string: one object for every message, not one each.
fn role_str(py: Python<'_>, role: Role) -> &Bound<'_, PyString> {
    match role {
        Role::User => intern!(py, "user"),
        Role::Assistant => intern!(py, "assistant"),
    }
}

/// A [`Conversation`] as the app's dict, keys in the app's order.
pub(crate) fn conversation_to_py<'py>(py: Python<'py>, conv: &Conversation) -> PyResult<Bound<'py, PyDict>> {
    let dicts = MessageDicts::new(py)?;
    let mut items = Vec::with_capacity(conv.messages.len());
    for m in &conv.messages {
        items.push(m.time.with_text(|time| dicts.dict(m.role, &m.content, time))?);
    }
    let messages = PyList::new(py, items)?;
    conversation_dict(py, &conv.title, &conv.model, messages, conv.created_at, conv.last_modified)
}

/// A conversation read from Redis as the app's dict, its strings going to Python straight from
/// the JSON Redis returned.
pub(crate) fn cached_to_py<'py>(py: Python<'py>, conv: &CachedConversation) -> PyResult<Bound<'py, PyDict>> {
    let dicts = MessageDicts::new(py)?;
    let mut items = Vec::with_capacity(conv.messages().len());
    for m in conv.messages() {
        items.push(dicts.dict(m.role, m.content, m.time)?);
    }
    let messages = PyList::new(py, items)?;
    conversation_dict(py, &conv.title, &conv.model, messages, conv.created_at, conv.last_modified)
}

/// Either kind of read result as the app's dict.
pub(crate) fn fetched_to_py<'py>(py: Python<'py>, fetched: &Fetched) -> PyResult<Bound<'py, PyDict>> {
    match fetched {
        Fetched::Cached(cached) => cached_to_py(py, cached),
        Fetched::Stored(conv) => conversation_to_py(py, conv),
    }
}

/// `list_conversations`' result: `[(conversation_id, conversation), ...]`.
pub(crate) fn listing_to_py<'py>(py: Python<'py>, items: &[(String, Conversation)]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for (id, conv) in items {
        list.append((id, conversation_to_py(py, conv)?))?;
    }
    Ok(list)
}
