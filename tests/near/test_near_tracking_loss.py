"""Losing the invalidation channel never leaves a stale copy served (docs/design.md, section 10).

A tracking connection killed by the server (CLIENT KILL) or by a Redis restart empties the near cache
(near_cache_resets grows, entries drop to 0): a write made while no tracking connection existed,
which Redis therefore reports to nobody, is read at once. A tracking connection silently partitioned
(socket open, nothing arriving, no error) stops the serving within the 0.5 s lease. Each time
tracking comes back, copies are served again and invalidations apply again.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from support.near_support import (
    conversation_read,
    ALLOWED_DELAY,
    LEASE,
    TrackingPartitionProxy,
    near_stats,
    poll,
    read_until_near_hit,
    set_pg_title,
    title_of,
    tracking_clients,
    wait_tracking,
)
from support.redis_support import conv_key, make_conversation, redis_client

CID = "0105e001"

# Scheduling slack on top of the lease for "serving stopped in time" (a stats() call and a poll step).
LEASE_SLACK = 0.25


def test_a_killed_tracking_connection_empties_the_cache_and_tracking_returns(
    make_redis_server, make_redis_manager, user_id
):
    server = make_redis_server()
    client = redis_client(server.url)
    manager = make_redis_manager(redis_url=server.url)
    key = conv_key(user_id, CID)
    current = make_conversation(2, title="v0")
    manager.save_conversation(CID, current, user_id=user_id)

    read = conversation_read(manager, CID, user_id)

    for round_ in range(1, 4):
        assert read_until_near_hit(manager, read) == current
        trackers = tracking_clients(client)
        assert len(trackers) == 1, f"round {round_}: one tracking connection expected, CLIENT LIST shows {trackers}"
        before = near_stats(manager)
        assert before["entries"] >= 1
        # The kill and the write in one pipeline: Redis runs them back to back, so the write happens
        # while no tracking connection exists and no invalidation of it is ever sent.
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("CLIENT", "KILL", "ID", trackers[0]["id"])
        pipe.hset(key, "title", f"written while untracked {round_}")
        assert pipe.execute() == [1, 0]
        current = {**current, "title": f"written while untracked {round_}"}

        poll(lambda: near_stats(manager)["resets"], lambda n, b=before: n > b["resets"], timeout=2, what="the reset")
        emptied = near_stats(manager)
        assert emptied["entries"] == 0 and emptied["bytes"] == 0, emptied
        assert read() == current, f"round {round_}: the copy from before the loss was served"

        wait_tracking(manager, timeout=5)
        assert read_until_near_hit(manager, read) == current, f"round {round_}: hits did not resume"
        assert len(tracking_clients(client)) == 1
        # The new tracking connection delivers invalidations.
        client.hset(key, "title", f"after reconnect {round_}")
        current = {**current, "title": f"after reconnect {round_}"}
        poll(read, lambda c, want=current: c == want, what=f"round {round_}: a write after the reconnect")


@pytest.mark.slow
def test_a_redis_restart_empties_the_cache_and_tracking_returns(
    make_redis_server, make_redis_manager, pg_conn, user_id
):
    server = make_redis_server()
    manager = make_redis_manager(redis_url=server.url)
    v1 = make_conversation(2, title="before the restart")
    manager.save_conversation(CID, v1, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1

    read = conversation_read(manager, CID, user_id)

    assert read_until_near_hit(manager, read) == v1
    before = near_stats(manager)
    server.stop()
    stopped = time.monotonic()
    poll(lambda: near_stats(manager)["tracking"], lambda t: not t, timeout=LEASE + LEASE_SLACK, what="serving stopped")
    after_stop = near_stats(manager)
    assert after_stop["resets"] > before["resets"] and after_stop["entries"] == 0, after_stop
    set_pg_title(pg_conn, CID, "changed while Redis was down")
    expected = {**v1, "title": "changed while Redis was down"}
    # Redis down: the read falls back to PostgreSQL, never to the copy.
    assert read() == expected
    server.start()  # --save '': empty
    assert read() == expected
    wait_tracking(manager, timeout=5)
    print(f"tracking back {time.monotonic() - stopped:.2f}s after the stop")
    assert read_until_near_hit(manager, read) == expected
    client = redis_client(server.url)
    assert len(tracking_clients(client)) == 1
    client.hset(conv_key(user_id, CID), "title", "written after the restart")
    poll(read, lambda c: title_of(c) == "written after the restart", what="a write after the restart")


@pytest.mark.slow
def test_a_silently_partitioned_tracking_connection_stops_serving_within_the_lease(
    make_redis_server, make_redis_manager, user_id
):
    """Only the tracking connection is partitioned (no RST, no EOF); the data connections work.
    redis_timeout=5, so the tracker's own read timeout cannot be what stops the serving: the lease is."""
    server = make_redis_server()
    direct = redis_client(server.url)
    with TrackingPartitionProxy(server.port) as proxy:
        manager = make_redis_manager(redis_url=proxy.url(), redis_timeout=5)
        v1 = make_conversation(2, title="before the partition")
        manager.save_conversation(CID, v1, user_id=user_id)

        read = conversation_read(manager, CID, user_id)

        assert read_until_near_hit(manager, read) == v1
        assert proxy.tracking_links == 1
        resets = near_stats(manager)["resets"]

        partitioned = proxy.partition_tracking()
        direct.hset(conv_key(user_id, CID), "title", "written during the partition")
        written = time.monotonic()
        expected = {**v1, "title": "written during the partition"}
        stopped_at = None
        stale_reads_late = []
        served_stale_until = None
        while time.monotonic() < partitioned + 1.5:
            started = time.monotonic()
            value = read()
            assert value in (v1, expected), value
            if value == v1:
                served_stale_until = started
                if started > written + ALLOWED_DELAY:
                    stale_reads_late.append(round(started - written, 3))
            if stopped_at is None:
                if not near_stats(manager)["tracking"]:
                    stopped_at = time.monotonic()  # the end of the stats() call: an upper bound
            time.sleep(0.005)
        assert stopped_at is not None, "the near cache still served 1.5 s into the partition"
        print(
            f"partition: serving stopped {stopped_at - partitioned:.3f}s after it, last stale read "
            f"{(served_stale_until or partitioned) - partitioned:.3f}s after it; "
            f"resets during it: {near_stats(manager)['resets'] - resets}"
        )
        assert stopped_at - partitioned <= LEASE + LEASE_SLACK, (
            f"copies were served {stopped_at - partitioned:.3f}s into a partition (lease {LEASE}s)"
        )
        assert not stale_reads_late, f"stale reads more than {ALLOWED_DELAY}s after the write: {stale_reads_late}"

        # Healed before the tracker's own 5 s timeout: the invalidation queued behind the partition
        # arrives before the heartbeat that vouches again, so the old copy is never served again.
        proxy.heal_tracking()
        wait_tracking(manager, timeout=8)
        assert read() == expected, "the copy from before the partition was served after it healed"
        assert read_until_near_hit(manager, read) == expected
        direct.hset(conv_key(user_id, CID), "title", "written after the partition")
        poll(read, lambda c: title_of(c) == "written after the partition", what="a write after the partition")
        manager.close()  # while the proxy is still there: its final flush needs Redis


