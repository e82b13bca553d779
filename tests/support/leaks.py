"""Where a password could leak, as text: exceptions (with their whole cause chain), log records,
nested stats() dicts. One set of helpers for every secrecy test (README, "Configuration": passwords never
appear in exceptions, log lines, repr() or stats())."""

from __future__ import annotations

import traceback
from urllib.parse import quote


def secret_forms(secret: str) -> set[str]:
    """The secret as written, and percent-encoded with and without '/' kept (as URLs carry it)."""
    return {secret, quote(secret, safe=""), quote(secret)}


def assert_no_secret(text: str, secret: str, where: str) -> None:
    """No form of the secret appears in `text`."""
    for form in secret_forms(secret):
        assert form not in text, f"the password leaks in {where}: {text!r}"


def exception_texts(exc: BaseException) -> dict[str, str]:
    """str(), repr(), args, attributes, the traceback and the whole cause chain, by where they come from."""
    texts = {
        "str": str(exc),
        "repr": repr(exc),
        "args": repr(exc.args),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "attributes": repr(getattr(exc, "__dict__", {})),
    }
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        texts[f"cause {type(cause).__name__}"] = f"{cause!s} {cause!r} {cause.args!r}"
        cause = cause.__cause__ or cause.__context__
    return texts


def log_texts(caplog) -> str:
    """Every captured record's message, arguments and traceback, and the formatted log."""
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
        if record.exc_text:
            parts.append(record.exc_text)
    parts.append(caplog.text)
    return "\n".join(parts)


def deep_text(value) -> str:
    """Every key and value of a nested stats() dict as text."""
    if isinstance(value, dict):
        return " ".join(f"{deep_text(k)}={deep_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return " ".join(deep_text(v) for v in value)
    return f"{value!s} {value!r}"
