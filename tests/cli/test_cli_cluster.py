"""`chat-history doctor` and `stats` on a Redis Cluster (3 primaries with a replica each, reached through
one node's URL): cluster mode, each primary's slots, memory and eviction policy, and stats()'s memory
numbers summed over the primaries. And on one node, doctor's report stays what it was."""

from __future__ import annotations

import json
import time

import pytest

from support.cluster_support import RedisClusterServers
from support.redis_support import make_conversation
from chat_history_rs import ChatHistoryManager
from support.servers import ServerError
from test_cli import cli_env, doctor_lines, parse_prometheus, run_cli

pytestmark = pytest.mark.slow

MB = 1024 * 1024
# A different maxmemory per primary, so a sum is told apart from one node's number or a multiple of it.
MAXMEMORY = (64 * MB, 65 * MB, 67 * MB)

# Doctor's checks on one node with Redis, in order (docs/monitoring.md, "The `chat-history` command"): no cluster lines.
SINGLE_NODE_CHECKS = [
    "mode",
    "PostgreSQL",
    "schema",
    "Redis",
    "near cache",
    "Redis eviction policy",
    "Redis memory",
    "write-back backlog",
    "write-back lag",
]


def wait_replicas_listed(servers: RedisClusterServers, timeout: float = 60) -> None:
    """Until every node's CLUSTER SLOTS lists a replica for each range: a replica appears there only once
    its first sync is done (seconds after `--cluster create`), and doctor counts what CLUSTER SLOTS lists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = [servers.node(port).execute_command("CLUSTER SLOTS") for port in servers.ports]
        if all(reply and all(len(entry) >= 4 for entry in reply) for reply in replies):
            return
        time.sleep(0.2)
    raise ServerError("the cluster's replicas were not listed in CLUSTER SLOTS in time")


@pytest.fixture(scope="module")
def cluster():
    try:
        servers = RedisClusterServers(extra_args=["--maxmemory-policy", "volatile-lru"])
    except ServerError as exc:
        pytest.fail(str(exc))
    try:
        servers.start()
        for primary, limit in zip(servers.primaries(), MAXMEMORY):
            servers.node(primary["port"]).config_set("maxmemory", limit)
        wait_replicas_listed(servers)
        yield servers
    finally:
        servers.remove()


@pytest.fixture
def cluster_env(cluster, pg_url):
    cluster.wait_healthy()
    cluster.flushall()
    # The schema, as `chat-history init-db` makes it: stats and doctor create no table.
    ChatHistoryManager(mode="postgres", connection_string=pg_url).close()
    return cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=cluster.url)


@pytest.fixture
def one_primary_allkeys(cluster):
    """One primary switched to allkeys-lru for the test, then back."""
    primary = cluster.primaries()[1]
    node = cluster.node(primary["port"])
    node.config_set("maxmemory-policy", "allkeys-lru")
    try:
        yield primary
    finally:
        node.config_set("maxmemory-policy", "volatile-lru")


def primaries_by_address(cluster) -> dict[str, dict]:
    return {f"127.0.0.1:{p['port']}": p for p in cluster.primaries()}


def shard_lines(checks: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """{address: (status, detail)} from doctor's `Redis shard N` lines."""
    return {detail.split(": ", 1)[0]: (status, detail) for name, (status, detail) in checks.items() if "shard" in name}


def test_doctor_on_a_cluster_reports_every_primary(cluster, cluster_env):
    result = run_cli("doctor", env=cluster_env)
    assert result.returncode == 0, result.stdout
    checks = doctor_lines(result.stdout)
    assert checks["Redis mode"] == ("OK", "cluster (3 primaries, 16384 of 16384 slots served); cluster key layout")
    primaries = primaries_by_address(cluster)
    shards = shard_lines(checks)
    assert set(shards) == set(primaries), result.stdout
    assert [name for name in checks if "shard" in name] == ["Redis shard 1", "Redis shard 2", "Redis shard 3"]
    limits = {cluster.node(p["port"]).config_get("maxmemory")["maxmemory"] for p in primaries.values()}
    assert limits == {str(m) for m in MAXMEMORY}
    for address, (status, detail) in shards.items():
        assert status == "OK", detail
        assert f"{address}: {primaries[address]['slots']} slots, 1 replica;" in detail
        assert "maxmemory-policy volatile-lru" in detail
        assert " MiB used of " in detail or " KiB used of " in detail, detail
    assert checks["Redis eviction policy"][0] == "OK"
    assert "(every primary)" in checks["Redis eviction policy"][1]
    assert checks["Redis memory"][0] == "OK"
    assert f"of {sum(MAXMEMORY) / MB:.1f} MiB" in checks["Redis memory"][1]


def test_doctor_warns_about_the_one_primary_that_may_evict_dirty_data(cluster, cluster_env, one_primary_allkeys):
    result = run_cli("doctor", env=cluster_env)
    assert result.returncode == 1, result.stdout
    checks = doctor_lines(result.stdout)
    shards = shard_lines(checks)
    evicting = f"127.0.0.1:{one_primary_allkeys['port']}"
    for address, (status, detail) in shards.items():
        if address == evicting:
            assert status == "WARN" and "allkeys-lru may evict dirty conversations" in detail, detail
        else:
            assert status == "OK", detail
    status, detail = checks["Redis eviction policy"]
    assert status == "WARN" and "do not agree (allkeys-lru, volatile-lru)" in detail


