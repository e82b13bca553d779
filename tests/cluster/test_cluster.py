"""Redis Cluster: 3 primaries with a replica each, reached through one node's URL (as Azure Managed
Redis hands out one host name). The product asks the server whether it is a cluster, uses the
cluster key layout (one hash slot per user, owner records per id, a bucketed dirty index), follows
MOVED and ASK, and survives failovers and resharding (docs/design.md, "Keys and rows")."""

from __future__ import annotations

import threading
import time

import pytest

from chat_history_rs import _core
from support.cluster_support import RedisClusterServers
from support.redis_support import grown, make_conversation, pg_conversation_ids
from support.servers import ServerError, assert_row_matches

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    try:
        servers = RedisClusterServers()
    except ServerError as exc:
        pytest.fail(str(exc))
    try:
        servers.start()
        yield servers
    finally:
        servers.remove()


@pytest.fixture
def cluster_manager(cluster, pg_url, make_manager):
    """Factory for redis-mode managers on the cluster (one node's URL); the cluster starts empty."""
    cluster.wait_healthy()
    cluster.flushall()

    def make(**kwargs):
        kwargs.setdefault("background_flush", False)
        return make_manager(
            mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=cluster.url, **kwargs
        )

    return make


def test_a_cluster_is_detected_and_keys_spread_over_every_primary(cluster, cluster_manager, pg_conn):
    app = cluster_manager()
    saved = {}
    for i in range(60):
        user, cid = f"user-{i}", f"c1{i:06x}"
        saved[(user, cid)] = make_conversation(2, prefix=f"{i} ")
        app.save_conversation(cid, saved[(user, cid)], user_id=user)
    stats = app.stats()
    assert stats["redis_layout"] == "cluster"
    assert stats["dirty_count"] == 60
    per_primary = cluster.keys_per_primary()
    assert len(per_primary) == 3 and all(n > 0 for n in per_primary.values()), per_primary
    for (user, cid), conv in saved.items():
        assert app.get_conversation(cid, user_id=user) == conv
    assert app.flush_dirty_conversations() == 60
    assert app.stats()["dirty_count"] == 0
    for (user, cid), conv in saved.items():
        assert_row_matches(pg_conn, cid, user, conv)


def test_the_api_keeps_its_promises_on_a_cluster(cluster_manager, pg_conn, user_id, other_user_id):
    app = cluster_manager()
    other_instance = cluster_manager()
    conv = make_conversation(2)
    app.save_conversation("c2000001", conv, user_id=user_id)
    assert [cid for cid, _ in other_instance.list_conversations(user_id)] == ["c2000001"]  # dirty, listed
    assert other_instance.get_conversation("c2000001", user_id=user_id) == conv
    with pytest.raises(PermissionError):
        other_instance.save_conversation("c2000001", make_conversation(1), user_id=other_user_id)
    other_instance.delete_conversation("c2000001", user_id=other_user_id)  # another user's id: nothing happens
    assert app.get_conversation("c2000001", user_id=user_id) == conv

    conv = grown(conv, 2)
    app.save_conversation("c2000001", conv, user_id=user_id)
    assert other_instance.flush_dirty_conversations() == 1
    assert other_instance.flush_dirty_conversations() == 0
    assert_row_matches(pg_conn, "c2000001", user_id, conv)

    # A write behind the cache's back, then a divergent copy in Redis: nothing is lost.
    behind = grown(conv, 1, text="behind the cache")
    app.postgres_backend.save_conversation("c2000001", user_id, behind)
    diverged = grown(conv, 1, text="only in redis")
    app.save_conversation("c2000001", diverged, user_id=user_id)
    app.flush_dirty_conversations()
    kept = app.list_conflicts(user_id)
    current = app.get_conversation("c2000001", user_id=user_id)
    places = [current["messages"]] + [k["conversation"]["messages"] for k in kept]
    for message in behind["messages"] + diverged["messages"]:
        assert any(message in place for place in places), message

    app.delete_conversation("c2000001", user_id=user_id)
    assert "c2000001" not in pg_conversation_ids(pg_conn)
    assert other_instance.get_conversation("c2000001", user_id=user_id) is None
    assert other_instance.list_conversations(user_id) == []
    # The id is free again once its owner deleted it.
    app.save_conversation("c2000001", make_conversation(1), user_id=other_user_id)
    assert app.flush_dirty_conversations() == 1


def test_redis_cluster_keyword_forces_the_layout(rdb, pg_url, make_manager, user_id):
    """`redis_cluster=True` on one node (Azure's Enterprise policy: one endpoint, one-slot scripts)
    uses the cluster layout over a plain connection; `False` the single-node layout (the seed design's key
    names), which `stats()["redis_layout"]` calls "single"."""
    for flag, layout in ((True, "cluster"), (False, "single"), (None, "single")):
        rdb.client.flushdb()
        app = make_manager(
            mode="postgres",
            connection_string=pg_url,
            redis_enabled=True,
            redis_connection_string=rdb.url,
            redis_cluster=flag,
            background_flush=False,
        )
        conv = make_conversation(2)
        app.save_conversation("c3000001", conv, user_id=user_id)
        assert app.stats()["redis_layout"] == layout
        assert app.get_conversation("c3000001", user_id=user_id) == conv
        assert app.flush_dirty_conversations() == 1
        keys = {k for k in rdb.client.keys("conv:*")}
        assert keys == {f"conv:{{{user_id}}}:c3000001" if layout == "cluster" else f"conv:{user_id}:c3000001"}
        app.delete_conversation("c3000001", user_id=user_id)
        app.close()


