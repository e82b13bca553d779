"""The near cache is dropped by every change Redis sees (docs/design.md, section 10): a save of another
manager, a write of another process (a manager or a plain redis-py HSET, as the seed's Python
design writes), a flush settling the hash, a TTL expiry, an eviction, a delete. Each test first
proves the near cache served the old copy (near_cache_hits grew), so none can pass with the near
cache off, then requires the new state within SEEN_WITHIN (1 s; invalidations normally apply within
milliseconds and the lease bounds staleness to 0.5 s even without them).
"""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest

from support.near_support import (
    conversation_read,
    near_stats,
    poll,
    read_until_near_hit,
    set_pg_title,
    title_of,
    wait_tracking,
)
from support.redis_support import (
    conv_key,
    grown,
    make_conversation,
    metadata,
    redis_client,
    run_script,
    script_env,
    wait_until,
)

CID = "0ea70001"
OTHER = "0ea70002"


def only(*allowed):
    """accept() for poll: True for the last of `allowed`, and fails on anything not in it at all (a
    read must be the old state or the new, nothing else)."""

    def accept(value):
        assert value in allowed, f"read {value!r}, which is none of the states written"
        return value == allowed[-1]

    return accept


def test_another_managers_save_drops_the_copy(make_redis_manager, user_id):
    """Another manager of the same process: its save drops the reader's copy at once (the process
    keeps a registry of its near caches), without waiting for Redis's invalidation. Another
    instance in another process is `test_a_write_of_another_process_drops_the_copy`."""
    writer, reader = make_redis_manager(), make_redis_manager()
    v1 = make_conversation(2, title="v1")
    writer.save_conversation(CID, v1, user_id=user_id)

    read = conversation_read(reader, CID, user_id)

    assert read_until_near_hit(reader, read) == v1

    v2 = {**grown(v1, 2), "title": "v2"}
    writer.save_conversation(CID, v2, user_id=user_id)
    assert read() == v2, "the other manager's copy outlived a save made in the same process"
    # And the new state is served from the process again, with nothing older coming back.
    assert read_until_near_hit(reader, read) == v2
    assert read() == v2


@pytest.mark.parametrize("how", ["redis-py HSET title", "redis-py HSET messages", "a manager in another process"])
def test_a_write_of_another_process_drops_the_copy(how, make_redis_manager, rdb, pg_url, user_id):
    manager = make_redis_manager()
    v1 = make_conversation(3, title="v1")
    manager.save_conversation(CID, v1, user_id=user_id)

    read = conversation_read(manager, CID, user_id)

    assert read_until_near_hit(manager, read) == v1
    invalidations = near_stats(manager)["invalidations"]

    key = conv_key(user_id, CID)
    if how == "redis-py HSET title":
        expected = {**v1, "title": "renamed by redis-py"}
        assert rdb.client.hset(key, "title", expected["title"]) == 0
    elif how == "redis-py HSET messages":
        expected = grown(v1, 2, text="written by redis-py")
        expected["last_modified"] = v1["last_modified"]  # only the messages field changes
        assert rdb.client.hset(key, "messages", json.dumps(expected["messages"])) == 0
    else:
        expected = {**grown(v1, 1, text="from the other process"), "title": "saved by another process"}
        proc = run_script(
            """
            import json, os
            from chat_history_rs import ChatHistoryManager
            m = ChatHistoryManager(mode="postgres", connection_string=os.environ["T_PG"], redis_enabled=True,
                                   redis_connection_string=os.environ["T_REDIS"], background_flush=False)
            m.save_conversation(os.environ["T_CONV"], json.loads(os.environ["T_BODY"]), user_id=os.environ["T_USER"])
            m.close()
            """,
            env=script_env(T_PG=pg_url, T_REDIS=rdb.url, T_CONV=CID, T_USER=user_id, T_BODY=json.dumps(expected)),
        )
        assert proc.returncode == 0, proc.stderr
    poll(read, only(v1, expected), what=f"the write by {how}")
    assert near_stats(manager)["invalidations"] > invalidations
    assert read_until_near_hit(manager, read) == expected


