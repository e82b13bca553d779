"""Helpers for the partial-failure tests and the randomized fault checker (test_partial_failures.py,
test_chaos.py): private servers that survive a crash with what they acknowledged, the conflict table of
docs/design.md section 5 ("Divergence"), and "is this message still retrievable" checks.

    durable_postgres()      a private PostgreSQL with synchronous_commit=on (a crash keeps acknowledged commits)
    durable_redis(*args)    a private redis-server with AOF fsync always (a restart keeps every write)
    conflict_copies(conn, conversation_id, user_id)
                            the messages of every `conversation_conflicts` row of that id and user
    missing_messages(...)   the messages of a saved conversation that are neither in the owner's conversation
                            nor in a conflict copy
    call_with_deadline(fn, seconds)
                            runs fn in a thread; ("returned", value) / ("raised", exc) / ("hung", None)
    LateProxy(port)         a TcpProxy that can also hold only the links open now (hold_open()) or the next
                            links that carry a save (hold_saves(n)): their clients give up and go on through
                            other links, which pass, and deliver() sends the held bytes late
    read_postgres_state(conn)
                            every conversation and conflict row as PostgreSQL holds them (the checker's final
                            state), and what could not be read
"""

from __future__ import annotations

import fcntl
import json
import struct
import termios
import threading
import time
from datetime import timezone
from typing import Any, Callable, Optional

import psycopg2
import psycopg2.errors

from support.servers import PostgresServer, RedisServer
from support.tcp_proxy import TcpProxy, _Link

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
    from support.servers import canonical

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
    from support.redis_support import make_conversation

    written: dict[str, dict] = {}
    wrong: list[str] = []
    calls = 0
    n = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            cid = f"{label}{n % 4:04x}"[:8]
            conversation = make_conversation(2, title=f"{label} {n}", prefix=f"{label} {n} ")
            if cid in written:  # the product keeps the first save's created_at (README, "A conversation")
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
        from support.tcp_proxy import TcpProxy

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


