"""``chat-history``: the operator's command line for chat_history_rs.

Pure Python over the public API (``ChatHistoryManager``, ``stats()``, ``flush_dirty_conversations()``
and the exceptions); the standard library only. ``chat-history --help`` lists the commands;
docs/monitoring.md and docs/deployment.md show them at work.

Exit codes (every command):

    0    done; for ``doctor``: every check OK
    1    the command failed: a server unreachable, a statement refused, bad settings, conversations
         that could not be written back; for ``doctor``: at least one WARN and no FAIL
    2    usage error (argparse: unknown option, missing command); for ``doctor``: at least one FAIL
    130  interrupted (Ctrl-C) outside ``flush --loop``

``doctor`` thus follows the Nagios plugin convention (0 OK, 1 WARNING, 2 CRITICAL), so a monitoring
agent can run it as a check as is.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import chat_history_rs
from chat_history_rs import ChatHistoryError, ChatHistoryManager, ConfigurationError, UnavailableError
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

ENV_FLAG_TRUE = ("1", "true", "yes", "on")
ENV_FLAG_FALSE = ("0", "false", "no", "off")


class CliError(Exception):
    """An expected failure: printed as one line on stderr, no traceback, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------
# Settings: flags first, then the environment variables the library reads
# --------------------------------------------------------------------------------------------------


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value and value.strip() else None


def _env_flag(name: str) -> bool | None:
    """Parsed as the library parses it; None when unset."""
    value = _env(name)
    if value is None:
        return None
    if value.lower() in ENV_FLAG_TRUE:
        return True
    if value.lower() in ENV_FLAG_FALSE:
        return False
    raise CliError(f"{name} must be true or false, got {value!r}")


def _dsn_value(value: str) -> str:
    """A libpq key=value value, quoted when it needs to be."""
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def postgres_from_parts() -> str | None:
    """The example app's connection string from its POSTGRES_* variables, when POSTGRES_HOST is set.

    Built as the app builds it (examples/streamlit_app/chat_config.py), so the tools run where only the
    app's settings exist, such as an App Service SSH console: sslmode defaults to ``require``, which
    Azure Database for PostgreSQL demands, except for a server on this machine (``prefer``).
    """
    host = _env("POSTGRES_HOST")
    if host is None:
        return None
    local = host in ("localhost", "127.0.0.1", "::1") or host.startswith("/")
    parts = {
        "host": host,
        "port": _env("POSTGRES_PORT") or "5432",
        "dbname": os.environ.get("POSTGRES_DATABASE") or "postgres",
        "user": os.environ.get("POSTGRES_ADMIN_LOGIN") or "postgres",
        "password": os.environ.get("POSTGRES_ADMIN_PASSWORD") or None,
        "sslmode": os.environ.get("POSTGRES_SSLMODE") or ("prefer" if local else "require"),
    }
    return " ".join(f"{key}={_dsn_value(value)}" for key, value in parts.items() if value is not None)


@dataclass
class Settings:
    """Where the servers are. The URLs may hold passwords: never print them (the library's redacted forms,
    from ``repr()`` and ``stats()``, are what the CLI shows)."""

    database_url: str
    redis_url: str | None  # None: the library reads REDIS_CONNECTION_STRING / REDIS_HOST itself
    use_redis: bool
    redis_enabled_env: bool | None  # REDIS_ENABLED as set in the environment


def resolve_settings(args: argparse.Namespace, *, redis: str) -> Settings:
    """redis: "required" (flush), "optional" (stats, doctor: used when configured) or "never" (init-db)."""
    database_url = getattr(args, "database_url", None) or _env("DATABASE_URL") or postgres_from_parts()
    if not database_url:
        raise CliError("no PostgreSQL configured: pass --database-url or set DATABASE_URL (or POSTGRES_HOST)")
    redis_url = getattr(args, "redis_url", None)
    if redis == "never" or getattr(args, "no_redis", False):
        return Settings(database_url, None, False, None)
    redis_enabled_env = _env_flag("REDIS_ENABLED")
    configured = bool(redis_url or _env("REDIS_CONNECTION_STRING") or _env("REDIS_HOST"))
    if redis == "required" and not configured:
        raise CliError("no Redis configured: pass --redis-url or set REDIS_CONNECTION_STRING (or REDIS_HOST)")
    if redis_enabled_env and not configured:
        raise CliError("REDIS_ENABLED is true but no Redis is configured: set REDIS_CONNECTION_STRING")
    # "optional": REDIS_ENABLED=false does not hide a configured Redis. During a rollback the operator
    # must still see the conversations there that PostgreSQL lacks.
    return Settings(database_url, redis_url, configured, redis_enabled_env)


@contextlib.contextmanager
def _library_log_level(level: int, verbose: bool) -> Iterator[None]:
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


def open_manager(args: argparse.Namespace, settings: Settings) -> ChatHistoryManager:
    """A postgres-mode manager, with Redis when the settings say so, and no background flusher."""
    use_redis = settings.use_redis
    kwargs: dict[str, Any] = {
        "mode": "postgres",
        "connection_string": settings.database_url,
        "redis_enabled": use_redis,
        "background_flush": False,
        "postgres_connect_timeout": args.connect_timeout,
        "close_timeout": getattr(args, "close_timeout", 30.0),
    }
    if use_redis:
        if settings.redis_url:
            kwargs["redis_connection_string"] = settings.redis_url
        kwargs["redis_timeout"] = args.redis_timeout
    # REDIS_AUTH=entra / POSTGRES_AUTH=entra: Microsoft Entra ID tokens instead of passwords (README).
    try:
        kwargs.update(providers_from_env())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with _library_log_level(logging.CRITICAL, args.verbose > 0):
        return ChatHistoryManager(**kwargs)


