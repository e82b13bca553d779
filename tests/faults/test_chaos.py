"""A seeded, randomized fault checker (model-based, Jepsen-style) for the Redis tier (docs/design.md).

It runs twice: on one redis-server (`node`) and on a Redis Cluster of 3 primaries and 3 replicas (`cluster`).

Servers of its own: PostgreSQL with synchronous_commit=on; on one node a redis-server with AOF (fsync always) and
a maxmemory a "fill" fault can exhaust, with a proxy per client path (instance A, instance B, the worker process
P, the flusher F), so one instance's network can fail while the others' works; on the cluster, nodes that
announce a proxy's port each (`cluster-announce-port`), so clients reach every node through its proxy and any
node can be cut, stalled or held as the clients see it. Clients: worker threads in this process on two managers
(app instances A and B; a tab's request goes now and then to the other instance, so a conversation is saved
through both), a worker subprocess with its own manager (P), an intruder that tries other users' ids, and a
standalone flusher subprocess (`chat-history flush --loop`). A scheduler meanwhile, one fault at a time (every
kind once first): partitions, stalls and cuts Redis (every path, or one), holds a path past `redis_timeout` and
delivers its bytes late (`*-late`, below), kills and restarts Redis, fills its memory, stops and kills
PostgreSQL, SIGKILLs the flusher; on the cluster it also SIGKILLs a primary (once its replica has every write it
acknowledged: docs/design.md, section 16, documents that a failover to a replica that lagged loses writes) and
fails primaries over by hand.

Late delivery (docs/design.md, "Write order"): a proxy holds bytes past `redis_timeout`, the links of the next
saves through one path, or the links open now, or every link; the writer gives up (falls back to PostgreSQL, or
raises); meanwhile newer saves go through another path (the other instance, or the same instance on a new
connection once its backoff ends) or straight to PostgreSQL; then the held bytes reach Redis, after those newer
saves, and Redis runs a write its writer gave up on. A late delivery is counted when held bytes reach the server
after waiting longer than its client waits (LateProxy.overdue_deliveries: redis_timeout on one node, whose pool
closes the connection; 6.5 s on the cluster, whose connection stays open and was measured waiting about 6 s).

At the end every fault is healed, the flusher stops and the apps close (flushing), a manager flushes until no
conversation is dirty, Redis is emptied (FLUSHALL on every primary) and the final state is read from PostgreSQL
alone, with SQL: a Redis copy marked clean but never written shows as a loss. Then the history is checked
(check_run; every rule has a history in the self-test below that fires it alone):

    LOST         every message of every acknowledged save is in its owner's conversation or in a
                 `conversation_conflicts` row of that id and user (docs/design.md, "Divergence"), unless an
                 acknowledged delete that started after the save ended removed it.
    NOT-NEWEST   the conversation is the newest save, with the same transcript (docs/design.md, "Write order":
                 a write is ordered by what its writer did). What "newest" means when calls failed: a call that
                 raised UnavailableError may or may not have applied, so the candidates are every acknowledged
                 save or delete, and every save that raised UnavailableError, that no acknowledged save or delete
                 *started after it ended* (one that did is newer by intent, whatever order the bytes arrived in);
                 the conversation at the end must hold exactly the transcript of one candidate save, or be absent
                 when a candidate is an acknowledged delete or nothing was ever acknowledged. A delete that raised
                 is no candidate: it changed nothing (docs/design.md, "Deletes"). A conflict copy never counts as
                 the conversation: a newest save found only in `conversation_conflicts` is this anomaly.
    TITLE        the same for the title: the conversation's transcript is a candidate's, but its title is none of
                 those candidates' titles (a rename lost, or an old title back).
    RESURRECTED  a conversation whose newest op was an acknowledged delete exists in PostgreSQL.
    CLAIMED      no user's save of another user's live id is acknowledged.
    LEAK         no read or list returned another user's data.
    ERROR        no call failed with anything but UnavailableError (an owner refused its own id, say).
    HUNG         no call took longer than HUNG_SECONDS, nor one that met no PostgreSQL fault longer than
                 REDIS_CALL_SECONDS (both derived below from the documented bounds), no worker was still in a call
                 HUNG_SECONDS after the stop, no close() took longer than close_timeout + HUNG_SECONDS.
    UNDRAINED    the dirty set (and on one node the set of late copies) empties within 30 s once every fault is healed.
    FINAL-READ   PostgreSQL's rows read as conversations (no gap in the sequence numbers, conflict copies that
                 parse), and the product, on the emptied Redis, reads exactly what the rows hold.
    FLUSHER      the flusher process exits cleanly on SIGTERM.
    WORKER-PROCESS  the worker process leaves its log.
    FAULT-TOOL   every fault was applied (a fault tool that failed proves nothing).
    TOO-FEW      the run proved something: at least MINIMUMS (scaled to its length) calls, failed calls,
                 fall-backs to PostgreSQL, conflict copies kept, and late deliveries that reached Redis after
                 their client had given up.

    CHAOS_SEED     the seed (printed with every anomaly; the fault sequence and each worker's choices follow from
                   it; timings do not, so a rerun explores the same plan, not the same interleaving)
    CHAOS_SECONDS  how long the workload runs (default 45 on one node, 30 on the cluster)
    CHAOS_REDIS    `node` or `cluster` to run one of the two (default: both)
    CHAOS_DUMP     a path, say h.json: the whole history as JSON in h.node.json and h.cluster.json

The product's warnings are logged in the run's tmp_path (pytest's --basetemp): instances.log for the instances in
this process, worker-process.err and flusher.log for the other two processes.

`make soak` runs both for 600 s each and prints the summaries: calls per kind, faults per kind, late deliveries,
conflicts kept, anomalies per kind.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

import redis
from support import chaos_workload
from support.chaos_support import LateProxy, durable_postgres, durable_redis, read_postgres_state
from support.chaos_workload import INTRUDER_INDEX, Op, Worker, op_from_json, transcript_digest
from support.redis_support import redis_client, script_env
from support.servers import ServerError, create_database, find_pg_bindir

SEED = int(os.environ.get("CHAOS_SEED", "20261129"))
SECONDS = {
    "node": float(os.environ.get("CHAOS_SECONDS", "45")),
    "cluster": float(os.environ.get("CHAOS_SECONDS", "30")),  # make test's cluster pass: under a minute in all
}
REDIS_KINDS = [k for k in ("node", "cluster") if os.environ.get("CHAOS_REDIS", "both") in ("both", "", k)]

MANAGER_KWARGS = {
    "redis_timeout": 0.5,
    "postgres_connect_timeout": 2.0,
    "postgres_lock_timeout": 2.0,
    "postgres_statement_timeout": 5.0,
}
CLOSE_TIMEOUT = 30.0  # close()'s default close_timeout (README, Configuration)
# The longest a call may take. The documented bounds (docs/design.md, sections 8 and 1.6): a call waits
# on Redis at most redis_timeout, then skips it for a backoff; on PostgreSQL, for a connection at most
# postgres_connect_timeout, for a lock at most postgres_lock_timeout, and a statement runs at most
# postgres_statement_timeout; a session the server ended is replaced and the call run again. So a call that
# meets a hung Redis and then a PostgreSQL that goes away costs at most about one redis_timeout + one
# connect_timeout + one statement_timeout + one more connect_timeout for the rerun: 9.5 s with the kwargs above.
# Doubled, because the machine is shared (2 cores, other suites, this test's own 9 servers and ~15 threads):
# calls measured here take up to about 3 s under faults, and a scheduler hiccup of seconds is not a hang.
HUNG_SECONDS = 2 * (
    MANAGER_KWARGS["redis_timeout"]
    + 2 * MANAGER_KWARGS["postgres_connect_timeout"]
    + MANAGER_KWARGS["postgres_statement_timeout"]
)
# A call that met no PostgreSQL fault has only Redis to wait on: at most a pool wait, a connect and a command,
# each bounded by redis_timeout (README, Configuration), before it goes to PostgreSQL, whose statements then
# take milliseconds. 2 s on top for the loaded machine (a call's own PostgreSQL work and a thread that waits for
# a core). Flushes are left to HUNG_SECONDS: a flush asked for tries Redis once per batch and round trip even
# while the process backs off from it (docs/design.md, section 8).
REDIS_CALL_SECONDS = 3 * MANAGER_KWARGS["redis_timeout"] + 2.0
EXPECTED_ERRORS = ("UnavailableError",)  # a call may fail while a server is away, with this error only
# What a run must show per 45 s of workload (scaled to its length, rounded down, never below 1), or it proved
# too little: that the faults hit calls, that instances fell back, that divergences were resolved by keeping a
# copy aside, and that bytes held past their client's timeout really reached Redis late.
MINIMUMS = {"calls": 2000, "failed calls": 20, "fallbacks": 20, "conflicts kept": 1, "late deliveries": 2}


def minimums_for(seconds: float) -> dict[str, int]:
    return {name: max(1, int(n * seconds / 45)) for name, n in MINIMUMS.items()}


# --------------------------------------------------------------------------------------------------
# The worlds: servers, proxies, flusher; and the faults each can inject
# --------------------------------------------------------------------------------------------------

PATHS = ("A", "B", "P", "F")  # instance A, instance B, the worker process, the flusher


class World:
    """PostgreSQL, the flusher process, and what both worlds share; a subclass adds Redis and its faults."""

    fault_weights: dict[str, int] = {}
    # How long a late fault holds bytes: longer than a call held there waits before it gives up, so that the
    # held bytes arrive after it did and after its worker's newer saves of the same conversation.
    late_hold = (2.0, 5.0)

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pg = durable_postgres()
        self.pg.start()
        self.pg_params = create_database(self.pg.params)
        self.flusher: Optional[subprocess.Popen] = None
        self.flusher_log = open(tmp / "flusher.log", "ab")  # noqa: SIM115 - closed in close()

    # -- what subclasses provide -------------------------------------------------------------------------

    def url(self, path: str) -> str:
        """The Redis URL a client path uses (A, B, P, F, or "checker")."""
        raise NotImplementedError

    def proxies(self) -> list[LateProxy]:
        raise NotImplementedError

    def inject(self, kind: str, hold, rng: random.Random) -> str:
        """Applies one fault, holds it (`hold(low, high)` waits a seeded time), heals it; returns what it did."""
        raise NotImplementedError

    def heal_redis(self) -> None:
        raise NotImplementedError

    def dirty_members(self) -> set[str]:
        raise NotImplementedError

    def flushall(self) -> None:
        raise NotImplementedError

    def choose_users(self, run: str) -> list[str]:
        return [f"chaos-{run}-user{n}" for n in range(4)]

    # -- flusher -----------------------------------------------------------------------------------------

    def start_flusher(self) -> None:
        cmd = [
            sys.executable, "-m", "chat_history_rs", "flush", "--loop", "--interval", "0.5",
            "--database-url", self.pg_params.url, "--redis-url", self.url("F"), "--connect-timeout", "2",
        ]  # fmt: skip
        self.flusher = subprocess.Popen(cmd, env=script_env(), stdout=self.flusher_log, stderr=self.flusher_log)

    def kill_flusher(self) -> None:
        if self.flusher is not None and self.flusher.poll() is None:
            self.flusher.send_signal(signal.SIGKILL)
            self.flusher.wait(timeout=30)
        self.flusher = None

    def stop_flusher(self) -> Optional[int]:
        """SIGTERM (final flush, then exit); SIGKILL after 40 s. Returns the exit code."""
        if self.flusher is None:
            return None
        self.flusher.send_signal(signal.SIGTERM)
        try:
            code = self.flusher.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.flusher.kill()
            code = self.flusher.wait()
        self.flusher = None
        return code

    # -- faults both worlds share ----------------------------------------------------------------------

    def inject_common(self, kind: str, hold) -> str:
        if kind == "pg-stop":
            self.pg.stop("fast")
            held = hold(0.5, 3.0)
            self.pg.start()
        elif kind == "pg-kill":
            self.pg.kill()
            held = hold(0.2, 2.0)
            self.pg.start()
        elif kind == "flusher-kill":
            self.kill_flusher()
            held = hold(0.0, 2.0)
            self.start_flusher()
        else:  # pragma: no cover - fault_weights lists the kinds
            raise AssertionError(kind)
        return f"held {held:.2f}s"

    def late(self, proxy: LateProxy, rng: random.Random, hold, where: str, saves: bool = True) -> str:
        """Holds bytes on a path past redis_timeout, then delivers them. Half the time the next one to three
        saves' links alone (the instance goes on through its other connections, once its backoff ends); a
        quarter of the time the links open now (new connections pass); a quarter of the time every link, new
        ones too (newer saves go through the other paths, or straight to PostgreSQL). `saves=False` (the
        flusher's path, which saves nothing: its flushes' settles are what is held) leaves out the first."""
        roll = rng.random() if saves else 0.5 + rng.random() / 2
        if roll < 0.5:
            count = rng.randint(1, 3)
            proxy.hold_saves(count)
            mode = f"the next {count} saves' links"
        elif roll < 0.75:
            mode = f"{proxy.hold_open()} open links"
        else:
            proxy.hold()
            mode = "every link"
        before = (proxy.late_deliveries, proxy.overdue_deliveries)
        held = hold(*self.late_hold)
        saves = proxy.saves_held
        proxy.deliver()
        wait_delivered([proxy])
        return (
            f"{where}: {mode} held {held:.2f}s ({saves} saves caught), then delivered; late deliveries: "
            f"{proxy.overdue_deliveries - before[1]} links, {proxy.late_deliveries - before[0]} of them closed"
        )

    def heal(self) -> None:
        self.heal_redis()
        if not self.pg.is_running():
            self.pg.start()

    def close(self) -> None:
        self.kill_flusher()
        self.flusher_log.close()
        for proxy in self.proxies():
            proxy.close()
        self.pg.remove()


def wait_delivered(proxies: list[LateProxy], timeout: float = 5.0) -> None:
    """Until the proxies have passed on every byte their clients sent (a late delivery included), and a
    moment more for the server to run it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.pending() for p in proxies):
        time.sleep(0.02)
    time.sleep(0.2)