def test_doctor_warns_about_a_shard_near_its_maxmemory_while_the_sum_is_low(cluster, cluster_env):
    primary = cluster.primaries()[2]
    node = cluster.node(primary["port"])
    before = node.config_get("maxmemory")["maxmemory"]
    node.config_set("maxmemory", int(node.info("memory")["used_memory"] * 1.1))  # about 90 % used
    try:
        result = run_cli("doctor", env=cluster_env)
    finally:
        node.config_set("maxmemory", before)
    assert result.returncode == 1, result.stdout
    checks = doctor_lines(result.stdout)
    for address, (status, detail) in shard_lines(checks).items():
        if address == f"127.0.0.1:{primary['port']}":
            assert status == "WARN" and "above 80 % of maxmemory" in detail, detail
        else:
            assert status == "OK", detail
    assert checks["Redis memory"][0] == "OK"  # the sum is far from its limit


def test_stats_on_a_cluster_sums_the_primaries(cluster, cluster_env, pg_url, make_manager, user_id):
    app = make_manager(
        mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=cluster.url
    )
    app.save_conversation("c6000001", make_conversation(2), user_id=user_id)
    stats = app.stats()
    nodes = stats["redis_nodes"]
    primaries = primaries_by_address(cluster)
    assert sorted(n["address"] for n in nodes) == sorted(primaries)
    assert [n["address"] for n in nodes] == sorted(n["address"] for n in nodes)
    for node in nodes:
        assert node["slots"] == primaries[node["address"]]["slots"]
        assert node["replicas"] == 1
        assert node["maxmemory_policy"] == "volatile-lru"
        server = cluster.node(primaries[node["address"]]["port"])
        assert node["maxmemory"] == int(server.config_get("maxmemory")["maxmemory"])
        assert node["used_memory"] > 0
    assert sum(n["slots"] for n in nodes) == 16384
    assert stats["redis_maxmemory"] == sum(MAXMEMORY)
    assert stats["redis_used_memory"] == sum(n["used_memory"] for n in nodes)
    assert stats["redis_used_memory"] > max(n["used_memory"] for n in nodes)
    assert stats["redis_maxmemory_policy"] == "volatile-lru"


def test_stats_policy_is_none_when_the_primaries_differ(cluster, cluster_env, one_primary_allkeys):
    result = run_cli("stats", "--json", env=cluster_env)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["redis_maxmemory_policy"] is None
    policies = {n["address"]: n["maxmemory_policy"] for n in stats["redis_nodes"]}
    assert policies[f"127.0.0.1:{one_primary_allkeys['port']}"] == "allkeys-lru"
    assert sorted(policies.values()) == ["allkeys-lru", "volatile-lru", "volatile-lru"]
    text = run_cli("stats", env=cluster_env).stdout
    assert "maxmemory policy         differs between primaries" in text
    assert text.count("maxmemory-policy volatile-lru") == 2 and text.count("maxmemory-policy allkeys-lru") == 1


def test_stats_prometheus_on_a_cluster_has_gauges_per_node(cluster, cluster_env):
    result = run_cli("stats", "--prometheus", env=cluster_env)
    assert result.returncode == 0, result.stderr
    samples = parse_prometheus(result.stdout)
    primaries = primaries_by_address(cluster)
    slots = {labels: value for labels, value in samples["chat_history_redis_node_slots"]}
    assert slots == {f'{{node="{address}"}}': float(p["slots"]) for address, p in primaries.items()}
    limits = sorted(value for _, value in samples["chat_history_redis_node_maxmemory_bytes"])
    assert limits == [float(m) for m in MAXMEMORY]
    assert samples["chat_history_redis_maxmemory_bytes"] == [("", float(sum(MAXMEMORY)))]
    used = samples["chat_history_redis_node_used_memory_bytes"]
    assert len(used) == 3 and all(value > 0 for _, value in used)
    policies = samples["chat_history_redis_node_maxmemory_policy_info"]
    assert sorted(labels for labels, _ in policies) == sorted(
        f'{{node="{address}",policy="volatile-lru"}}' for address in primaries
    )
    assert samples["chat_history_redis_maxmemory_policy_info"] == [('{policy="volatile-lru"}', 1.0)]


def test_doctor_on_one_node_is_unchanged(rdb, pg_url):
    ChatHistoryManager(mode="postgres", connection_string=pg_url).close()  # the schema, as init-db makes it
    env = cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url)
    result = run_cli("doctor", env=env)
    names = [name for name in doctor_lines(result.stdout)]
    assert names == SINGLE_NODE_CHECKS, result.stdout
    status, detail = doctor_lines(result.stdout)["near cache"]
    assert status == "OK" and "Redis tracks it" in detail, result.stdout
    stats = json.loads(run_cli("stats", "--json", env=env).stdout)
    assert stats["redis_nodes"] == []
    assert stats["redis_used_memory"] > 0 and stats["redis_maxmemory_policy"]
    prometheus = run_cli("stats", "--prometheus", env=env).stdout
    assert "chat_history_redis_node_" not in prometheus


def test_doctor_on_one_endpoint_with_redis_cluster_set(rdb, pg_url):
    ChatHistoryManager(mode="postgres", connection_string=pg_url).close()  # the schema, as init-db makes it
    """REDIS_CLUSTER=true (Azure's Enterprise clustering policy: one endpoint, not a Redis Cluster) is read
    from the environment and reported; the rest of the report is the single node's."""
    result = run_cli("doctor", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url, REDIS_CLUSTER="true"))
    checks = doctor_lines(result.stdout)
    status, detail = checks["Redis mode"]
    assert status == "OK" and "one endpoint, not a Redis Cluster; cluster key layout" in detail
    assert [name for name in checks if name != "Redis mode"] == SINGLE_NODE_CHECKS
    assert not any("shard" in name for name in checks)