def close_quietly(manager: ChatHistoryManager, verbose: bool) -> None:
    """close(), its log records hidden unless -v.

    close() always writes back what is dirty. For the commands that only look (stats, doctor) that flush
    is not what the user asked for; after a failed flush it would fail again. Either way its errors
    would bury the report or the one-line error the command prints.
    """
    with _library_log_level(logging.CRITICAL, verbose):
        manager.close()


def describe_postgres(manager: ChatHistoryManager) -> str:
    """The redacted PostgreSQL URL, from repr(); stats() does not carry it."""
    found = re.search(r'postgres="([^"]*)"', repr(manager))
    return found.group(1) if found else "PostgreSQL"


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "") or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def postgres_tls(redacted_url: str) -> tuple[str, str]:
    """(status, words) for the sslmode of a redacted PostgreSQL URL."""
    mode = re.search(r"[?&]sslmode=([a-z-]+)", redacted_url)
    sslmode = mode.group(1) if mode else "prefer"
    words = {
        "disable": "no TLS",
        "allow": "TLS only if the server insists, unverified",
        "prefer": "TLS when the server offers it, unverified",
        "require": "TLS, certificate not verified",
        "verify-ca": "TLS, certificate chain verified",
        "verify-full": "TLS, certificate chain and host name verified",
    }.get(sslmode, f"sslmode={sslmode}")
    hosts = re.sub(r"^[a-z]+://(?:[^@/]*@)?", "", redacted_url).split("/")[0]
    remote = [h for h in (part.rsplit(":", 1)[0] for part in hosts.split(",")) if not _is_loopback(h)]
    if remote and sslmode in ("disable", "allow", "prefer"):
        return "WARN", f"sslmode={sslmode}: {words}; use sslmode=require or verify-full for a remote server"
    return "OK", f"sslmode={sslmode}: {words}"


def redis_tls(redacted_url: str) -> tuple[str, str]:
    """(status, words) for a redacted Redis URL: its scheme says whether TLS is used."""
    scheme = redacted_url.split("://", 1)[0]
    host = re.sub(r"^[a-z]+://", "", redacted_url).split("/")[0].rsplit(":", 1)[0]
    if scheme == "rediss" and redacted_url.endswith("#insecure"):
        return "WARN", "rediss://: TLS, certificate NOT verified (#insecure or ssl_cert_reqs=none)"
    if scheme == "rediss":
        return "OK", "rediss://: TLS, certificate and host name verified"
    if not _is_loopback(host):
        return "WARN", "redis://: no TLS to a remote server; use rediss:// (Azure: port 6380)"
    return "OK", "redis://: no TLS (loopback)"


def redis_reachable(stats: dict[str, Any]) -> bool:
    """Whether this manager could read Redis just now.

    ``redis_available`` alone is not enough: right after a start against a dead Redis it can still
    say True; the global gauges (None when Redis could not be read) tell.
    """
    return (
        bool(stats.get("redis_enabled")) and bool(stats.get("redis_available")) and stats.get("dirty_count") is not None
    )


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def memory_fraction(stats: dict[str, Any]) -> float | None:
    used, limit = stats.get("redis_used_memory"), stats.get("redis_maxmemory")
    if used is None or not limit:
        return None
    return used / limit


def format_human(stats: dict[str, Any], postgres: str) -> str:
    """stats() for a person: the global write-back and Redis numbers first, this process's counters last."""
    lines = [f"mode:                     {stats.get('mode')}", f"PostgreSQL:               {postgres}"]
    if not stats.get("redis_enabled"):
        lines.append("Redis:                    not configured (PostgreSQL only)")
    else:
        reachable = redis_reachable(stats)
        lines.append(f"Redis:                    {stats.get('redis_url')} ({'up' if reachable else 'UNREACHABLE'})")
        if reachable:
            fraction = memory_fraction(stats)
            limit = stats.get("redis_maxmemory")
            memory = _size(stats.get("redis_used_memory"))
            if limit and fraction is not None:
                memory += f" of {_size(limit)} ({fraction * 100:.1f} %; alert above {MEMORY_THRESHOLD * 100:.0f} %)"
            elif limit == 0:
                memory += " (no maxmemory limit)"
            lines += [
                "",
                "Write-back (every process sharing this Redis):",
                f"  dirty conversations      {stats.get('dirty_count')} (alert above {DIRTY_THRESHOLD})",
                f"  oldest dirty age         {_age(stats.get('oldest_dirty_age_seconds'))}",
                f"  Redis memory             {memory}",
                f"  maxmemory policy         {stats.get('redis_maxmemory_policy') or _policy_unknown(stats)}",
            ]
            nodes = stats.get("redis_nodes") or []
            if nodes:
                lines.append(f"  Redis Cluster            {len(nodes)} primaries (memory above is their sum)")
                lines += [f"    {describe_node(node)}" for node in nodes]
        hit_rate = stats.get("hit_rate")
        lines += [
            "",
            "This process only (a fresh `chat-history` process starts at 0; the app's own stats() has its numbers):",
            f"  cache hits / misses      {stats.get('cache_hits')} / {stats.get('cache_misses')}"
            + (
                f" (hit rate {hit_rate * 100:.1f} %; target above {HIT_RATE_TARGET * 100:.0f} %)"
                if hit_rate is not None
                else ""
            ),
            (
                f"  flushes                  {stats.get('flushes')}"
                f" ({stats.get('conversations_flushed')} conversations, {stats.get('flush_failures')} failures)"
            ),
            f"  stuck conversations      {len(stats.get('stuck_conversations') or [])}",
            f"  conflict copies kept     {stats.get('conflicts_kept')} (`{PROG} conflicts` lists them)",
            f"  PostgreSQL fallbacks     {stats.get('postgres_fallbacks')}",
        ]
    return "\n".join(lines)