class NodeWorld(World):
    """One redis-server, with a proxy per client path."""

    fault_weights = {
        "redis-partition": 3,
        "redis-stall": 2,
        "redis-cut": 2,
        "redis-late": 6,
        "redis-restart": 2,
        "redis-oom": 2,
        "pg-stop": 2,
        "pg-kill": 2,
        "flusher-kill": 3,
    }

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.redis = durable_redis("--maxmemory", "24mb", "--maxmemory-policy", "volatile-lru")
        self.redis.start()
        self.direct = redis_client(self.redis.url)
        self.path_proxies = {path: LateProxy(self.redis.port) for path in PATHS}
        self.fillers = 0

    def url(self, path: str) -> str:
        return self.redis.url if path == "checker" else self.path_proxies[path].url()

    def proxies(self) -> list[LateProxy]:
        return list(self.path_proxies.values())

    def _targets(self, rng: random.Random) -> tuple[str, list[LateProxy]]:
        """Every path (Redis is away), or one path (one instance's network)."""
        if rng.random() < 0.5:
            return "every path", self.proxies()
        path = rng.choice(PATHS)
        return f"path {path}", [self.path_proxies[path]]

    def inject(self, kind: str, hold, rng: random.Random) -> str:
        if kind == "redis-partition":
            where, proxies = self._targets(rng)
            for proxy in proxies:
                proxy.partition()
            held = hold(0.5, 3.0)
            for proxy in proxies:
                proxy.heal()
        elif kind == "redis-stall":
            where, proxies = self._targets(rng)
            for proxy in proxies:
                proxy.stall()
            held = hold(0.3, 2.0)
            # Stalled requests are dropped here, never delivered late: that is redis-late's job.
            for proxy in proxies:
                proxy.cut()
                proxy.heal()
        elif kind == "redis-cut":
            where, proxies = self._targets(rng)
            for proxy in proxies:
                proxy.cut()
            held = 0.0
        elif kind == "redis-late":
            path = rng.choices(PATHS, weights=(3, 3, 2, 2))[0]
            return self.late(self.path_proxies[path], rng, hold, f"path {path}", saves=path != "F")
        elif kind == "redis-restart":
            where = "server"
            self.redis.kill()
            held = hold(0.2, 2.0)
            self.redis.start()
        elif kind == "redis-oom":
            where = "server"
            if not self.fill_redis():
                self.free_redis()
                return "could not fill Redis (not reachable?)"
            held = hold(0.5, 3.0)
            self.free_redis()
        else:
            return self.inject_common(kind, hold)
        return f"{where}: held {held:.2f}s"

    def fill_redis(self) -> bool:
        """Keys without a TTL (never evicted under volatile-lru) until Redis refuses writes (OOM)."""
        try:
            for _ in range(2000):
                self.direct.set(f"chaos:filler:{self.fillers}", b"f" * 100_000)
                self.fillers += 1
        except redis.exceptions.ResponseError as exc:
            return "maxmemory" in str(exc) or "OOM" in str(exc)
        except redis.exceptions.ConnectionError:
            return False
        return False

    def free_redis(self) -> None:
        names = [f"chaos:filler:{n}" for n in range(self.fillers)]
        for start in range(0, len(names), 500):
            self.direct.delete(*names[start : start + 500])
        self.fillers = 0

    def heal_redis(self) -> None:
        for proxy in self.proxies():
            proxy.heal()
        if not self.redis.is_running():
            self.redis.start()
        if self.fillers:
            self.free_redis()
        wait_delivered(self.proxies())

    def dirty_members(self) -> set[str]:
        # Late copies (and copies a save kept aside) are listed apart on one node; until a flush put them in
        # PostgreSQL they are as unflushed as a dirty conversation, and the FLUSHALL below would lose them.
        return set(self.direct.smembers("dirty:convs")) | set(self.direct.smembers("late:convs"))

    def flushall(self) -> None:
        self.direct.flushall()

    def close(self) -> None:
        super().close()
        self.direct.close()
        self.redis.remove()


