"""Helpers for the partial-failure tests and the randomized fault checker (test_partial_failures.py,
test_chaos.py): private servers that survive a crash with what they acknowledged, the conflict table of
SPEC section 4 item 9, and "is this message still retrievable" checks.

    durable_postgres()      a private PostgreSQL with synchronous_commit=on (a crash keeps acknowledged commits)
    durable_redis(*args)    a private redis-server with AOF fsync always (a restart keeps every write)
    conflict_copies(conn, conversation_id, user_id)
                            the messages of every `conversation_conflicts` row of that id and user
    missing_messages(...)   the messages of a saved conversation that are neither in the owner's conversation
                            nor in a conflict copy
    call_with_deadline(fn, seconds)
                            runs fn in a thread; ("returned", value) / ("raised", exc) / ("hung", None)
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Optional

import psycopg2
import psycopg2.errors

from servers import PostgresServer, RedisServer

CONFLICT_TABLE = "conversation_conflicts"


def durable_postgres() -> PostgresServer:
    """A private cluster whose commits survive `pg_ctl -m immediate` (the throwaway default is
    synchronous_commit=off, which forgets acknowledged commits on a crash). Not started."""
    return PostgresServer(settings={"synchronous_commit": "on"})


def durable_redis(*extra_args: str) -> RedisServer:
    """A private redis-server that keeps every write across a restart (AOF, fsync always). Not started."""
    return RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always", *extra_args])


def message_key(message: dict) -> tuple[str, str, str]:
    """(role, content, time) of a message, the identity the conflict contract compares."""
    return (message["role"], message["content"], message["time"])


def conflict_copies(conn, conversation_id: str, user_id: str) -> list[list[dict]]:
    """The messages of every conflict copy kept for this conversation and user (an empty list when the
    table does not exist: then nothing was kept aside)."""
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT messages FROM {CONFLICT_TABLE} WHERE conversation_id = %s AND user_client_id = %s"
                " ORDER BY conflict_id",
                (conversation_id, user_id),
            )
            rows = cur.fetchall()
    except psycopg2.errors.UndefinedTable:
        if not conn.autocommit:
            conn.rollback()
        return []
    out = []
    for (messages,) in rows:
        if isinstance(messages, str):
            messages = json.loads(messages)
        out.append(messages)
    return out


def conflict_count(conn) -> int:
    """Rows in conversation_conflicts (0 when the table does not exist)."""
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {CONFLICT_TABLE}")
            return cur.fetchone()[0]
    except psycopg2.errors.UndefinedTable:
        if not conn.autocommit:
            conn.rollback()
        return 0


def _same_instant(a: str, b: str) -> bool:
    from servers import canonical

    try:
        return canonical(a) == canonical(b)
    except ValueError:
        return a == b


def _contains(messages: list[dict], wanted: dict) -> bool:
    return any(
        m.get("role") == wanted["role"]
        and m.get("content") == wanted["content"]
        and _same_instant(str(m.get("time")), wanted["time"])
        for m in messages
    )


def missing_messages(current: Optional[dict], conflicts: list[list[dict]], saved: list[dict]) -> list[dict]:
    """The messages of `saved` found neither in `current` (the owner's conversation, or None) nor in any
    conflict copy. Matched by role, content and time (time compared as an instant)."""
    pools = [current["messages"]] if current is not None else []
    pools += conflicts
    return [m for m in saved if not any(_contains(pool, m) for pool in pools)]


def call_with_deadline(fn: Callable[[], Any], seconds: float) -> tuple[str, Any]:
    """Runs fn in a daemon thread and waits up to `seconds`: ("returned", value), ("raised", exception)
    or ("hung", the thread). A hung call keeps its thread; the test must then release whatever blocks it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return ("hung", thread)
    if "error" in box:
        return ("raised", box["error"])
    return ("returned", box.get("value"))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    value = fn()
    return time.monotonic() - started, value


def hammer(manager, user_id: str, label: str, seconds: float = 4.0) -> dict:
    """Saves and reads this user's conversations (ids `label` + 4 hex) for `seconds`; every read must be what this
    process wrote. Returns {"calls": n, "wrong": [up to 5 descriptions]}, plus "error" if a call raised."""
    from redis_support import make_conversation

    written: dict[str, dict] = {}
    wrong: list[str] = []
    calls = 0
    n = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            cid = f"{label}{n % 4:04x}"[:8]
            conversation = make_conversation(2, title=f"{label} {n}", prefix=f"{label} {n} ")
            if cid in written:  # the product keeps the first save's created_at (SPEC 2)
                conversation["created_at"] = written[cid]["created_at"]
            manager.save_conversation(cid, conversation, user_id=user_id)
            written[cid] = conversation
            calls += 1
            for check_id, expected in list(written.items()):
                got = manager.get_conversation(check_id, user_id=user_id)
                calls += 1
                if got != expected and len(wrong) < 5:
                    wrong.append(f"{check_id}: expected title {expected['title']!r}, got {got and got['title']!r}")
            listed = {cid for cid, _ in manager.list_conversations(user_id)}
            calls += 1
            if listed != set(written) and len(wrong) < 5:
                wrong.append(f"list: expected {sorted(written)}, got {sorted(listed)}")
            n += 1
    except Exception as exc:  # noqa: BLE001 - handed back to the caller, which fails on it
        return {"calls": calls, "wrong": wrong, "error": f"{type(exc).__name__}: {exc}"}
    return {"calls": calls, "wrong": wrong}


class ThrottledProxy:
    """A TcpProxy whose client-to-server direction can be limited to `bytes_per_second` (a congested or distant
    link): a request of n bytes then takes n / rate seconds to reach the server. Built on TcpProxy (same
    partition/stall/cut/heal); only the pump differs."""

    def __new__(cls, target_port: int):
        from tcp_proxy import TcpProxy

        class _Throttled(TcpProxy):
            rate: Optional[float] = None
            chunk = 4096  # small reads, so the delay follows the bytes

            def throttle(self, bytes_per_second: Optional[float]) -> None:
                self.rate = bytes_per_second

            def _forward(self, link, sock, data: bytes) -> None:  # TcpProxy's, after the delay
                if sock is link.client and self.rate:
                    time.sleep(len(data) / self.rate)
                super()._forward(link, sock, data)

        return _Throttled(target_port)