@pytest.mark.timeout(300)
def test_a_failover_of_every_shard_loses_nothing_and_calls_keep_working(cluster, cluster_manager, pg_conn):
    app = cluster_manager()
    latest = {}
    for i in range(30):
        latest[(f"fo-{i}", f"c4{i:06x}")] = make_conversation(2, prefix=f"{i} ")
    for (user, cid), conv in latest.items():
        app.save_conversation(cid, conv, user_id=user)
    for primary in cluster.primaries():
        cluster.failover(primary)
        for (user, cid), conv in latest.items():  # calls keep working, and every dirty save survived
            assert app.get_conversation(cid, user_id=user) == conv
            latest[(user, cid)] = grown(conv, 1)
            app.save_conversation(cid, latest[(user, cid)], user_id=user)
    assert app.stats()["dirty_count"] == 30
    assert app.flush_dirty_conversations() == 30
    for (user, cid), conv in latest.items():
        assert_row_matches(pg_conn, cid, user, conv)


@pytest.mark.timeout(600)
def test_resharding_while_threads_save_and_another_instance_flushes(cluster, cluster_manager, pg_conn):
    writer = cluster_manager()
    flusher = cluster_manager()
    latest: dict = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def save_loop(t: int) -> None:
        try:
            rounds = 0
            while not stop.is_set() or rounds < 3:
                for i in range(10):
                    key = (f"rs-{t}-{i}", f"c5{t:02x}{i:04x}")
                    conv = latest.get(key) or make_conversation(1, prefix=f"{t}-{i} ")
                    conv = grown(conv, 1)
                    writer.save_conversation(key[1], conv, user_id=key[0])
                    latest[key] = conv
                rounds += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def flush_loop() -> None:
        try:
            while not stop.is_set():
                flusher.flush_dirty_conversations()
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save_loop, args=(t,)) for t in range(3)]
    threads.append(threading.Thread(target=flush_loop))
    for thread in threads:
        thread.start()
    try:
        primaries = cluster.primaries()
        cluster.reshard(primaries[0], primaries[1], 2000)
        cluster.reshard(primaries[1], primaries[2], 2000)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == []
    moved = {n["port"]: n["slots"] for n in cluster.primaries()}
    assert sorted(moved.values()) != [5461, 5461, 5462], moved  # the slots really moved
    writer.flush_dirty_conversations()
    flusher.flush_dirty_conversations()
    assert writer.stats()["dirty_count"] == 0
    for (user, cid), conv in latest.items():
        assert_row_matches(pg_conn, cid, user, conv)


def test_a_user_left_out_of_the_dirty_index_is_found_and_flushed(cluster, cluster_manager, pg_conn):
    """A process that dies between a save's script and its index entry leaves a dirty conversation no
    flusher walks to; a process's first flush (and every 30th) scans the primaries and puts the user back."""
    app = cluster_manager()
    assert app.flush_dirty_conversations() == 0  # this process's first flush (and its scan) is behind it
    conv = make_conversation(2)
    app.save_conversation("c6000001", conv, user_id="orphan-user")
    client = cluster.client()
    removed = sum(client.zrem(f"dirtyusers:{{{n}}}", "orphan-user") for n in range(64))
    assert removed == 1  # as if the process died right after the script
    assert app.flush_dirty_conversations() == 0  # no flusher finds it through the index ...
    assert app.stats()["dirty_count"] == 0  # ... nor counts it
    fresh = cluster_manager()
    assert fresh.flush_dirty_conversations() == 1  # a first flush scans the primaries and finds it
    assert_row_matches(pg_conn, "c6000001", "orphan-user", conv)
    client.close()


def test_a_save_whose_index_entry_fails_is_kept_in_redis_and_indexed_later(
    cluster, cluster_manager, pg_conn, failpoints
):  # fmt: skip
    """The save's script ran, then its user's entry in the dirty index could not be written (the index's node
    failing over, here a failpoint): the save is in Redis, dirty, so it succeeds there, rather than also going
    to PostgreSQL as a failed save, and the entry is written before the index is next counted or walked."""
    app = cluster_manager()
    assert app.flush_dirty_conversations() == 0  # this process's first flush (and its scan) is behind it
    conv = make_conversation(2)
    _core._failpoint_set("save.index_fails", "1*return")
    app.save_conversation("c6000002", conv, user_id="late-index-user")
    client = cluster.client()
    assert not any(client.zscore(f"dirtyusers:{{{n}}}", "late-index-user") for n in range(64))  # the failpoint bit
    assert pg_conversation_ids(pg_conn) == set()  # not written to PostgreSQL as a fallback
    stats = app.stats()
    assert stats["postgres_fallbacks"] == 0
    assert stats["dirty_count"] == 1  # the count wrote the entry first
    assert sum(client.zscore(f"dirtyusers:{{{n}}}", "late-index-user") is not None for n in range(64)) == 1
    assert app.flush_dirty_conversations() == 1  # found through the index, not a scan
    assert_row_matches(pg_conn, "c6000002", "late-index-user", conv)
    client.close()
