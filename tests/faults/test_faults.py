"""Faults and races of the Redis tier (docs/design.md, "Write-back" and "Faults"), with real servers that are
killed, stopped, restarted, filled up, or cut off behind a TCP proxy. Each test ends by checking the data row by
row.
"""

from __future__ import annotations

import random
import signal
from dataclasses import replace
import subprocess
import threading
import time

import pytest

from chat_history_rs import ChatHistoryError, UnavailableError, _core
from support.redis_support import (
    assert_cached,
    conv_key,
    dirty_member,
    dirty_set,
    grown,
    make_conversation,
    pg_conversation_ids,
    pg_message_count,
    python_script,
    redis_client,
    script_env,
    seed_fields,
    wait_until,
    write_seed_hash,
)
from support.servers import assert_row_matches, create_database, fetch_conversation_row
from support.tcp_proxy import TcpProxy


def _assert_postgres_unavailable(exc: BaseException) -> None:
    assert isinstance(exc, ConnectionError), f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, UnavailableError), f"{type(exc).__name__}: {exc}"
    assert "PostgreSQL" in str(exc), str(exc)


def _needs_failpoints() -> None:
    """The flusher processes some tests start stop at a failpoint or slow down at one."""
    if not _core._failpoints_enabled():
        pytest.fail("this build has no failpoints: build with `make dev-test` (make test does)")


def _flush_while_postgres_is_down(manager) -> None:
    """docs/design.md, "Faults": while PostgreSQL is unreachable, flushes keep everything dirty. Returning 0
    or raising UnavailableError (naming PostgreSQL) are both accepted: the docs do not pin which."""
    try:
        assert manager.flush_dirty_conversations() == 0
    except UnavailableError as exc:
        _assert_postgres_unavailable(exc)


# --------------------------------------------------------------------------------------------------
# 1. A save racing flushes is never marked clean without being written (docs/design.md, "Write-back")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_save_flush_race_loses_nothing(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    saver = make_redis_manager()
    flusher = make_redis_manager()  # another app instance (or the standalone flusher) on the same Redis
    conversation = make_conversation(1, prefix="race ")
    saver.save_conversation(conv_id, conversation, user_id=user_id)

    done = threading.Event()
    errors: list[BaseException] = []
    flushed = [0]

    def flush_loop() -> None:
        try:
            while not done.is_set():
                flushed[0] += flusher.flush_dirty_conversations()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=flush_loop)
    thread.start()
    deadline = time.monotonic() + 20
    rounds = 0
    try:
        while rounds < 2000 and time.monotonic() < deadline:
            conversation = grown(conversation, 1, text=f"round {rounds}")
            saver.save_conversation(conv_id, conversation, user_id=user_id)
            rounds += 1
    finally:
        done.set()
        thread.join(timeout=30)
    assert errors == []
    assert rounds >= 100 and flushed[0] >= 10, (rounds, flushed[0])  # there really was a race

    saver.flush_dirty_conversations()
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    assert dirty_set(rdb.client) == set()
    assert_cached(rdb.client, user_id, conv_id, conversation, dirty=False)
    assert saver.get_conversation(conv_id, user_id=user_id) == conversation


# --------------------------------------------------------------------------------------------------
# 2. A delete racing a flush: the conversation never comes back (docs/design.md, "Deletes")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_delete_flush_race_never_resurrects(make_redis_manager, rdb, pg_conn, user_id):
    app = make_redis_manager()
    flusher = make_redis_manager()
    keeper = make_conversation(2, title="survivor")
    app.save_conversation("5a5a5a5a", keeper, user_id=user_id)
    deleted: list[str] = []
    errors: list[BaseException] = []
    rng = random.Random(7)

    for n in range(300):
        cid = f"de1e{n:04d}"
        conversation = make_conversation(3, prefix=f"{n} ")
        app.save_conversation(cid, conversation, user_id=user_id)
        if n % 2:  # half of them already exist in PostgreSQL and are dirty again
            app.flush_dirty_conversations()
            app.save_conversation(cid, grown(conversation, 1), user_id=user_id)
        barrier = threading.Barrier(2)

        def flush(barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait()
                time.sleep(rng.random() * 0.002)
                flusher.flush_dirty_conversations()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=flush)
        thread.start()
        barrier.wait()
        time.sleep(rng.random() * 0.002)
        app.delete_conversation(cid, user_id=user_id)
        deleted.append(cid)
        thread.join()
    assert errors == []

    in_postgres = sorted(pg_conversation_ids(pg_conn) - {"5a5a5a5a"})
    in_redis = [cid for cid in deleted if rdb.client.exists(conv_key(user_id, cid))]
    assert (in_postgres, in_redis) == ([], []), "deleted conversations came back right after the race"
    app.flush_dirty_conversations()
    flusher.flush_dirty_conversations()
    assert pg_conversation_ids(pg_conn) == {"5a5a5a5a"}
    assert pg_message_count(pg_conn) == 2
    assert_row_matches(pg_conn, "5a5a5a5a", user_id, keeper)
    assert [cid for cid in deleted if rdb.client.exists(conv_key(user_id, cid))] == []
    assert dirty_set(rdb.client) == set()
    assert [cid for cid in deleted if app.get_conversation(cid, user_id=user_id) is not None] == []
    assert [cid for cid, _ in app.list_conversations(user_id)] == ["5a5a5a5a"]


