"""Partial failures between the tiers (docs/design.md, "Divergence", "Ownership", "Deletes", "Faults" and
"Processes"): one test per scenario of the "partial failures" issue, each with real servers, real stops and kills,
the TCP proxy, or a real fork. A proxy goes in front of whichever server the suite uses (a throwaway one, or
CHR_TEST_REDIS_URL's and CHR_TEST_POSTGRES_URL's), so none of these tests skips for an external server.

The pattern is the app's: a read (after a fallback, if that is what the fault causes), an append of a user
message and an assistant reply, a save; then the fault heals and the test checks, row by row, that every
message a call acknowledged is still retrievable: in the owner's conversation, or kept aside in
`conversation_conflicts` (the divergence rule, docs/design.md, "Divergence").
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import pytest

from chat_history_rs import UnavailableError
from support.chaos_support import (
    ThrottledProxy,
    call_with_deadline,
    conflict_copies,
    conflict_count,
    missing_messages,
)
from support.redis_support import (
    TESTS_DIR,
    assert_cached,
    conv_key,
    dirty_member,
    dirty_set,
    grown,
    make_conversation,
    needs_single_node,
    owner_key,
    pg_conversation_ids,
    python_script,
    redis_client,
    script_env,
    seed_fields,
    wait_until,
    write_seed_hash,
)
from support.servers import assert_row_matches, create_database
from support.tcp_proxy import TcpProxy


def _redis_address(rdb) -> tuple[str, int]:
    """Where the test's Redis listens. On a cluster the test skips: a proxy in front of one node cannot cut the
    cluster off (the client reaches the other nodes directly)."""
    needs_single_node("a proxy in front of one node cannot cut the cluster off")
    url = urlsplit(rdb.url)
    return url.hostname or "127.0.0.1", url.port or 6379


def redis_proxy(rdb) -> TcpProxy:
    """A TcpProxy in front of the test's Redis, wherever it runs (a throwaway server or CHR_TEST_REDIS_URL's)."""
    host, port = _redis_address(rdb)
    return TcpProxy(port, host)


def throttled_redis_proxy(rdb):
    """chaos_support's ThrottledProxy in front of the test's Redis, wherever it runs."""
    host, port = _redis_address(rdb)
    proxy = ThrottledProxy(port)
    proxy.target = (host, port)  # ThrottledProxy takes a port only; the target is read at each connection
    return proxy


def through(proxy: TcpProxy, url: str) -> str:
    """`url` with its host and port replaced by the proxy's; the login, the database and the options stay."""
    parts = urlsplit(url)
    login, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{login}{at}127.0.0.1:{proxy.port}"))


def postgres_proxy(pg_params) -> TcpProxy:
    """A TcpProxy in front of the test's PostgreSQL (a throwaway server or CHR_TEST_POSTGRES_URL's)."""
    return TcpProxy(pg_params.port, pg_params.host)


def postgres_through(proxy: TcpProxy, pg_params) -> str:
    return replace(pg_params, host="127.0.0.1", port=proxy.port).url


def app_turn(conversation: dict, text: str) -> dict:
    """What the app does after a read: append the user's message and the assistant's reply (unique content)."""
    return grown(conversation, 2, text=text)


def redis_back(manager, probe_user: str) -> bool:
    """One call that goes through Redis if the manager is willing to try it (a miss on an unknown id), then
    whether the manager says Redis is available again."""
    manager.get_conversation("0000beef", user_id=probe_user)
    return manager.stats()["redis_available"] is True


def flush_until_clean(manager, client, timeout: float = 20) -> None:
    """Flushes until dirty:convs is empty; fails (AssertionError) if it is not within `timeout`."""

    def clean() -> bool:
        manager.flush_dirty_conversations()
        return not dirty_set(client)

    wait_until(clean, timeout=timeout, interval=0.2, what="an empty dirty set after flushing")


def assert_every_message_retrievable(manager, conn, conversation_id, user_id, saved_versions) -> dict:
    """Every message of every acknowledged save is in the owner's conversation or in a conflict copy of that
    id and user (docs/design.md, "Divergence"). Returns the current conversation."""
    current = manager.get_conversation(conversation_id, user_id=user_id)
    conflicts = conflict_copies(conn, conversation_id, user_id)
    for label, saved in saved_versions.items():
        lost = missing_messages(current, conflicts, saved["messages"])
        assert lost == [], (
            f"{label}: {len(lost)} acknowledged message(s) of {conversation_id} are gone: {lost}\n"
            f"current: {json.dumps(current and current['messages'])}\nconflict copies: {json.dumps(conflicts)}"
        )
    return current


