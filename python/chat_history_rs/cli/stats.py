"""``chat-history stats``: stats() as text for a person, as JSON, or in the Prometheus text format."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import chat_history_rs
from chat_history_rs import UnavailableError
from chat_history_rs.cli.common import (
    DIRTY_THRESHOLD,
    EXIT_FAILED,
    EXIT_OK,
    HIT_RATE_TARGET,
    MEMORY_THRESHOLD,
    PROG,
    close_quietly,
    describe_node,
    human_age,
    human_size,
    library_log_level,
    memory_fraction,
    missing_schema,
    open_manager,
    postgres_probe,
    print_error,
    redis_reachable,
    resolve_settings,
)

HELP = """\
Print stats(). Hit/miss, flush and call counters belong to the process that reports them, and this
command is a fresh process: they are 0 here (the app's own stats() has the app's; Azure Monitor has
Redis's cachehits/cachemisses). The gauges are global, shared by every process on this Redis: dirty
conversations, oldest dirty age (the write-back lag), Redis memory and eviction policy.
This command only looks: it writes nothing back (what is dirty stays dirty, so the lag it reports is
the deployment's) and creates no table. "mode" is the app's mode here (--mode, else CHAT_HISTORY_MODE
with REDIS_ENABLED; unset, the servers configured)."""


def add_parser(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    stats = add("stats", "print stats(): text, --json or --prometheus", HELP)
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


def format_human(stats: Mapping[str, Any], postgres: str) -> str:
    """stats() for a person: the global write-back and Redis numbers first, this process's counters last."""
    lines = [f"mode:                     {stats.get('mode')}", f"PostgreSQL:               {postgres}"]
    if not stats.get("redis_enabled"):
        lines.append("Redis:                    not configured (PostgreSQL only)")
    else:
        reachable = redis_reachable(stats)
        state = "up" if reachable else f"UNREACHABLE: {stats.get('redis_error') or 'no answer'}"
        lines.append(f"Redis:                    {stats.get('redis_url')} ({state})")
        if stats.get("mode") == "postgres":
            lines.append("                          (configured, but not used by the app in postgres mode)")
        if reachable:
            fraction = memory_fraction(stats)
            limit = stats.get("redis_maxmemory")
            memory = human_size(stats.get("redis_used_memory"))
            if limit and fraction is not None:
                alert = f"alert above {MEMORY_THRESHOLD * 100:.0f} %"
                memory += f" of {human_size(limit)} ({fraction * 100:.1f} %; {alert})"
            elif limit == 0:
                memory += " (no maxmemory limit)"
            lines += [
                "",
                "Write-back (every process sharing this Redis):",
                f"  dirty conversations      {stats.get('dirty_count')} (alert above {DIRTY_THRESHOLD})",
                f"  oldest dirty age         {human_age(stats.get('oldest_dirty_age_seconds'))}",
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
            f"  near cache               {describe_near_cache(stats)}",
        ]
    return "\n".join(lines)


def describe_near_cache(stats: Mapping[str, Any]) -> str:
    """One line: whether the near cache serves, its hits and invalidations, and its size."""
    if not stats.get("near_cache_enabled"):
        return "off (near_cache_bytes=0)"
    state = "serving" if stats.get("near_cache_tracking") else "not serving (no invalidation connection yet)"
    return (
        f"{state}; {stats.get('near_cache_hits')} hits, {stats.get('near_cache_misses')} misses,"
        f" {stats.get('near_cache_invalidations')} invalidations; {stats.get('near_cache_entries')} entries,"
        f" {human_size(stats.get('near_cache_bytes'))} of {human_size(stats.get('near_cache_limit_bytes'))}"
    )


def _policy_unknown(stats: Mapping[str, Any]) -> str:
    return "differs between primaries (see below)" if stats.get("redis_nodes") else "unknown"


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
    Metric(
        "cache_hits",
        "chat_history_cache_hits_total",
        "counter",
        "Reads served from the cache, Redis or the near cache" + _THIS_PROCESS,
    ),
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
    Metric(
        "near_cache_hits",
        "chat_history_near_cache_hits_total",
        "counter",
        "Reads answered by the near cache in the process, without a Redis round trip" + _THIS_PROCESS,
    ),
    Metric(
        "near_cache_misses",
        "chat_history_near_cache_misses_total",
        "counter",
        "Reads the near cache could not answer while it was serving" + _THIS_PROCESS,
    ),
    Metric(
        "near_cache_invalidations",
        "chat_history_near_cache_invalidations_total",
        "counter",
        "Near-cache copies dropped because Redis said their key changed" + _THIS_PROCESS,
    ),
    Metric(
        "near_cache_evictions",
        "chat_history_near_cache_evictions_total",
        "counter",
        "Near-cache copies dropped to stay within near_cache_bytes" + _THIS_PROCESS,
    ),
    Metric(
        "near_cache_resets",
        "chat_history_near_cache_resets_total",
        "counter",
        "Times the near cache lost its invalidation connection and was emptied" + _THIS_PROCESS,
    ),
    Metric(
        "near_cache_entries",
        "chat_history_near_cache_entries",
        "gauge",
        "Conversations and lists the near cache holds" + _THIS_PROCESS,
    ),
    Metric(
        "near_cache_bytes",
        "chat_history_near_cache_bytes",
        "gauge",
        "Bytes the near cache holds (bounded by near_cache_bytes)" + _THIS_PROCESS,
    ),
    Metric(
        "near_cache_tracking",
        "chat_history_near_cache_serving",
        "gauge",
        "1 while Redis vouches for the near cache (invalidations flowing) and it serves reads" + _THIS_PROCESS,
    ),
    Metric(
        "feed_following",
        "chat_history_feed_following",
        "gauge",
        "1 while this process applies PostgreSQL's changes to its Redis (one process per Redis does)" + _THIS_PROCESS,
    ),
    Metric(
        "feed_changes_applied",
        "chat_history_feed_changes_applied_total",
        "counter",
        "Changes PostgreSQL committed that this process applied to its Redis" + _THIS_PROCESS,
    ),
    Metric(
        "feed_copies_dropped",
        "chat_history_feed_copies_dropped_total",
        "counter",
        "Copies dropped because PostgreSQL held a newer row or a delete" + _THIS_PROCESS,
    ),
    Metric(
        "feed_divergences",
        "chat_history_feed_divergences_total",
        "counter",
        "Dirty copies older than PostgreSQL's row, resolved by the flush" + _THIS_PROCESS,
    ),
    Metric(
        "feed_resyncs", "chat_history_feed_resyncs_total", "counter", "Full resyncs of the change feed" + _THIS_PROCESS
    ),
    Metric(
        "feed_lag_seconds",
        "chat_history_feed_lag_seconds",
        "gauge",
        "Seconds since the following process last read PostgreSQL's changes to the end" + _THIS_PROCESS,
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


def format_prometheus(stats: Mapping[str, Any], *, postgres_up: bool | None = None) -> str:
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


def cmd_stats(args: argparse.Namespace) -> int:
    """Prints the report; exits 1 when PostgreSQL or Redis could not be reached (the report says which).
    Writes nothing: the manager is opened to inspect (no write-back, not even on close; no table made)."""
    settings = resolve_settings(args, redis="optional")
    try:
        manager = open_manager(args, settings, inspect=True)
    except UnavailableError:
        if args.format == "prometheus":
            # The scrape still says something useful: PostgreSQL is down (docs/monitoring.md).
            sys.stdout.write(format_prometheus({"mode": settings.mode}, postgres_up=False))
        raise
    verbose = args.verbose > 0
    try:
        with library_log_level(logging.CRITICAL, verbose):
            problem = postgres_probe(manager)
            stats: dict[str, Any] = dict(manager.stats())
        postgres = settings.postgres_url
    finally:
        close_quietly(manager, verbose)
    # The app's mode, not the manager's: this one looks at Redis whenever one is configured.
    stats["mode"] = settings.mode
    if args.format == "json":
        print(json.dumps({**stats, "postgres_available": problem is None}))
    elif args.format == "prometheus":
        sys.stdout.write(format_prometheus(stats, postgres_up=problem is None))
    else:
        print(format_human(stats, postgres if problem is None else f"UNREACHABLE: {problem}"))
    if problem is not None and missing_schema(problem):
        # This command creates no table: the database was never initialised.
        print_error(f"{problem}; the tables are missing: run `{PROG} init-db`")
        return EXIT_FAILED
    if problem is not None:
        print_error(str(problem))
        return EXIT_FAILED
    if stats.get("redis_enabled") and not redis_reachable(stats):
        why = stats.get("redis_error")
        print_error(f"Redis is unavailable at {stats.get('redis_url')}" + (f": {why}" if why else ""))
        return EXIT_FAILED
    return EXIT_OK
