"""``chat-history doctor``: check a deployment (PostgreSQL and its sslmode, the schema, Redis and its TLS, a
Redis Cluster's primaries, the eviction policy, memory, the write-back backlog and lag); each check prints
OK, WARN or FAIL, and the exit code follows the Nagios convention."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import time
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from chat_history_rs import (
    ChatHistoryError,
    ChatHistoryManager,
    ConfigurationError,
    ResolvedSettings,
    UnavailableError,
)
from chat_history_rs.cli.common import (
    CLUSTER_SLOTS,
    DIRTY_AGE_THRESHOLD,
    DIRTY_THRESHOLD,
    DOCTOR_EXIT,
    EXIT_OK,
    MEMORY_THRESHOLD,
    CliError,
    Settings,
    close_quietly,
    describe_node,
    is_redis_misconfiguration,
    human_age,
    human_size,
    library_log_level,
    memory_fraction,
    missing_schema,
    open_manager,
    postgres_probe,
    redis_reachable,
    resolve_settings,
)

HELP = f"""\
Check a deployment: PostgreSQL reachable (and its sslmode), the schema, Redis reachable (and TLS),
on a Redis Cluster its primaries (each one's slots, memory and policy),
Redis's eviction policy (allkeys-* is a WARN: it may evict dirty data), Redis memory (WARN above
{MEMORY_THRESHOLD * 100:.0f} %), dirty conversations (WARN above --max-dirty) and their age (WARN above
--max-dirty-age). Each check prints OK, WARN or FAIL. Exit 0 all OK, 1 a WARN, 2 a FAIL (Nagios
convention). It only looks: it creates no table (a missing schema is a FAIL naming `chat-history
init-db`) and writes nothing back. A Redis whose settings do not fit the server (a wrong password, TLS
on one side only, a database number on a cluster, a server that is not Redis) is a FAIL naming the
cause, as it is a ConfigurationError for the app."""


def add_parser(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    doctor = add("doctor", "check connectivity, schema, eviction policy and write-back lag", HELP)
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


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "") or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def postgres_tls(resolved: ResolvedSettings | None) -> tuple[str, str]:
    """(status, words) for the sslmode PostgreSQL is reached with, as the library resolved it."""
    sslmode = (resolved.postgres_sslmode if resolved else None) or "prefer"
    words = {
        "disable": "no TLS",
        "allow": "TLS only if the server insists, unverified",
        "prefer": "TLS when the server offers it, unverified",
        "require": "TLS, certificate not verified",
        "verify-ca": "TLS, certificate chain verified",
        "verify-full": "TLS, certificate chain and host name verified",
    }.get(sslmode, f"sslmode={sslmode}")
    hosts = resolved.postgres_host_names if resolved else []
    remote = [h for h in hosts if not _is_loopback(h)]
    if remote and sslmode in ("disable", "allow", "prefer"):
        return "WARN", f"sslmode={sslmode}: {words}; use sslmode=require or verify-full for a remote server"
    return "OK", f"sslmode={sslmode}: {words}"


def redis_tls(resolved: ResolvedSettings | None) -> tuple[str, str]:
    """(status, words) for Redis's TLS, as the library resolved it."""
    tls = resolved.redis_tls if resolved else None
    if tls and not (resolved and resolved.redis_certificate_verified):
        return "WARN", "rediss://: TLS, certificate NOT verified (#insecure or ssl_cert_reqs=none)"
    if tls:
        return "OK", "rediss://: TLS, certificate and host name verified"
    if not _is_loopback((resolved.redis_host_name if resolved else None) or ""):
        return "WARN", "redis://: no TLS to a remote server; use rediss:// (Azure: port 6380)"
    return "OK", "redis://: no TLS (loopback)"


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
    doctor.report("OK", "mode", _describe_mode(settings))
    redis_refused: ChatHistoryError | None = None
    try:
        try:
            manager = open_manager(args, settings, inspect=True)
        except ConfigurationError as exc:
            if not (settings.use_redis and is_redis_misconfiguration(exc)):
                raise
            # Redis's settings do not fit the server: the app would refuse to start. PostgreSQL is
            # still worth checking, without Redis.
            redis_refused = exc
            manager = open_manager(args, settings, inspect=True, use_redis=False)
    except ConfigurationError as exc:
        doctor.report("FAIL", "configuration", str(exc))
        return
    except UnavailableError as exc:
        doctor.report("FAIL", "PostgreSQL", str(exc))
        return
    except ChatHistoryError as exc:
        doctor.report("FAIL", "PostgreSQL", f"{exc}")
        return
    try:
        _diagnose_with(manager, args, settings, doctor, redis_refused)
    finally:
        close_quietly(manager, args.verbose > 0)