# --------------------------------------------------------------------------------------------------
# 1. A Redis blip inside the app's read-append-save (docs/design.md, "Divergence")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["partition", "one_read_times_out"])
def test_redis_blip_in_read_append_save_keeps_every_message(make_redis_manager, rdb, pg_conn, user_id, conv_id, fault):
    """Redis holds 4 messages dirty, PostgreSQL 2. The app's read falls back to PostgreSQL (Redis cut off,
    or a single read timing out), it appends a turn and saves. After Redis returns and everything is flushed,
    the 2 messages only Redis held must still be retrievable (in the conversation or a conflict copy)."""
    with redis_proxy(rdb) as proxy:
        app = make_redis_manager(redis_url=through(proxy, rdb.url), redis_timeout=0.5)
        flushed = make_conversation(2, prefix="flushed ")
        app.save_conversation(conv_id, flushed, user_id=user_id)
        assert app.flush_dirty_conversations() == 1
        only_in_redis = app_turn(flushed, "only in Redis")
        app.save_conversation(conv_id, only_in_redis, user_id=user_id)
        assert_cached(rdb.client, user_id, conv_id, only_in_redis, dirty=True)

        if fault == "partition":
            proxy.partition()
        else:
            proxy.stall()  # the read waits past redis_timeout, as a pool wait under load does
        seen = app.get_conversation(conv_id, user_id=user_id)  # the app's read
        if fault == "one_read_times_out":
            proxy.heal()  # only that one read was affected
        assert seen is not None
        after_blip = app_turn(seen, "after the blip")
        app.save_conversation(conv_id, after_blip, user_id=user_id)  # acknowledged
        proxy.heal()

        wait_until(lambda: redis_back(app, user_id), timeout=30, interval=0.2, what="Redis in use again")
        flush_until_clean(app, rdb.client)

        current = assert_every_message_retrievable(
            app, pg_conn, conv_id, user_id, {"saved before the blip": only_in_redis, "saved after it": after_blip}
        )
        assert current in (only_in_redis, after_blip), "the conversation is neither acknowledged version"
        assert_row_matches(pg_conn, conv_id, user_id, current)
        # The two versions diverge (neither is a prefix of the other): the loser is kept aside, and counted.
        kept = conflict_copies(pg_conn, conv_id, user_id)
        assert len(kept) == 1, f"two diverging acknowledged versions, and {len(kept)} conflict copies kept"
        assert app.stats()["conflicts_kept"] == len(kept)


