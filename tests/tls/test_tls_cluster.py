"""TLS on a Redis Cluster (README, "Configuration": every node is checked against the name the cluster advertises).

A throwaway cluster of 3 primaries with a replica each that speaks TLS only, on the client port, the
cluster bus and replication (tls_support.TlsRedisClusterServers; the nodes advertise 127.0.0.1, a name
their certificate covers). The manager is given one node's `rediss://` URL and the CA file, as Azure
hands out one host name: it must find every node from that one and reach each over TLS with the
certificate verified, since no node listens in plain text. Checked from outside the product: which
primary holds each key, read with redis-py over TLS; rows with psycopg2.

Tests request the cluster and database fixtures before `make_manager`, so the managers are closed
before the database is dropped.
"""

from __future__ import annotations

import re

import pytest

from chat_history_rs import ConfigurationError
from support.redis_support import grown, make_conversation, pg_conversation_ids, wait_until
from support.servers import ServerError, assert_row_matches
from support.tls_support import TlsRedisClusterServers, TlsUnsupported

pytestmark = pytest.mark.slow

HOSTS = ["127.0.0.1", "localhost"]

# A certificate the client refused (rustls: UnknownIssuer, NotValidForName, ...), as in test_tls.py.
CERTIFICATE_REFUSED = r"(?i)certificate|issuer"


def _start(cluster: TlsRedisClusterServers) -> TlsRedisClusterServers:
    try:
        cluster.start()
    except TlsUnsupported as exc:
        cluster.remove()
        pytest.skip(str(exc))
    except BaseException:
        cluster.remove()
        raise
    return cluster


@pytest.fixture(scope="module")
def tls_cluster(pki):
    """A TLS-only cluster whose every node presents Pki.node (names localhost and 127.0.0.1)."""
    try:
        cluster = TlsRedisClusterServers(pki.node, pki.ca)
    except ServerError as exc:
        pytest.fail(str(exc))
    yield _start(cluster)
    cluster.remove()


@pytest.fixture
def cluster(tls_cluster):
    """tls_cluster, healthy and emptied before the test."""
    tls_cluster.wait_healthy()
    tls_cluster.flushall()
    return tls_cluster


def _manager(make_manager, pg_url, redis_url, **kwargs):
    return make_manager(
        mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=redis_url,
        background_flush=False, **kwargs,
    )  # fmt: skip


def _conversations(prefix: str, count: int) -> dict:
    """(user, conversation id) -> conversation, the users spread over many hash slots."""
    return {(f"{prefix}-user-{i}", f"{i:08x}"): make_conversation(2, prefix=f"{prefix} {i} ") for i in range(count)}


def _key(user: str, cid: str) -> str:
    return f"conv:{{{user}}}:{cid}"  # the cluster layout: the user's id as the hash tag


def _owners(cluster, saved) -> dict[int, set]:
    """Primary port -> the saved conversations whose hash that primary holds, asked of each primary
    itself over TLS (SCAN lists a node's own keys: a key counts only where it really is)."""
    wanted = {_key(user, cid): (user, cid) for user, cid in saved}
    found: dict[int, set] = {}
    for p in cluster.primaries():
        node = cluster.node(p["port"])
        try:
            found[p["port"]] = {wanted[k] for k in node.scan_iter(match="conv:*", count=1000) if k in wanted}
        finally:
            node.close()
    return found


def _slot_owner_ports(cluster, saved) -> set[int]:
    """The primaries that own the slots of the saved conversations' keys (CLUSTER SLOTS)."""
    client = cluster.client()
    try:
        return {client.get_node_from_key(_key(user, cid)).port for user, cid in saved}
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------
# One node's URL and the CA file: every node, over TLS
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
def test_one_nodes_rediss_url_reaches_every_primary_over_tls(pki, cluster, pg_url, pg_conn, make_manager, host):
    saved = _conversations(f"all-{host}", 30)
    assert _slot_owner_ports(cluster, saved) == {p["port"] for p in cluster.primaries()}, "keys on every primary"
    app = _manager(make_manager, pg_url, f"rediss://{host}:{cluster.ports[0]}/0", redis_ca_file=str(pki.ca))
    for (user, cid), conv in saved.items():
        app.save_conversation(cid, conv, user_id=user)
    stats = app.stats()
    assert stats["redis_layout"] == "cluster", stats
    assert stats["redis_available"] is True, stats
    assert stats["dirty_count"] == len(saved), stats

    # Write-back: every save is in Redis, on the primary that owns its slot, and not yet in PostgreSQL.
    owners = _owners(cluster, saved)
    assert all(owners.values()), f"saves per primary: { {port: len(held) for port, held in owners.items()} }"
    assert sorted(k for held in owners.values() for k in held) == sorted(saved), "each save on exactly one primary"
    client = cluster.client()
    try:
        for port, held in owners.items():
            for user, cid in held:
                assert client.get_node_from_key(_key(user, cid)).port == port
                assert client.hget(_key(user, cid), "dirty") == "1"
    finally:
        client.close()
    assert pg_conversation_ids(pg_conn) == set(), "a save went to PostgreSQL, not to Redis"

    # Reads are served from the cluster (PostgreSQL has nothing yet); a flush writes every row.
    for (user, cid), conv in saved.items():
        assert app.get_conversation(cid, user_id=user) == conv
    # The near cache tracks every node over TLS too (its connections reach each node found from the
    # URL's with the same CA file and name checks), and then answers repeated reads.
    wait_until(lambda: app.stats()["near_cache_tracking"], timeout=10, what="near-cache tracking of every node")
    hits = app.stats()["near_cache_hits"]
    for _ in range(2):
        for (user, cid), conv in saved.items():
            assert app.get_conversation(cid, user_id=user) == conv
    assert app.stats()["near_cache_hits"] >= hits + len(saved), "the near cache answered the second pass"
    assert app.flush_dirty_conversations() == len(saved)
    for (user, cid), conv in saved.items():
        assert_row_matches(pg_conn, cid, user, conv)
    assert app.stats()["dirty_count"] == 0


