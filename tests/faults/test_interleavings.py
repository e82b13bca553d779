"""Races forced, not hoped for: failpoints compiled into test builds (`make test` builds with the
`failpoints` feature) stop the product at a named point until the test lets it go, so each test
below proves its interleaving happened before it checks the outcome.

Points: flush.after_read, flush.before_settle, flush.between_batches, delete.after_postgres.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace

import pytest

from chat_history_rs import UnavailableError, _core
from support.chaos_support import conflict_count
from support.redis_support import (
    WAIT,
    Background,
    assert_cached,
    conv_key,
    dirty_member,
    dirty_set,
    grown,
    make_conversation,
    pg_conversation_ids,
    pg_message_count,
    write_seed_hash,
)
from support.servers import PostgresServer, assert_row_matches, create_database, find_pg_bindir
from support.tcp_proxy import TcpProxy


def pg_cache_version(conn, conversation_id: str) -> int | None:
    """The version of what PostgreSQL's row holds (None without a row)."""
    with conn.cursor() as cur:
        cur.execute("SELECT cache_version FROM conversations WHERE conversation_id = %s", (conversation_id,))
        row = cur.fetchone()
    return row[0] if row else None


# --------------------------------------------------------------------------------------------------
# A flush and the writes that race it
# --------------------------------------------------------------------------------------------------


def test_save_between_a_flushs_write_and_its_settle_stays_dirty(
    failpoints, make_redis_manager, rdb, pg_conn, user_id, conv_id
):
    app = make_redis_manager()
    v1 = make_conversation(2, title="v1")
    app.save_conversation(conv_id, v1, user_id=user_id)
    failpoints.pause("flush.before_settle", count=1)
    flush = Background(app.flush_dirty_conversations)
    failpoints.wait("flush.before_settle")
    assert_row_matches(pg_conn, conv_id, user_id, v1)  # the flush wrote v1 and has not settled yet

    v2 = grown({**v1, "title": "v2"}, 1)
    app.save_conversation(conv_id, v2, user_id=user_id)
    failpoints.release("flush.before_settle")
    assert flush.result() == 1

    assert_cached(rdb.client, user_id, conv_id, v2, dirty=True)  # not marked clean unwritten
    assert app.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, v2)
    assert_cached(rdb.client, user_id, conv_id, v2, dirty=False)


def test_seed_writer_between_a_flushs_read_and_its_settle_is_written_next(
    failpoints, make_redis_manager, rdb, pg_conn, user_id, conv_id
):
    app = make_redis_manager()
    v1 = make_conversation(2, title="ours")
    app.save_conversation(conv_id, v1, user_id=user_id)
    failpoints.pause("flush.after_read", count=1)
    flush = Background(app.flush_dirty_conversations)
    failpoints.wait("flush.after_read")

    seed = grown({**v1, "title": "the seed's"}, 1, text="seed")
    write_seed_hash(rdb.client, user_id, conv_id, seed)  # HSET over our hash, keeping our fields
    failpoints.release("flush.after_read")
    assert flush.result() == 1
    assert_row_matches(pg_conn, conv_id, user_id, v1)  # what the flush read
    assert dirty_member(user_id, conv_id) in dirty_set(rdb.client)  # but the seed's write stays dirty

    assert app.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, seed)
    assert_cached(rdb.client, user_id, conv_id, seed, dirty=False)
    assert app.get_conversation(conv_id, user_id=user_id) == seed


def test_seed_writer_after_a_flush_is_written_by_the_next(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    """Scenario 2: the seed's HSET leaves our version fields in place; PostgreSQL must still get its save."""
    app = make_redis_manager()
    v1 = make_conversation(2)
    app.save_conversation(conv_id, v1, user_id=user_id)
    assert app.flush_dirty_conversations() == 1

    seed = grown(v1, 2, text="seed")
    write_seed_hash(rdb.client, user_id, conv_id, seed)
    assert app.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, seed)
    assert_cached(rdb.client, user_id, conv_id, seed, dirty=False)