def _policy_unknown(stats: dict[str, Any]) -> str:
    return "differs between primaries (see below)" if stats.get("redis_nodes") else "unknown"


def describe_node(node: dict[str, Any]) -> str:
    """One cluster primary: where, its slots and replicas, memory and eviction policy."""
    used, limit = node.get("used_memory"), node.get("maxmemory")
    memory = f"{_size(used)} used"
    if limit:
        memory += f" of {_size(limit)}" + (f" ({used / limit * 100:.1f} %)" if used is not None else "")
    elif limit == 0:
        memory += ", no maxmemory limit"
    replicas = node.get("replicas")
    return (
        f"{node.get('address')}: {node.get('slots')} slots, {replicas} replica{'s' if replicas != 1 else ''};"
        f" {memory}; maxmemory-policy {node.get('maxmemory_policy') or 'unknown'}"
    )


@dataclass(frozen=True)
class Metric:
    key: str
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    value: Callable[[Any], float | None] = lambda v: None if v is None else float(v)


_THIS_PROCESS = " (this process only: `chat-history stats` starts a fresh one, so 0 there)"
_GLOBAL = " (global: every process sharing this Redis)"

METRICS = (
    Metric("cache_hits", "chat_history_cache_hits_total", "counter", "Reads served from Redis" + _THIS_PROCESS),
    Metric("cache_misses", "chat_history_cache_misses_total", "counter", "Reads Redis could not serve" + _THIS_PROCESS),
    Metric("hit_rate", "chat_history_cache_hit_ratio", "gauge", "Cache hits / (hits + misses)" + _THIS_PROCESS),
    Metric(
        "dirty_count",
        "chat_history_dirty_conversations",
        "gauge",
        "Conversations saved in Redis and not yet written to PostgreSQL" + _GLOBAL,
    ),
    Metric(
        "oldest_dirty_age_seconds",
        "chat_history_oldest_dirty_age_seconds",
        "gauge",
        "Age of the oldest dirty conversation, the write-back lag; 0 when none is dirty" + _GLOBAL,
    ),
    Metric("flushes", "chat_history_flushes_total", "counter", "Write-back runs" + _THIS_PROCESS),
    Metric(
        "conversations_flushed",
        "chat_history_conversations_flushed_total",
        "counter",
        "Conversations written back to PostgreSQL" + _THIS_PROCESS,
    ),
    Metric(
        "flush_failures",
        "chat_history_flush_failures_total",
        "counter",
        "Conversations a write-back could not write (kept dirty, retried)" + _THIS_PROCESS,
    ),
    Metric(
        "conflicts_kept",
        "chat_history_conflicts_kept_total",
        "counter",
        "Copies kept aside in conversation_conflicts after Redis and PostgreSQL diverged" + _THIS_PROCESS,
    ),
    Metric(
        "stuck_conversations",
        "chat_history_stuck_conversations",
        "gauge",
        "Conversations waiting for a retry after PostgreSQL refused them" + _THIS_PROCESS,
        lambda v: None if v is None else float(len(v)),
    ),
    Metric(
        "postgres_fallbacks",
        "chat_history_postgres_fallbacks_total",
        "counter",
        "Calls that went to PostgreSQL because Redis was unavailable" + _THIS_PROCESS,
    ),
    Metric(
        "redis_used_memory",
        "chat_history_redis_used_memory_bytes",
        "gauge",
        "Redis used_memory (INFO memory)" + _GLOBAL,
    ),
    Metric(
        "redis_maxmemory",
        "chat_history_redis_maxmemory_bytes",
        "gauge",
        "Redis maxmemory; 0 means no limit" + _GLOBAL,
    ),
    Metric("reads", "chat_history_reads_total", "counter", "get_conversation calls" + _THIS_PROCESS),
    Metric("lists", "chat_history_lists_total", "counter", "list_conversations calls" + _THIS_PROCESS),
    Metric("saves", "chat_history_saves_total", "counter", "save_conversation calls" + _THIS_PROCESS),
    Metric("deletes", "chat_history_deletes_total", "counter", "delete_conversation calls" + _THIS_PROCESS),
    Metric("errors", "chat_history_errors_total", "counter", "Calls that raised" + _THIS_PROCESS),
)


def _label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


NODE_METRICS = (
    ("slots", "chat_history_redis_node_slots", "Hash slots a Redis Cluster primary serves"),
    ("replicas", "chat_history_redis_node_replicas", "Replicas of a Redis Cluster primary"),
    ("used_memory", "chat_history_redis_node_used_memory_bytes", "A Redis Cluster primary's used_memory"),
    ("maxmemory", "chat_history_redis_node_maxmemory_bytes", "A Redis Cluster primary's maxmemory; 0 means no limit"),
)