def _describe_mode(settings: Settings) -> str:
    where = {"local": "JSON files", "postgres": "PostgreSQL", "redis": "Redis over PostgreSQL, write-back"}
    source = "no mode set: the servers configured" if settings.mode_source == "default" else settings.mode_source
    return f"{settings.mode}: {where.get(settings.mode, settings.mode)} ({source})"


def _diagnose_cluster(nodes: Sequence[Mapping[str, Any]], doctor: Doctor) -> None:
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


NEAR_CACHE_WAIT = 3.0


def _diagnose_near_cache(manager: ChatHistoryManager, doctor: Doctor) -> None:
    """Whether Redis keeps the near cache correct: its tracking connections come up within a few
    seconds of the first call, or Redis refused CLIENT TRACKING (the app's log says why)."""
    stats = manager.stats()
    if not stats.get("near_cache_enabled"):
        doctor.report("OK", "near cache", "off (near_cache_bytes=0): every read goes to Redis")
        return
    deadline = time.monotonic() + NEAR_CACHE_WAIT
    while not stats.get("near_cache_tracking") and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = manager.stats()
    limit = human_size(stats.get("near_cache_limit_bytes"))
    if stats.get("near_cache_tracking"):
        doctor.report("OK", "near cache", f"Redis tracks it (CLIENT TRACKING, every node); up to {limit} per manager")
    else:
        doctor.report(
            "WARN",
            "near cache",
            f"not serving after {NEAR_CACHE_WAIT:g} s: Redis refused CLIENT TRACKING or its invalidations do not"
            " arrive (run with -v for the reason); reads go to Redis, which is correct but slower",
        )


def _diagnose_with(
    manager: ChatHistoryManager,
    args: argparse.Namespace,
    settings: Settings,
    doctor: Doctor,
    redis_refused: ChatHistoryError | None = None,
) -> None:
    postgres = settings.postgres_url
    with library_log_level(logging.CRITICAL, args.verbose > 0):
        problem = postgres_probe(manager)
    if isinstance(problem, UnavailableError):
        doctor.report("FAIL", "PostgreSQL", str(problem))
    else:
        status, tls = postgres_tls(settings.resolved)
        doctor.report(status, "PostgreSQL", f"connected to {postgres} ({tls})")
        if problem is None:
            doctor.report("OK", "schema", "conversations table readable")
        elif missing_schema(problem):
            doctor.report(
                "FAIL", "schema", "the tables are missing (this check creates none): run `chat-history init-db`"
            )
        else:
            doctor.report("FAIL", "schema", f"{problem}; `chat-history init-db` creates the tables when missing")
    if redis_refused is not None:
        doctor.report("FAIL", "Redis", str(redis_refused))
        return
    if not settings.use_redis:
        detail = "not configured: PostgreSQL only (pass --redis-url or set REDIS_CONNECTION_STRING to check it)"
        doctor.report("OK", "Redis", detail)
        return
    with library_log_level(logging.CRITICAL, args.verbose > 0):
        stats = manager.stats()
    redis_url = stats.get("redis_url", "Redis")
    if not redis_reachable(stats):
        # The library's own reason (a refused connection, a timeout, a login refused after start...),
        # not a bare "unreachable".
        why = stats.get("redis_error") or f"no answer within {args.redis_timeout:g} s"
        doctor.report("FAIL", "Redis", f"unreachable at {redis_url}: {why}")
        return
    status, tls = redis_tls(settings.resolved)
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
    _diagnose_near_cache(manager, doctor)
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
    used = human_size(stats.get("redis_used_memory"))
    if stats.get("redis_used_memory") is None:
        doctor.report("WARN", "Redis memory", "used_memory could not be read")
    elif fraction is None:
        doctor.report("OK", "Redis memory", f"{used} used, no maxmemory limit")
    else:
        limit = human_size(stats.get("redis_maxmemory"))
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
            f"oldest dirty conversation is {human_age(age)} old (threshold {args.max_dirty_age:g} s)"
            + ("; no flusher is running, or PostgreSQL refuses it (see the app's logs)" if over else ""),
        )
    if settings.redis_enabled_env is False and dirty:
        doctor.report(
            "WARN",
            "rollback",
            f"REDIS_ENABLED is false but {dirty} conversations in Redis were never written to PostgreSQL:"
            " run `chat-history flush` before removing Redis",
        )