# --------------------------------------------------------------------------------------------------
# 2. A seed-design writer during a rolling upgrade (docs/design.md, "Keys and rows" and "Write-back")
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_seed_writer_hset_over_our_hash_is_written_back(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    """A seed instance HSETs the conversation over our clean hash (leaving our ver/pgv fields) and SADDs
    dirty:convs: our flush must write the seed's content, never mark it clean unwritten."""
    app = make_redis_manager()
    ours = make_conversation(2, prefix="ours ")
    app.save_conversation(conv_id, ours, user_id=user_id)
    assert app.flush_dirty_conversations() == 1

    seeds = app_turn(ours, "seed instance")
    write_seed_hash(rdb.client, user_id, conv_id, seeds)
    assert rdb.client.hget(conv_key(user_id, conv_id), "ver") is not None  # the scenario: our fields remain

    written = app.flush_dirty_conversations()
    assert_row_matches(pg_conn, conv_id, user_id, seeds)
    assert written == 1
    assert dirty_set(rdb.client) == set()
    assert app.get_conversation(conv_id, user_id=user_id) == seeds


@pytest.mark.timeout(60)
def test_a_save_over_a_seed_writers_unflushed_copy_keeps_the_seed_writers_messages(
    make_redis_manager, rdb, pg_conn, user_id, conv_id
):  # fmt: skip
    """A seed instance HSETs a turn over our dirty hash, leaving our fields, the prefix fingerprints
    among them, describing our older copy. Our next save, built on that older copy, does not extend the
    seed's: the save script must see that the fingerprints no longer describe the transcript, and keep
    the seed's copy aside rather than trust them and replace it."""
    app = make_redis_manager()
    ours = make_conversation(2, prefix="ours ")
    app.save_conversation(conv_id, ours, user_id=user_id)

    seeds = app_turn(ours, "seed instance")
    write_seed_hash(rdb.client, user_id, conv_id, seeds)
    assert rdb.client.hget(conv_key(user_id, conv_id), "fps") is not None  # the scenario: our stale fields remain

    mine = app_turn(ours, "this instance")
    app.save_conversation(conv_id, mine, user_id=user_id)
    app.flush_dirty_conversations()

    assert_row_matches(pg_conn, conv_id, user_id, mine)
    lost = missing_messages(None, conflict_copies(pg_conn, conv_id, user_id), seeds["messages"])
    assert lost == [], f"the seed instance's messages are neither in the row nor kept aside: {lost}"


@pytest.mark.timeout(60)
def test_seed_clear_dirty_flag_never_marks_unwritten_content_clean(
    make_redis_manager, rdb, pg_conn, user_id, conv_id
):  # fmt: skip
    """The seed's flusher calls clear_dirty_flag through manager.redis_backend on a hash a seed writer just
    replaced: a hash whose content is not in PostgreSQL must not become clean (it would never be written)."""
    app = make_redis_manager()
    ours = make_conversation(2, prefix="ours ")
    app.save_conversation(conv_id, ours, user_id=user_id)
    assert app.flush_dirty_conversations() == 1

    seeds = app_turn(ours, "seed instance")
    write_seed_hash(rdb.client, user_id, conv_id, seeds)
    app.redis_backend.clear_dirty_flag(user_id, conv_id)  # content `seeds` is not in PostgreSQL yet

    app.flush_dirty_conversations()
    assert_row_matches(pg_conn, conv_id, user_id, seeds)
    assert app.get_conversation(conv_id, user_id=user_id) == seeds


# --------------------------------------------------------------------------------------------------
# 3. A claim while PostgreSQL is down (docs/design.md, "Ownership": a claim that cannot be checked is refused)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_claim_while_postgres_is_down_is_refused(own_pg_server, make_redis_manager, rdb, user_id, other_user_id):
    alice, bob = user_id, other_user_id
    params = create_database(own_pg_server.params)
    app = make_redis_manager(connection_string=params.url, postgres_connect_timeout=2.0)
    hers = make_conversation(2, title="Alice's")
    app.save_conversation("c1a10001", hers, user_id=alice)
    cached = make_conversation(2, title="Alice's cached chat")
    app.save_conversation("c1a10002", cached, user_id=alice)
    assert app.flush_dirty_conversations() == 2
    # Her first chat is no longer cached: no hash, no owner record (both expired).
    rdb.client.delete(conv_key(alice, "c1a10001"), owner_key("c1a10001"))

    own_pg_server.stop()

    with pytest.raises(UnavailableError):
        app.save_conversation("c1a10001", make_conversation(1, title="Bob's"), user_id=bob)
    assert rdb.client.exists(conv_key(bob, "c1a10001")) == 0
    assert rdb.client.get(owner_key("c1a10001")) is None
    assert dirty_member(bob, "c1a10001") not in dirty_set(rdb.client)
    cached = app_turn(cached, "while PostgreSQL is down")
    app.save_conversation("c1a10002", cached, user_id=alice)  # her cached chat still saves ("Faults")
    assert_cached(rdb.client, alice, "c1a10002", cached, dirty=True)

    own_pg_server.start()

    hers = app_turn(hers, "after the outage")
    app.save_conversation("c1a10001", hers, user_id=alice)
    assert app.get_conversation("c1a10001", user_id=alice) == hers
    with pytest.raises(PermissionError):
        app.save_conversation("c1a10001", make_conversation(1, title="Bob's, again"), user_id=bob)
    assert app.get_conversation("c1a10001", user_id=bob) is None
    assert app.flush_dirty_conversations() == 2
    conn = params.connect()
    try:
        assert_row_matches(conn, "c1a10001", alice, hers)
        assert_row_matches(conn, "c1a10002", alice, cached)
        assert dirty_set(rdb.client) == set()
        assert app.stats()["stuck_conversations"] == []
        app.delete_conversation("c1a10001", user_id=alice)
        assert app.get_conversation("c1a10001", user_id=alice) is None
        assert pg_conversation_ids(conn) == {"c1a10002"}
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# 4. A delete while PostgreSQL is down: all or nothing (docs/design.md, "Deletes")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_delete_while_postgres_is_down_changes_nothing(own_pg_server, make_redis_manager, rdb, user_id, conv_id):
    params = create_database(own_pg_server.params)
    app = make_redis_manager(connection_string=params.url, postgres_connect_timeout=2.0)
    flushed = make_conversation(2, prefix="flushed ")
    app.save_conversation(conv_id, flushed, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    edited = app_turn(flushed, "unflushed edit")
    app.save_conversation(conv_id, edited, user_id=user_id)

    own_pg_server.stop()

    with pytest.raises(UnavailableError):
        app.delete_conversation(conv_id, user_id=user_id)
    assert_cached(rdb.client, user_id, conv_id, edited, dirty=True)
    assert app.get_conversation(conv_id, user_id=user_id) == edited

    own_pg_server.start()

    assert app.get_conversation(conv_id, user_id=user_id) == edited
    assert app.flush_dirty_conversations() == 1
    conn = params.connect()
    try:
        assert_row_matches(conn, conv_id, user_id, edited)
        app.delete_conversation(conv_id, user_id=user_id)
        assert app.get_conversation(conv_id, user_id=user_id) is None
        app.flush_dirty_conversations()
        assert pg_conversation_ids(conn) == set()
        assert app.get_conversation(conv_id, user_id=user_id) is None
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# 5. A flush or close asked for right after Redis returns (docs/design.md, "Faults": it tries Redis now)
# --------------------------------------------------------------------------------------------------


def _back_off_for_long(manager, user_id: str, seconds: float = 4.5) -> None:
    """Keeps calling while Redis is unreachable, so the backoff doubles up to a few seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        manager.get_conversation("0000dead", user_id=user_id)  # falls back to PostgreSQL: None
        time.sleep(0.05)
    assert manager.stats()["redis_available"] is False


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("asked_by", ["flush", "close"])
def test_flush_asked_for_right_after_redis_returns(make_redis_manager, rdb, pg_conn, user_id, conv_id, asked_by):
    with redis_proxy(rdb) as proxy:
        app = make_redis_manager(redis_url=through(proxy, rdb.url), redis_timeout=0.5)
        conversation = make_conversation(3, prefix="dirty ")
        app.save_conversation(conv_id, conversation, user_id=user_id)
        proxy.partition()
        _back_off_for_long(app, user_id)
        proxy.heal()  # Redis is back; the process is still in its backoff

        if asked_by == "flush":
            assert app.flush_dirty_conversations() == 1
        else:
            app.close()
        assert_row_matches(pg_conn, conv_id, user_id, conversation)
        assert dirty_set(rdb.client) == set()


# --------------------------------------------------------------------------------------------------
# 6. Locks, statements and close() without bound (docs/design.md, "The contract" item 6, and "Faults")
# --------------------------------------------------------------------------------------------------


def _reader_holding_access_share(params):
    """A session with a transaction open that has read `conversations` (a report, pg_dump)."""
    reader = params.connect(autocommit=False)
    with reader.cursor() as cur:
        cur.execute("SELECT count(*) FROM conversations")
        cur.fetchone()
    return reader


def _third_client_query(params) -> int:
    """Another client's ordinary query; gives up (raises) after 5 s instead of queueing forever."""
    conn = params.connect(options="-c statement_timeout=5000")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM conversations")
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("redis_tier", [False, True], ids=["postgres", "redis"])
def test_starting_a_manager_does_not_queue_other_clients_behind_a_reader(
    make_manager, rdb, pg_params, pg_conn, redis_tier
):  # fmt: skip
    from chat_history_rs import ChatHistoryManager

    first = make_manager(mode="postgres", connection_string=pg_params.url)  # the schema exists
    first.close()
    reader = _reader_holding_access_share(pg_params)
    kwargs = {"mode": "postgres", "connection_string": pg_params.url}
    if redis_tier:
        kwargs.update(redis_enabled=True, redis_connection_string=rdb.url, background_flush=False)
    started = []
    try:
        outcome, value = call_with_deadline(lambda: started.append(ChatHistoryManager(**kwargs)), 10)
        third = call_with_deadline(lambda: _third_client_query(pg_params), 10)
    finally:
        reader.rollback()  # releases whatever queued behind it
        reader.close()
    if outcome == "hung":
        value.join(30)  # the constructor goes on once the reader is gone: close what it opened
    for manager in started:
        manager.close()
    assert outcome != "hung", "a starting manager waited 10 s behind a reader's ACCESS SHARE lock"
    assert outcome == "returned", value
    assert third == ("returned", 0), f"another client's query while a manager started: {third}"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("configured", [True, False], ids=["lock_timeout_1s", "defaults"])
def test_a_call_blocked_by_a_lock_raises_instead_of_hanging(make_manager, pg_params, pg_conn, user_id, configured):
    """`postgres_lock_timeout` (default 5 s) bounds every statement: a call behind an ACCESS EXCLUSIVE lock
    held elsewhere raises UnavailableError instead of waiting for it (bound checked at 3x the timeout)."""
    kwargs = {"postgres_lock_timeout": 1.0, "postgres_statement_timeout": 10.0} if configured else {}
    bound = 3 * (1.0 if configured else 5.0)
    manager = make_manager(mode="postgres", connection_string=pg_params.url, **kwargs)
    manager.save_conversation("10c00001", make_conversation(2), user_id=user_id)
    locker = pg_params.connect(autocommit=False)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
        outcomes = {
            "get": call_with_deadline(lambda: manager.get_conversation("10c00001", user_id=user_id), bound + 5),
            "save": call_with_deadline(
                lambda: manager.save_conversation("10c00002", make_conversation(1), user_id=user_id), bound + 5
            ),
        }
    finally:
        locker.rollback()
        locker.close()
    for call, (outcome, value) in outcomes.items():
        assert outcome == "raised", f"{call} behind a held lock: {outcome} {value!r} (expected UnavailableError)"
        assert isinstance(value, UnavailableError), f"{call}: {type(value).__name__}: {value}"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_close_with_a_background_flush_stuck_on_postgres_returns_within_close_timeout(
    make_redis_manager, rdb, pg_params, user_id
):  # fmt: skip
    with postgres_proxy(pg_params) as proxy:
        url = postgres_through(proxy, pg_params)
        app = make_redis_manager(
            connection_string=url, background_flush=True, flush_interval=0.2, close_timeout=2.0,
            postgres_connect_timeout=1.0,
        )  # fmt: skip
        app.save_conversation("c105e001", make_conversation(2), user_id=user_id)
        wait_until(lambda: not dirty_set(rdb.client), timeout=15, what="the background flusher at work")
        app.save_conversation("c105e001", make_conversation(4), user_id=user_id)
        proxy.stall()  # PostgreSQL hangs: the next background flush waits on it
        time.sleep(1.0)
        try:
            outcome, value = call_with_deadline(app.close, 3 * 2.0)
        finally:
            proxy.heal()
        assert outcome != "hung", "close() waited past 3x close_timeout on a background flush stuck on PostgreSQL"
        assert outcome == "returned", value


# close() promises to return within close_timeout (docs/design.md, "Faults"). The slack covers a shared 2-core
# machine's scheduling and the release of the pools: a loose bound on a promise, not a benchmark.
CLOSE_TIMEOUT = 2.0
CLOSE_SLACK = 2.0


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "stalled",
    [
        "redis",
        # A flush statement sent over a stalled PostgreSQL link waits on the socket without bound (the server
        # never received it, so statement_timeout cannot end it): close() leaves that flush behind at its deadline.
        "postgres",
    ],
)
def test_close_with_a_stalled_server_returns_within_close_timeout_and_logs_what_stays_dirty(
    make_redis_manager, rdb, pg_params, pg_conn, caplog, user_id, stalled
):  # fmt: skip
    """Three conversations are dirty when Redis or PostgreSQL stalls (accepts, answers nothing), and the app
    closes its manager: close() returns within close_timeout (plus the slack above), logs a warning about what
    it could not write, and leaves the conversations dirty in Redis for a later flush, which writes them."""
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    with redis_proxy(rdb) as redis_link, postgres_proxy(pg_params) as postgres_link:
        app = make_redis_manager(
            redis_url=through(redis_link, rdb.url), connection_string=postgres_through(postgres_link, pg_params),
            redis_timeout=0.5, postgres_connect_timeout=1.0, close_timeout=CLOSE_TIMEOUT,
        )  # fmt: skip
        conversations = {f"c105ed0{i}": make_conversation(2 + i, prefix=f"{i} ") for i in range(3)}
        for cid, conv in conversations.items():
            app.save_conversation(cid, conv, user_id=user_id)  # each save asked PostgreSQL about the new id
        (redis_link if stalled == "redis" else postgres_link).stall()
        caplog.clear()
        started = time.monotonic()
        try:
            outcome, value = call_with_deadline(app.close, CLOSE_TIMEOUT + CLOSE_SLACK + 3)
            elapsed = time.monotonic() - started
            # Before the links heal: nothing written, everything still dirty.
            assert dirty_set(rdb.client) == {dirty_member(user_id, cid) for cid in conversations}
            assert pg_conversation_ids(pg_conn) == set()
        finally:
            redis_link.heal()  # a close() still waiting on the link ends once the link forwards again
            postgres_link.heal()
        assert outcome != "hung", f"close() with {stalled} stalled had not returned after {elapsed:.1f} s"
        assert outcome == "returned", value
        assert elapsed <= CLOSE_TIMEOUT + CLOSE_SLACK, (
            f"close() with {stalled} stalled took {elapsed:.1f} s (close_timeout={CLOSE_TIMEOUT})"
        )
        complaints = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("chat_history_rs") and "dirty" in r.getMessage()
        ]
        assert complaints, f"close() could not write 3 dirty conversations and logged nothing about them: {caplog.text}"
        if stalled == "postgres":  # Redis answers: close() can say how many stay dirty
            assert any(" 3 " in f" {text} " for text in complaints), complaints

    later = make_redis_manager()
    if stalled == "redis":
        assert later.flush_dirty_conversations() == 3
    else:
        # The flush close() left behind reaches PostgreSQL once the link heals, and races this one: each
        # conversation is written by one of them, and the dirty set empties.
        def drained() -> bool:
            later.flush_dirty_conversations()
            return dirty_set(rdb.client) == set()

        wait_until(drained, timeout=20, what="the dirty set emptied")
    for cid, conv in conversations.items():
        assert_row_matches(pg_conn, cid, user_id, conv)