def _emit_nodes(out: list[str], nodes: list[dict[str, Any]]) -> None:
    """Per-primary gauges of a Redis Cluster, one family each with a `node` label (host:port)."""
    if not nodes:
        return
    families: list[tuple[str, str, list[tuple[dict[str, Any], float]]]] = [
        (name, help_text, [({"node": n["address"]}, float(n[key])) for n in nodes if n.get(key) is not None])
        for key, name, help_text in NODE_METRICS
    ]
    families.append(
        (
            "chat_history_redis_node_maxmemory_policy_info",
            "A Redis Cluster primary's maxmemory-policy (allkeys-* may evict dirty conversations)",
            [
                ({"node": n["address"], "policy": n["maxmemory_policy"]}, 1.0)
                for n in nodes
                if n.get("maxmemory_policy")
            ],
        )
    )
    for name, help_text, samples in families:
        if not samples:
            continue
        out.append(f"# HELP {name} {_help_text(help_text + _GLOBAL)}")
        out.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{label_text}}} {_number(value)}")


def format_prometheus(stats: dict[str, Any], *, postgres_up: bool | None = None) -> str:
    """stats() in the Prometheus text exposition format (version 0.0.4), ending with a newline.

    Usable by an app for its own counters too: ``format_prometheus(history.stats())``. Numbers that
    stats() does not have (no Redis, Redis unreachable, no read yet) are left out, not reported as 0.
    """
    out: list[str] = []

    def emit(name: str, kind: str, help_text: str, value: float, labels: dict[str, Any] | None = None) -> None:
        out.append(f"# HELP {name} {_help_text(help_text)}")
        out.append(f"# TYPE {name} {kind}")
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"
        out.append(f"{name}{label_text} {_number(float(value))}")

    emit(
        "chat_history_info",
        "gauge",
        "chat_history_rs version and storage mode of the reporting process",
        1,
        {"version": chat_history_rs.__version__, "mode": stats.get("mode", "")},
    )
    if postgres_up is not None:
        emit("chat_history_postgres_up", "gauge", "1 when PostgreSQL answered the reporting process", postgres_up)
    if stats.get("redis_enabled"):
        reachable = redis_reachable(stats)
        emit("chat_history_redis_up", "gauge", "1 when Redis answered the reporting process", reachable)
        shown = dict(stats)
        if shown.get("dirty_count") is not None and shown.get("oldest_dirty_age_seconds") is None:
            shown["oldest_dirty_age_seconds"] = 0.0  # nothing dirty: no lag
        for metric in METRICS:
            value = metric.value(shown.get(metric.key)) if metric.key in shown else None
            if value is not None:
                emit(metric.name, metric.kind, metric.help, value)
        policy = stats.get("redis_maxmemory_policy")
        if policy:
            emit(
                "chat_history_redis_maxmemory_policy_info",
                "gauge",
                "Redis maxmemory-policy (volatile-* or noeviction keep dirty conversations; allkeys-* may evict them)",
                1,
                {"policy": policy},
            )
        _emit_nodes(out, stats.get("redis_nodes") or [])
    else:
        for metric in METRICS:
            value = metric.value(stats.get(metric.key))
            if metric.key in ("reads", "lists", "saves", "deletes", "errors") and value is not None:
                emit(metric.name, metric.kind, metric.help, value)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def cmd_init_db(args: argparse.Namespace) -> int:
    settings = resolve_settings(args, redis="never")
    manager = open_manager(args, settings)
    try:
        where = describe_postgres(manager)
    finally:
        manager.close()
    print(
        f"schema ready at {where}: conversations, messages, conversation_tombstones, conversation_conflicts"
        " (created when missing;"
    )
    print("existing tables and rows are left as they were)")
    return EXIT_OK


def cmd_flush(args: argparse.Namespace) -> int:
    if args.loop:
        return run_flush_worker(args)
    if args.interval is not None:
        raise CliError("--interval needs --loop", EXIT_USAGE)
    settings = resolve_settings(args, redis="required")
    manager = open_manager(args, settings)
    verbose = args.verbose > 0
    try:
        redis_where = manager.stats().get("redis_url", "Redis")
        # WARNINGs from a flush that fails say what the one-line error below says; ERRORs still show.
        with _library_log_level(logging.ERROR, verbose):
            written = manager.flush_dirty_conversations()
        stats = manager.stats()
    except UnavailableError as exc:
        close_quietly(manager, verbose)  # its flush would fail the same way, and say so twice
        message = str(exc)
        if message.startswith("Redis") and redis_where not in message:
            message += f" (Redis at {redis_where})"
        raise CliError(f"flush failed; nothing is lost, dirty conversations stay in Redis: {message}") from None
    except BaseException:
        close_quietly(manager, verbose)
        raise
    manager.close()
    print(f"wrote {written} conversation{'s' if written != 1 else ''} back to PostgreSQL")
    stuck = stats.get("stuck_conversations") or []
    dirty = stats.get("dirty_count")
    if dirty:
        print(f"{dirty} still dirty in Redis (saved since the flush began, or refused by PostgreSQL)")
    if stuck:
        shown = ", ".join(map(str, stuck[:10])) + (" ..." if len(stuck) > 10 else "")
        _error(f"{len(stuck)} could not be written and stay dirty in Redis (see the log above): {shown}")
        return EXIT_FAILED
    return EXIT_OK


