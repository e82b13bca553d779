"""The near cache on a Redis Cluster (3 primaries, a replica each, reached through one node's URL):
every primary is tracked, copies are served, and a write by another client (redis-py's RedisCluster, to
the conversation's primary) drops the copy within SEEN_WITHIN; a list copy likewise."""

from __future__ import annotations

import pytest

from support.near_support import (
    near_stats,
    poll,
    read_until_near_hit,
    title_of,
    tracking_clients,
    wait_tracking,
    conversation_read,
)
from support.redis_support import make_conversation, metadata

pytestmark = pytest.mark.slow


def test_the_near_cache_serves_and_is_invalidated_on_a_cluster(redis_cluster_servers, pg_url, make_manager, user_id):
    cluster = redis_cluster_servers
    cluster.wait_healthy()
    manager = make_manager(
        mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=cluster.url,
        background_flush=False,
    )  # fmt: skip
    client = cluster.client()
    try:
        conversation = make_conversation(2, title="on a cluster")
        manager.save_conversation("c1a50001", conversation, user_id=user_id)
        assert manager.stats()["redis_layout"] == "cluster"
        wait_tracking(manager, timeout=10)

        # A tracking connection on every primary (replicas are tracked once CLUSTER SLOTS lists them,
        # which Redis does only after their first sync).
        # Polled: when the replicas first appear the tracker replaces its connections.
        def per_primary() -> dict:
            return {n["port"]: len(tracking_clients(cluster.node(n["port"]))) for n in cluster.primaries()}

        poll(per_primary, lambda found: len(found) == 3 and all(found.values()), timeout=5, what="trackers")

        read = conversation_read(manager, "c1a50001", user_id)

        assert read_until_near_hit(manager, read) == conversation
        key = f"conv:{{{user_id}}}:c1a50001"
        assert client.hset(key, "title", "renamed through RedisCluster") == 0
        poll(read, lambda c: title_of(c) == "renamed through RedisCluster", what="the cluster write")
        assert near_stats(manager)["invalidations"] >= 1
        assert read_until_near_hit(manager, read) == {**conversation, "title": "renamed through RedisCluster"}

        def listing():
            return manager.list_conversations(user_id)

        # The list is made of the dirty hash's own fields: it shows the title the write above gave it.
        renamed = {**metadata(conversation), "title": "renamed through RedisCluster"}
        assert read_until_near_hit(manager, listing) == [("c1a50001", renamed)]
        other = make_manager(
            mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=cluster.url,
            background_flush=False,
        )  # fmt: skip
        second = make_conversation(1, title="second")
        other.save_conversation("c1a50002", second, user_id=user_id)
        poll(listing, lambda items: [cid for cid, _ in items] == ["c1a50002", "c1a50001"], what="the other save")
        wait_tracking(manager, timeout=10)
    finally:
        client.close()
