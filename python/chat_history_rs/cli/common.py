"""What every ``chat-history`` command shares: exit codes and thresholds, the settings (resolved by the
library, ``chat_history_rs.resolve_settings``, with the flags as keyword arguments), opening and closing a
manager, and the small formatting helpers more than one command prints with."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import chat_history_rs
from chat_history_rs import (
    ChatHistoryError,
    ChatHistoryManager,
    ConfigurationError,
    ResolvedSettings,
    UnavailableError,
)
from chat_history_rs.azure import providers_from_env

log = logging.getLogger("chat_history_rs.cli")

PROG = "chat-history"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DOCTOR_EXIT = {"OK": EXIT_OK, "WARN": 1, "FAIL": 2}

# The seed design's alert thresholds (its "Monitoring and Metrics" section).
HIT_RATE_TARGET = 0.80
DIRTY_THRESHOLD = 100
MEMORY_THRESHOLD = 0.80
# Not in the seed: the background flusher runs every 10 s and a conversation PostgreSQL refuses is
# retried with a backoff of at most 5 minutes, so a lag beyond that means nothing is flushing.
DIRTY_AGE_THRESHOLD = 300.0
# Hash slots of a Redis Cluster: every one must be served for every user's keys to be reachable.
CLUSTER_SLOTS = 16384
# What mode= and CHAT_HISTORY_MODE take (the library's three, and the example app's two local ones).
MODES = ("local", "postgres", "local_psql", "local_redis", "redis")


class CliError(Exception):
    """An expected failure: printed as one line on stderr, no traceback, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def print_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Settings: the library resolves them (flag > environment variable > default)
# --------------------------------------------------------------------------------------------------

# Each connection flag is the keyword argument of the same setting (`chat-history config` shows which won).
FLAG_KEYWORDS = {
    "mode": "mode",
    "database_url": "connection_string",
    "redis_url": "redis_connection_string",
    "connect_timeout": "postgres_connect_timeout",
    "redis_timeout": "redis_timeout",
}


def library_settings(args: argparse.Namespace, **keywords: Any) -> ResolvedSettings:
    """The library's settings with the flags given on the command line as keyword arguments."""
    given = getattr(args, "flags_given", ())
    flags = {keyword: getattr(args, flag) for flag, keyword in FLAG_KEYWORDS.items() if flag in given}
    try:
        return chat_history_rs.resolve_settings(**{**flags, **keywords})
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None


@dataclass
class Settings:
    """Where the servers are. ``database_url`` may hold a password: never print it (``postgres_url`` is the
    redacted form; the library's redacted Redis URL comes from ``stats()``)."""

    database_url: str
    postgres_url: str
    redis_url: str | None  # None: the library reads REDIS_CONNECTION_STRING / REDIS_HOST itself
    use_redis: bool
    redis_enabled_env: bool | None  # REDIS_ENABLED as set in the environment
    # The mode an app opens in here (`ChatHistoryManager()`, resolved by the library: --mode, else
    # CHAT_HISTORY_MODE and REDIS_ENABLED), or, when neither is set, the one the servers configured
    # make ("redis" with Redis, else "postgres"); and where it came from.
    mode: str = "postgres"
    mode_source: str = "default"
    # The library's resolution they come from: what doctor reports of TLS (sslmode, rediss) it reads here.
    resolved: ResolvedSettings | None = None


def app_mode(resolved: ResolvedSettings) -> tuple[str | None, str]:
    """(the library's mode, where it came from) when --mode or CHAT_HISTORY_MODE sets it; (None, "default")
    when neither does, which for the library means local mode and for these commands "the servers that
    are configured" (they have nothing to do with local files)."""
    source = resolved.source("mode")
    if source == "default":
        return None, source
    try:
        return resolved.mode, source
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None


def resolve_settings(args: argparse.Namespace, *, redis: str) -> Settings:
    """redis: "required" (flush), "optional" (stats, doctor, conflicts: used when configured) or "never"
    (init-db). A mode set to local (--mode or CHAT_HISTORY_MODE) has no servers: a usage error here."""
    no_redis = redis == "never" or getattr(args, "no_redis", False)
    resolved = library_settings(args)
    mode, mode_source = app_mode(resolved)
    if mode == "local":
        raise CliError(
            f"the mode is local ({mode_source}): conversations are JSON files, and `{PROG} {args.command}` works"
            " on PostgreSQL and Redis; pass --mode postgres or --mode redis (or set CHAT_HISTORY_MODE)"
        )
    if no_redis:
        # Without Redis, REDIS_ENABLED is not read at all: init-db works whatever it says.
        resolved = library_settings(args, redis_enabled=False)
    database_url = resolved.value("connection_string")
    if not database_url:
        raise CliError("no PostgreSQL configured: pass --database-url or set DATABASE_URL (or POSTGRES_HOST)")
    postgres_url = resolved.postgres_url or "PostgreSQL"
    redis_url = getattr(args, "redis_url", None)
    if no_redis:
        return Settings(database_url, postgres_url, None, False, None, mode or "postgres", mode_source, resolved)
    from_env = resolved.source("redis_enabled") == "env REDIS_ENABLED"
    redis_enabled_env = resolved.value("redis_enabled") if from_env else None
    configured = resolved.redis_configured
    if mode == "redis" and not configured:
        raise CliError(
            f"the mode is redis ({mode_source}) but no Redis is configured: pass --redis-url or set"
            " REDIS_CONNECTION_STRING (or REDIS_HOST)"
        )
    if redis == "required" and not configured:
        raise CliError("no Redis configured: pass --redis-url or set REDIS_CONNECTION_STRING (or REDIS_HOST)")
    if redis_enabled_env and not configured:
        raise CliError("REDIS_ENABLED is true but no Redis is configured: set REDIS_CONNECTION_STRING")
    # "optional": REDIS_ENABLED=false (or a postgres mode) does not hide a configured Redis. During a
    # rollback the operator must still see the conversations there that PostgreSQL lacks; the mode
    # reported is still the app's.
    if mode is None:
        mode = "redis" if configured and redis_enabled_env is not False else "postgres"
    return Settings(database_url, postgres_url, redis_url, configured, redis_enabled_env, mode, mode_source, resolved)