# --------------------------------------------------------------------------------------------------
# 3. Two flusher processes: no older version overwrites a newer one (docs/design.md, "Write-back")
# --------------------------------------------------------------------------------------------------

FLUSHER_LOOP = """
    import os, sys, threading
    from chat_history_rs import ChatHistoryManager, _core
    manager = ChatHistoryManager(
        mode="postgres", connection_string=os.environ["T_PG"], redis_enabled=True,
        redis_connection_string=os.environ["T_REDIS"], background_flush=False, flush_batch_size=20,
    )
    # The first flush stops after its read, before PostgreSQL, until the test says go: the test makes
    # both flushers hold the same conversation there. Later flushes run freely.
    _core._failpoint_pause("flush.after_read", 1)
    first = []
    thread = threading.Thread(target=lambda: first.append(manager.flush_dirty_conversations()), daemon=True)
    thread.start()
    assert _core._failpoint_wait("flush.after_read", 1, 30.0)
    print("holding", flush=True)
    sys.stdin.readline()
    _core._failpoint_release("flush.after_read")
    thread.join()
    print("first", first[0], flush=True)
    written = first[0]
    while not os.path.exists(os.environ["T_STOP"]):
        written += manager.flush_dirty_conversations()
    manager.close()
    print(written, flush=True)
"""