class StopSignals:
    """SIGTERM and SIGINT ask the worker to stop after the current batch; a second one ends it at once.

    The handler only records the request: the flush runs in Rust with the GIL released, and Python
    runs the handler once the call returns, so a batch in flight is always finished.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), signal.SIGINT) if s is not None)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum
            # A second signal takes the default action: an operator can always end it at once (what is
            # dirty then simply stays in Redis for the next flush).
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            raise CliError("flush --loop must run in the main thread (it handles SIGTERM and SIGINT)")
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def sleep(self, seconds: float) -> None:
        """Sleep until `seconds` pass or a stop is requested (checked every 0.2 s)."""
        deadline = time.monotonic() + seconds
        while self.received is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.2))

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


def _flush_run(manager: ChatHistoryManager, interval: float) -> None:
    """One write-back run of the worker, logged; errors are logged and the next run retries."""
    started = time.monotonic()
    try:
        written = manager.flush_dirty_conversations()
    except UnavailableError as exc:
        log.warning("flush run failed, retrying in %g s; nothing is lost (it stays dirty in Redis): %s", interval, exc)
        return
    except ChatHistoryError as exc:
        log.error("flush run failed, retrying in %g s: %s", interval, exc)
        return
    stats = manager.stats()
    log.info(
        "flush run: %d written in %.3f s; %s dirty (oldest %s); %d stuck",
        written,
        time.monotonic() - started,
        stats.get("dirty_count"),
        _age(stats.get("oldest_dirty_age_seconds")),
        len(stats.get("stuck_conversations") or []),
    )


def run_flush_worker(args: argparse.Namespace) -> int:
    interval = 10.0 if args.interval is None else args.interval
    if not interval > 0 or math.isinf(interval):
        raise CliError(f"--interval must be a positive number of seconds, got {interval}", EXIT_USAGE)
    settings = resolve_settings(args, redis="required")
    stop = StopSignals()
    with stop.installed():
        manager = open_manager(args, settings)
        stats = manager.stats()
        log.info(
            "flush worker started: PostgreSQL %s, Redis %s, every %g s (stop with SIGTERM or Ctrl-C)",
            describe_postgres(manager),
            stats.get("redis_url"),
            interval,
        )
        try:
            while stop.received is None:
                _flush_run(manager, interval)
                stop.sleep(interval)
            log.info("received %s: final flush, then exit", stop.name)
        finally:
            manager.close()  # the final flush; it logs what it could not write
    log.info("flush worker stopped")
    return EXIT_OK


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


def cmd_conflicts(args: argparse.Namespace) -> int:
    """Lists kept conflict copies, shows one with its messages (--show), or restores one (--restore)."""
    settings = resolve_settings(args, redis="optional")
    manager = open_manager(args, settings)
    try:
        if args.restore is not None:
            conversation_id, user_id = manager.restore_conflict(args.restore)
            print(f"restored copy {args.restore} as conversation {conversation_id} of user {user_id}")
            return EXIT_OK
        conflict_id = args.show
        kept = manager.list_conflicts(args.user, conflict_id=conflict_id, limit=args.limit)
    finally:
        close_quietly(manager, args.verbose > 0)
    if conflict_id is not None and not kept:
        raise CliError(f"no kept copy has conflict_id {conflict_id}", EXIT_FAILED)
    if args.json:
        print(json.dumps(kept))
        return EXIT_OK
    if not kept:
        print("no conflict copies kept")
        return EXIT_OK
    for c in kept:
        conv = c["conversation"]
        restored = f", restored {c['restored_at']}" if c["restored_at"] else ""
        print(
            f"{c['conflict_id']}  conversation {c['conversation_id']}  user {c['user_id']}  "
            f"{len(conv['messages'])} messages  kept {c['kept_at']}{restored}"
        )
        print(f"    {c['reason']}; title {conv['title']!r}")
        if conflict_id is not None:
            for m in conv["messages"]:
                print(f"    [{m['time']}] {m['role']}: {m['content']}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    """Prints the report; exits 1 when PostgreSQL or Redis could not be reached (the report says which)."""
    settings = resolve_settings(args, redis="optional")
    try:
        manager = open_manager(args, settings)
    except UnavailableError:
        if args.format == "prometheus":
            # The scrape still says something useful: PostgreSQL is down (docs/monitoring.md).
            sys.stdout.write(format_prometheus({"mode": "postgres"}, postgres_up=False))
        raise
    verbose = args.verbose > 0
    try:
        with _library_log_level(logging.CRITICAL, verbose):
            problem = postgres_probe(manager)
            stats = manager.stats()
        postgres = describe_postgres(manager)
    finally:
        close_quietly(manager, verbose)
    if args.format == "json":
        print(json.dumps({**stats, "postgres_available": problem is None}))
    elif args.format == "prometheus":
        sys.stdout.write(format_prometheus(stats, postgres_up=problem is None))
    else:
        print(format_human(stats, postgres if problem is None else f"UNREACHABLE: {problem}"))
    if problem is not None:
        _error(str(problem))
        return EXIT_FAILED
    if stats.get("redis_enabled") and not redis_reachable(stats):
        _error(f"Redis is unavailable at {stats.get('redis_url')}")
        return EXIT_FAILED
    return EXIT_OK


@dataclass
class Check:
    status: str  # "OK", "WARN" or "FAIL"
    name: str
    detail: str


class Doctor:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.checks: list[Check] = []

    def report(self, status: str, name: str, detail: str) -> None:
        self.checks.append(Check(status, name, detail))
        print(f"{status:<5} {name}: {detail}", file=self.out, flush=True)

    def exit_code(self) -> int:
        return max((DOCTOR_EXIT[c.status] for c in self.checks), default=EXIT_OK)

    def summary(self) -> str:
        counts = {s: sum(c.status == s for c in self.checks) for s in ("OK", "WARN", "FAIL")}
        return f"{counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL"


def eviction_policy_check(policy: str | None) -> tuple[str, str]:
    if policy is None:
        return "WARN", "could not be read (INFO memory); make sure it is volatile-lru or noeviction"
    if policy.startswith("allkeys-"):
        return (
            "WARN",
            (
                f"{policy} may evict dirty conversations that were never written to PostgreSQL;"
                " set maxmemory-policy volatile-lru (dirty keys have no TTL, so volatile-* never evicts them)"
            ),
        )
    if policy.startswith("volatile-"):
        return "OK", f"{policy}: only keys with a TTL (clean copies) can be evicted; dirty ones are kept"
    if policy == "noeviction":
        return "OK", "noeviction: nothing is evicted; when Redis is full, saves go straight to PostgreSQL"
    return "WARN", f"{policy}: unknown policy; volatile-lru is the safe choice for write-back"


def cmd_doctor(args: argparse.Namespace) -> int:
    doctor = Doctor(sys.stdout)
    try:
        _diagnose(args, doctor)
    finally:
        code = doctor.exit_code()
        print(f"doctor: {doctor.summary()} (exit {code})", file=sys.stdout)
    return code


def _diagnose(args: argparse.Namespace, doctor: Doctor) -> None:
    try:
        settings = resolve_settings(args, redis="optional")
    except CliError as exc:
        doctor.report("FAIL", "configuration", str(exc))
        return
    try:
        manager = open_manager(args, settings)
    except ConfigurationError as exc:
        doctor.report("FAIL", "configuration", str(exc))
        return
    except UnavailableError as exc:
        doctor.report("FAIL", "PostgreSQL", str(exc))
        return
    except ChatHistoryError as exc:
        # Reached, but refused: the schema statements at start (no CREATE right, say).
        doctor.report("FAIL", "schema", f"{exc}")
        return
    try:
        _diagnose_with(manager, args, settings, doctor)
    finally:
        close_quietly(manager, args.verbose > 0)


def _diagnose_cluster(nodes: list[dict[str, Any]], doctor: Doctor) -> None:
    """A Redis Cluster: how many primaries, then a line per primary (`Redis shard N`), which warns when its
    policy may evict dirty data or its memory is past the threshold (one full shard refuses saves even
    when the sum looks fine)."""
    covered = sum(n.get("slots") or 0 for n in nodes)
    doctor.report(
        "OK" if covered == CLUSTER_SLOTS else "WARN",
        "Redis mode",
        f"cluster ({len(nodes)} primar{'ies' if len(nodes) != 1 else 'y'}, {covered} of {CLUSTER_SLOTS} slots"
        " served); cluster key layout"
        + ("" if covered == CLUSTER_SLOTS else "; keys in the slots no primary serves cannot be read or saved"),
    )
    for index, node in enumerate(nodes, start=1):
        status, why = "OK", ""
        policy = node.get("maxmemory_policy")
        if policy is None or node.get("used_memory") is None:
            status, why = "WARN", "; INFO memory could not be read on this primary"
        elif eviction_policy_check(policy)[0] != "OK":
            status, why = "WARN", f"; {eviction_policy_check(policy)[1]}"
        used, limit = node.get("used_memory"), node.get("maxmemory")
        if used is not None and limit and used / limit > MEMORY_THRESHOLD:
            status = "WARN"
            why += f"; above {MEMORY_THRESHOLD * 100:.0f} % of maxmemory: flush, or scale the cache out"
        doctor.report(status, f"Redis shard {index}", describe_node(node) + why)


def _diagnose_with(manager: ChatHistoryManager, args: argparse.Namespace, settings: Settings, doctor: Doctor) -> None:
    postgres = describe_postgres(manager)
    with _library_log_level(logging.CRITICAL, args.verbose > 0):
        problem = postgres_probe(manager)
    if isinstance(problem, UnavailableError):
        doctor.report("FAIL", "PostgreSQL", str(problem))
    else:
        status, tls = postgres_tls(postgres)
        doctor.report(status, "PostgreSQL", f"connected to {postgres} ({tls})")
        if problem is None:
            doctor.report("OK", "schema", "conversations table readable (the tables are created at start when missing)")
        else:
            doctor.report("FAIL", "schema", f"{problem}; `chat-history init-db` creates the tables")
    if not settings.use_redis:
        detail = "not configured: PostgreSQL only (pass --redis-url or set REDIS_CONNECTION_STRING to check it)"
        doctor.report("OK", "Redis", detail)
        return
    with _library_log_level(logging.CRITICAL, args.verbose > 0):
        stats = manager.stats()
    redis_url = stats.get("redis_url", "Redis")
    if not redis_reachable(stats):
        doctor.report("FAIL", "Redis", f"unreachable at {redis_url} (within {args.redis_timeout:g} s)")
        return
    status, tls = redis_tls(redis_url)
    doctor.report(status, "Redis", f"connected to {redis_url} ({tls})")
    nodes = stats.get("redis_nodes") or []
    if nodes:
        _diagnose_cluster(nodes, doctor)
    elif stats.get("redis_layout") == "cluster":
        doctor.report(
            "OK",
            "Redis mode",
            "one endpoint, not a Redis Cluster; cluster key layout (redis_cluster=True, as Azure's Enterprise"
            " clustering policy needs)",
        )
    policies = sorted({str(n.get("maxmemory_policy")) for n in nodes})
    if len(policies) > 1:
        doctor.report(
            "WARN",
            "Redis eviction policy",
            f"the primaries do not agree ({', '.join(policies)}); set volatile-lru on every one",
        )
    else:
        status, detail = eviction_policy_check(stats.get("redis_maxmemory_policy"))
        doctor.report(status, "Redis eviction policy", detail + (" (every primary)" if nodes else ""))
    fraction = memory_fraction(stats)
    used = _size(stats.get("redis_used_memory"))
    if stats.get("redis_used_memory") is None:
        doctor.report("WARN", "Redis memory", "used_memory could not be read")
    elif fraction is None:
        doctor.report("OK", "Redis memory", f"{used} used, no maxmemory limit")
    else:
        limit = _size(stats.get("redis_maxmemory"))
        over = fraction > MEMORY_THRESHOLD
        doctor.report(
            "WARN" if over else "OK",
            "Redis memory",
            f"{used} of {limit} ({fraction * 100:.1f} %; threshold {MEMORY_THRESHOLD * 100:.0f} %)"
            + ("; flush, raise maxmemory or move to a larger cache" if over else ""),
        )
    dirty = stats.get("dirty_count") or 0
    over = dirty > args.max_dirty
    doctor.report(
        "WARN" if over else "OK",
        "write-back backlog",
        f"{dirty} dirty conversation{'s' if dirty != 1 else ''} (threshold {args.max_dirty})"
        + ("; is a flusher running? try `chat-history flush`" if over else ""),
    )
    age = stats.get("oldest_dirty_age_seconds")
    if age is None:
        doctor.report("OK", "write-back lag", f"nothing dirty (threshold {args.max_dirty_age:g} s)")
    else:
        over = age > args.max_dirty_age
        doctor.report(
            "WARN" if over else "OK",
            "write-back lag",
            f"oldest dirty conversation is {_age(age)} old (threshold {args.max_dirty_age:g} s)"
            + ("; no flusher is running, or PostgreSQL refuses it (see the app's logs)" if over else ""),
        )
    if settings.redis_enabled_env is False and dirty:
        doctor.report(
            "WARN",
            "rollback",
            f"REDIS_ENABLED is false but {dirty} conversations in Redis were never written to PostgreSQL:"
            " run `chat-history flush` before removing Redis",
        )


# --------------------------------------------------------------------------------------------------
# The parser and main()
# --------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Operator tools for chat_history_rs: create the schema, write Redis back to PostgreSQL (once, or as
a standalone worker), report stats (text, JSON, Prometheus) and check a deployment (doctor).

Settings come from the flags, else from the environment the library reads: DATABASE_URL (else the
example app's POSTGRES_HOST, POSTGRES_PORT, POSTGRES_ADMIN_LOGIN, POSTGRES_ADMIN_PASSWORD,
POSTGRES_DATABASE, POSTGRES_SSLMODE), REDIS_CONNECTION_STRING (or REDIS_HOST, REDIS_PORT,
REDIS_PASSWORD, REDIS_SSL), REDIS_CA_FILE, REDIS_CLUSTER. stats and doctor look at Redis whenever one is
configured, even with REDIS_ENABLED=false: during a rollback that is where unsaved chats are.
"""