@contextlib.contextmanager
def library_log_level(level: int, verbose: bool) -> Iterator[None]:
    """Raise the library logger's level for a while, unless -v asked to see everything.

    The connect phase logs each failed attempt; the CLI reports the outcome itself in one line.
    """
    logger = logging.getLogger("chat_history_rs")
    previous = logger.level
    if not verbose and logger.getEffectiveLevel() < level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def open_manager(
    args: argparse.Namespace, settings: Settings, *, inspect: bool = False, use_redis: bool | None = None
) -> ChatHistoryManager:
    """A postgres-mode manager, with Redis when the settings say so (or ``use_redis``), and no background
    flusher. ``inspect``: for the commands that only look (stats, doctor), a manager that creates no table
    and writes nothing back, not even when it closes."""
    use_redis = settings.use_redis if use_redis is None else use_redis
    kwargs: dict[str, Any] = {
        "mode": "postgres",
        "connection_string": settings.database_url,
        "redis_enabled": use_redis,
        "background_flush": False,
        "postgres_connect_timeout": args.connect_timeout,
        "close_timeout": getattr(args, "close_timeout", 30.0),
    }
    if inspect:
        kwargs["_inspect_only"] = True
    if use_redis:
        if settings.redis_url:
            kwargs["redis_connection_string"] = settings.redis_url
        kwargs["redis_timeout"] = args.redis_timeout
    # REDIS_AUTH=entra / POSTGRES_AUTH=entra: Microsoft Entra ID tokens instead of passwords (docs/credentials.md).
    try:
        kwargs.update(providers_from_env())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with library_log_level(logging.CRITICAL, args.verbose > 0):
        return ChatHistoryManager(**kwargs)


def close_quietly(manager: ChatHistoryManager, verbose: bool) -> None:
    """close(), its log records hidden unless -v.

    A manager opened to inspect (stats, doctor) writes nothing back when it closes; the others' close()
    flushes, which after a failed flush would fail again. Either way its records would bury the report
    or the one-line error the command prints.
    """
    with library_log_level(logging.CRITICAL, verbose):
        manager.close()


def is_redis_misconfiguration(error: ChatHistoryError) -> bool:
    """Whether a manager refused to open because Redis's settings do not fit the server (a wrong password,
    TLS on one side only, a database number on a cluster, a server that is not Redis): the library names
    the cause in a ConfigurationError that starts with "Redis at"."""
    return isinstance(error, ConfigurationError) and str(error).startswith("Redis at ")


def shorten(text: str, limit: int = 80) -> str:
    """One line of at most ``limit`` characters: a title may be a megabyte of anything."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def missing_schema(problem: ChatHistoryError) -> bool:
    """Whether PostgreSQL refused a read because the tables do not exist (`chat-history init-db` makes them)."""
    return not isinstance(problem, UnavailableError) and "does not exist" in str(problem)


def redis_reachable(stats: Mapping[str, Any]) -> bool:
    """Whether this manager could read Redis just now.

    ``redis_available`` alone is not enough: right after a start against a dead Redis it can still
    say True; the global gauges (None when Redis could not be read) tell.
    """
    return (
        bool(stats.get("redis_enabled")) and bool(stats.get("redis_available")) and stats.get("dirty_count") is not None
    )


# --------------------------------------------------------------------------------------------------
# Formatting shared by stats, flush and doctor
# --------------------------------------------------------------------------------------------------


def human_size(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def memory_fraction(stats: Mapping[str, Any]) -> float | None:
    used, limit = stats.get("redis_used_memory"), stats.get("redis_maxmemory")
    if used is None or not limit:
        return None
    return used / limit


def describe_node(node: Mapping[str, Any]) -> str:
    """One cluster primary: where, its slots and replicas, memory and eviction policy."""
    used, limit = node.get("used_memory"), node.get("maxmemory")
    memory = f"{human_size(used)} used"
    if limit:
        memory += f" of {human_size(limit)}" + (f" ({used / limit * 100:.1f} %)" if used is not None else "")
    elif limit == 0:
        memory += ", no maxmemory limit"
    replicas = node.get("replicas")
    return (
        f"{node.get('address')}: {node.get('slots')} slots, {replicas} replica{'s' if replicas != 1 else ''};"
        f" {memory}; maxmemory-policy {node.get('maxmemory_policy') or 'unknown'}"
    )


def postgres_probe(manager: ChatHistoryManager) -> ChatHistoryError | None:
    """Reads PostgreSQL once (an empty listing); returns what went wrong, or None.

    A redis-mode manager starts without PostgreSQL (saves go to Redis meanwhile), so constructing one
    proves nothing about PostgreSQL.
    """
    backend = manager.postgres_backend
    if backend is None:  # pragma: no cover - postgres mode always has one
        return ConfigurationError("this manager has no PostgreSQL store")
    try:
        backend.list_conversations("chat-history-doctor", 1)
    except ChatHistoryError as exc:
        return exc
    return None