def test_seed_clear_dirty_flag_never_cleans_what_postgres_lacks(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    app = make_redis_manager()
    v1 = make_conversation(2)
    app.save_conversation(conv_id, v1, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    seed = grown(v1, 1, text="seed")
    write_seed_hash(rdb.client, user_id, conv_id, seed)

    app.redis_backend.clear_dirty_flag(user_id, conv_id)  # PostgreSQL still has v1
    assert dirty_member(user_id, conv_id) in dirty_set(rdb.client)
    assert rdb.client.hget(conv_key(user_id, conv_id), "dirty") == "1"

    # The seed's own flush: save to PostgreSQL, then clear: now it may clean.
    app.postgres_backend.save_conversation(conv_id, user_id, seed)
    app.redis_backend.clear_dirty_flag(user_id, conv_id)
    assert dirty_member(user_id, conv_id) not in dirty_set(rdb.client)
    assert_row_matches(pg_conn, conv_id, user_id, seed)


def test_delete_between_a_flushs_read_and_its_write_wins(
    failpoints, make_redis_manager, rdb, pg_conn, user_id, conv_id
):
    app = make_redis_manager()
    flusher = make_redis_manager()
    v1 = make_conversation(2)
    app.save_conversation(conv_id, v1, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    app.save_conversation(conv_id, grown(v1, 1), user_id=user_id)  # dirty again

    failpoints.pause("flush.after_read", count=1)
    flush = Background(flusher.flush_dirty_conversations)
    failpoints.wait("flush.after_read")
    app.delete_conversation(conv_id, user_id=user_id)
    failpoints.release("flush.after_read")
    flush.result()

    assert conv_id not in pg_conversation_ids(pg_conn)
    for manager in (app, flusher):
        assert manager.get_conversation(conv_id, user_id=user_id) is None
        assert manager.list_conversations(user_id) == []
    assert dirty_set(rdb.client) == set()


def test_flush_and_save_between_a_deletes_two_steps_never_resurrect(
    failpoints, make_redis_manager, rdb, pg_conn, user_id, conv_id
):
    app = make_redis_manager()
    other = make_redis_manager()
    v1 = make_conversation(2)
    app.save_conversation(conv_id, v1, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    app.save_conversation(conv_id, grown(v1, 1), user_id=user_id)  # dirty, not yet in PostgreSQL

    failpoints.pause("delete.after_postgres", count=1)
    delete = Background(app.delete_conversation, conv_id, user_id=user_id)
    failpoints.wait("delete.after_postgres")
    assert conv_id not in pg_conversation_ids(pg_conn)  # PostgreSQL deleted; Redis not yet

    # Another instance flushes the dirty copy it still finds in Redis, and saves a newer one.
    other.flush_dirty_conversations()
    assert conv_id not in pg_conversation_ids(pg_conn)
    other.save_conversation(conv_id, grown(v1, 2), user_id=user_id)
    failpoints.release("delete.after_postgres")
    delete.result()

    # The delete returned last: it wins over everything before it, in both tiers.
    other.flush_dirty_conversations()
    app.flush_dirty_conversations()
    assert conv_id not in pg_conversation_ids(pg_conn)
    for manager in (app, other):
        assert manager.get_conversation(conv_id, user_id=user_id) is None
    assert rdb.client.exists(conv_key(user_id, conv_id)) == 0


# --------------------------------------------------------------------------------------------------
# Flushers killed or overlapping, PostgreSQL crashing under a flush
# --------------------------------------------------------------------------------------------------

PAUSED_FLUSHER = textwrap.dedent(
    """
    import sys, threading
    from chat_history_rs import ChatHistoryManager, _core
    point = sys.argv[3]
    m = ChatHistoryManager(mode="postgres", connection_string=sys.argv[1], redis_enabled=True,
                           redis_connection_string=sys.argv[2], background_flush=False)
    _core._failpoint_pause(point, 1)
    done = []
    t = threading.Thread(target=lambda: done.append(m.flush_dirty_conversations()), daemon=True)
    t.start()
    assert _core._failpoint_wait(point, 1, 30.0)
    print("PAUSED", flush=True)
    sys.stdin.readline()  # the test says when to go on (or kills this process)
    _core._failpoint_release(point)
    t.join()
    print("FLUSHED", done[0], flush=True)
    sys.stdin.readline()  # the test checks PostgreSQL before close() could flush anything again
    m.close()
    """
)


def _paused_flusher(pg_url: str, redis_url: str, point: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_FLUSHER, pg_url, redis_url, point],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line == "PAUSED", f"the flusher process did not reach {point}: {line!r}"
    return proc


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def test_flusher_killed_between_postgres_and_settle_then_run_again(
    failpoints, make_redis_manager, rdb, pg_url, pg_conn, user_id
):
    app = make_redis_manager()
    conversations = {f"c1a0000{i}": make_conversation(3 + i, prefix=f"{i} ") for i in range(4)}
    for cid, conv in conversations.items():
        app.save_conversation(cid, conv, user_id=user_id)

    proc = _paused_flusher(pg_url, rdb.url, "flush.before_settle")
    try:
        for cid, conv in conversations.items():  # the kill lands after PostgreSQL has everything ...
            assert_row_matches(pg_conn, cid, user_id, conv)
        assert len(dirty_set(rdb.client)) == 4  # ... and before Redis was settled
    finally:
        proc.send_signal(signal.SIGKILL)
        _reap(proc)

    assert app.flush_dirty_conversations() == 0  # PostgreSQL is current: nothing to write again
    assert dirty_set(rdb.client) == set()
    for cid, conv in conversations.items():
        assert_row_matches(pg_conn, cid, user_id, conv)
        assert_cached(rdb.client, user_id, cid, conv, dirty=False)
    assert pg_message_count(pg_conn) == sum(len(c["messages"]) for c in conversations.values())


def test_two_flushers_that_overlap_keep_the_newest(
    failpoints, make_redis_manager, rdb, pg_url, pg_conn, user_id, conv_id
):
    """Old over new: a slow flusher (another process) reads v1 and stops before its PostgreSQL write; the app
    saves v2 and another flusher writes it; only then does the slow flusher's write of v1 run. It must write
    nothing: PostgreSQL keeps v2, checked before any other flush could repair it."""
    app = make_redis_manager()
    v0 = make_conversation(2, title="v0")
    app.save_conversation(conv_id, v0, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    v1 = grown({**v0, "title": "v1"}, 1)
    app.save_conversation(conv_id, v1, user_id=user_id)
    slow = _paused_flusher(pg_url, rdb.url, "flush.after_read")  # read v1; its PostgreSQL write waits
    try:
        assert_row_matches(pg_conn, conv_id, user_id, v0)  # paused before its write: PostgreSQL still has v0
        v2 = grown({**v1, "title": "v2"}, 2)
        app.save_conversation(conv_id, v2, user_id=user_id)
        assert app.flush_dirty_conversations() == 1  # v2 lands between the slow flusher's read and its write
        assert_row_matches(pg_conn, conv_id, user_id, v2)
        v2_version = pg_cache_version(pg_conn, conv_id)

        slow.stdin.write("go\n")
        slow.stdin.flush()
        assert slow.stdout.readline().strip() == "FLUSHED 0"  # its v1 reached PostgreSQL after v2 and was refused
        assert_row_matches(pg_conn, conv_id, user_id, v2)
        assert pg_cache_version(pg_conn, conv_id) == v2_version
        assert_cached(rdb.client, user_id, conv_id, v2, dirty=False)
        slow.stdin.write("close\n")
        slow.stdin.flush()
        assert slow.wait(timeout=30) == 0
    finally:
        _reap(slow)
    assert conflict_count(pg_conn) == 0  # v1 is a prefix of v2: nothing to keep aside
    assert app.get_conversation(conv_id, user_id=user_id) == v2


def test_a_copy_the_app_replaced_while_a_flusher_held_it_is_kept_aside_once(
    failpoints, make_redis_manager, rdb, pg_conn, user_id, conv_id
):
    """Flusher A reads v2; the app regenerates the last reply (v3 does not extend v2) and flusher B writes v3.
    A's write then finds PostgreSQL moved on. v2's last reply never reached PostgreSQL, and the save that replaced
    it cannot tell a regenerate from a save built on an older read of PostgreSQL (docs/design.md, "Write order"):
    the save keeps v2 aside, once. A, which held v2, adds no second copy: what it read was replaced by the app,
    not diverged between the tiers. Both tiers hold v3."""
    from support.chaos_support import conflict_copies

    app, a, b = make_redis_manager(), make_redis_manager(), make_redis_manager()
    v1 = make_conversation(2)
    app.save_conversation(conv_id, v1, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    v2 = grown(v1, 2)
    app.save_conversation(conv_id, v2, user_id=user_id)

    failpoints.pause("flush.after_read", count=1)
    flush = Background(a.flush_dirty_conversations)
    failpoints.wait("flush.after_read")
    v3 = grown({**v2, "messages": v2["messages"][:-1]}, 1, text="regenerated")
    app.save_conversation(conv_id, v3, user_id=user_id)
    assert b.flush_dirty_conversations() == 1
    failpoints.release("flush.after_read")
    flush.result()

    assert_row_matches(pg_conn, conv_id, user_id, v3)
    assert conflict_copies(pg_conn, conv_id, user_id) == [v2["messages"]], "v2 kept aside once, whole"
    assert_cached(rdb.client, user_id, conv_id, v3, dirty=False)
    assert app.get_conversation(conv_id, user_id=user_id) == v3


def test_a_copy_gone_from_redis_while_a_flusher_held_it_is_still_kept_when_it_diverged(
    failpoints, make_redis_manager, pg_manager, rdb, pg_conn, user_id, conv_id
):
    """The flusher reads v2 (only Redis has its last messages); a write straight to PostgreSQL diverged from it;
    then Redis loses the hash (a restart without persistence). The copy the flusher holds is the last one: it
    must be resolved as read (kept aside), not mistaken for a copy the app replaced."""
    from support.chaos_support import conflict_copies

    app = make_redis_manager()
    v1 = make_conversation(2)
    app.save_conversation(conv_id, v1, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    v2 = grown(v1, 2, text="only in Redis")
    app.save_conversation(conv_id, v2, user_id=user_id)
    pg_manager.save_conversation(conv_id, grown(v1, 1, text="straight to PostgreSQL"), user_id=user_id)

    failpoints.pause("flush.after_read", count=1)
    flush = Background(app.flush_dirty_conversations)
    failpoints.wait("flush.after_read")
    rdb.client.delete(conv_key(user_id, conv_id))
    failpoints.release("flush.after_read")
    flush.result()

    current = pg_manager.get_conversation(conv_id, user_id=user_id)
    copies = conflict_copies(pg_conn, conv_id, user_id) + ([current["messages"]] if current else [])
    assert [m["content"] for m in v2["messages"]] in [[m["content"] for m in copy] for copy in copies], (
        f"v2's messages are neither in the conversation nor kept aside: {copies}"
    )


@pytest.fixture
def crashable_pg():
    """A private PostgreSQL that keeps every commit it acknowledged (synchronous_commit=on), so a
    crash (`pg_ctl -m immediate`) loses nothing the product was told was committed."""
    if find_pg_bindir() is None:
        pytest.fail("PostgreSQL binaries not found: cannot start a private cluster")
    server = PostgresServer(settings={"fsync": "on", "synchronous_commit": "on"})
    try:
        server.start()
        yield server
    finally:
        server.remove()


def test_postgres_crash_in_the_middle_of_a_flush_loses_nothing(
    failpoints, crashable_pg, make_redis_manager, rdb, user_id
):
    params = create_database(crashable_pg.params)
    app = make_redis_manager(connection_string=params.url, postgres_connect_timeout=2.0)
    conversations = {f"c2a0000{i}": make_conversation(2 + i, prefix=f"{i} ") for i in range(5)}
    for cid, conv in conversations.items():
        app.save_conversation(cid, conv, user_id=user_id)

    failpoints.pause("flush.after_read", count=1)
    flush = Background(app.flush_dirty_conversations)
    failpoints.wait("flush.after_read")
    crashable_pg.kill()
    failpoints.release("flush.after_read")
    with pytest.raises(UnavailableError, match="PostgreSQL"):
        flush.result()
    assert len(dirty_set(rdb.client)) == 5  # nothing was marked clean
    for cid, conv in conversations.items():
        assert app.get_conversation(cid, user_id=user_id) == conv

    crashable_pg.start()
    assert app.flush_dirty_conversations() == 5
    conn = params.connect()
    try:
        for cid, conv in conversations.items():
            assert_row_matches(conn, cid, user_id, conv)
    finally:
        conn.close()
    assert dirty_set(rdb.client) == set()


class CommitReplyLost(TcpProxy):
    """A TCP proxy in front of PostgreSQL that, once `arm()`ed, lets the next COMMIT a client sends through
    and swallows the server's reply to it: the server committed (with synchronous_commit=on, the commit is on
    disk before that reply is sent), and the client never hears so. `swallowed` is set once the reply said
    COMMIT; the link stays open and silent until the server goes away."""

    # The wire messages (simple query protocol): Query "COMMIT", and CommandComplete "COMMIT".
    COMMIT_QUERY = b"Q\x00\x00\x00\x0bCOMMIT\x00"
    COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        super().__init__(target_port, target_host)
        self._armed = threading.Event()
        self._victim = None
        self.swallowed = threading.Event()

    def arm(self) -> None:
        self._armed.set()

    def _forward(self, link, sock, data: bytes) -> None:
        if sock is link.client and self._victim is None and self._armed.is_set() and self.COMMIT_QUERY in data:
            self._victim = link
        elif sock is not link.client and link is self._victim:
            if self.COMMIT_DONE in data:
                self.swallowed.set()
            return  # the reply (and anything after it) never reaches the client
        super()._forward(link, sock, data)


def test_postgres_crash_after_a_commit_whose_reply_was_lost_loses_and_duplicates_nothing(
    failpoints, crashable_pg, make_redis_manager, rdb, user_id
):
    """The flush's COMMIT reaches PostgreSQL and commits; its reply is lost (a proxy swallows it) and PostgreSQL
    crashes (`pg_ctl -m immediate`) before the client hears anything. The flush cannot know its batch is in:
    it raises and leaves Redis dirty. After the restart PostgreSQL has the whole batch (the commit was
    acknowledged on disk), and the next flush writes nothing twice: every row once, Redis clean."""
    params = create_database(crashable_pg.params)
    conn = params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW synchronous_commit")
            assert cur.fetchone()[0] == "on"  # an acknowledged commit survives the crash
    finally:
        conn.close()
    with CommitReplyLost(params.port, params.host) as proxy:
        url = replace(params, host="127.0.0.1", port=proxy.port).url
        app = make_redis_manager(connection_string=url, postgres_connect_timeout=2.0)
        conversations = {f"c4a0000{i}": make_conversation(2 + i, prefix=f"{i} ") for i in range(5)}
        for cid, conv in conversations.items():
            app.save_conversation(cid, conv, user_id=user_id)

        proxy.arm()
        flush = Background(app.flush_dirty_conversations)
        assert proxy.swallowed.wait(WAIT), "the flush's COMMIT reply never came back from PostgreSQL"
        crashable_pg.kill()
        with pytest.raises(UnavailableError, match="PostgreSQL"):
            flush.result()
        assert len(dirty_set(rdb.client)) == 5  # the flush never learnt of its commit: nothing settled

        crashable_pg.start()
        conn = params.connect()
        try:
            # Before any other flush: the commit the client never heard of is in PostgreSQL, whole.
            assert pg_conversation_ids(conn) == set(conversations)
            for cid, conv in conversations.items():
                assert_row_matches(conn, cid, user_id, conv)

            assert app.flush_dirty_conversations() == 0  # PostgreSQL already holds every version: nothing written
            assert dirty_set(rdb.client) == set()
            for cid, conv in conversations.items():
                assert_row_matches(conn, cid, user_id, conv)
                assert_cached(rdb.client, user_id, cid, conv, dirty=False)
            assert pg_message_count(conn) == sum(len(c["messages"]) for c in conversations.values())
            assert conflict_count(conn) == 0
        finally:
            conn.close()


def test_close_with_a_background_flush_held_returns_within_close_timeout(
    failpoints, make_redis_manager, rdb, pg_conn, user_id, conv_id
):
    app = make_redis_manager(background_flush=True, flush_interval=0.1, close_timeout=1.0)
    conv = make_conversation(2)
    failpoints.pause("flush.after_read")
    app.save_conversation(conv_id, conv, user_id=user_id)
    failpoints.wait("flush.after_read")  # the background flush holds the data it read

    started = time.monotonic()
    app.close()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 5.0, f"close() took {elapsed:.1f}s with close_timeout=1"
    failpoints.release("flush.after_read")

    assert dirty_member(user_id, conv_id) in dirty_set(rdb.client) or conv_id in pg_conversation_ids(pg_conn)
    later = make_redis_manager()
    later.flush_dirty_conversations()
    assert_row_matches(pg_conn, conv_id, user_id, conv)


def test_flush_between_batches_honours_close_timeout(failpoints, make_redis_manager, rdb, pg_conn, user_id):
    app = make_redis_manager(flush_batch_size=2, close_timeout=1.0)
    for i in range(6):
        app.save_conversation(f"c3a0000{i}", make_conversation(1, prefix=f"{i} "), user_id=user_id)
    failpoints.pause("flush.between_batches", count=1)
    closing = Background(app.close)
    failpoints.wait("flush.between_batches")
    # close() is stuck behind its own first batch; release after its deadline passed: it stops there.
    time.sleep(1.2)
    failpoints.release("flush.between_batches")
    closing.result()
    written = pg_conversation_ids(pg_conn)
    assert 2 <= len(written) < 6, written  # one batch written, then the deadline ended the flush
    assert len(dirty_set(rdb.client)) == 6 - len(written)


def test_a_staged_copy_lost_before_the_script_is_never_stored_empty(
    failpoints, make_redis_manager, rdb, pg_conn, user_id, conv_id
):
    """Scenario 8: the staged hash vanishes (evicted) between the HSET and the script: the script
    must not rename nothing into place and report success; the save reaches PostgreSQL instead."""
    app = make_redis_manager()
    other = make_redis_manager()
    v1 = make_conversation(2)
    app.save_conversation(conv_id, v1, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    v2 = grown(v1, 2)
    _core._failpoint_set("save.lose_staged", "1*return")
    app.save_conversation(conv_id, v2, user_id=user_id)
    assert_row_matches(pg_conn, conv_id, user_id, v2)
    assert rdb.client.hget(conv_key(user_id, conv_id), "messages") != "[]"
    for manager in (app, other):
        assert manager.get_conversation(conv_id, user_id=user_id) == v2