# --------------------------------------------------------------------------------------------------
# 7. Fork (docs/design.md, "Processes"): a forked child gets its own connections; no reply reaches the wrong one
# --------------------------------------------------------------------------------------------------

# Each fork experiment runs in a fresh interpreter: a reply read by the wrong process can leave a call waiting
# forever inside the extension, where no pytest timeout can interrupt it; a subprocess can always be killed.
FORK_EXPERIMENT = """
    import json, os, sys, time, uuid
    sys.path.insert(0, os.environ["T_TESTS"])
    from support.chaos_support import hammer
    from chat_history_rs import ChatHistoryManager

    app = ChatHistoryManager(
        mode="postgres", connection_string=os.environ["T_PG"], redis_enabled=True,
        redis_connection_string=os.environ["T_REDIS"], background_flush=True, flush_interval=0.2,
    )
    parent_user = str(uuid.uuid4())
    warm = {"title": "before the fork", "model": "gpt-4o", "messages": [
        {"role": "user", "content": "hello", "time": "2025-11-26T00:35:21.123456+00:00"}],
        "created_at": "2025-11-26T00:35:21.123456+00:00", "last_modified": "2025-11-26T00:35:21.123456+00:00"}
    app.save_conversation("0f0f0001", warm, user_id=parent_user)
    for _ in range(3):  # pools open, connections in use
        assert app.get_conversation("0f0f0001", user_id=parent_user) == warm
    out = {}
    if os.environ["T_HOW"] == "os.fork":
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                result = hammer(app, str(uuid.uuid4()), uuid.uuid4().hex[:4])
            except BaseException as exc:
                result = {"error": repr(exc)}
            os.write(write_fd, json.dumps(result).encode())
            os._exit(0)
        os.close(write_fd)
        out["parent"] = hammer(app, parent_user, uuid.uuid4().hex[:4])
        _, status = os.waitpid(pid, 0)
        out["child_exit"] = [os.waitstatus_to_exitcode(status)]
        with os.fdopen(read_fd, "rb") as pipe:
            out["children"] = [json.loads(pipe.read() or b"{}")]
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        def work(user):
            queue.put(hammer(app, user, uuid.uuid4().hex[:4]))
        workers = [ctx.Process(target=work, args=(str(uuid.uuid4()),)) for _ in range(2)]
        for w in workers:
            w.start()
        out["parent"] = hammer(app, parent_user, uuid.uuid4().hex[:4])
        out["children"] = [queue.get(timeout=60) for _ in workers]
        for w in workers:
            w.join()
        out["child_exit"] = [w.exitcode for w in workers]
    # The parent keeps working after its children exited.
    later = dict(warm, title="after the children exited")
    app.save_conversation("0f0f0001", later, user_id=parent_user)
    out["after"] = app.get_conversation("0f0f0001", user_id=parent_user) == later
    app.close()
    print(json.dumps(out), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_forked_processes_each_get_their_own_data(rdb, pg_url, how):
    """A manager opened (pools in use, background flusher running) before a fork: parent and children hammer
    their own users' conversations at once; every read must be what that process wrote, no call may hang,
    and the parent keeps working after the children exit."""
    env = script_env(T_PG=pg_url, T_REDIS=rdb.url, T_HOW=how, T_TESTS=TESTS_DIR)
    proc = subprocess.Popen(
        python_script(FORK_EXPERIMENT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the fork experiment ({how}) hung: a call never returned\n{err[-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["child_exit"] == [0] * len(result["children"])
    for who, run in [("parent", result["parent"])] + [(f"child {i}", r) for i, r in enumerate(result["children"])]:
        assert "error" not in run, f"{who}: {run}"
        assert run["wrong"] == [], f"{who} read data that was not its own: {run['wrong']}"
        assert run["calls"] > 50, f"{who} made only {run['calls']} calls: no real interleaving"
    assert result["after"] is True, "the parent's own save did not read back after the children exited"


FORK_WAITS_FOR_CALLS = """
    import os, sys, threading, time, uuid
    sys.path.insert(0, os.environ["T_TESTS"])
    from support.redis_support import make_conversation
    from chat_history_rs import ChatHistoryManager, _core

    app = ChatHistoryManager(
        mode="postgres", connection_string=os.environ["T_PG"], redis_enabled=True,
        redis_connection_string=os.environ["T_REDIS"], background_flush=False,
    )
    user = str(uuid.uuid4())
    app.save_conversation(uuid.uuid4().hex[:8], make_conversation(2), user_id=user)
    _core._failpoint_pause("flush.after_read", 1)
    held = threading.Thread(target=app.flush_dirty_conversations)
    held.start()
    assert _core._failpoint_wait("flush.after_read", 1, 20.0)
    started = time.monotonic()
    threading.Timer(1.0, lambda: _core._failpoint_release("flush.after_read")).start()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    waited = time.monotonic() - started
    os.waitpid(pid, 0)
    held.join()
    print(f"waited {waited:.2f}", flush=True)