# --------------------------------------------------------------------------------------------------
# Verification stays on
# --------------------------------------------------------------------------------------------------


def _assert_refused_at_construction(make_manager, pg_url, cluster, why: str = CERTIFICATE_REFUSED, **kwargs) -> None:
    """README "Misconfiguration or outage", as test_tls.py checks it on one node: a certificate that does
    not verify is a ConfigurationError at construction naming the cause (`why`), and no node holds a key."""
    with pytest.raises(ConfigurationError) as info:
        _manager(make_manager, pg_url, cluster.url, **kwargs)
    message = str(info.value)
    assert "TLS failed: the server's certificate does not verify" in message, message
    assert re.search(why, message), message
    assert sum(cluster.keys_per_primary().values()) == 0, "the manager wrote to nodes it could not verify"


@pytest.mark.parametrize("case", ["another-ca", "no-ca-file"])
def test_a_cluster_whose_certificate_is_not_trusted_is_not_used(pki, cluster, pg_url, make_manager, monkeypatch, case):
    monkeypatch.delenv("REDIS_CA_FILE", raising=False)
    kwargs = {"redis_ca_file": str(pki.other_ca)} if case == "another-ca" else {}  # else Mozilla's roots
    _assert_refused_at_construction(make_manager, pg_url, cluster, **kwargs)


@pytest.fixture
def seed_only_named_cluster(pki):
    """A TLS cluster where only the URL's node (`.ports[0]`) presents a certificate naming 127.0.0.1; the
    others present `wrong.example`'s (the same CA; as TLS clients of each other they use Pki.node)."""
    try:
        cluster = TlsRedisClusterServers(pki.node, pki.ca)
    except ServerError as exc:
        pytest.fail(str(exc))
    for port in cluster.ports[1:]:
        cluster.certs[port] = pki.wrong_name
    yield _start(cluster)
    cluster.remove()


def test_every_discovered_node_has_its_name_verified(pki, seed_only_named_cluster, pg_url, make_manager, monkeypatch):
    # The first node passes verification; the nodes found through it advertise 127.0.0.1 with certificates
    # that do not name it. They must be refused, not trusted because the first one was.
    cluster = seed_only_named_cluster
    monkeypatch.delenv("REDIS_CA_FILE", raising=False)
    saved = _conversations("seed-only", 12)
    assert len(_slot_owner_ports(cluster, saved)) == 3
    _assert_refused_at_construction(
        make_manager, pg_url, cluster, why=r"(?i)not valid for name", redis_ca_file=str(pki.ca)
    )


# --------------------------------------------------------------------------------------------------
# A failover
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_manual_failovers_keep_calls_working_over_tls(pki, cluster, pg_url, pg_conn, make_manager):
    app = _manager(make_manager, pg_url, cluster.url, redis_ca_file=str(pki.ca))
    latest = _conversations("failover", 24)
    for (user, cid), conv in latest.items():
        app.save_conversation(cid, conv, user_id=user)
    # Every shard, the URL's node first if a primary: after it, the node the manager was given is a replica.
    primaries = sorted(cluster.primaries(), key=lambda p: p["port"] != cluster.ports[0])
    for primary in primaries:
        cluster.failover(primary)  # returns once the two nodes swapped roles and the cluster is healthy
        for (user, cid), conv in latest.items():
            # Unflushed, so only Redis has them: each read is served by the cluster's new layout.
            assert app.get_conversation(cid, user_id=user) == conv
            latest[(user, cid)] = grown(conv, 1)
            app.save_conversation(cid, latest[(user, cid)], user_id=user)
        assert app.stats()["redis_available"] is True
    assert pg_conversation_ids(pg_conn) == set(), "a save went to PostgreSQL, not to Redis"
    owners = _owners(cluster, latest)
    assert sorted(k for held in owners.values() for k in held) == sorted(latest)
    assert app.flush_dirty_conversations() == len(latest)
    for (user, cid), conv in latest.items():
        assert_row_matches(pg_conn, cid, user, conv)