class ClusterWorld(World):
    """A Redis Cluster of 3 primaries and 3 replicas, each node behind the proxy it announces."""

    # A save on a cluster was measured waiting up to about 6 s on a node that stopped answering (each command's
    # response_timeout, retried), against 1.5 s on one node: hold longer, so that its writer gives up, goes on,
    # and saves again through a new connection before the held bytes arrive.
    late_hold = (7.0, 10.0)

    fault_weights = {
        "node-partition": 2,
        "node-stall": 2,
        "node-cut": 2,
        "node-late": 6,
        "primary-kill": 2,
        "primary-failover": 1,
        "pg-stop": 2,
        "pg-kill": 2,
        "flusher-kill": 2,
    }

    def __init__(self, tmp: Path) -> None:
        from support.cluster_support import ProxiedRedisClusterServers

        super().__init__(tmp)
        # A replica's full sync starts at once (the default waits 5 s for more replicas to share one).
        # Held bytes count as late once they waited longer than a cluster call was measured to wait (late_hold).
        self.cluster = ProxiedRedisClusterServers(
            proxy_factory=lambda port: LateProxy(port, late_after=6.5), extra_args=["--repl-diskless-sync-delay", "0"]
        )
        self.cluster.start()

    def url(self, path: str) -> str:
        return self.cluster.url  # node 0's proxy: the product discovers the others (through their proxies)

    def proxies(self) -> list[LateProxy]:
        return list(self.cluster.proxies.values())

    def choose_users(self, run: str) -> list[str]:
        """Four users, at least one on every primary's slots (a user's keys share the slot of its hash tag)."""
        from redis.crc import key_slot

        shards = sorted((lo, hi) for lo, hi in self._slot_ranges())
        users: list[str] = []
        covered: set[int] = set()
        n = 0
        while len(users) < 4 or len(covered) < len(shards):
            name = f"chaos-{run}-user{n}"
            n += 1
            slot = key_slot(name.encode())
            shard = next(i for i, (lo, hi) in enumerate(shards) if lo <= slot <= hi)
            if shard not in covered or (len(covered) == len(shards) and len(users) < 4):
                covered.add(shard)
                users.append(name)
        return users

    def _slot_ranges(self) -> list[tuple[int, int]]:
        client = self.cluster.node(self.cluster.ports[0])
        try:
            return [(int(lo), int(hi)) for lo, hi, *_ in client.execute_command("CLUSTER", "SLOTS")]
        finally:
            client.close()

    def _node_targets(self, rng: random.Random) -> tuple[str, list[LateProxy]]:
        """One node (a primary most of the time: clients talk to primaries), or every node."""
        roll = rng.random()
        if roll < 0.3:
            return "every node", self.proxies()
        candidates = [n["port"] for n in self.cluster.primaries()] if roll < 0.85 else self.cluster.ports
        port = rng.choice(sorted(candidates))
        return f"node {port}", [self.cluster.proxies[port]]

    def inject(self, kind: str, hold, rng: random.Random) -> str:
        c = self.cluster
        if kind == "node-partition":
            where, proxies = self._node_targets(rng)
            for proxy in proxies:
                proxy.partition()
            held = hold(0.5, 3.0)
            for proxy in proxies:
                proxy.heal()
        elif kind == "node-stall":
            where, proxies = self._node_targets(rng)
            for proxy in proxies:
                proxy.stall()
            held = hold(0.3, 2.0)
            for proxy in proxies:
                proxy.cut()
                proxy.heal()
        elif kind == "node-cut":
            where, proxies = self._node_targets(rng)
            for proxy in proxies:
                proxy.cut()
            held = 0.0
        elif kind == "node-late":
            port = rng.choice(sorted(n["port"] for n in c.primaries()))
            return self.late(c.proxies[port], rng, hold, f"primary {port}")
        elif kind == "primary-kill":
            c.wait_healthy(timeout=60)  # every shard has its replica again before another dies
            primary = rng.choice(sorted(c.primaries(), key=lambda n: n["port"]))
            return c.crash_primary(primary, down_for=rng.random() * 1.5)
        elif kind == "primary-failover":
            c.wait_healthy(timeout=60)
            primary = rng.choice(sorted(c.primaries(), key=lambda n: n["port"]))
            c.failover(primary)
            return f"primary {primary['port']} failed over to its replica"
        else:
            return self.inject_common(kind, hold)
        return f"{where}: held {held:.2f}s"

    def heal_redis(self) -> None:
        for proxy in self.proxies():
            proxy.heal()
        for port in self.cluster.ports:
            if not self.cluster.is_running(port):
                self.cluster.restart(port)
        self.cluster.wait_healthy(timeout=60)
        wait_delivered(self.proxies())

    def dirty_members(self) -> set[str]:
        members: set[str] = set()
        for node in self.cluster.primaries():
            client = self.cluster.node(node["port"])
            try:
                for key in client.scan_iter(match="user:{*}:dirtyconvs", count=1000):
                    members |= client.smembers(key)
            finally:
                client.close()
        return members

    def flushall(self) -> None:
        self.cluster.flushall()  # the primaries; their replicas follow
        clients = [self.cluster.node(port) for port in self.cluster.ports]
        try:
            deadline = time.monotonic() + 10
            while any(client.dbsize() for client in clients) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def close(self) -> None:
        super().close()
        self.cluster.remove()


