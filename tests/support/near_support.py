"""Helpers for the near-cache tests (tests/near/): the near cache's figures, its tracking connections
as Redis lists them, reads polled against a deadline, and a proxy that partitions only the tracking
connection.

    near_stats(manager)            the `near_cache_*` figures of stats(), prefix stripped
    tracking_clients(client)       CLIENT LIST entries of the tracking connections (pub/sub, tracking on)
    kill_tracking(client)          CLIENT KILL of each of them; returns how many
    conversation_read(manager, id, user)  the get_conversation call a test repeats, as a function
    read_until_near_hit(manager, read)
                                   calls read() until the near cache answered one (near_cache_hits grew);
                                   returns what that read returned
    poll(read, accept, timeout)    calls read() until accept(value) or the deadline; returns (value, seconds)
    set_pg_title(conn, id, title)  changes a conversation's title in PostgreSQL only, behind the product's back
    TrackingPartitionProxy         a TcpProxy whose partition_tracking() silences only the connections that
                                   sent CLIENT TRACKING, without closing them (a silently partitioned link)
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from support.tcp_proxy import TcpProxy, _Link

# The window the contract allows a copy to outlive a change made elsewhere: the PING lease (0.5 s)
# plus a margin for scheduling on a loaded 2-core machine.
LEASE = 0.5
ALLOWED_DELAY = 0.6
# How long a test polls for a change that normally shows within a millisecond or so.
SEEN_WITHIN = 1.0


def near_stats(manager) -> dict:
    """{"enabled", "tracking", "hits", "misses", "invalidations", "evictions", "resets", "entries",
    "bytes", "limit_bytes"} from manager.stats()."""
    stats = manager.stats()
    return {key[len("near_cache_") :]: value for key, value in stats.items() if key.startswith("near_cache_")}


def tracking_clients(client) -> list[dict]:
    """The connections Redis lists as the near cache's trackers: subscribed (flags P / sub > 0) with
    tracking on (flags t)."""
    out = []
    for entry in client.client_list():
        flags = entry.get("flags", "")
        subscribed = "P" in flags or int(entry.get("sub", 0)) > 0
        if subscribed and "t" in flags:
            out.append(entry)
    return out


def kill_tracking(client) -> int:
    """CLIENT KILL of every tracking connection; returns how many were killed."""
    killed = 0
    for entry in tracking_clients(client):
        killed += int(client.execute_command("CLIENT", "KILL", "ID", entry["id"]))
    return killed


def wait_tracking(manager, timeout: float = 5.0) -> float:
    """Waits until the near cache serves (near_cache_tracking True); returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while not near_stats(manager)["tracking"]:
        if time.monotonic() > deadline:
            raise AssertionError(f"near cache not tracking within {timeout}s: {near_stats(manager)}")
        time.sleep(0.01)
    return time.monotonic() - started


def conversation_read(manager, conversation_id: str, user_id: str) -> Callable[[], Any]:
    """The read the tests repeat: `manager.get_conversation(conversation_id, user_id=user_id)`."""
    return lambda: manager.get_conversation(conversation_id, user_id=user_id)


def read_until_near_hit(manager, read: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Calls read() until one was answered by the near cache (near_cache_hits grew across it); returns
    that read's value. Fails when none was within timeout: the near cache is not serving."""
    deadline = time.monotonic() + timeout
    while True:
        before = near_stats(manager)["hits"]
        value = read()
        if near_stats(manager)["hits"] > before:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no near-cache hit within {timeout}s: {near_stats(manager)}")
        time.sleep(0.01)


def poll(read: Callable[[], Any], accept: Callable[[Any], bool], timeout: float = SEEN_WITHIN, what: str = "value"):
    """Calls read() until accept(value); returns (value, seconds since the first call). Fails with the
    last value read when the deadline passes."""
    started = time.monotonic()
    while True:
        value = read()
        elapsed = time.monotonic() - started
        if accept(value):
            return value, elapsed
        if elapsed > timeout:
            raise AssertionError(f"{what} not read within {timeout}s; the last read returned {value!r}")
        time.sleep(0.005)


def title_of(conversation) -> Any:
    return None if conversation is None else conversation["title"]


def set_pg_title(conn, conversation_id: str, title: str) -> None:
    """Changes the title in PostgreSQL only (Redis keeps what it had): a read that returns it came from
    PostgreSQL."""
    with conn.cursor() as cur:
        cur.execute("UPDATE conversations SET title = %s WHERE conversation_id = %s", (title, conversation_id))
        assert cur.rowcount == 1, f"no conversations row {conversation_id}"


class TrackingPartitionProxy(TcpProxy):
    """A TcpProxy that can partition the tracking connections alone.

    A link that carried `CLIENT TRACKING` from the client is a tracking link. partition_tracking()
    stops forwarding on those links, either way, leaving their sockets open (no RST, no EOF: the
    client sees silence, as behind a dead network path), while every other connection keeps
    working; heal_tracking() forwards again. The bytes wait in the kernel buffers meanwhile.
    """

    def __init__(self, target_port: int) -> None:
        self._tracking_links: set[_Link] = set()
        self._tracking_partitioned = threading.Event()
        self.partitioned_at: float | None = None
        super().__init__(target_port)

    def partition_tracking(self) -> float:
        """Silences the tracking links now; returns time.monotonic() of that instant."""
        self._tracking_partitioned.set()
        self.partitioned_at = time.monotonic()
        return self.partitioned_at

    def heal_tracking(self) -> None:
        self._tracking_partitioned.clear()

    @property
    def tracking_links(self) -> int:
        with self._lock:
            return len([link for link in self._tracking_links if not link.closed.is_set()])

    hold_wait, select_wait = 0.005, 0.01  # a partition must take hold within milliseconds
    recheck_hold = True

    def _held(self, link: _Link) -> bool:
        return super()._held(link) or (self._tracking_partitioned.is_set() and link in self._tracking_links)

    def _forward(self, link: _Link, sock, data: bytes) -> None:
        if sock is link.client and b"TRACKING" in data.upper():
            with self._lock:
                self._tracking_links.add(link)
        super()._forward(link, sock, data)

    def _dropped(self, link: _Link) -> None:
        super()._dropped(link)
        self._tracking_links.discard(link)