def _start_holding_flusher(env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        python_script(FLUSHER_LOOP), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    line = proc.stdout.readline().strip()
    assert line == "holding", f"the flusher did not reach flush.after_read: {line!r}"
    return proc


def _go(proc: subprocess.Popen) -> int:
    """Lets a holding flusher's first flush go on; returns how many conversations it wrote."""
    proc.stdin.write("go\n")
    proc.stdin.flush()
    word, written = proc.stdout.readline().split()
    assert word == "first", word
    return int(written)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_flusher_processes_keep_the_newest_version(
    make_redis_manager, rdb, pg_url, pg_conn, user_id, tmp_path
):  # fmt: skip
    """Two flusher processes overlap on one conversation, proven: while it is the only dirty one, each stops
    right after reading it (a failpoint), A holding v0 and B v1, before either wrote or settled. B writes
    first, then A's older copy reaches PostgreSQL and must write nothing. Then both flush freely while the
    app saves 200 conversations three times over; once they have emptied the dirty set, PostgreSQL must
    hold every newest version, checked before anyone else flushes."""
    _needs_failpoints()
    stop = tmp_path / "stop"
    env = script_env(T_PG=pg_url, T_REDIS=rdb.url, T_STOP=str(stop))
    manager = make_redis_manager()
    ids = [f"2f{n:06d}" for n in range(200)]
    contested = ids[0]
    finals = {contested: make_conversation(1, title="v0", prefix=f"{contested} ")}
    manager.save_conversation(contested, finals[contested], user_id=user_id)
    procs: list[subprocess.Popen] = []
    try:
        # Only `contested` is dirty: a flusher that reached flush.after_read read it (and no other).
        procs.append(_start_holding_flusher(env))  # A holds v0
        finals[contested] = grown({**finals[contested], "title": "v1"}, 2, text="v1")
        manager.save_conversation(contested, finals[contested], user_id=user_id)
        procs.append(_start_holding_flusher(env))  # B holds v1
        assert dirty_set(rdb.client) == {dirty_member(user_id, contested)}
        assert pg_conversation_ids(pg_conn) == set()  # both hold it between their read and their write
        a, b = procs
        assert _go(b) == 1
        assert_row_matches(pg_conn, contested, user_id, finals[contested])
        assert _go(a) == 0  # A's v0 came after B's v1: refused
        assert_row_matches(pg_conn, contested, user_id, finals[contested])

        for cid in ids[1:]:
            finals[cid] = make_conversation(1, title="v0", prefix=f"{cid} ")
            manager.save_conversation(cid, finals[cid], user_id=user_id)
        for version in range(2, 5):
            for cid in ids:
                finals[cid] = grown({**finals[cid], "title": f"v{version}"}, 2, text=f"v{version}")
                manager.save_conversation(cid, finals[cid], user_id=user_id)
        # The flushers alone write everything back; nothing else flushes before the check.
        wait_until(lambda: not dirty_set(rdb.client), timeout=60, interval=0.1, what="the flushers emptying it")
        assert pg_conversation_ids(pg_conn) == set(finals)
        for cid, conv in finals.items():
            assert_row_matches(pg_conn, cid, user_id, conv)
        assert pg_message_count(pg_conn) == sum(len(c["messages"]) for c in finals.values())
    finally:
        stop.touch()
        outputs = []
        for proc in procs:
            outputs.append(proc.communicate(timeout=60))  # closing stdin also lets a holding flusher go on
    for proc, (_out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    written = [int(out.split()[-1]) for out, _ in outputs]
    print("written by each flusher:", written)
    assert all(n > 0 for n in written), f"a flusher wrote nothing while the app saved: {written}"


# --------------------------------------------------------------------------------------------------
# 4. Redis down: straight to PostgreSQL, then caching resumes by itself (docs/design.md, "Faults")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_redis_down_falls_back_to_postgres_and_recovers(
    make_redis_server, make_redis_manager, pg_conn, user_id, other_user_id
):
    server = make_redis_server()
    client = redis_client(server.url)
    manager = make_redis_manager(redis_url=server.url, redis_timeout=0.5)
    cached = make_conversation(2, title="cached before the outage")
    manager.save_conversation("0a000001", cached, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1
    fallbacks = manager.stats()["postgres_fallbacks"]

    server.kill()

    during = make_conversation(3, title="saved during the outage")
    manager.save_conversation("0a000002", during, user_id=user_id)
    assert_row_matches(pg_conn, "0a000002", user_id, during)  # straight to PostgreSQL, nothing lost
    cached = grown(cached, 2)
    manager.save_conversation("0a000001", cached, user_id=user_id)
    assert_row_matches(pg_conn, "0a000001", user_id, cached)
    doomed = make_conversation(1, title="deleted during the outage")
    manager.save_conversation("0a000003", doomed, user_id=user_id)
    assert_row_matches(pg_conn, "0a000003", user_id, doomed)
    manager.delete_conversation("0a000003", user_id=user_id)
    assert "0a000003" not in pg_conversation_ids(pg_conn)
    with pytest.raises(PermissionError):  # ownership holds on the fallback path too
        manager.save_conversation("0a000001", make_conversation(1, title="intruder"), user_id=other_user_id)
    manager.delete_conversation("0a000001", user_id=other_user_id)
    assert_row_matches(pg_conn, "0a000001", user_id, cached)

    assert manager.get_conversation("0a000001", user_id=user_id) == cached
    assert manager.get_conversation("0a000002", user_id=user_id) == during
    assert manager.get_conversation("0a000003", user_id=user_id) is None
    assert [cid for cid, _ in manager.list_conversations(user_id)] == ["0a000001", "0a000002"]
    try:  # nothing can be read from a dead Redis: 0, or UnavailableError naming Redis (the docs do not pin it)
        assert manager.flush_dirty_conversations() == 0
    except UnavailableError as exc:
        assert "Redis" in str(exc), str(exc)
    stats = manager.stats()
    assert stats["redis_available"] is False
    assert stats["postgres_fallbacks"] > fallbacks

    server.start()  # same port, empty

    latest = {"v": during}

    def cached_again() -> bool:
        latest["v"] = grown(latest["v"], 1)
        manager.save_conversation("0a000002", latest["v"], user_id=user_id)
        return seed_fields(client, user_id, "0a000002") is not None

    wait_until(cached_again, timeout=30, interval=0.2, what="caching resumed after Redis came back")
    assert_cached(client, user_id, "0a000002", latest["v"], dirty=True)
    assert manager.stats()["redis_available"] is True
    assert manager.get_conversation("0a000002", user_id=user_id) == latest["v"]
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, "0a000002", user_id, latest["v"])
    assert_row_matches(pg_conn, "0a000001", user_id, cached)
    assert manager.get_conversation("0a000001", user_id=user_id) == cached


# --------------------------------------------------------------------------------------------------
# 5. Partition, then heal: the stale dirty copy never overwrites the newer save (docs/design.md, "Divergence")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["partition", "stall"])
def test_partition_then_heal_keeps_the_newer_version(make_redis_manager, rdb, pg_conn, user_id, conv_id, fault):
    with TcpProxy(rdb.server.port) as proxy:
        manager = make_redis_manager(redis_url=proxy.url(), redis_timeout=0.5)
        v1 = make_conversation(2, title="v1")
        manager.save_conversation(conv_id, v1, user_id=user_id)
        assert_cached(rdb.client, user_id, conv_id, v1, dirty=True)

        if fault == "partition":
            proxy.partition()
        else:
            proxy.stall()
        v2 = grown({**v1, "title": "v2"}, 2)
        manager.save_conversation(conv_id, v2, user_id=user_id)  # Redis unreachable: straight to PostgreSQL
        assert_row_matches(pg_conn, conv_id, user_id, v2)
        assert manager.get_conversation(conv_id, user_id=user_id) == v2

        # Another instance never lost Redis and flushes the stale v1 it finds dirty there: v2 must stay.
        other_instance = make_redis_manager()
        other_instance.flush_dirty_conversations()
        assert_row_matches(pg_conn, conv_id, user_id, v2)
        proxy.heal()

        # An explicit flush tries Redis at once, backoff or not; v1 (still dirty in Redis) must never win.
        manager.flush_dirty_conversations()
        assert_row_matches(pg_conn, conv_id, user_id, v2)
        assert dirty_set(rdb.client) == set()
        assert manager.stats()["redis_available"] is True
        assert manager.get_conversation(conv_id, user_id=user_id) == v2
        assert [(cid, c["title"]) for cid, c in manager.list_conversations(user_id)] == [(conv_id, "v2")]

        assert other_instance.get_conversation(conv_id, user_id=user_id) == v2

        # And a later save goes through Redis again and is flushed normally.
        v3 = grown({**v2, "title": "v3"}, 1)
        manager.save_conversation(conv_id, v3, user_id=user_id)
        assert manager.flush_dirty_conversations() == 1
        assert_row_matches(pg_conn, conv_id, user_id, v3)
        assert dirty_set(rdb.client) == set()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_delete_during_partition_is_not_undone_by_the_stale_copy(make_redis_manager, rdb, pg_conn, user_id):
    """docs/design.md, "Deletes": a delete made while Redis was unreachable; the dirty copy left in Redis never
    comes back."""
    with TcpProxy(rdb.server.port) as proxy:
        manager = make_redis_manager(redis_url=proxy.url(), redis_timeout=0.5)
        flushed = make_conversation(2, title="flushed, then changed, then deleted")
        manager.save_conversation("de100001", flushed, user_id=user_id)
        manager.flush_dirty_conversations()
        manager.save_conversation("de100001", grown(flushed, 1), user_id=user_id)  # dirty again
        never_flushed = make_conversation(2, title="never flushed, then deleted")
        manager.save_conversation("de100002", never_flushed, user_id=user_id)
        assert dirty_set(rdb.client) == {dirty_member(user_id, "de100001"), dirty_member(user_id, "de100002")}

        proxy.partition()
        manager.delete_conversation("de100001", user_id=user_id)
        manager.delete_conversation("de100002", user_id=user_id)
        assert pg_conversation_ids(pg_conn) == set()
        assert manager.get_conversation("de100001", user_id=user_id) is None
        assert manager.list_conversations(user_id) == []

        other_instance = make_redis_manager()  # never lost Redis; finds both dirty there
        other_instance.flush_dirty_conversations()
        assert pg_conversation_ids(pg_conn) == set()

        proxy.heal()
        manager.flush_dirty_conversations()  # explicit: tries Redis now, whatever the backoff
        assert pg_conversation_ids(pg_conn) == set()
        assert dirty_set(rdb.client) == set()
        assert manager.stats()["redis_available"] is True
        for app in (manager, other_instance):
            assert app.get_conversation("de100001", user_id=user_id) is None
            assert app.get_conversation("de100002", user_id=user_id) is None
            assert app.list_conversations(user_id) == []
        assert pg_conversation_ids(pg_conn) == set()


# --------------------------------------------------------------------------------------------------
# 6. PostgreSQL down: saves into Redis, flushes keep them dirty, uncached reads raise (docs/design.md, "Faults")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_postgres_down_keeps_saving_into_redis(own_pg_server, make_redis_manager, rdb, user_id):
    params = create_database(own_pg_server.params)
    conn = params.connect()
    manager = make_redis_manager(connection_string=params.url, postgres_connect_timeout=2.0)
    before = make_conversation(2, title="flushed before the outage")
    manager.save_conversation("b0000001", before, user_id=user_id)
    uncached = make_conversation(2, title="only in PostgreSQL")
    manager.save_conversation("b0000003", uncached, user_id=user_id)
    assert manager.flush_dirty_conversations() == 2
    rdb.client.delete(conv_key(user_id, "b0000003"))
    conn.close()

    own_pg_server.stop()

    before = grown(before, 2)
    manager.save_conversation("b0000001", before, user_id=user_id)
    assert_cached(rdb.client, user_id, "b0000001", before, dirty=True)
    # An id Redis does not know cannot be checked against PostgreSQL's owner: refused, nothing stored.
    during = make_conversation(3, title="saved during the outage")
    with pytest.raises(ConnectionError) as info:
        manager.save_conversation("b0000002", during, user_id=user_id)
    _assert_postgres_unavailable(info.value)
    assert rdb.client.exists(conv_key(user_id, "b0000002")) == 0

    _flush_while_postgres_is_down(manager)
    assert dirty_set(rdb.client) == {dirty_member(user_id, "b0000001")}
    assert_cached(rdb.client, user_id, "b0000001", before, dirty=True)

    assert manager.get_conversation("b0000001", user_id=user_id) == before  # cached: no PostgreSQL needed
    for missing in ("b0000002", "b0000003", "b000ffff"):  # in PostgreSQL only / nowhere: only PostgreSQL can tell
        with pytest.raises(ConnectionError) as info:
            manager.get_conversation(missing, user_id=user_id)
        _assert_postgres_unavailable(info.value)
    with pytest.raises(ConnectionError) as info:
        manager.list_conversations(user_id)
    _assert_postgres_unavailable(info.value)
    _flush_while_postgres_is_down(manager)
    assert manager.stats()["dirty_count"] == 1

    own_pg_server.start()

    manager.save_conversation("b0000002", during, user_id=user_id)
    assert manager.flush_dirty_conversations() == 2
    conn = params.connect()
    try:
        assert_row_matches(conn, "b0000001", user_id, before)
        assert_row_matches(conn, "b0000002", user_id, during)
        assert_row_matches(conn, "b0000003", user_id, uncached)
    finally:
        conn.close()
    assert dirty_set(rdb.client) == set()
    assert manager.get_conversation("b0000003", user_id=user_id) == uncached
    assert [cid for cid, _ in manager.list_conversations(user_id)] == ["b0000002", "b0000001", "b0000003"]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_postgres_connections_cut_then_healed(make_redis_manager, rdb, pg_server, pg_params, user_id):
    """Dropped PostgreSQL connections in the pool (docs/design.md, "Faults"): the pool replaces them, nothing is
    lost."""
    with TcpProxy(pg_params.port, pg_params.host) as proxy:
        url = replace(pg_params, host="127.0.0.1", port=proxy.port).url
        manager = make_redis_manager(connection_string=url, postgres_connect_timeout=2.0)
        conn = pg_params.connect()
        first = make_conversation(2, title="first")
        manager.save_conversation("c0000001", first, user_id=user_id)
        assert manager.flush_dirty_conversations() == 1

        proxy.partition()
        second = grown({**first, "title": "second"}, 2)
        manager.save_conversation("c0000001", second, user_id=user_id)  # cached: no PostgreSQL needed
        _flush_while_postgres_is_down(manager)
        assert dirty_set(rdb.client) == {dirty_member(user_id, "c0000001")}
        with pytest.raises(ConnectionError) as info:
            manager.get_conversation("c000ffff", user_id=user_id)
        _assert_postgres_unavailable(info.value)

        proxy.heal()  # the pool's old connections are dead; new ones work
        assert wait_until(lambda: _try_flush(manager) == 1, timeout=15, interval=0.2, what="flush after heal")
        assert_row_matches(conn, "c0000001", user_id, second)
        assert dirty_set(rdb.client) == set()
        conn.close()


@pytest.mark.timeout(60)
def test_close_with_postgres_down_logs_and_keeps_data_dirty(
    make_redis_manager, rdb, pg_server, pg_params, caplog, user_id
):  # fmt: skip
    """docs/design.md, "Faults" (`close()`): close() drains within a bounded time and says what it could not
    write; the data stays dirty."""
    import logging

    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    with TcpProxy(pg_params.port, pg_params.host) as proxy:
        url = replace(pg_params, host="127.0.0.1", port=proxy.port).url
        manager = make_redis_manager(connection_string=url, postgres_connect_timeout=1.0)
        conversation = make_conversation(2)
        manager.save_conversation("c1050001", conversation, user_id=user_id)
        proxy.partition()
        caplog.clear()
        manager.close()
        complaints = [
            r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("chat_history_rs")
        ]
        assert complaints, "close() could not write a dirty conversation and logged nothing"
        assert_cached(rdb.client, user_id, "c1050001", conversation, dirty=True)  # kept for a later flush

        proxy.heal()
        later = make_redis_manager(connection_string=url)
        assert later.flush_dirty_conversations() == 1
        conn = pg_params.connect()
        try:
            assert_row_matches(conn, "c1050001", user_id, conversation)
        finally:
            conn.close()


@pytest.mark.timeout(60)
def test_other_users_save_while_postgres_is_down_never_overwrites(
    make_redis_manager, rdb, pg_server, pg_params, user_id, other_user_id
):  # fmt: skip
    """docs/design.md, "Ownership": a claim that cannot be checked is refused, so A's conversation (in
    PostgreSQL only) survives B's save."""
    with TcpProxy(pg_params.port, pg_params.host) as proxy:
        url = replace(pg_params, host="127.0.0.1", port=proxy.port).url
        manager = make_redis_manager(connection_string=url, postgres_connect_timeout=1.0)
        mine = make_conversation(2, title="A's")
        manager.save_conversation("0c000001", mine, user_id=user_id)
        manager.flush_dirty_conversations()
        rdb.client.delete(conv_key(user_id, "0c000001"), "owner:0c000001")  # no longer cached: both lapsed

        proxy.partition()
        # Redis does not know the id and PostgreSQL cannot say whose it is: B's claim is refused.
        with pytest.raises(UnavailableError, match="PostgreSQL"):
            manager.save_conversation("0c000001", make_conversation(1, title="B's"), user_id=other_user_id)
        assert rdb.client.exists(conv_key(other_user_id, "0c000001")) == 0
        assert rdb.client.get("owner:0c000001") is None
        proxy.heal()

        wait_until(lambda: _flush_succeeds(manager), timeout=15, interval=0.2, what="a flush after PostgreSQL healed")
        conn = pg_params.connect()
        try:
            assert_row_matches(conn, "0c000001", user_id, mine)
            # A keeps full use of her conversation; B is refused.
            assert manager.get_conversation("0c000001", user_id=user_id) == mine
            mine = grown(mine, 1)
            manager.save_conversation("0c000001", mine, user_id=user_id)
            with pytest.raises(PermissionError):
                manager.save_conversation("0c000001", make_conversation(1, title="B's"), user_id=other_user_id)
            assert manager.flush_dirty_conversations() == 1
            assert_row_matches(conn, "0c000001", user_id, mine)
            assert manager.stats()["stuck_conversations"] == []
            manager.delete_conversation("0c000001", user_id=user_id)
            assert fetch_conversation_row(conn, "0c000001") is None
            assert manager.get_conversation("0c000001", user_id=user_id) is None
        finally:
            conn.close()


def _flush_succeeds(manager) -> bool:
    try:
        manager.flush_dirty_conversations()
    except UnavailableError:
        return False
    return True


def _try_flush(manager) -> int:
    try:
        return manager.flush_dirty_conversations()
    except UnavailableError:
        return 0


# --------------------------------------------------------------------------------------------------
# 7. Redis out of memory (noeviction): the save reaches PostgreSQL (docs/design.md, "Faults")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_redis_out_of_memory_saves_reach_postgres(make_redis_server, make_redis_manager, pg_conn, user_id, conv_id):
    server = make_redis_server("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    client = redis_client(server.url)
    manager = make_redis_manager(redis_url=server.url)
    v1 = make_conversation(2, title="v1, cached clean")
    manager.save_conversation(conv_id, v1, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1
    assert_cached(client, user_id, conv_id, v1, dirty=False)

    import redis as redis_py

    filled = 0
    with pytest.raises(redis_py.exceptions.ResponseError, match="maxmemory"):  # redis-py strips the "OOM" code
        for filled in range(10_000):  # noqa: B007
            client.set(f"filler:{filled}", "f" * 10_000)
    assert filled > 0

    v2 = grown({**v1, "title": "v2, during OOM"}, 2)
    manager.save_conversation(conv_id, v2, user_id=user_id)
    new = make_conversation(3, title="new during OOM")
    manager.save_conversation("00e00001", new, user_id=user_id)
    # Redis refusing the write sends the save straight to PostgreSQL. Redis may also let a script's write in
    # over maxmemory, leaving the save dirty in Redis: then a flush, still under OOM, must write it back.
    try:
        manager.flush_dirty_conversations()
    except ChatHistoryError as exc:  # settling may be refused under OOM; nothing else may go wrong
        assert "out of memory" in str(exc), exc
    assert_row_matches(pg_conn, conv_id, user_id, v2)
    assert_row_matches(pg_conn, "00e00001", user_id, new)

    # Never the stale clean v1 that is still in Redis.
    assert manager.get_conversation(conv_id, user_id=user_id) == v2
    assert manager.get_conversation("00e00001", user_id=user_id) == new
    assert [cid for cid, _ in manager.list_conversations(user_id)] == ["00e00001", conv_id]

    client.flushdb()  # memory back: caching resumes
    latest = {"v": new}

    def cached_again() -> bool:
        latest["v"] = grown(latest["v"], 1)
        manager.save_conversation("00e00001", latest["v"], user_id=user_id)
        return seed_fields(client, user_id, "00e00001") is not None

    wait_until(cached_again, timeout=30, interval=0.2, what="caching resumed after memory was freed")
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, "00e00001", user_id, latest["v"])
    assert manager.get_conversation(conv_id, user_id=user_id) == v2


# --------------------------------------------------------------------------------------------------
# 8. A flusher killed half-way, run again: exactly one clean copy (docs/design.md, "Write-back": idempotent)
# --------------------------------------------------------------------------------------------------

FLUSH_ONCE = """
    import os
    from chat_history_rs import ChatHistoryManager, _core
    manager = ChatHistoryManager(
        mode="postgres", connection_string=os.environ["T_PG"], redis_enabled=True,
        redis_connection_string=os.environ["T_REDIS"], background_flush=False, flush_batch_size=50,
    )
    # Each batch waits 50 ms between its PostgreSQL commit and its settle in Redis, so a flush of 1000
    # conversations lasts over a second and the kill lands inside it (most likely in that window).
    _core._failpoint_set("flush.before_settle", "sleep(50)")
    print("flushing", flush=True)
    print(manager.flush_dirty_conversations(), flush=True)
"""
KILLED_FLUSHER = "killed-flusher"  # the application_name its PostgreSQL sessions carry


def _killed_flushers_sessions(conn) -> int:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            (KILLED_FLUSHER,),
        )
        return cur.fetchone()[0]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_flusher_killed_half_way_then_run_again(make_redis_manager, rdb, pg_url, pg_conn, user_id):
    """A flusher process is killed (SIGKILL) three times in the middle of a flush of 1000 conversations: each
    time PostgreSQL, read as soon as the killed process's sessions are gone, holds some of them but not all,
    each whole. The next flush writes exactly the rest, and every row is there once."""
    _needs_failpoints()
    manager = make_redis_manager()
    conversations = {f"9f{n:06d}": make_conversation(3 + n % 4, prefix=f"{n} ") for n in range(1000)}
    for cid, conv in conversations.items():
        manager.save_conversation(cid, conv, user_id=user_id)
    env = script_env(T_PG=f"{pg_url}?application_name={KILLED_FLUSHER}", T_REDIS=rdb.url)

    written = 0
    for _ in range(3):
        proc = subprocess.Popen(python_script(FLUSH_ONCE), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"flushing", proc.stderr.read()
            # Killed once this run has committed a batch of its own (50 rows more than before it).
            wait_until(lambda target=written + 50: len(pg_conversation_ids(pg_conn)) >= target, timeout=30,
                       interval=0.005, what="the flusher's first commit")  # fmt: skip
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        # A COMMIT sent just before the kill is done (or rolled back) once PostgreSQL ended the session.
        wait_until(lambda: _killed_flushers_sessions(pg_conn) == 0, timeout=30, what="its sessions gone")
        in_postgres = pg_conversation_ids(pg_conn)
        assert written + 50 <= len(in_postgres) < 1000, f"the kill did not land mid-flush: {len(in_postgres)} written"
        written = len(in_postgres)
        # Whatever the killed flusher committed is complete: no conversation with part of its messages.
        for cid in in_postgres:
            assert_row_matches(pg_conn, cid, user_id, conversations[cid])
        assert 1000 - written <= len(dirty_set(rdb.client)) <= 1000  # settled only what PostgreSQL has

    assert manager.flush_dirty_conversations() == 1000 - written  # the rest; what PostgreSQL has is current
    assert pg_conversation_ids(pg_conn) == set(conversations)
    for cid, conv in conversations.items():
        assert_row_matches(pg_conn, cid, user_id, conv)
    assert pg_message_count(pg_conn) == sum(len(c["messages"]) for c in conversations.values())
    assert dirty_set(rdb.client) == set()
    assert manager.flush_dirty_conversations() == 0


# --------------------------------------------------------------------------------------------------
# 9. A conversation PostgreSQL refuses does not block the others (docs/design.md, "Write-back")
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_poison_conversation_is_kept_and_does_not_block(make_redis_manager, rdb, pg_conn, user_id, other_user_id):
    manager = make_redis_manager()
    owned = make_conversation(2, title="A owns this id")
    manager.save_conversation("a11ce000", owned, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1

    bad_role = make_conversation(2, title="bad role")
    bad_role["messages"][1]["role"] = "system"
    write_seed_hash(rdb.client, user_id, "0b0150e1", bad_role, ttl=None)
    # Another user's id (e.g. written by an old seed-design instance, which never checked ownership).
    b_copy = make_conversation(1, title="B's")
    write_seed_hash(rdb.client, other_user_id, "a11ce000", b_copy, ttl=None)
    poison = {dirty_member(user_id, "0b0150e1")}

    good = {f"600d{n:04d}": make_conversation(2, prefix=f"{n} ") for n in range(10)}
    for cid, conv in good.items():
        manager.save_conversation(cid, conv, user_id=user_id)

    assert manager.flush_dirty_conversations() == 10
    for cid, conv in good.items():
        assert_row_matches(pg_conn, cid, user_id, conv)
    assert_row_matches(pg_conn, "a11ce000", user_id, owned)  # A's row untouched
    assert "0b0150e1" not in pg_conversation_ids(pg_conn)
    assert dirty_set(rdb.client) == poison  # recorded, never silently dropped
    assert rdb.client.exists(conv_key(user_id, "0b0150e1"))
    stats = manager.stats()
    assert stats["flush_failures"] >= 1
    assert poison <= set(stats["stuck_conversations"]), stats["stuck_conversations"]
    # B's copy under A's id is not retried forever: it is kept aside, where an operator sees it.
    kept = manager.list_conflicts(other_user_id)
    assert [(c["conversation_id"], c["conversation"]) for c in kept] == [("a11ce000", b_copy)]
    assert not rdb.client.exists(conv_key(other_user_id, "a11ce000"))
    assert stats["conflicts_kept"] == 1

    # The next flush still writes the good ones (the poison is retried with backoff, not in their way).
    later = make_conversation(3, title="later")
    manager.save_conversation("600dffff", later, user_id=user_id)
    updated = grown(good["600d0000"], 1)
    manager.save_conversation("600d0000", updated, user_id=user_id)
    assert manager.flush_dirty_conversations() == 2
    assert_row_matches(pg_conn, "600dffff", user_id, later)
    assert_row_matches(pg_conn, "600d0000", user_id, updated)
    assert_row_matches(pg_conn, "a11ce000", user_id, owned)
    assert dirty_set(rdb.client) == poison
    assert poison <= set(manager.stats()["stuck_conversations"])
    assert fetch_conversation_row(pg_conn, "0b0150e1") is None


# --------------------------------------------------------------------------------------------------
# 10. Redis restarts (data lost): the same manager keeps working (docs/design.md, "Faults")
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_redis_restart_manager_keeps_working(make_redis_server, make_redis_manager, pg_conn, user_id):
    server = make_redis_server()
    client = redis_client(server.url)
    manager = make_redis_manager(redis_url=server.url, redis_timeout=0.5)
    flushed = make_conversation(2, title="flushed")
    manager.save_conversation("1e000001", flushed, user_id=user_id)
    manager.flush_dirty_conversations()
    for _ in range(5):  # warm the pool: several connections that the restart will break
        assert manager.get_conversation("1e000001", user_id=user_id) == flushed

    server.restart()  # --save '': everything in Redis is gone
    assert client.dbsize() == 0

    # No call raises: Redis errors fall back to PostgreSQL or reconnect.
    assert manager.get_conversation("1e000001", user_id=user_id) == flushed
    assert [cid for cid, _ in manager.list_conversations(user_id)] == ["1e000001"]
    latest = {"v": make_conversation(1, title="after restart")}
    manager.save_conversation("1e000002", latest["v"], user_id=user_id)

    def cached_again() -> bool:
        latest["v"] = grown(latest["v"], 1)
        manager.save_conversation("1e000002", latest["v"], user_id=user_id)
        return seed_fields(client, user_id, "1e000002") is not None

    wait_until(cached_again, timeout=30, interval=0.2, what="caching after the Redis restart")
    assert_cached(client, user_id, "1e000002", latest["v"], dirty=True)
    assert manager.get_conversation("1e000002", user_id=user_id) == latest["v"]
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, "1e000002", user_id, latest["v"])
    assert_row_matches(pg_conn, "1e000001", user_id, flushed)
    assert manager.stats()["redis_available"] is True


# --------------------------------------------------------------------------------------------------
# The tools themselves
# --------------------------------------------------------------------------------------------------


def test_tcp_proxy_forwards_cuts_refuses_stalls_and_heals(rdb):
    import redis as redis_py
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with TcpProxy(rdb.server.port) as proxy:
        no_retry = Retry(NoBackoff(), 0)
        client = redis_py.Redis(port=proxy.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=no_retry)
        assert client.ping()
        proxy.cut()
        assert client.ping()  # redis-py reconnects on a dropped connection
        proxy.partition()
        with pytest.raises(redis_py.exceptions.ConnectionError):
            client.ping()
        proxy.heal()
        assert client.ping()
        proxy.stall()
        with pytest.raises((redis_py.exceptions.TimeoutError, redis_py.exceptions.ConnectionError)):
            client.ping()
        proxy.heal()
        client.connection_pool.disconnect()
        assert client.ping()
        client.close()