EPILOG = """\
exit codes: 0 done (doctor: all OK); 1 failed, e.g. a server unreachable (doctor: warnings);
2 usage error (doctor: a check failed); 130 interrupted. Passwords are never printed.
"""

STATS_HELP = """\
Print stats(). Hit/miss, flush and call counters belong to the process that reports them, and this
command is a fresh process: they are 0 here (the app's own stats() has the app's; Azure Monitor has
Redis's cachehits/cachemisses). The gauges are global, shared by every process on this Redis: dirty
conversations, oldest dirty age (the write-back lag), Redis memory and eviction policy.
Note: like every manager, the one this command opens writes back what is dirty when it closes."""

DOCTOR_HELP = f"""\
Check a deployment: PostgreSQL reachable (and its sslmode), the schema, Redis reachable (and TLS),
on a Redis Cluster its primaries (each one's slots, memory and policy),
Redis's eviction policy (allkeys-* is a WARN: it may evict dirty data), Redis memory (WARN above
{MEMORY_THRESHOLD * 100:.0f} %), dirty conversations (WARN above --max-dirty) and their age (WARN above
--max-dirty-age). Each check prints OK, WARN or FAIL. Exit 0 all OK, 1 a WARN, 2 a FAIL (Nagios
convention). Opening a manager creates missing tables, and closing it writes back what is dirty."""