"""


@pytest.mark.timeout(90)
def test_a_fork_waits_for_the_calls_in_flight(rdb, pg_url):
    """A flush is held in flight (failpoint) when the main thread forks; the fork waits until the call ends (the
    failpoint is released after 1 s), so the child is not copied from a thread half-way through the product."""
    env = script_env(T_PG=pg_url, T_REDIS=rdb.url, T_TESTS=TESTS_DIR)
    done = subprocess.run(python_script(FORK_WAITS_FOR_CALLS), env=env, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stderr[-3000:]
    waited = float(done.stdout.strip().splitlines()[-1].split()[1])
    assert 0.9 <= waited < 4.5, f"the fork waited {waited:.2f} s for a call that ended after 1 s"


MANY_FORKS = """
    import os, sys, threading, time, uuid
    sys.path.insert(0, os.environ["T_TESTS"])
    from support.redis_support import grown, make_conversation
    from chat_history_rs import ChatHistoryManager

    settings = dict(
        mode="postgres", connection_string=os.environ["T_PG"], redis_enabled=True,
        redis_connection_string=os.environ["T_REDIS"], background_flush=True, flush_interval=0.05,
    )
    app = ChatHistoryManager(**settings)
    parent_user = str(uuid.uuid4())
    tag = uuid.uuid4().hex[:4]  # ids of this process's own
    stop = threading.Event()

    def busy(thread):  # the parent's pools stay in use (and grow) while it forks
        # A chat as an app writes it, one message more per save, and a new one every 50 (a save that replaced
        # a chat with other content every time would keep each replaced copy aside: docs/design.md, "Write order").
        n, conversation = 0, None
        while not stop.is_set():
            cid = f"parent-{tag}-{thread}-{n // 50}"
            conversation = make_conversation(1) if n % 50 == 0 else grown(conversation, 1)
            app.save_conversation(cid, conversation, user_id=parent_user)
            app.get_conversation(cid, user_id=parent_user)
            n += 1

    threads = [threading.Thread(target=busy, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    hung = failed = 0
    for i in range(int(os.environ["T_FORKS"])):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                user = str(uuid.uuid4())
                for n in range(3):
                    cid = f"child-{tag}-{i}-{n}"
                    conversation = make_conversation(2, title=f"child {i} {n}")
                    app.save_conversation(cid, conversation, user_id=user)
                    if app.get_conversation(cid, user_id=user) != conversation:
                        print(f"child {i}: {cid} did not read back", file=sys.stderr, flush=True)
                        break
                    app.list_conversations(user)
                else:
                    code = 0
                # Managers opened in the child: each opens its pools as the inherited one did.
                more = [ChatHistoryManager(**settings) for _ in range(8)]
                for k, manager in enumerate(more):
                    conversation = make_conversation(1, title=f"child {i} manager {k}")
                    manager.save_conversation(f"child-{tag}-{i}-m{k}", conversation, user_id=user)
                    if manager.get_conversation(f"child-{tag}-{i}-m{k}", user_id=user) != conversation:
                        print(f"child {i}: manager {k} did not read back", file=sys.stderr, flush=True)
                        code = 1
                for manager in more:
                    manager.close()
            except BaseException as exc:
                print(f"child {i}: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                failed += os.waitstatus_to_exitcode(status) != 0
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                hung += 1
                break
            time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    app.close()
    print(f"hung={hung} failed={failed}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_forks_while_the_parent_is_busy_never_hang(rdb, pg_url):
    """Children forked while three threads of the parent save and read and its background flusher runs: each
    child uses the inherited manager and opens eight more; none may hang or fail. Six processes fork three
    children each, since where things land in memory differs between processes (ASLR). With r2d2's pools,
    whose worker threads sat parked at the fork, 11 children in 12 hung: parking_lot's table of parked
    threads, copied into the child, pointed into stacks that the child's new threads reused."""
    env = script_env(T_PG=pg_url, T_REDIS=rdb.url, T_FORKS="3", T_TESTS=TESTS_DIR)
    outcomes = []
    for _ in range(2):
        batch = [
            subprocess.Popen(python_script(MANY_FORKS), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for _ in range(3)
        ]  # fmt: skip
        for proc in batch:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            outcomes.append((out.strip().splitlines()[-1], err[-2000:]))
    assert [outcome for outcome, _ in outcomes] == ["hung=0 failed=0"] * len(outcomes), outcomes


FORK_WHILE_TRACKER_LOCKED = """
    import os, sys, time, uuid
    import redis
    sys.path.insert(0, os.environ["T_TESTS"])
    from support.near_support import wait_tracking
    from support.redis_support import make_conversation
    from chat_history_rs import ChatHistoryManager, _core

    app = ChatHistoryManager(mode="postgres", connection_string=os.environ["T_PG"], redis_enabled=True,
                             redis_connection_string=os.environ["T_REDIS"], background_flush=False)
    wait_tracking(app)
    user = str(uuid.uuid4())
    app.save_conversation("f0a00001", make_conversation(1), user_id=user)
    app.get_conversation("f0a00001", user_id=user)
    # The tracker stops inside its near cache's lock at the next invalidation: another client's write.
    _core._failpoint_pause("near.invalidate.locked", 1)
    redis.Redis.from_url(os.environ["T_REDIS"]).hset(f"conv:{user}:f0a00001", "title", "changed elsewhere")
    assert _core._failpoint_wait("near.invalidate.locked", 1, 10.0), "the tracker never applied the invalidation"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            app.save_conversation("f0a00002", make_conversation(1), user_id=user)  # drops this process's copies
            code = 0 if app.get_conversation("f0a00002", user_id=user) else 1
        finally:
            os._exit(code)
    deadline, outcome = time.monotonic() + 15, "hung"
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            outcome = f"exit={os.waitstatus_to_exitcode(status)}"
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    _core._failpoint_release("near.invalidate.locked")
    app.close()
    print(outcome, flush=True)
"""


@pytest.mark.timeout(90)
def test_a_child_forked_while_the_tracker_holds_its_lock_does_not_hang(rdb, pg_url, failpoints):
    """The fork gate waits for calls, not for the near cache's tracking thread, which may hold its cache's
    lock at the instant of the fork. A save in the child drops this process's copies from every near cache
    of the process: the parent's inherited one too, whose lock no thread of the child will ever release
    (found by test_forks_while_the_parent_is_busy_never_hang: one child in 18 hung once, under load). The
    tracker is held inside its lock here (a failpoint, in the script's process) while the parent forks."""
    env = script_env(T_PG=pg_url, T_REDIS=rdb.url, T_TESTS=TESTS_DIR)
    proc = subprocess.run(python_script(FORK_WHILE_TRACKER_LOCKED), env=env, capture_output=True, text=True,
                          timeout=80)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "exit=0", (proc.stdout, proc.stderr[-3000:])


# --------------------------------------------------------------------------------------------------
# 8. The outdated-copies list, versions from a clock ahead, owner keys of dropped copies ("Versions", "Divergence")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_caching_resumes_after_an_outage_with_thousands_of_fallback_saves(make_redis_manager, rdb, user_id):
    """6000 saves of 5 ids went to PostgreSQL while Redis was away. On a link of 20 kB/s to Redis (a distant or
    congested cache) the outdated copies to drop are still only 5: caching must resume within 30 s."""
    with throttled_redis_proxy(rdb) as proxy:
        app = make_redis_manager(redis_url=through(proxy, rdb.url), redis_timeout=0.5)
        ids = [f"8a{n:06d}" for n in range(5)]
        latest = {cid: make_conversation(1, title=cid) for cid in ids}
        for cid in ids:
            app.save_conversation(cid, latest[cid], user_id=user_id)
        proxy.throttle(20_000)
        proxy.partition()
        saves = 0
        while saves < 6000:  # the same few ids, over and over, straight to PostgreSQL
            cid = ids[saves % len(ids)]
            latest[cid] = {**latest[cid], "title": f"{cid} save {saves}"}
            app.save_conversation(cid, latest[cid], user_id=user_id)
            saves += 1
        assert app.stats()["redis_available"] is False
        proxy.heal()

        def cached_again() -> bool:
            latest[ids[0]] = app_turn(latest[ids[0]], "after the outage")
            app.save_conversation(ids[0], latest[ids[0]], user_id=user_id)
            cached = seed_fields(rdb.client, user_id, ids[0])
            return cached is not None and cached["title"] == latest[ids[0]]["title"] and cached["dirty"] == "1"

        # Each call in its own bounded wait: a call that blocks on the link (writing the whole list) is a hang.
        outcome, value = call_with_deadline(
            lambda: wait_until(
                cached_again, timeout=30, interval=0.5, what="caching resumed after 6000 fallback saves"
            ),
            40,
        )
        if outcome == "hung":
            proxy.close()  # frees the blocked call before the manager is closed
        assert outcome != "hung", "caching did not resume within 40 s of Redis returning (a call blocked on the link)"
        assert outcome == "returned", value
        assert app.stats()["redis_available"] is True
        assert_cached(rdb.client, user_id, ids[0], latest[ids[0]], dirty=True)
        for cid in ids:
            assert app.get_conversation(cid, user_id=user_id) == latest[cid]


@pytest.mark.timeout(60)
def test_save_after_postgres_version_ran_ahead_is_flushed_as_the_newest(
    make_redis_manager, rdb, pg_conn, user_id, conv_id
):  # fmt: skip
    """A PostgreSQL clock far ahead gave the row a cache_version Redis's clock will not reach for years; the
    cached copy expired. The next save is still the newest: the flush writes it and puts nothing aside."""
    app = make_redis_manager()
    flushed = make_conversation(2, prefix="flushed ")
    app.save_conversation(conv_id, flushed, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    with pg_conn.cursor() as cur:
        cur.execute("UPDATE conversations SET cache_version = cache_version + 1000000000000")
    rdb.client.delete(conv_key(user_id, conv_id))  # the clean copy expired

    later = app_turn(app.get_conversation(conv_id, user_id=user_id), "saved later")
    rdb.client.delete(conv_key(user_id, conv_id))  # and the read's backfill expired too
    app.save_conversation(conv_id, later, user_id=user_id)
    app.flush_dirty_conversations()

    assert_row_matches(pg_conn, conv_id, user_id, later)
    assert app.get_conversation(conv_id, user_id=user_id) == later
    assert conflict_count(pg_conn) == 0
    assert dirty_set(rdb.client) == set()


@pytest.mark.timeout(60)
def test_a_copy_older_than_another_users_tombstone_never_comes_back(
    make_redis_manager, rdb, pg_conn, user_id, conv_id
):  # fmt: skip
    """The owner deletes through an instance cut off from Redis: PostgreSQL holds the tombstone, Redis still the
    dirty copy. Another user then claims the free id and deletes it in turn, so the tombstone becomes theirs (the
    chaos checker found this path). The owner's old copy must not be flushed back."""
    app = make_redis_manager()
    first = make_conversation(2)
    app.save_conversation(conv_id, first, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    app.save_conversation(conv_id, grown(first, 2), user_id=user_id)  # dirty in Redis
    with redis_proxy(rdb) as proxy:
        cut_off = make_redis_manager(redis_url=through(proxy, rdb.url), redis_timeout=0.5)
        proxy.partition()
        cut_off.delete_conversation(conv_id, user_id=user_id)
    assert conv_id not in pg_conversation_ids(pg_conn)
    with pg_conn.cursor() as cur:  # what the other user's claim and delete leave behind
        cur.execute(
            "UPDATE conversation_tombstones SET user_client_id = 'another-user', deleted_version = deleted_version + 1"
            " WHERE conversation_id = %s",
            (conv_id,),
        )
        assert cur.rowcount == 1
    app.flush_dirty_conversations()
    assert conv_id not in pg_conversation_ids(pg_conn), "the deleted copy was flushed back"
    assert app.get_conversation(conv_id, user_id=user_id) is None


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_owner_key_of_a_dropped_stale_copy_expires(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    """Instance A holds a dirty copy; instance B, cut off from Redis, saves a newer version straight to
    PostgreSQL. A's flush drops (or keeps aside) its stale copy: the id's owner record must not stay forever."""
    a = make_redis_manager()
    first = make_conversation(2, prefix="first ")
    a.save_conversation(conv_id, first, user_id=user_id)
    assert a.flush_dirty_conversations() == 1
    stale = app_turn(first, "A, dirty")
    a.save_conversation(conv_id, stale, user_id=user_id)
    with redis_proxy(rdb) as proxy:
        b = make_redis_manager(redis_url=through(proxy, rdb.url), redis_timeout=0.5)
        proxy.partition()
        newer = app_turn(b.get_conversation(conv_id, user_id=user_id), "B, straight to PostgreSQL")
        b.save_conversation(conv_id, newer, user_id=user_id)
        assert_row_matches(pg_conn, conv_id, user_id, newer)

        a.flush_dirty_conversations()
        assert_row_matches(pg_conn, conv_id, user_id, newer)
        assert rdb.client.hget(conv_key(user_id, conv_id), "dirty") != "1"
        ttl = rdb.client.ttl(owner_key(conv_id))
        assert ttl == -2 or ttl > 0, f"owner:{conv_id} of a dropped copy has no TTL ({ttl})"
        proxy.heal()


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("refusal", ["oom", "readonly"])
def test_a_save_refused_by_redis_never_leaves_the_older_copy_served(
    make_redis_server, make_redis_manager, pg_conn, user_id, conv_id, refusal
):  # fmt: skip
    """Redis answers but refuses writes (out of memory under noeviction; READONLY after a failover demoted the
    node): the save goes to PostgreSQL, and the older clean copy still cached must never be served again, not
    even after Redis accepts writes again (the outdated copy is dropped without Redis being marked degraded)."""
    import redis as redis_py

    from support.servers import closed_port

    server = make_redis_server("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    client = redis_client(server.url)
    app = make_redis_manager(redis_url=server.url)
    v1 = make_conversation(2, title="v1")
    app.save_conversation(conv_id, v1, user_id=user_id)
    assert app.flush_dirty_conversations() == 1
    assert_cached(client, user_id, conv_id, v1, dirty=False)

    fillers = 0
    if refusal == "oom":
        with pytest.raises(redis_py.exceptions.ResponseError):
            while fillers < 10_000:
                client.set(f"filler:{fillers}", "f" * 10_000)
                fillers += 1
    else:
        client.execute_command("REPLICAOF", "127.0.0.1", str(closed_port()))  # demoted; its master is unreachable
        with pytest.raises(redis_py.exceptions.ReadOnlyError):
            client.set("probe", "1")

    v2 = app_turn({**v1, "title": "v2"}, "while Redis refused writes")
    app.save_conversation(conv_id, v2, user_id=user_id)
    # To PostgreSQL, or (Redis may let a script's write in over maxmemory) dirty into Redis: either way the
    # newest save is what a read returns.
    assert app.get_conversation(conv_id, user_id=user_id) == v2

    if refusal == "oom":
        client.delete(*[f"filler:{n}" for n in range(fillers)])
    else:
        client.execute_command("REPLICAOF", "NO", "ONE")
    client.set("probe", "1")  # Redis accepts writes again

    assert app.get_conversation(conv_id, user_id=user_id) == v2
    assert [(cid, meta["title"]) for cid, meta in app.list_conversations(user_id)] == [(conv_id, "v2")]
    app.flush_dirty_conversations()
    assert_row_matches(pg_conn, conv_id, user_id, v2)
    assert app.get_conversation(conv_id, user_id=user_id) == v2
