"""The app's ChatHistoryManager inside Streamlit: its lifetime, the flushes, and the cache's health.

One manager serves the whole process (one pair of connection pools shared by every session). What
is dirty in Redis is written back to PostgreSQL:

- every `flush_interval` seconds by the manager's background thread;
- when a browser session ends: Streamlit then releases the session-scoped resource registered by
  `history_for_session()`, whose `on_release` flushes (Streamlit has no other session-end event);
- at interpreter exit, by the atexit hook that `chat_history_rs` registers (it closes every open
  manager, which flushes), and when Streamlit's resource cache is cleared (`on_release` closes);
- when the user presses "Save all to database".
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import streamlit as st
from chat_config import AppSettings, User
from chat_history_rs import ChatHistoryError, ChatHistoryManager, ClosedError, OwnershipError, ValidationError

log = logging.getLogger("chat_app")

# Streamlit calls on_release on its event-loop thread when a websocket closes; a flush waits on the
# network (up to the connect timeout when PostgreSQL is down), so it runs here instead. One worker
# keeps session-end flushes in order; concurrent.futures joins it at exit, before the package's
# atexit hook closes the managers.
SESSION_FLUSHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-session-flush")

# The seed's alert thresholds.
MIN_HIT_RATE = 0.80
MAX_DIRTY = 100
MAX_MEMORY_FRACTION = 0.80
# A hit rate over a handful of lookups says nothing (a new chat's first list is a miss).
MIN_LOOKUPS_FOR_HIT_RATE = 20


def configure_logging() -> None:
    """INFO from the app and from chat_history_rs (flushes, fallbacks) to stderr, beside Streamlit's own
    log; left alone when the process configured logging itself (a root handler, as pytest adds)."""
    if logging.getLogger().handlers or log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("chat_app", "chat_history_rs"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)


def _close(history: ChatHistoryManager) -> None:
    try:
        history.close()
    except ChatHistoryError:
        log.exception("closing the chat history failed")


@st.cache_resource(show_spinner=False, on_release=_close)
def open_history(settings: AppSettings) -> ChatHistoryManager:
    """The process-wide manager for these settings; closed (after a flush) when the cache is cleared."""
    log.info("opening chat history (%s)", settings.description)
    return ChatHistoryManager(**settings.manager_kwargs())


@dataclass
class SessionHandle:
    """What a browser session holds; releasing it flushes what the session left dirty."""

    history: ChatHistoryManager
    user: User


def _flush(handle: SessionHandle) -> None:
    try:
        count = handle.history.flush_dirty_conversations()
    except ClosedError:
        return  # the resource cache was cleared first, and close() flushed
    except ChatHistoryError as exc:
        # What is left stays dirty in Redis for the background flusher or the next flush; nothing is lost.
        log.warning("flush at the end of %s's session failed: %s", handle.user.name, exc)
        return
    log.info("session of %s ended: flushed %d conversation(s) to PostgreSQL", handle.user.name, count)


def _flush_when_session_ends(handle: SessionHandle) -> None:
    if not handle.history.redis_enabled:
        return
    try:
        SESSION_FLUSHER.submit(_flush, handle)
    except RuntimeError:  # the interpreter is already shutting down and starts no thread: flush right here
        _flush(handle)


# `_history` starts with an underscore so Streamlit does not hash it: the key is (settings, user).
@st.cache_resource(scope="session", show_spinner=False, on_release=_flush_when_session_ends)
def _session_handle(settings: AppSettings, user: User, _history: ChatHistoryManager) -> SessionHandle:
    return SessionHandle(_history, user)


def history_for_session(settings: AppSettings, user: User) -> ChatHistoryManager:
    """The shared manager, with this browser session registered for a flush when it ends."""
    history = open_history(settings)
    _session_handle(settings, user, history)
    return history


def find_chat(history: ChatHistoryManager, user: User, chat_id: Optional[str]) -> Optional[dict[str, Any]]:
    """The chat of that id, or None: no id, deleted, another user's, or a hand-edited `?chat=` that is no
    valid id at all (the manager refuses those with a ValidationError, a ValueError)."""
    if not chat_id:
        return None
    try:
        return history.get_conversation(chat_id, user_id=user.id)
    except ValidationError:
        return None


def save_new(history: ChatHistoryManager, conversation: dict[str, Any], user: User) -> str:
    """Saves a new conversation under a fresh id and returns the id. Ids are 8 hex characters, as in
    Phase 1, so one may already belong to another user: the manager refuses that, and we draw again."""
    for _ in range(5):
        conversation_id = secrets.token_hex(4)
        try:
            history.save_conversation(conversation_id, conversation, user_id=user.id)
        except OwnershipError:
            continue
        return conversation_id
    raise OwnershipError("no free conversation id after 5 tries")


# --------------------------------------------------------------------------------------------------
# Health: the numbers stats() reports, and the seed's alerts on them
# --------------------------------------------------------------------------------------------------


def cache_alerts(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """[(level, message)], level "error" or "warning", for every threshold the stats are past."""
    alerts: list[tuple[str, str]] = []
    if not stats.get("redis_enabled"):
        return alerts
    if stats.get("redis_available") is False:
        alerts.append(("error", "Redis is unreachable: reads and saves go straight to PostgreSQL."))
    lookups = stats.get("cache_hits", 0) + stats.get("cache_misses", 0)
    hit_rate = stats.get("hit_rate")
    if hit_rate is not None and lookups >= MIN_LOOKUPS_FOR_HIT_RATE and hit_rate < MIN_HIT_RATE:
        alerts.append(("warning", f"Cache hit rate {hit_rate:.0%} is below the {MIN_HIT_RATE:.0%} target."))
    dirty = stats.get("dirty_count") or 0
    if dirty > MAX_DIRTY:
        alerts.append(("warning", f"{dirty} conversations await write-back (alert above {MAX_DIRTY})."))
    fraction = memory_fraction(stats)
    if fraction is not None and fraction > MAX_MEMORY_FRACTION:
        limit = f"{MAX_MEMORY_FRACTION:.0%}"
        alerts.append(("error", f"Redis memory at {fraction:.0%} of maxmemory (alert above {limit})."))
    stuck = [str(member) for member in stats.get("stuck_conversations") or []]
    failures = stats.get("flush_failures") or 0
    if stuck:
        ids = ", ".join(stuck)
        alerts.append(("error", f"{len(stuck)} conversation(s) PostgreSQL refused, retried with backoff: {ids}"))
    elif failures:
        alerts.append(("warning", f"{failures} flush failure(s) since start; the data stayed dirty and was retried."))
    policy = stats.get("redis_maxmemory_policy") or ""
    if policy.startswith("allkeys-"):
        alerts.append(("warning", f"maxmemory-policy {policy} may evict unsaved conversations; use volatile-lru."))
    return alerts


def memory_fraction(stats: dict[str, Any]) -> Optional[float]:
    """used_memory / maxmemory, or None when Redis has no limit (maxmemory 0) or did not say."""
    used, limit = stats.get("redis_used_memory"), stats.get("redis_maxmemory")
    if not used or not limit:
        return None
    return used / limit


def health_lines(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """The numbers behind the alerts, [(name, value)], for the sidebar."""
    hit_rate, age = stats.get("hit_rate"), stats.get("oldest_dirty_age_seconds")
    lookups = stats.get("cache_hits", 0) + stats.get("cache_misses", 0)
    used, limit, fraction = stats.get("redis_used_memory"), stats.get("redis_maxmemory"), memory_fraction(stats)
    share = "" if fraction is None else f", {fraction:.0%}"
    return [
        ("Hit rate", "n/a" if hit_rate is None else f"{hit_rate:.0%} of {lookups} lookups"),
        ("Dirty", f"{stats.get('dirty_count', 0)}" + ("" if age is None else f", oldest {age:.0f} s")),
        ("Written back", f"{stats.get('conversations_flushed', 0)}"),
        ("Flush failures", f"{stats.get('flush_failures', 0)}"),
        ("Redis memory", f"{_mebibytes(used)} of {_mebibytes(limit) if limit else 'no limit'}{share}"),
        ("Eviction policy", stats.get("redis_maxmemory_policy") or "?"),
        ("Near cache", _near_cache(stats)),
    ]


def _near_cache(stats: dict) -> str:
    """Hits answered in this process, invalidations Redis sent, and the memory the copies take."""
    if not stats.get("near_cache_enabled"):
        return "off"
    state = "" if stats.get("near_cache_tracking") else " (not serving)"
    return (
        f"{stats.get('near_cache_hits', 0)} hits, {stats.get('near_cache_invalidations', 0)} invalidations,"
        f" {stats.get('near_cache_entries', 0)} entries, {_mebibytes(stats.get('near_cache_bytes'))}{state}"
    )


def _mebibytes(value: Optional[int]) -> str:
    return "?" if value is None else f"{value / 2**20:.1f} MiB"