FLUSH_HELP = """\
Write conversations that are dirty in Redis back to PostgreSQL, once (prints how many; exit 1 if
some could not be written), or with --loop as a standalone write-back worker: flushes every
--interval seconds, logs each run, and on SIGTERM or SIGINT finishes the batch in flight, makes a
final flush and exits 0 (a second signal ends it at once; what is dirty stays in Redis)."""


def build_parser() -> argparse.ArgumentParser:
    # The connection options are accepted before or after the command. SUPPRESS keeps a subparser from
    # overwriting a value given before the command with its default (an argparse quirk).
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connections")
    group.add_argument(
        "--database-url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="PostgreSQL URL or key=value string (default: $DATABASE_URL)",
    )
    group.add_argument(
        "--redis-url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="redis:// or rediss:// URL (default: $REDIS_CONNECTION_STRING, or $REDIS_HOST and friends)",
    )
    group.add_argument(
        "--connect-timeout",
        metavar="S",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds to connect to PostgreSQL (default 5)",
    )
    group.add_argument(
        "--redis-timeout",
        metavar="S",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds for a Redis connect or command (default 0.5; more for a distant cache)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more (logger chat_history_rs): -v INFO, -vv DEBUG",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {chat_history_rs.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=EPILOG,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    init_db = add(
        "init-db",
        "create the PostgreSQL schema when missing",
        "Create the tables (conversations, messages, conversation_tombstones, conversation_conflicts) and\n"
        "indexes when missing.\n"
        "Existing tables and rows are never altered destructively. Redis is not used.",
    )
    init_db.set_defaults(func=cmd_init_db)

    flush = add("flush", "write dirty conversations back to PostgreSQL (once, or --loop)", FLUSH_HELP)
    flush.add_argument("--loop", action="store_true", help="run as a write-back worker until SIGTERM/SIGINT")
    flush.add_argument(
        "--interval", metavar="S", type=float, default=None, help="seconds between runs with --loop (default 10)"
    )
    flush.add_argument(
        "--close-timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="seconds the final flush may take (default 30)",
    )
    flush.set_defaults(func=cmd_flush)

    conflicts = add(
        "conflicts",
        "list, show or restore copies kept aside when Redis and PostgreSQL diverged",
        "When a copy in Redis and one in PostgreSQL diverge (a write made while Redis was unreachable,\n"
        "a seed-design writer, an id PostgreSQL gives to another user), the newer stays the\n"
        "conversation and the other is kept in the table conversation_conflicts, unless all its\n"
        'messages are already in the one that stays (docs/design.md, "Divergence"). This lists them,\n'
        "shows one with its messages, or makes one the conversation again (the copy it replaces is\n"
        "kept aside in turn, so a restore loses nothing).",
    )
    conflicts.add_argument("--user", metavar="USER_ID", default=None, help="only this user's copies")
    conflicts.add_argument("--limit", metavar="N", type=int, default=100, help="at most N copies (default 100)")
    conflicts.add_argument("--json", action="store_true", help="as a JSON array")
    action = conflicts.add_mutually_exclusive_group()
    action.add_argument("--show", metavar="ID", type=int, default=None, help="one copy, with its messages")
    action.add_argument("--restore", metavar="ID", type=int, default=None, help="make copy ID the conversation again")
    conflicts.set_defaults(func=cmd_conflicts, close_timeout=30.0)

    stats = add("stats", "print stats(): text, --json or --prometheus", STATS_HELP)
    fmt = stats.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="stats() as a JSON object")
    fmt.add_argument(
        "--prometheus",
        dest="format",
        action="store_const",
        const="prometheus",
        help="Prometheus text exposition format (for node_exporter's textfile collector)",
    )
    stats.add_argument("--no-redis", action="store_true", help="report PostgreSQL only, even if Redis is configured")
    stats.set_defaults(func=cmd_stats, format="text", close_timeout=5.0)

    doctor = add("doctor", "check connectivity, schema, eviction policy and write-back lag", DOCTOR_HELP)
    doctor.add_argument(
        "--max-dirty",
        metavar="N",
        type=int,
        default=DIRTY_THRESHOLD,
        help=f"WARN above this many dirty conversations (default {DIRTY_THRESHOLD}, the seed's threshold)",
    )
    doctor.add_argument(
        "--max-dirty-age",
        metavar="S",
        type=float,
        default=DIRTY_AGE_THRESHOLD,
        help=f"WARN when the oldest dirty conversation is older (default {DIRTY_AGE_THRESHOLD:g} s)",
    )
    doctor.add_argument("--no-redis", action="store_true", help="check PostgreSQL only, even if Redis is configured")
    doctor.set_defaults(func=cmd_doctor, close_timeout=5.0)
    return parser