def test_serving_goes_on_while_other_keys_change_all_the_time(make_redis_server, make_redis_manager, user_id):
    """Tracking is on whole prefixes (BCAST), so every write under conv: and user: by anyone sends the
    tracker an invalidation, for keys this process never read too. A steady stream of them, here
    other users' conversations written by redis-py about 200 times a second (little for Redis, and
    what a busy app's other instances do), must not stop the serving: each PING still has to be
    answered and acknowledged within the lease. The test samples near_cache_tracking and counts hits
    of one conversation read every 10 ms, for 2 s of that stream."""
    server = make_redis_server()
    writer_client = redis_client(server.url)
    manager = make_redis_manager(redis_url=server.url)
    conversation = make_conversation(2, title="read all the time")
    manager.save_conversation(CID, conversation, user_id=user_id)

    read = conversation_read(manager, CID, user_id)

    assert read_until_near_hit(manager, read) == conversation
    stop = threading.Event()
    written = []

    def other_users_write() -> None:
        i = 0
        while not stop.is_set():
            writer_client.hset(conv_key(f"other-user-{i % 7}", "0a0b0c0d"), "title", f"t{i}")
            i += 1
            time.sleep(0.005)
        written.append(i)

    writer = threading.Thread(target=other_users_write, daemon=True)
    writer.start()
    try:
        time.sleep(0.3)
        windows = []
        for _ in range(4):  # four windows of 0.5 s
            hits = near_stats(manager)["hits"]
            tracking = []
            window_end = time.monotonic() + 0.5
            while time.monotonic() < window_end:
                assert read() == conversation
                tracking.append(near_stats(manager)["tracking"])
                time.sleep(0.01)
            windows.append((near_stats(manager)["hits"] - hits, sum(tracking), len(tracking)))
    finally:
        stop.set()
        writer.join(timeout=10)
    print(f"under {written} writes of other keys: (hits, tracking samples True, samples) per 0.5 s: {windows}")
    assert all(hits > 0 for hits, _, _ in windows), (
        f"the near cache stopped serving while other keys changed: (hits, tracking True, samples) per 0.5 s "
        f"window: {windows}; stats {near_stats(manager)}"
    )
    assert all(true >= samples * 0.9 for _, true, samples in windows), windows


def test_a_redis_that_refuses_the_channels_leaves_the_near_cache_off(
    make_redis_server, make_redis_manager, user_id, caplog
):
    """An ACL without pub/sub channels: tracking cannot run, so nothing is served from the process
    (never a copy no one vouches for), reads and writes go to Redis as without a near cache, and one
    warning says why."""
    caplog.set_level(logging.WARNING, logger="chat_history_rs")
    server = make_redis_server()
    admin = redis_client(server.url)
    admin.execute_command("ACL", "SETUSER", "nochannels", "on", ">pw-n", "~*", "resetchannels", "+@all")
    manager = make_redis_manager(redis_url=f"redis://nochannels:pw-n@127.0.0.1:{server.port}/0")
    first = make_conversation(2, title="first")
    manager.save_conversation(CID, first, user_id=user_id)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert manager.get_conversation(CID, user_id=user_id) == first
        time.sleep(0.02)
    admin.hset(conv_key(user_id, CID), "title", "changed behind its back")
    assert title_of(manager.get_conversation(CID, user_id=user_id)) == "changed behind its back"
    stats = near_stats(manager)
    assert stats["enabled"] and not stats["tracking"] and stats["hits"] == 0, stats
    assert manager.stats()["cache_hits"] > 50, "reads were served by Redis"
    warnings = [r.getMessage() for r in caplog.records if "refused CLIENT TRACKING" in r.getMessage()]
    assert len(warnings) == 1, warnings