def test_a_flush_settling_the_hash_drops_the_copy_and_later_writes_are_seen(make_redis_manager, rdb, user_id):
    """The flush's own settle (dirty flag off, TTL on) is a write Redis reports; the copy read while
    dirty goes, and a change made after the flush by another client is still seen."""
    manager = make_redis_manager()
    v1 = make_conversation(2, title="dirty v1")
    manager.save_conversation(CID, v1, user_id=user_id)

    read = conversation_read(manager, CID, user_id)

    assert read_until_near_hit(manager, read) == v1
    invalidations = near_stats(manager)["invalidations"]
    assert manager.flush_dirty_conversations() == 1
    assert rdb.client.ttl(conv_key(user_id, CID)) > 0, "the flush did not settle the hash"
    poll(lambda: near_stats(manager)["invalidations"], lambda n: n > invalidations, what="the settle's invalidation")

    assert read_until_near_hit(manager, read) == v1  # the clean copy is served from the process
    expected = {**v1, "title": "renamed by redis-py after the flush"}
    rdb.client.hset(conv_key(user_id, CID), "title", expected["title"])
    poll(read, only(v1, expected), what="the change after the flush")


@pytest.mark.slow
def test_a_ttl_expiry_drops_the_copy(make_redis_manager, rdb, pg_conn, user_id):
    """A clean copy whose key expires in Redis: Redis reports the expiry (the copy is dropped, counted
    as an invalidation), and the read after it comes from PostgreSQL, whose title was changed behind
    the product's back so the two are told apart. (A copy is also served for at most a quarter of
    redis_ttl, so the invalidation count is what shows the expiry itself reached the near cache.)"""
    manager = make_redis_manager(redis_ttl=2)
    wait_tracking(manager)
    v1 = make_conversation(2, title="cached")
    manager.save_conversation(CID, v1, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1

    read = conversation_read(manager, CID, user_id)

    # Within the first second of the 2 s TTL, so the read may keep its copy.
    assert read_until_near_hit(manager, read, timeout=0.8) == v1
    invalidations = near_stats(manager)["invalidations"]
    set_pg_title(pg_conn, CID, "from postgres")
    # No reads through the manager meanwhile: a read may give the key its TTL back.
    wait_until(lambda: not rdb.client.exists(conv_key(user_id, CID)), timeout=8, interval=0.02, what="the expiry")
    poll(lambda: near_stats(manager)["invalidations"], lambda n: n > invalidations, what="the expiry's invalidation")
    expected = {**v1, "title": "from postgres"}
    poll(read, only(v1, expected), what="the PostgreSQL copy after the expiry")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru"])
def test_an_eviction_drops_the_copy(policy, make_redis_server, make_redis_manager, pg_conn, user_id):
    """Redis evicts the clean conversation under memory pressure; the manager must not go on serving
    its copy: the read after the eviction comes from PostgreSQL (title changed there behind the
    product's back, so the two are told apart) and matches it."""
    server = make_redis_server("--maxmemory", "2mb", "--maxmemory-policy", policy)
    client = redis_client(server.url)
    manager = make_redis_manager(redis_url=server.url)
    v1 = make_conversation(4, title="cached", content_size=200)
    manager.save_conversation(CID, v1, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1  # clean: it has a TTL, so volatile-lru may evict it

    read = conversation_read(manager, CID, user_id)

    assert read_until_near_hit(manager, read) == v1
    invalidations = near_stats(manager)["invalidations"]
    set_pg_title(pg_conn, CID, "from postgres")
    key = conv_key(user_id, CID)
    filler = "f" * 10_000
    for batch in range(600):  # up to 60 MB of volatile keys into a 2 MB Redis, until the key is gone
        pipe = client.pipeline(transaction=False)
        for i in range(10):
            pipe.set(f"filler:{batch}:{i}", filler, ex=3600)
        pipe.exists(key)  # EXISTS does not touch the key's LRU clock
        if pipe.execute()[-1] == 0:
            break
    else:
        pytest.fail(f"{key} was never evicted: the test proves nothing")
    assert int(client.info("stats")["evicted_keys"]) > 0
    poll(lambda: near_stats(manager)["invalidations"], lambda n: n > invalidations, what="the eviction's invalidation")
    expected = {**v1, "title": "from postgres"}
    poll(read, only(v1, expected), what="the PostgreSQL copy after the eviction")


def test_a_delete_by_another_manager_drops_the_copy(make_redis_manager, user_id):
    writer, reader = make_redis_manager(), make_redis_manager()
    v1 = make_conversation(2, title="to be deleted")
    writer.save_conversation(CID, v1, user_id=user_id)

    read = conversation_read(reader, CID, user_id)

    assert read_until_near_hit(reader, read) == v1
    writer.delete_conversation(CID, user_id=user_id)
    poll(read, only(v1, None), what="the delete")
    assert read() is None


def test_a_list_copy_is_dropped_by_another_managers_save_and_delete(make_redis_manager, user_id):
    writer, reader = make_redis_manager(), make_redis_manager()
    first = make_conversation(2, title="first")
    writer.save_conversation(CID, first, user_id=user_id)

    def listing():
        return reader.list_conversations(user_id)

    one = [(CID, metadata(first))]
    assert read_until_near_hit(reader, listing) == one

    second = make_conversation(2, title="second")
    writer.save_conversation(OTHER, second, user_id=user_id)
    both = [(OTHER, metadata(second)), (CID, metadata(first))]
    poll(listing, only(one, both), what="the other manager's new conversation in the list")
    assert read_until_near_hit(reader, listing) == both

    writer.delete_conversation(CID, user_id=user_id)
    remaining = [(OTHER, metadata(second))]
    poll(listing, only(both, remaining), what="the other manager's delete in the list")
    renamed = {**second, "title": "second, renamed", "last_modified": grown(second, 0)["last_modified"]}
    assert read_until_near_hit(reader, listing) == remaining
    writer.save_conversation(OTHER, renamed, user_id=user_id)
    poll(listing, only(remaining, [(OTHER, metadata(renamed))]), what="the other manager's rename in the list")
    assert title_of(reader.get_conversation(OTHER, user_id=user_id)) == "second, renamed"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_the_tracking_threads_yield_to_the_callers_and_still_keep_up(make_redis_manager, user_id):
    """The tracking threads run below the callers' priority (an invalidation that arrives with a caller's
    own reply does not run ahead of the caller on a busy CPU), and the process's own threads keep theirs;
    the copies are still dropped by another manager's writes as they come."""
    reader, writer = make_redis_manager(), make_redis_manager(near_cache_bytes=0)
    conversation = make_conversation(2, title="v0")
    writer.save_conversation(CID, conversation, user_id=user_id)
    wait_tracking(reader)
    read = conversation_read(reader, CID, user_id)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    niceness = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            niceness.setdefault(f.read().strip(), set()).add(os.getpriority(os.PRIO_PROCESS, int(tid)))
    assert niceness.get("chr-near-node") == {min(mine + 10, 19)}, niceness
    others = {name: nice for name, nice in niceness.items() if name != "chr-near-node"}
    assert all(nice == {mine} for nice in others.values()), others  # the supervisor, the feed, Python's
    for n in range(1, 6):
        assert read_until_near_hit(reader, read) == conversation
        conversation = {**conversation, "title": f"v{n}"}
        writer.save_conversation(CID, conversation, user_id=user_id)
        poll(read, lambda c, want=f"v{n}": title_of(c) == want, what=f"write {n}")