@contextlib.contextmanager
def _logging_to_stderr(verbose: int, worker: bool) -> Iterator[None]:
    """A handler on the ``chat_history_rs`` logger for this run, removed afterwards (main() may be called
    more than once in a process). -v INFO, -vv DEBUG; the worker logs its runs at INFO by default."""
    logger = logging.getLogger("chat_history_rs")
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 or worker else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("database_url", None), ("redis_url", None), ("verbose", 0)):
        if not hasattr(args, name):
            setattr(args, name, default)
    args.connect_timeout = getattr(args, "connect_timeout", 5.0)
    args.redis_timeout = getattr(args, "redis_timeout", 0.5)
    if not args.connect_timeout > 0 or not args.redis_timeout > 0:
        parser.error("--connect-timeout and --redis-timeout must be more than 0 seconds")
    worker = args.command == "flush" and args.loop
    with _logging_to_stderr(args.verbose, worker):
        try:
            return args.func(args)
        except CliError as exc:
            if exc.code == EXIT_USAGE:
                parser.error(str(exc))
            _error(str(exc))
            return exc.code
        except ConfigurationError as exc:
            _error(f"configuration: {exc}")
            return EXIT_FAILED
        except ChatHistoryError as exc:
            # UnavailableError names the server and never holds a password (the library redacts).
            _error(str(exc))
            return EXIT_FAILED
        except KeyboardInterrupt:
            _error("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # `chat-history stats | head`: the reader left. Python would complain again at exit while
            # flushing stdout, so point stdout at /dev/null first.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_FAILED


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover - `python -m chat_history_rs` goes through __main__.py
    sys.exit(main())