class Scheduler(threading.Thread):
    """Injects one fault at a time, drawn from the seed (every kind once first, late delivery first of all):
    apply, hold, heal, pause."""

    def __init__(self, world: World, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.world = world
        self.rng = random.Random(f"{seed}/faults")
        self.stop_event = stop
        self.log: list[tuple[float, float, str, str]] = []  # (start, end, kind, detail)
        self.errors: list[str] = []

    def _hold(self, low: float, high: float) -> float:
        seconds = low + self.rng.random() * (high - low)
        self.stop_event.wait(seconds)
        return seconds

    def run(self) -> None:
        kinds = list(self.world.fault_weights)
        weights = list(self.world.fault_weights.values())
        # Every kind once (in a seeded order, late delivery first and twice: a short run must have the late
        # deliveries MINIMUMS asks for, and one late fault may catch a single save), then at random.
        first_round = self.rng.sample(kinds, len(kinds)) + [kind for kind in kinds if kind.endswith("-late")]
        first_round.sort(key=lambda kind: kind.endswith("-late"))  # pop() takes from the end
        self._hold(1.0, 2.0)
        while not self.stop_event.is_set():
            kind = first_round.pop() if first_round else self.rng.choices(kinds, weights=weights)[0]
            start = time.time()
            try:
                detail = self.world.inject(kind, self._hold, self.rng)
            except (ServerError, OSError, redis.exceptions.RedisError, subprocess.SubprocessError) as exc:
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                detail = f"fault tool failed: {exc}"
                try:
                    self.world.heal()
                except (ServerError, OSError, redis.exceptions.RedisError) as heal_exc:
                    self.errors.append(f"heal after {kind}: {heal_exc}")
            self.log.append((start, time.time(), kind, detail))
            self._hold(0.3, 2.0)


# --------------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """Everything check_run judges: the history, the final state as PostgreSQL holds it, and what the
    harness saw of the run. Times are seconds since the workload began."""

    seed: int
    ops: list[Op]
    conversations: dict  # id -> {"user", "title", "model", "messages": [(role, content, utc time)]}
    conflicts: dict  # (user, id) -> [{"title", "messages", "reason"}]
    faults: list = field(default_factory=list)  # (start, end, kind, detail)
    read_problems: list[str] = field(default_factory=list)  # rows that do not read, product reads that differ
    hung_workers: list[str] = field(default_factory=list)
    slow_closes: list[str] = field(default_factory=list)
    worker_process: Optional[str] = None  # why the worker process left no log, when it did not
    undrained: Optional[str] = None
    flusher_code: Optional[int] = None
    fault_tool_errors: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # the MINIMUMS' names -> what the run had
    minimums: dict = field(default_factory=dict)


def _describe(op: Op) -> str:
    outcome = "ok" if op.ok else f"FAILED {op.error}"
    extra = f" ({op.note})" if op.note else ""
    size = f" {op.size} msgs" if op.size is not None else ""
    title = f" {op.title!r}" if op.kind == "rename" else ""
    via = f" via {op.via}" if op.via else ""
    return f"{op.kind}{size}{title} [{op.t0:.3f}s..{op.t1:.3f}s] by {op.worker}{via}: {outcome}{extra}"


def _faults_during(faults, t0: float, t1: float) -> list[str]:
    return [f"{kind} [{s:.3f}s..{e:.3f}s] {detail}" for s, e, kind, detail in faults if s <= t1 and e >= t0]


def _timeline(history: list[Op], at: Op, before: int = 3, after: int = 8) -> str:
    i = history.index(at)
    return "\n      ".join(_describe(o) for o in history[max(0, i - before) : i + after + 1])


def _maybe_applied(op: Op) -> bool:
    """A save that raised UnavailableError may have been applied (its bytes may still reach Redis)."""
    return op.kind in ("save", "rename") and not op.ok and op.error_type in EXPECTED_ERRORS


def check_history(ops: list[Op], conversations: dict, conflicts: dict, faults, seed: int) -> list[str]:
    """The anomalies of a history against the final state read from PostgreSQL (the rules of the module
    docstring: LOST, NOT-NEWEST, TITLE, RESURRECTED, CLAIMED, LEAK, HUNG for a call, ERROR)."""
    anomalies: list[str] = []
    by_conv: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind in ("get", "save", "rename", "delete"):
            by_conv[(op.user, op.cid)].append(op)
    for history in by_conv.values():
        history.sort(key=lambda o: o.t0)
    # Other users' calls on an id (the intruder's), for the LOST report: a timeline of the owner's calls alone hid
    # the delete of another user behind the cluster soak's one LOST (docs/design.md, "Ownership").
    intrusions: dict[str, list[Op]] = defaultdict(list)
    for op in sorted(ops, key=lambda o: o.t0):
        if op.kind.startswith("intrude") and op.cid:
            intrusions[op.cid].append(op)

    for (user, cid), history in sorted(by_conv.items()):
        row = conversations.get(cid)
        current = row if row is not None and row["user"] == user else None
        kept = conflicts.get((user, cid), [])
        acked = [o for o in history if o.kind in ("save", "rename", "delete") and o.ok]
        acked_ids = {id(o) for o in acked}
        acked_deletes = [o for o in acked if o.kind == "delete"]
        failed_deletes = [o for o in history if o.kind == "delete" and not o.ok]
        shown = (
            "no conversation" if current is None else f"{len(current['messages'])} messages, title {current['title']!r}"
        )

        # LOST: every acknowledged message is in the conversation or a conflict copy, unless an acknowledged delete
        # that started after its save ended removed it. A save records the messages acknowledged for the first time;
        # the tab never saves after an acknowledged delete, so that delete comes after every save holding them.
        available = {
            m for pool in ([current["messages"]] if current else []) + [c["messages"] for c in kept] for m in pool
        }
        available = {(role, content, at) for role, content, at in available}
        lost: dict[tuple, Op] = {}
        for save in (o for o in acked if o.kind != "delete"):
            if any(d.t0 >= save.t1 for d in acked_deletes):
                continue
            for role, content, at in save.saved or []:
                key = (role, content, chaos_workload.utc_iso(at))
                if key not in available:
                    lost.setdefault(key, save)
        if lost:
            first = min(lost.values(), key=lambda o: o.t0)
            after_failed_delete = any(d.t0 >= first.t1 for d in failed_deletes)
            anomalies.append(
                f"LOST seed={seed} user={user} id={cid}: {len(lost)} acknowledged message(s) are neither in the "
                f"conversation nor in a conflict copy; first acknowledged by {_describe(first)}"
                f"{' (a delete that raised came later: deletes must be all or nothing)' if after_failed_delete else ''}"
                f"\n    expected e.g. {next(iter(lost))}\n    PostgreSQL holds: {shown}, {len(kept)} conflict copies"
                f"\n    faults around: {_faults_during(faults, first.t0 - 3, first.t1 + 10)[:6]}"
                f"\n    history from there:\n      {_timeline(history, first)}"
                f"\n    other users' calls on this id from there: "
                f"{[_describe(o) for o in intrusions[cid] if o.t1 >= first.t0][:5] or 'none'}"
            )

        # NOT-NEWEST, TITLE, RESURRECTED: the conversation is one of the newest saves (module docstring).
        candidates = [
            o for o in history if (id(o) in acked_ids or _maybe_applied(o)) and not any(y.t0 > o.t1 for y in acked)
        ]
        if not candidates:
            continue  # nothing was ever saved (reads only)
        candidate_saves = [o for o in candidates if o.kind != "delete"]
        absent_allowed = not acked or any(o.kind == "delete" for o in candidates)
        newest = max(acked, key=lambda o: o.t1) if acked else max(candidates, key=lambda o: o.t1)
        if not candidate_saves:
            if current is not None:
                anomalies.append(
                    f"RESURRECTED seed={seed} user={user} id={cid}: deleted by {_describe(newest)}, yet PostgreSQL "
                    f"holds it: {shown}\n    faults around: {_faults_during(faults, newest.t0 - 5, newest.t1 + 10)[:6]}"
                    f"\n    history up to the delete:\n      {_timeline(history, newest, before=6, after=2)}"
                )
            continue
        if current is None:
            if not absent_allowed:
                raised = [d for d in failed_deletes if d.t0 >= newest.t1]
                anomalies.append(
                    f"NOT-NEWEST seed={seed} user={user} id={cid}: the conversation is gone; the newest save was "
                    f"{_describe(newest)}"
                    f"{' (a delete that raised came later, and must have changed nothing)' if raised else ''}"
                    f"\n    faults around: {_faults_during(faults, newest.t0 - 3, newest.t1 + 10)[:6]}"
                    f"\n    history from there:\n      {_timeline(history, newest)}"
                )
            continue
        digest = transcript_digest(current["messages"])
        same_transcript = [o for o in candidate_saves if o.digest == digest]
        if not same_transcript:
            older = [o for o in history if o.kind in ("save", "rename") and o.digest == digest]
            aside = [o for o in candidate_saves if any(transcript_digest(c["messages"]) == o.digest for c in kept)]
            what = f"the transcript of the older {_describe(older[-1])}" if older else "a transcript no save held"
            anomalies.append(
                f"NOT-NEWEST seed={seed} user={user} id={cid}: PostgreSQL holds {what} ({shown}), not the newest "
                f"save, {_describe(newest)}"
                f"{'; the newest save is in conversation_conflicts instead' if aside else ''}"
                f"\n    faults around: {_faults_during(faults, newest.t0 - 5, newest.t1 + 10)[:6]}"
                f"\n    history around the newest save:\n      {_timeline(history, newest, before=8, after=3)}"
            )
        elif not any(o.title == current["title"] for o in same_transcript):
            anomalies.append(
                f"TITLE seed={seed} user={user} id={cid}: PostgreSQL holds the newest save's messages with the title "
                f"{current['title']!r}; the newest save has {same_transcript[-1].title!r}: "
                f"{_describe(same_transcript[-1])}"
                f"\n    faults around: {_faults_during(faults, newest.t0 - 5, newest.t1 + 10)[:6]}"
                f"\n    history around it:\n      {_timeline(history, same_transcript[-1], before=6, after=3)}"
            )

    # CLAIMED: no save of another user's live id is acknowledged.
    owners_by_id: dict[str, list[tuple[str, list[Op]]]] = defaultdict(list)
    for (user, cid), history in by_conv.items():
        owners_by_id[cid].append((user, history))
    for op in ops:
        if op.kind != "intrude-save" or not op.ok:
            continue
        for owner, history in owners_by_id.get(op.cid, []):
            held = any(o.kind in ("save", "rename") and o.ok and o.t1 < op.t0 for o in history)
            deleted = any(o.kind == "delete" and o.ok and o.t0 < op.t1 for o in history)
            raised = any(o.kind == "delete" and not o.ok and o.t0 < op.t1 for o in history)
            if held and not deleted:
                anomalies.append(
                    f"CLAIMED seed={seed} id={op.cid}: {op.user}'s save of {owner}'s live conversation was "
                    f"acknowledged [{op.t0:.3f}s..{op.t1:.3f}s]"
                    f"{' (after a delete of it that raised: deletes must be all or nothing)' if raised else ''}; "
                    f"faults then: {_faults_during(faults, op.t0 - 2, op.t1)}"
                )

    refused: dict[tuple, list[Op]] = defaultdict(list)
    for op in ops:
        # LEAK: no read or list returned another user's data.
        if op.foreign:
            anomalies.append(
                f"LEAK seed={seed} worker={op.worker} op={op.kind} user={op.user} id={op.cid} at {op.t0:.3f}s via "
                f"{op.via}: returned what belongs to another user: {op.foreign}"
            )
        # HUNG: no call took longer than the documented bounds allow.
        during = [(kind, detail) for s, e, kind, detail in faults if s <= op.t1 and e >= op.t0]
        bound, why = HUNG_SECONDS, "its bound"
        if op.kind != "flush" and not any(kind.startswith("pg-") for kind, _ in during):
            bound, why = REDIS_CALL_SECONDS, "the bound of a call that met no PostgreSQL fault"
        if op.t1 - op.t0 > bound:
            anomalies.append(
                f"HUNG seed={seed} user={op.user} id={op.cid}: {_describe(op)} took {op.t1 - op.t0:.1f}s "
                f"({why}: {bound:g}s); faults then: {_faults_during(faults, op.t0, op.t1)[:4]}"
            )
        # ERROR: every failure is "unavailable", never a refusal of the user's own id.
        if op.ok:
            continue
        if op.kind.startswith("intrude"):
            if op.error_type not in EXPECTED_ERRORS + ("OwnershipError",):
                anomalies.append(f"ERROR seed={seed} intruder {op.user} id={op.cid}: {_describe(op)}")
            continue
        if (
            op.kind == "flush"
            and "OOM" in (op.error or "")
            and any(kind == "redis-oom" and s <= op.t1 and e >= op.t0 for s, e, kind, _ in faults)
        ):
            continue  # a flush cannot settle while Redis refuses writes; test_faults.py accepts any error here
        if op.error_type not in EXPECTED_ERRORS:
            refused[(op.user, op.cid, op.error_type)].append(op)
    # One anomaly per conversation and kind of error (a conversation another user took refuses every later save).
    for calls in refused.values():
        first = calls[0]
        more = f" (and {len(calls) - 1} more calls like it, the last [{calls[-1].t0:.3f}s])" if len(calls) > 1 else ""
        anomalies.append(
            f"ERROR seed={seed} user={first.user} id={first.cid}: {_describe(first)}{more}; faults then: "
            f"{_faults_during(faults, first.t0, first.t1)}"
        )
    return anomalies


def check_run(record: RunRecord) -> list[str]:
    """Every anomaly of a run: the history's (check_history) and the harness's."""
    seed = record.seed
    anomalies = check_history(record.ops, record.conversations, record.conflicts, record.faults, seed)
    anomalies += [f"HUNG seed={seed} {what}" for what in record.hung_workers + record.slow_closes]
    if record.worker_process is not None:
        anomalies.append(f"WORKER-PROCESS seed={seed} {record.worker_process}")
    if record.undrained is not None:
        anomalies.append(f"UNDRAINED seed={seed}: {record.undrained}")
    anomalies += [f"FINAL-READ seed={seed} {problem}" for problem in record.read_problems]
    if record.flusher_code not in (0, None, -signal.SIGTERM):
        anomalies.append(f"FLUSHER seed={seed}: the flush --loop worker exited {record.flusher_code} on SIGTERM")
    anomalies += [f"FAULT-TOOL seed={seed} {e}" for e in record.fault_tool_errors]
    for name, least in record.minimums.items():
        if record.figures.get(name, 0) < least:
            anomalies.append(
                f"TOO-FEW seed={seed}: {record.figures.get(name, 0)} {name}, fewer than the {least} a run this long "
                f"must have: the faults did not test what they are for"
            )
    return anomalies


def _summary(kind: str, counts: Counter, record: RunRecord, anomalies: list[str], seconds: float, took: float) -> str:
    per_kind: dict[str, Counter] = defaultdict(Counter)
    for (op_kind, ok), n in counts.items():
        per_kind[op_kind]["ok" if ok else "failed"] += n
    slowest: dict[str, float] = defaultdict(float)
    for op in record.ops:
        slowest[op.kind] = max(slowest[op.kind], op.t1 - op.t0)
    lines = [
        f"chaos[{kind}]: seed={record.seed} run={took:.0f}s (workload {seconds:g}s, then heal, drain, check) "
        f"calls={sum(counts.values())}"
    ]
    for op_kind in sorted(per_kind):
        lines.append(
            f"  op {op_kind:15} ok={per_kind[op_kind]['ok']:6} failed={per_kind[op_kind]['failed']:6}"
            f"  slowest kept {slowest.get(op_kind, 0.0):5.2f}s"
        )
    for fault_kind, n in sorted(Counter(k for _, _, k, _ in record.faults).items()):
        lines.append(f"  fault {fault_kind:16} {n}")
    observations = Counter(op.note.split(":", 1)[0].split(" after")[0] for op in record.ops if op.note)
    for note, n in sorted(observations.items()):
        lines.append(f"  observed {note}: {n}")
    figures = ", ".join(
        f"{name} {record.figures.get(name, 0)} (min {least})" for name, least in record.minimums.items()
    )
    lines.append(f"  figures: {figures}")
    by_kind = Counter(a.split(" ", 1)[0] for a in anomalies)
    lines.append(f"  anomalies: {len(anomalies)} {dict(by_kind)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("redis_kind", REDIS_KINDS)
@pytest.mark.timeout(int(max(SECONDS.values())) + 420)
def test_randomized_faults_lose_leak_and_hang_nothing(tmp_path, redis_kind):
    if find_pg_bindir() is None:
        pytest.skip("PostgreSQL binaries not found: the checker needs a private cluster to stop and kill")
    seconds = SECONDS[redis_kind]
    world: World = NodeWorld(tmp_path) if redis_kind == "node" else ClusterWorld(tmp_path)
    managers: list = []
    # What this process's instances (A, B and the checker's) log, beside the worker's and the flusher's logs, for
    # reading an anomaly's history against what the product did.
    log_file = logging.FileHandler(tmp_path / "instances.log")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    product_log = logging.getLogger("chat_history_rs")
    product_log.addHandler(log_file)
    try:
        anomalies, summary = _run(world, tmp_path, managers, redis_kind, seconds)
    finally:
        for manager in managers:  # before the servers go: close() flushes
            manager.close()
        world.close()
        product_log.removeHandler(log_file)
        log_file.close()
    print(summary)
    for anomaly in anomalies:
        print(anomaly)
    print(summary)  # again, after the details
    # The first anomaly of each kind, then the rest: one kind must not hide the others.
    firsts = list({a.split(" ", 1)[0]: a for a in reversed(anomalies)}.values())[::-1]
    ordered = firsts + [a for a in anomalies if a not in firsts]
    assert anomalies == [], (
        f"{len(anomalies)} anomalies (reproduce with CHAOS_SEED={SEED} CHAOS_SECONDS={seconds:g} "
        f"CHAOS_REDIS={redis_kind}):\n" + summary + "\n" + "\n".join(ordered[:25])
    )


def _run(world: World, tmp_path: Path, managers: list, redis_kind: str, seconds: float):
    from chat_history_rs import ChatHistoryManager

    def make_manager(**kwargs):
        managers.append(ChatHistoryManager(**kwargs))
        return managers[-1]

    run = uuid.uuid4().hex[:6]
    users = world.choose_users(run)
    intruder_user = f"chaos-{run}-intruder"
    common = dict(mode="postgres", connection_string=world.pg_params.url, redis_enabled=True, **MANAGER_KWARGS)
    app_a = make_manager(**common, redis_connection_string=world.url("A"), background_flush=True, flush_interval=1.0)
    app_b = make_manager(**common, redis_connection_string=world.url("B"), background_flush=False)
    workers = [
        Worker("t0", 0, {"A": app_a, "B": app_b}, users, SEED),
        Worker("t1", 1, {"B": app_b, "A": app_a}, users, SEED),
        Worker("t2", 2, {"B": app_b, "A": app_a}, users, SEED),
        Worker("intruder", INTRUDER_INDEX, {"A": app_a}, [intruder_user], SEED, intruder=intruder_user),
    ]
    workers[-1].victim_ids = lambda: [
        op.cid for w in workers[:-1] for op in w.ops[-200:] if op.kind == "save" and op.ok
    ]
    victim_workers = [0, 1, 2, 3, 4]

    stop_file = tmp_path / "stop"
    log_path = tmp_path / "worker-process.jsonl"
    config = {
        "pg_url": world.pg_params.url,
        "redis_url": world.url("P"),
        "instance": "P",
        "manager_kwargs": {**MANAGER_KWARGS, "background_flush": True, "flush_interval": 1.0},
        "seconds": seconds + 5,
        "join_seconds": HUNG_SECONDS,
        "users": users,
        "seed": SEED,
        "worker_names": ["p3", "p4"],
        "worker_indexes": [3, 4],
        "stop_file": str(stop_file),
        "log_path": str(log_path),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    process_err = open(tmp_path / "worker-process.err", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, chaos_workload.__file__, str(tmp_path / "config.json")],
        env=script_env(), stdout=process_err, stderr=process_err,
    )  # fmt: skip
    world.start_flusher()

    stop = threading.Event()
    deadline = time.time() + seconds
    threads = [
        threading.Thread(target=w.run, args=(stop, deadline, users, victim_workers), daemon=True) for w in workers
    ]
    scheduler = Scheduler(world, SEED, stop)
    started = time.time()
    for thread in threads:
        thread.start()
    scheduler.start()
    while time.time() < deadline:
        time.sleep(0.2)
    stop.set()
    stop_file.touch()
    scheduler.join(timeout=120)
    if scheduler.is_alive():
        raise AssertionError(f"the fault scheduler did not finish its last fault within 120 s: {scheduler.log[-3:]}")

    # Every thread had the bound to end the call it was in when the workload stopped.
    hung_workers: list[str] = []
    join_deadline = time.monotonic() + HUNG_SECONDS
    for worker, thread in zip(workers, threads):
        thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
        if thread.is_alive():
            hung_workers.append(f"worker {worker.name}: still in a call {HUNG_SECONDS:g}s after the stop")
    try:
        process_code = process.wait(timeout=HUNG_SECONDS + CLOSE_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        process_code = process.wait()
        hung_workers.append("the worker process did not finish")
    process_err.close()

    # Heal everything (held bytes are delivered), stop the flusher (its final flush), close the apps (theirs),
    # then drain what is left.
    try:
        world.heal()
    except (ServerError, OSError, redis.exceptions.RedisError) as exc:
        raise AssertionError(f"healing the faults failed: {exc}\nfaults: {scheduler.log}\n{scheduler.errors}") from exc
    flusher_code = world.stop_flusher()
    ops: list[Op] = [op for w in workers for op in list(w.ops)]
    counts: Counter = Counter()
    for worker in workers:
        counts.update(worker.counts)
    fallbacks = 0
    worker_process = None
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    for line in lines:
        data = json.loads(line)
        if "counts" in data:
            counts.update({(kind, ok): n for kind, ok, n in data["counts"]})
            hung_workers += [f"worker-process thread {name}: still in a call after the stop" for name in data["hung"]]
            fallbacks += int(data["stats"].get("postgres_fallbacks", 0) or 0)
        else:
            ops.append(op_from_json(data))
    if not lines:
        worker_process = (
            f"exited {process_code} without a log:\n"
            + (tmp_path / "worker-process.err").read_text(errors="replace")[-3000:]
        )
    slow_closes: list[str] = []
    for name, manager in (("A", app_a), ("B", app_b)):
        fallbacks += int(manager.stats().get("postgres_fallbacks", 0) or 0)
        began = time.monotonic()
        manager.close()
        took = time.monotonic() - began
        if took > CLOSE_TIMEOUT + HUNG_SECONDS:
            slow_closes.append(f"instance {name}: close() took {took:.1f}s (close_timeout {CLOSE_TIMEOUT:g}s)")

    checker = make_manager(mode="postgres", connection_string=world.pg_params.url, redis_enabled=True,
                           redis_connection_string=world.url("checker"), background_flush=False)  # fmt: skip
    drain_deadline = time.monotonic() + 30
    last_drain_error = None
    while world.dirty_members() and time.monotonic() < drain_deadline:
        try:
            checker.flush_dirty_conversations()
        except Exception as exc:  # noqa: BLE001 - the drain keeps trying until its deadline; reported below
            last_drain_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        else:
            last_drain_error = None
            if world.dirty_members():
                time.sleep(0.2)
    left = sorted(world.dirty_members())
    undrained = None
    if left:
        undrained = (
            f"{len(left)} conversations still dirty 30 s after every fault healed "
            f"(stuck: {checker.stats()['stuck_conversations'][:10]}, last error: {last_drain_error}): {left[:10]}"
        )
    checker.close()

    # The final state: Redis emptied, PostgreSQL read with SQL.
    world.flushall()
    conn = world.pg_params.connect()
    try:
        conversations, conflicts, read_problems = read_postgres_state(conn)
    finally:
        conn.close()
    read_problems += _product_reads_differ(world, ops, conversations)

    for op in ops:  # every time printed is seconds since the workload began
        op.t0 -= started
        op.t1 -= started
    faults = [(s - started, e - started, kind, detail) for s, e, kind, detail in scheduler.log]
    figures = {
        "calls": sum(counts.values()),
        "failed calls": sum(n for (_, ok), n in counts.items() if not ok),
        "fallbacks": fallbacks,
        "conflicts kept": sum(len(copies) for copies in conflicts.values()),
        "late deliveries": sum(proxy.overdue_deliveries for proxy in world.proxies()),
    }
    record = RunRecord(
        seed=SEED, ops=ops, conversations=conversations, conflicts=conflicts, faults=faults,
        read_problems=read_problems, hung_workers=hung_workers, slow_closes=slow_closes,
        worker_process=worker_process, undrained=undrained, flusher_code=flusher_code,
        fault_tool_errors=scheduler.errors, figures=figures, minimums=minimums_for(seconds),
    )  # fmt: skip
    if os.environ.get("CHAOS_DUMP"):  # the whole history, for a closer look at a run
        dump = Path(os.environ["CHAOS_DUMP"])
        with open(dump.with_name(f"{dump.stem}.{redis_kind}{dump.suffix}"), "w") as out:
            json.dump({"seed": SEED, "redis": redis_kind, "faults": faults, "ops": [op.__dict__ for op in ops],
                       "conversations": conversations, "figures": figures,
                       "conflicts": {f"{u} {c}": v for (u, c), v in conflicts.items()}}, out)  # fmt: skip
    anomalies = check_run(record)
    return anomalies, _summary(redis_kind, counts, record, anomalies, seconds, time.time() - started)


def _product_reads_differ(world: World, ops: list[Op], conversations: dict) -> list[str]:
    """The product, on the emptied Redis, must read what PostgreSQL's rows hold (title and messages)."""
    from chat_history_rs import ChatHistoryManager

    problems: list[str] = []
    keys = sorted({(op.user, op.cid) for op in ops if op.kind in ("save", "rename", "delete")})
    reader = ChatHistoryManager(mode="postgres", connection_string=world.pg_params.url, redis_enabled=True,
                                redis_connection_string=world.url("checker"), background_flush=False)  # fmt: skip
    with reader:
        for user, cid in keys:
            row = conversations.get(cid)
            expected = None
            if row is not None and row["user"] == user:
                expected = (row["title"], transcript_digest(row["messages"]))
            try:
                got = reader.get_conversation(cid, user_id=user)
            except Exception as exc:  # noqa: BLE001 - reported, with the id
                problems.append(f"{user} {cid}: the product's read raised {type(exc).__name__}: {exc}")
                continue
            seen = None
            if got is not None:
                messages = [(m["role"], m["content"], m["time"]) for m in got["messages"]]
                seen = (got["title"], transcript_digest(messages))
            if seen != expected:
                problems.append(
                    f"{user} {cid}: the product reads {'nothing' if got is None else repr(got['title'])} "
                    f"but PostgreSQL holds {'nothing' if row is None else repr(row['title'])}"
                )
    return problems


# --------------------------------------------------------------------------------------------------
# The checker can fail: each rule fires, alone, on a history made to break it
# --------------------------------------------------------------------------------------------------


def _turn(n: int) -> list[tuple[str, str, str]]:
    return [
        ("user", f"<u> c turn {n} user", f"2025-11-26T00:00:{2 * n:02d}+00:00"),
        ("assistant", f"<u> c turn {n} assistant", f"2025-11-26T00:00:{2 * n + 1:02d}+00:00"),
    ]


M1 = _turn(1)
M2 = M1 + _turn(2)
M3 = M2 + _turn(3)


def _save(cid, t0, messages, before=(), ok=True, title="t", kind="save", error=None, user="u"):
    """A save of `messages` whose first-time acknowledged ones are those not in `before`."""
    fresh = [list(m) for m in messages if m not in before]
    return Op("w", kind, user, cid, t0, t0 + 0.1, ok, error, fresh if ok else [list(m) for m in messages],
              len(messages), title, digest=transcript_digest(messages), via="A")  # fmt: skip


def _other(kind, cid, t0, t1, ok=True, error=None, user="u"):
    return Op("w", kind, user, cid, t0, t1, ok, error, via="A")


def _row(messages, title="t", user="u"):
    return {"user": user, "title": title, "model": "gpt-4o", "messages": list(messages)}


def _clean_record() -> RunRecord:
    """A run that breaks no rule: every kind of history the rules must accept."""
    unavailable = "UnavailableError: Redis is unavailable"
    ops = [
        # c1: three turns, the newest is the conversation.
        _save("c1", 1.0, M1), _save("c1", 2.0, M2, M1), _save("c1", 3.0, M3, M2),
        # c2: the newest save raised (it may have applied): the save before it, or it, may be the conversation.
        _save("c2", 1.0, M1), _save("c2", 2.0, M2, M1, ok=False, error=unavailable),
        # c3: a stale read: the newest save lacks turn 2, whose messages are kept aside in a conflict copy.
        _save("c3", 1.0, M1), _save("c3", 2.0, M2, M1), _save("c3", 3.0, M1 + M3[4:], M2),
        # c4: deleted on purpose, after a delete that raised (which changed nothing).
        _save("c4", 1.0, M1), _other("delete", "c4", 2.0, 2.1, ok=False, error=unavailable),
        _other("delete", "c4", 3.0, 3.1),
        # c5: renamed; the rename is the newest save.
        _save("c5", 1.0, M1), _save("c5", 2.0, M1, M1, title="renamed", kind="rename"),
        # c6: a save that raised and was never applied, and nothing else: absent is fine.
        _save("c6", 1.0, M1, ok=False, error=unavailable),
        # reads, lists, an intruder refused, a flush that failed while a server was away
        _other("get", "c1", 4.0, 4.2), _other("list", None, 4.0, 4.1),
        _other("intrude-save", "c1", 4.0, 4.1, ok=False, error="OwnershipError: not yours", user="x"),
        _other("flush", None, 5.0, 5.5, ok=False, error=unavailable, user=""),
    ]  # fmt: skip
    # a slow read while PostgreSQL was away is within its bound
    ops.append(_other("get", "c1", 10.0, 10.0 + REDIS_CALL_SECONDS + 1))
    faults = [(9.0, 12.0, "pg-stop", "held 3.00s")]
    conversations = {"c1": _row(M3), "c2": _row(M2), "c3": _row(M1 + M3[4:]), "c5": _row(M1, title="renamed")}
    conflicts = {("u", "c3"): [{"title": "t", "messages": list(M2), "reason": "diverged"}]}
    figures = dict(minimums_for(45))
    return RunRecord(seed=1, ops=ops, conversations=conversations, conflicts=conflicts, faults=faults,
                     figures=figures, minimums=minimums_for(45))  # fmt: skip


def test_checker_accepts_a_clean_run():
    assert check_run(_clean_record()) == []


def _break(kind: str, record: RunRecord) -> None:
    """Makes `record` break exactly the rule `kind`."""
    ops, conv, conflicts = record.ops, record.conversations, record.conflicts
    if kind == "LOST":  # c3's turn 2 was kept aside; now it is gone from there too
        conflicts.pop(("u", "c3"))
    elif kind == "NOT-NEWEST":  # a late save of turn 2 replaced turn 3, which was kept aside: still not newest
        conv["c1"] = _row(M2)
        conflicts[("u", "c1")] = [{"title": "t", "messages": list(M3), "reason": "late"}]
    elif kind == "TITLE":  # the rename is lost, though its messages are there
        conv["c5"] = _row(M1, title="t")
    elif kind == "RESURRECTED":  # a row alone brings a deleted conversation back
        conv["c4"] = _row(M1)
    elif kind == "CLAIMED":
        ops.append(_other("intrude-save", "c1", 6.0, 6.1, user="x"))
    elif kind == "LEAK":
        leaky = _other("get", "c1", 6.0, 6.1)
        leaky.foreign = ["<x> c9 turn 1 user"]
        ops.append(leaky)
    elif kind == "HUNG":  # a read during a PostgreSQL fault, past even the larger bound
        ops.append(_other("get", "c1", 10.0, 10.0 + HUNG_SECONDS + 1))
    elif kind == "HUNG-REDIS":  # a save that met no PostgreSQL fault, past the bound of Redis alone
        ops.append(_save("c1", 20.0, M3, M3))
        ops[-1].t1 = 20.0 + REDIS_CALL_SECONDS + 1
    elif kind == "ERROR":  # two refusals of one conversation: one anomaly
        ops.append(_other("save", "c1", 6.0, 6.1, ok=False, error="OwnershipError: belongs to another user"))
        ops.append(_other("save", "c1", 7.0, 7.1, ok=False, error="OwnershipError: belongs to another user"))
    elif kind == "UNDRAINED":
        record.undrained = "1 conversations still dirty: ['u:c1']"
    elif kind == "FINAL-READ":
        record.read_problems = ["c1: message sequence number 3 where 2 was due"]
    elif kind == "FLUSHER":
        record.flusher_code = 1
    elif kind == "WORKER-PROCESS":
        record.worker_process = "exited 1 without a log"
    elif kind == "FAULT-TOOL":
        record.fault_tool_errors = ["redis-restart: ServerError: redis-server did not start"]
    elif kind == "TOO-FEW":
        record.figures["late deliveries"] = 0
    else:  # pragma: no cover
        raise AssertionError(kind)


ANOMALY_KINDS = [
    "LOST", "NOT-NEWEST", "TITLE", "RESURRECTED", "CLAIMED", "LEAK", "HUNG", "HUNG-REDIS", "ERROR", "UNDRAINED",
    "FINAL-READ", "FLUSHER", "WORKER-PROCESS", "FAULT-TOOL", "TOO-FEW",
]  # fmt: skip


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_checker_flags_every_kind_of_anomaly(kind):
    record = _clean_record()
    _break(kind, record)
    anomalies = check_run(record)
    assert [a.split(" ", 1)[0] for a in anomalies] == [kind.split("-REDIS")[0]], anomalies


def test_checker_flags_a_hung_worker_and_a_slow_close():
    record = _clean_record()
    record.hung_workers = ["worker t0: still in a call 19s after the stop"]
    record.slow_closes = ["instance A: close() took 60.0s (close_timeout 30s)"]
    assert [a.split(" ", 1)[0] for a in check_run(record)] == ["HUNG", "HUNG"]


def test_checker_flags_the_late_delivery_loss():
    """Issue 18's loss, as the checker sees it: v2 times out and is delivered late, after v3 (acknowledged);
    PostgreSQL ends on v2 and v3's messages are nowhere."""
    record = _clean_record()
    record.ops += [_save("c7", 1.0, M1), _save("c7", 2.0, M2, M1), _save("c7", 3.0, M3, M2)]
    record.conversations["c7"] = _row(M2)
    kinds = sorted(a.split(" ", 1)[0] for a in check_run(record))
    assert kinds == ["LOST", "NOT-NEWEST"]