def _unread(sock) -> int:
    """Bytes waiting in a socket's receive buffer (0 when it is gone)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


class LateProxy(TcpProxy):
    """A TcpProxy whose hold can also take only some links, while new links pass:

        hold_open()        holds the links open now (a flow hashed to a path that died; new connections get
                           through): their clients give up (`redis_timeout`) and reconnect through new links
        hold_saves(count)  holds the next `count` links that carry a save (a chunk with a `staged:` key, which
                           every save writes first) from that chunk on: the save's writer gives up on it while
                           the instance's next calls go through its other connections

    `deliver()` (or `heal()`) then sends everything held, late, after those newer calls. `hold()` (every link,
    new ones too), `deliver()` and `late_deliveries` are TcpProxy's (tests/tcp_proxy.py). TcpProxy counts a late
    delivery only once the client closed its end; a client that keeps the connection (the redis crate's cluster
    connection does) still gave up on a request after its timeout, so `overdue_deliveries` counts the links whose
    held bytes reached the server after waiting longer than `late_after` (the clients' timeout), closed or not."""

    # A hold must take the very next bytes (a request sent just after hold() would otherwise be forwarded by a
    # pump already inside select(), on time, and only its reply held).
    recheck_hold = True
    SAVE_MARK = b"staged:"

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", late_after: float = 0.5) -> None:
        self._frozen: frozenset = frozenset()
        self._stash: dict[_Link, bytes] = {}  # what a held save's link read before it was held
        self._saves_to_hold = 0
        self._waiting_since: dict[_Link, float] = {}  # when a held link's first held byte was seen
        self.late_after = late_after
        self.overdue_deliveries = 0
        super().__init__(target_port, target_host)

    def hold_open(self) -> int:
        """Holds the links open now until deliver() or heal(); returns how many."""
        with self._lock:
            self._frozen = frozenset(self._links)
            return len(self._frozen)

    def hold_saves(self, count: int) -> None:
        """Holds the next `count` links that send a save, from that save on, until deliver() or heal()."""
        with self._lock:
            self._saves_to_hold = count

    @property
    def saves_held(self) -> int:
        with self._lock:
            return len(self._stash)

    def deliver(self) -> None:
        now = time.monotonic()
        with self._lock:
            for link, since in self._waiting_since.items():
                if link in self._links and now - since >= self.late_after:
                    self.overdue_deliveries += 1
            self._waiting_since.clear()
        if self._holding.is_set():
            super().deliver()
        with self._lock:
            self._saves_to_hold = 0
            for link in self._frozen & self._links:
                stash = self._stash.pop(link, b"")
                if stash:
                    try:
                        link.upstream.sendall(stash)
                    except OSError:
                        continue
                    link.late_bytes = len(stash)
                link.held = _unread(link.client)
                link.released_at = now
            self._stash.clear()
            self._frozen = frozenset()  # only now may the pumps read what was held

    def heal(self) -> None:
        if self._frozen or self._saves_to_hold:
            self.deliver()
        super().heal()

    def pending(self) -> int:
        """Bytes clients sent that the proxy has not yet passed on (held, or just not yet pumped)."""
        with self._lock:
            return sum(_unread(link.client) for link in self._links) + sum(map(len, self._stash.values()))

    def _held(self, link: _Link) -> bool:
        held = super()._held(link) or link in self._frozen
        if held and link not in self._waiting_since and _unread(link.client):
            with self._lock:
                self._waiting_since.setdefault(link, time.monotonic())
        return held

    def _forward(self, link: _Link, sock, data: bytes) -> None:
        if sock is link.client and self._saves_to_hold and self.SAVE_MARK in data:
            with self._lock:
                if self._saves_to_hold:
                    self._saves_to_hold -= 1
                    self._stash[link] = data
                    self._waiting_since[link] = time.monotonic()
                    self._frozen = self._frozen | {link}
                    return
        super()._forward(link, sock, data)


# --------------------------------------------------------------------------------------------------
# The final state, from PostgreSQL alone
# --------------------------------------------------------------------------------------------------


def utc_iso(value) -> str:
    """A message time as the product stores it (`Timestamp` in src/model.rs): the UTC instant's isoformat()."""
    from datetime import datetime

    dt = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat()


def read_postgres_state(conn) -> tuple[dict, dict, list[str]]:
    """What PostgreSQL holds, read with plain SQL (no product code, no Redis):

    conversations[id] = {"user", "title", "model", "messages": [(role, content, utc time), ...]}
    conflicts[(user, id)] = [{"title", "messages": [(role, content, utc time), ...], "reason"}, ...]
    problems: rows that do not read as a conversation (a gap in the sequence numbers, a conflict
              copy whose messages do not parse)
    """
    problems: list[str] = []
    conversations: dict[str, dict] = {}
    with conn.cursor() as cur:
        cur.execute("SELECT conversation_id, user_client_id, title, model FROM conversations")
        for cid, user, title, model in cur.fetchall():
            conversations[cid] = {"user": user, "title": title, "model": model, "messages": []}
        cur.execute(
            "SELECT conversation_id, sequence_number, role, content, timestamp FROM messages"
            " ORDER BY conversation_id, sequence_number"
        )
        for cid, seq, role, content, at in cur.fetchall():
            conversation = conversations.get(cid)
            if conversation is None:
                problems.append(f"message row {cid}#{seq} has no conversation row")
                continue
            if seq != len(conversation["messages"]):
                problems.append(f"{cid}: message sequence number {seq} where {len(conversation['messages'])} was due")
            conversation["messages"].append((role, content, utc_iso(at)))
    conflicts: dict[tuple[str, str], list[dict]] = {}
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT conflict_id, conversation_id, user_client_id, title, messages, reason FROM {CONFLICT_TABLE}"
                " ORDER BY conflict_id"
            )
            rows = cur.fetchall()
    except psycopg2.errors.UndefinedTable:
        if not conn.autocommit:
            conn.rollback()
        rows = []
    for conflict_id, cid, user, title, messages, reason in rows:
        try:
            if isinstance(messages, str):
                messages = json.loads(messages)
            parsed = [(m["role"], m["content"], utc_iso(m["time"])) for m in messages]
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"conflict row {conflict_id} of {cid}: messages do not parse ({exc})")
            continue
        conflicts.setdefault((user, cid), []).append({"title": title, "messages": parsed, "reason": reason})
    return conversations, conflicts, problems
