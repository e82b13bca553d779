//! `redis_credential_provider` and `postgres_credential_provider`: a Python callable as the core's
//! [`CredentialProvider`]. The GIL is taken only to call it, from whichever thread opens or renews
//! a connection (the core runs with the GIL released). What it returns is never shown: a bad
//! result is described by its shape, a failure by what the callable raised.

use std::time::{Duration, SystemTime};

use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};

use crate::credentials::{CredentialProvider, Credentials};
use crate::error::Error;

const SHAPE: &str = "expected (username, password) or (username, password, expires_at)";

/// Wraps `callable` (checked to be callable) as the provider named `name`.
pub(super) fn provider(
    name: &'static str,
    callable: &Bound<'_, PyAny>,
    margin: Duration,
) -> Result<CredentialProvider, Error> {
    if !callable.is_callable() {
        return Err(Error::config(format!(
            "{name} must be a callable returning (username, password) or (username, password, expires_at)"
        )));
    }
    let callable = callable.clone().unbind();
    let provide = move || {
        // A connection opened while the interpreter shuts down (a last flush) cannot call Python.
        Python::try_attach(|py| call(py, &callable))
            .unwrap_or_else(|| Err("cannot be called: the Python interpreter is shutting down".to_owned()))
    };
    Ok(CredentialProvider::new(name, provide).with_margin(margin))
}

fn call(py: Python<'_>, callable: &Py<PyAny>) -> Result<Credentials, String> {
    let result = callable.bind(py).call0().map_err(|e| raised(py, &e))?;
    let items: Vec<Bound<'_, PyAny>> = if let Ok(tuple) = result.cast::<PyTuple>() {
        tuple.iter().collect()
    } else if let Ok(list) = result.cast::<PyList>() {
        list.iter().collect()
    } else {
        return Err(format!("returned {}; {SHAPE}", type_name(&result)));
    };
    if !(2..=3).contains(&items.len()) {
        return Err(format!("returned {} items; {SHAPE}", items.len()));
    }
    let text = |index: usize, what: &str| -> Result<String, String> {
        let item = &items[index];
        if item.is_none() && index == 0 {
            return Ok(String::new());
        }
        item.cast::<PyString>()
            .ok()
            .and_then(|s| s.to_cow().ok().map(std::borrow::Cow::into_owned))
            .ok_or_else(|| format!("returned a {what} that is {}, not a string; {SHAPE}", type_name(item)))
    };
    let username = text(0, "username")?;
    let password = text(1, "password")?;
    let expires_at = match items.get(2) {
        None => None,
        Some(item) if item.is_none() => None,
        Some(item) => {
            let seconds: f64 = item.extract().map_err(|_| {
                format!("returned an expires_at that is {}, not Unix seconds; {SHAPE}", type_name(item))
            })?;
            let since_epoch = Duration::try_from_secs_f64(seconds)
                .map_err(|_| "returned an expires_at that is not a time after 1970 in Unix seconds".to_owned())?;
            Some(SystemTime::UNIX_EPOCH + since_epoch)
        }
    };
    Ok(Credentials { username, password, expires_at })
}

/// `raised ValueError: the message`: the callable's own words, which are the caller's to keep clean.
fn raised(py: Python<'_>, error: &PyErr) -> String {
    let class = error.get_type(py).name().map_or_else(|_| "an exception".to_owned(), |n| n.to_string());
    match error.value(py).str() {
        Ok(message) if !message.to_string_lossy().is_empty() => format!("raised {class}: {message}"),
        _ => format!("raised {class}"),
    }
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    let name = value.get_type().name().map_or_else(|_| "an object".to_owned(), |n| n.to_string());
    if name == "NoneType" {
        "None".to_owned()
    } else {
        format!("a {name}")
    }
}
