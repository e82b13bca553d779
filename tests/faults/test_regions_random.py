"""Users hopping between two regions while faults hit (docs/design.md, section 17): a seeded randomized run.

Two regions over one private PostgreSQL: `node`, a single redis-server, and `cluster`, a Redis Cluster of 3
primaries with a replica each; each region has its own redis-mode manager (background flusher, follower). Six
users, one call at a time, read, append and save their conversations in whichever region the coin sends each call
to (so most hops are faster than the write-back, and the two regions' copies diverge and meet in PostgreSQL), and
delete one now and then or once it is long (a new one takes its place). A postgres-mode writer in a thread of its
own appends to conversations of its own, which the users read in the regions, and deletes each once it is long.
The users' calls also go to a postgres-mode instance (the seed plan's rollback runs both modes side by side;
CHAOS_HOP_POSTGRES_MODE=0 leaves it out), whose saves must not lose a write-back that landed after their read (the
run found that: test_between_tiers.py's `test_a_postgres_mode_save_over_a_write_back_it_did_not_read_loses_nothing`).
Meanwhile a fault thread, one fault at a time, every 1 to 3 s:

    kill-followers     terminates the PostgreSQL connections whose last statement read `conversation_changes`
                       (the listeners' connections: the followers draw theirs from the manager's pool);
    kill-connections   terminates every PostgreSQL connection to the database (the followers' included);
    restart-postgres   restarts PostgreSQL;
    restart-<region>   restarts that region's Redis empty. The node is restarted; on the cluster every node is
                       SIGKILLed and started again with its nodes.conf (RedisClusterServers.restart_empty): the
                       cluster keeps its slot map and roles and loses its data, as a managed Redis without
                       persistence does when it restarts. Flushing every primary instead would keep the
                       clients' connections and the cluster's topology, and so test less of what a restart does.
                       Before either, the region's dirty copies are written back with the users held: a Redis
                       that loses its memory loses what was dirty in it, a documented limit this run does not
                       test. When they cannot be written back (PostgreSQL down), the restart is skipped and
                       counted. The region's manager, follower and flusher keep running through it.

Staleness, "no read staler than the bound once a change is in PostgreSQL": a sampler thread reads every
conversation's `last_modified` (or its tombstone) from PostgreSQL every 0.1 to 0.3 s, and a postgres-mode save
that returned is in PostgreSQL too. Every read that begins more than STALE_BOUND seconds after such a fact, plus
any time PostgreSQL was down in between (no follower can read a stopped server), must return a copy at least that
new (STALE otherwise): a `last_modified` not older than the row's, and nothing once the row was deleted for good.
A region's own dirty copy newer than the row is allowed (docs/design.md, "Divergence": the newer version wins;
versions and `last_modified` follow the order of the saves here, since a conversation's saves are made one at a
time by one thread). A read of a conversation whose row was seen must not find nothing unless a delete of it was
asked for.

At the end, once every region wrote back: LOST (every acknowledged message is in its conversation or kept aside in
`conversation_conflicts`), RESURRECTED (a deleted conversation is in PostgreSQL, or served by a region), NOT-NEWEST
(a region, or PostgreSQL, does not serve the newest save; `created_at` aside: a conversation created in both
regions before either wrote it back keeps the `created_at` of the first written back, since PostgreSQL's row keeps
its creation time), and the STALE reads. Each anomaly is followed by its conversation's last calls and the faults'
times (HISTORY), and a stale or resurrected copy by what the region's Redis holds and its feed mark. The summary
gives the calls per kind (ok, and refused by a fault), the faults per kind and what bit (connections terminated,
the followers' among them, restarts skipped), PostgreSQL's time down, the hops between regions, the reads checked
for staleness, the conflict copies kept, and the anomalies per kind.

`CHAOS_SEED=n` replays a run's plan (the fault sequence and the users' choices follow from it; timings do not);
`CHAOS_SECONDS` sets its length (20 s by default; `make soak` runs 600 s).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

import pytest

from chat_history_rs import ChatHistoryError
from support.cluster_support import RedisClusterServers
from support.redis_support import grown, make_conversation, redis_client
from support.servers import RedisServer, ServerError, create_database

# How long after a change is in PostgreSQL a region may still serve the older copy: a poll (0.2 s), plus a
# killed connection the follower must get over (its retry is 1 s), plus a write-back of an older dirty copy the
# change made the follower resolve. Time PostgreSQL was down is added on top (see the module's docstring).
STALE_BOUND = 5.0
# A user deletes a conversation past this many messages, and the writer starts a new one (deleting the old), so
# saves stay cheap and conversations live long enough (tens of seconds) for their reads to be checked for staleness.
USER_MAX_MESSAGES = 240
WRITER_MAX_MESSAGES = 60
# Users hop to the postgres-mode instance too (CHAOS_HOP_POSTGRES_MODE=0 leaves it out): a postgres-mode save must
# not lose a write-back that landed after its read
# (test_between_tiers.py::test_a_postgres_mode_save_over_a_write_back_it_did_not_read_loses_nothing).
HOP_POSTGRES_MODE = os.environ.get("CHAOS_HOP_POSTGRES_MODE", "1") == "1"
# The users' pause between two calls, at most: a few hundred calls a second, a few saves a second per conversation.
USER_PAUSE = 0.006


@dataclass
class Fact:
    """What PostgreSQL held for a conversation at `at` (monotonic): `modified` is the row's last_modified, None
    when there was no row but a tombstone."""

    at: float
    modified: Optional[datetime]


@dataclass
class History:
    acknowledged: dict[str, list[dict]] = field(default_factory=dict)  # conversation id -> saves returned
    deleted: set[str] = field(default_factory=set)  # deletes that returned
    deleted_in_order: list[str] = field(default_factory=list)
    delete_asked: set[str] = field(default_factory=set)  # every delete asked for, returned or not
    last: dict[str, dict] = field(default_factory=dict)  # conversation id -> the last save returned
    owner: dict[str, str] = field(default_factory=dict)
    facts: dict[str, list[Fact]] = field(default_factory=dict)  # per conversation, in `at` order
    facts_lock: threading.Lock = field(default_factory=threading.Lock)
    postgres_down: list[tuple[float, float]] = field(default_factory=list)  # restarts: (began, ready)
    calls: Counter = field(default_factory=Counter)  # (kind, "ok" or "refused") -> calls, the users' thread
    writer_calls: Counter = field(default_factory=Counter)  # the same, the writer's thread
    faults: Counter = field(default_factory=Counter)  # fault kind -> times applied
    bit: Counter = field(default_factory=Counter)  # what the faults hit: connections terminated, restarts skipped
    hops: int = 0
    reads_checked: Counter = field(default_factory=Counter)  # against a row or a tombstone
    stale_reads: list[str] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)
    events: dict[str, list[str]] = field(default_factory=dict)  # per conversation: its calls, for the anomalies

    def event(self, cid: str, began: float, where: str, what: str, conv: Optional[dict]) -> None:
        took = time.monotonic() - began
        self.events.setdefault(cid, []).append(
            f"{began - self.began:8.3f}s +{took:.3f}s {where:13} {what:18} {describe(conv)}"
        )

    def known(self, cid: str, fact: Fact) -> None:
        with self.facts_lock:
            facts = self.facts.setdefault(cid, [])
            if facts and facts[-1].at <= fact.at and facts[-1].modified == fact.modified:
                return  # the same row seen again: the earlier sighting is the stronger fact
            bisect.insort(facts, fact, key=lambda f: f.at)

    def newest_before(self, cid: str, began: float) -> Optional[Fact]:
        """The newest fact a read that began at `began` must reflect."""
        with self.facts_lock:
            facts = list(self.facts.get(cid, ()))
        for fact in reversed(facts):
            if fact.at + STALE_BOUND + self.down_between(fact.at, began) < began:
                return fact
        return None

    def down_between(self, start: float, end: float) -> float:
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in list(self.postgres_down))


def modified_at(conv: dict) -> datetime:
    return datetime.fromisoformat(conv["last_modified"])


def check_read(history: History, where: str, cid: str, began: float, conv: Optional[dict], peek: dict) -> None:
    fact = history.newest_before(cid, began)
    if fact is None:
        return
    late = f"read in {where} {began - fact.at:.1f} s after PostgreSQL held"
    if fact.modified is None:
        if cid not in history.deleted:
            return  # a delete that raised may have applied, and the user saves the conversation again
        history.reads_checked["tombstone"] += 1
        if conv is not None:
            held = in_redis(peek, where, history, cid)
            history.stale_reads.append(f"{cid}: {late} its tombstone, yet served ({conv['last_modified']}){held}")
        return
    history.reads_checked["row"] += 1
    if conv is None:
        if cid not in history.delete_asked:
            history.stale_reads.append(f"{cid}: {late} its row ({fact.modified.isoformat()}), yet not found")
    elif modified_at(conv) < fact.modified:
        history.stale_reads.append(
            f"{cid}: {late} its row of {fact.modified.isoformat()}, served the older {conv['last_modified']}"
            + in_redis(peek, where, history, cid)
        )


@pytest.mark.timeout(int(float(os.environ.get("CHAOS_SECONDS") or 20)) + 300)
def test_users_hopping_regions_under_faults_lose_and_resurrect_nothing(own_pg_server, make_manager):
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    seconds = float(os.environ.get("CHAOS_SECONDS") or 20)
    print(f"CHAOS_SEED={seed} CHAOS_SECONDS={seconds:g}")
    rng = random.Random(seed)
    try:
        node = RedisServer()
        cluster = RedisClusterServers()
    except ServerError as exc:
        pytest.skip(str(exc))
    started = time.monotonic()
    regions: dict = {}
    try:
        node.start()
        cluster.start()
        params = create_database(own_pg_server.params, prefix="regions")
        regions = {
            name: make_manager(
                mode="postgres",
                connection_string=params.url,
                redis_enabled=True,
                redis_connection_string=server.url,
                flush_interval=0.5,
            )
            for name, server in (("node", node), ("cluster", cluster))
        }
        rollback = make_manager(mode="postgres", connection_string=params.url)
        writer = make_manager(mode="postgres", connection_string=params.url)
        peek = {"node": redis_client(node.url), "cluster": cluster.client()}
        world = World(rng, regions, rollback, writer, {"node": node.restart, "cluster": cluster.restart_empty}, peek)
        history = world.run(seconds, own_pg_server, params)
        anomalies = check(history, regions, rollback, params, peek)
        for client in peek.values():
            client.close()
        summary = _summary(seed, seconds, time.monotonic() - started, history, anomalies, params)
        print(summary)
        for anomaly in anomalies:
            print(anomaly)
        for line in histories(history, anomalies):
            print(line)
        assert anomalies == [], (
            f"{len(anomalies)} anomalies (reproduce with CHAOS_SEED={seed} CHAOS_SECONDS={seconds:g}):\n"
            + summary
            + "\n"
            + "\n".join(anomalies[:25])
        )
    finally:
        for region in regions.values():
            region.close()  # before the servers go: close() flushes
        node.remove()
        cluster.remove()


class World:
    """The users, the writer, the sampler and the faults of one run."""

    def __init__(self, rng, regions, rollback, writer, restart_redis, peek) -> None:
        self.peek = peek
        self.rng = rng
        self.regions = regions
        # Where a user's call may go: a region, and the postgres-mode instance when HOP_POSTGRES_MODE.
        self.places = {**regions, "postgres-mode": rollback} if HOP_POSTGRES_MODE else dict(regions)
        self.writer = writer
        self.restart_redis = restart_redis
        self.history = History()
        # A fault that needs the users to wait (a region's Redis restarting) clears `users_may_run`, then takes
        # `hold`, which the users hold for each step (a plain lock alone could starve the fault thread).
        self.hold = threading.Lock()
        self.users_may_run = threading.Event()
        self.users_may_run.set()
        self.stop = threading.Event()
        self.users = [f"user-{n}" for n in range(6)]
        self.next_id = Counter()
        self.live = {user: [self.new_id(user) for _ in range(3)] for user in self.users}
        self.writer_ids = [f"w{k}feed0" for k in range(3)]
        self.last_place: dict[str, str] = {}

    def new_id(self, user: str) -> str:
        self.next_id[user] += 1
        return f"{user[-1]}hop{self.next_id[user]}"

    def run(self, seconds: float, pg_server, params) -> History:
        history = self.history
        for cid in self.writer_ids:
            conv = make_conversation(2, prefix=f"{cid} ")
            self.writer.save_conversation(cid, conv, user_id="writer")
            self.saved(cid, "writer", conv, in_postgres=True)
        threads = [
            threading.Thread(target=self.faults, args=(random.Random(self.rng.random()), pg_server, params)),
            threading.Thread(target=self.write, args=(random.Random(self.rng.random()),)),
            threading.Thread(target=self.sample, args=(params,)),
        ]
        for thread in threads:
            thread.daemon = True
            thread.start()
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.users_may_run.wait()
                with self.hold:
                    self.step()
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=120)
        return history

    def saved(self, cid: str, user: str, conv: dict, *, in_postgres: bool) -> None:
        history = self.history
        history.acknowledged.setdefault(cid, []).append(conv)
        history.last[cid] = conv
        history.owner[cid] = user
        if in_postgres:
            history.known(cid, Fact(time.monotonic(), modified_at(conv)))

    # -- the users -------------------------------------------------------------------------------------------

    def step(self) -> None:
        rng, history = self.rng, self.history
        name = rng.choice(sorted(self.places))
        place = self.places[name]
        roll = rng.random()
        if roll < 0.2:
            kind = "read-writer"
            cid = rng.choice(self.writer_ids)
            user = "writer"
        elif roll < 0.25 and history.deleted_in_order:
            kind = "read-deleted"
            cid = rng.choice(history.deleted_in_order[-200:])
            user = history.owner[cid]
        else:
            user = rng.choice(self.users)
            cid = rng.choice(self.live[user])
            history.owner[cid] = user
            kind = "read" if roll < 0.4 else "delete" if roll < 0.403 else "save"
            if self.last_place.get(user, name) != name:
                history.hops += 1
            self.last_place[user] = name
        try:
            began = time.monotonic()
            conv = place.get_conversation(cid, user_id=user)
            history.event(cid, began, name, "read", conv)
            check_read(history, name, cid, began, conv, self.peek)
            if kind == "save" and conv is not None and len(conv["messages"]) >= USER_MAX_MESSAGES:
                kind = "delete"
            began = time.monotonic()
            if kind == "delete" and conv is not None:
                history.delete_asked.add(cid)
                place.delete_conversation(cid, user_id=user)
                history.event(cid, began, name, "delete", None)
                history.deleted.add(cid)
                history.deleted_in_order.append(cid)
                self.live[user][self.live[user].index(cid)] = self.new_id(user)
            elif kind == "save":
                conv = make_conversation(2, prefix=f"{cid} ") if conv is None else conv
                conv = grown(conv, 2, text=f"{cid} op {sum(history.calls.values())}")
                place.save_conversation(cid, conv, user_id=user)
                history.event(cid, began, name, "save", conv)
                self.saved(cid, user, conv, in_postgres=name == "postgres-mode")
            history.calls[(kind, "ok")] += 1
        except ChatHistoryError as exc:
            history.event(cid, began, name, f"{kind} REFUSED", None)
            history.events[cid].append(f"          {exc}")
            history.calls[(kind, "refused")] += 1  # refused while PostgreSQL or a Redis restarted: not acknowledged
            time.sleep(0.05)
        time.sleep(rng.uniform(0, USER_PAUSE))

    # -- the postgres-mode writer ----------------------------------------------------------------------------

    def write(self, rng: random.Random) -> None:
        history = self.history
        while not self.stop.wait(rng.uniform(0.02, 0.1)):
            k = rng.randrange(len(self.writer_ids))
            cid = self.writer_ids[k]
            kind = "writer-save"
            try:
                conv = self.writer.get_conversation(cid, user_id="writer")
                if conv is not None and len(conv["messages"]) >= WRITER_MAX_MESSAGES:
                    kind = "writer-delete"
                    history.delete_asked.add(cid)
                    self.writer.delete_conversation(cid, user_id="writer")
                    history.event(cid, time.monotonic(), "writer", "delete", None)
                    history.deleted.add(cid)
                    history.deleted_in_order.append(cid)
                    self.writer_ids[k] = f"w{k}feed{int(cid.rsplit('feed', 1)[1]) + 1}"
                else:
                    if conv is None:  # the first save of a new one was refused
                        conv = make_conversation(0)
                    conv = grown(conv, 2, text=f"{cid} writer {sum(history.writer_calls.values())}")
                    self.writer.save_conversation(cid, conv, user_id="writer")
                    history.event(cid, time.monotonic(), "writer", "save", conv)
                    self.saved(cid, "writer", conv, in_postgres=True)
                history.writer_calls[(kind, "ok")] += 1
            except ChatHistoryError:
                history.writer_calls[(kind, "refused")] += 1

    # -- PostgreSQL, sampled ---------------------------------------------------------------------------------

    def sample(self, params) -> None:
        """Records what PostgreSQL holds, as facts the reads are checked against (`check_read`)."""
        conn = None
        rng = random.Random(0)
        while not self.stop.wait(rng.uniform(0.1, 0.3)):
            try:
                if conn is None:
                    conn = params.connect()
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT conversation_id, c.last_modified"
                        " FROM conversations c FULL JOIN conversation_tombstones t USING (conversation_id)"
                    )
                    rows = cur.fetchall()
                at = time.monotonic()  # every row was committed before the query returned
                for cid, modified in rows:
                    self.history.known(cid, Fact(at, modified))
            except Exception:  # noqa: BLE001 - PostgreSQL restarting or the connection killed: sample again later
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    # -- the faults ------------------------------------------------------------------------------------------

    def faults(self, rng: random.Random, pg_server, params) -> None:
        history = self.history
        while not self.stop.wait(rng.uniform(1.0, 3.0)):
            kind = rng.choice(["kill-followers", "kill-connections", "restart-postgres", "restart-redis"])
            if kind in ("kill-followers", "kill-connections"):
                history.faults[kind] += 1
                began = time.monotonic()
                killed, followers = terminate(pg_server, params, followers_only=kind == "kill-followers")
                history.event("faults", began, "postgres", f"{kind} {killed}", None)
                history.bit[f"{kind}: connections terminated"] += killed
                history.bit[f"{kind}: of them the followers'"] += followers
            elif kind == "restart-postgres":
                history.faults[kind] += 1
                began = time.monotonic()
                history.postgres_down.append((began, math.inf))  # reads during the restart see it already
                pg_server.restart()
                history.postgres_down[-1] = (began, time.monotonic())
                history.event("faults", began, "postgres", "restarted", None)
            else:
                name = rng.choice(sorted(self.regions))
                history.faults[f"restart-redis-{name}"] += 1
                self.users_may_run.clear()
                try:
                    with self.hold:
                        if written_back(self.regions[name]):
                            began = time.monotonic()
                            self.restart_redis[name]()
                            history.event("faults", began, name, "restarted empty", None)
                        else:
                            history.bit[f"restart-redis-{name}: skipped, dirty copies not written back"] += 1
                finally:
                    self.users_may_run.set()


def terminate(pg_server, params, *, followers_only: bool) -> tuple[int, int]:
    """Terminates the database's connections (only those whose last statement read `conversation_changes`, the
    followers', when asked); returns how many, and how many of them were the followers'."""
    conn = pg_server.params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid), query ILIKE '%%conversation_changes%%' FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()"
                " AND (NOT %s OR query ILIKE '%%conversation_changes%%')",
                (params.dbname, followers_only),
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    return sum(1 for ok, _ in rows if ok), sum(1 for ok, follower in rows if ok and follower)


def written_back(region) -> bool:
    """Whether the region's dirty copies could all be written back (PostgreSQL may be restarting)."""
    for _ in range(20):
        try:
            region.flush_dirty_conversations()
            if region.stats()["dirty_count"] == 0:
                return True
        except ChatHistoryError:
            time.sleep(0.5)
    return False


def check(history: History, regions: dict, rollback, params, peek: dict) -> list[str]:
    anomalies = [f"STALE {read}" for read in history.stale_reads]
    deadline = time.monotonic() + 60
    while True:
        try:
            for region in regions.values():
                region.flush_dirty_conversations()
            break
        except ChatHistoryError:
            if time.monotonic() > deadline:
                return [*anomalies, "UNDRAINED the regions could not write back after the faults"]
            time.sleep(0.5)
    conn = params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT conversation_id FROM conversations")
            in_postgres = {row[0] for row in cur.fetchall()}
            kept: dict[str, list[list[dict]]] = {}
            cur.execute("SELECT conversation_id, messages::text FROM conversation_conflicts")
            for cid, messages in cur.fetchall():
                kept.setdefault(cid, []).append(json.loads(messages))
    finally:
        conn.close()
    places = {**regions, "postgres-mode": rollback}
    anomalies += [f"RESURRECTED {cid}: deleted, yet in PostgreSQL" for cid in sorted(history.deleted & in_postgres)]
    for cid in sorted(history.deleted):
        for name, place in places.items():
            if place.get_conversation(cid, user_id=history.owner[cid]) is not None:
                held = in_redis(peek, name, history, cid)
                anomalies.append(f"RESURRECTED {cid}: deleted, yet served by {name}{held}")

    def behind() -> list[str]:
        out = []
        for cid, last in sorted(history.last.items()):
            if cid in history.deleted:
                continue
            for name, place in places.items():
                served = place.get_conversation(cid, user_id=history.owner[cid])
                if served is None or without_created_at(served) != without_created_at(last):
                    out.append(
                        f"NOT-NEWEST {cid}: {name} serves {describe(served)}, not the newest save, {describe(last)}"
                        + in_redis(peek, name, history, cid)
                    )
        return out

    deadline = time.monotonic() + STALE_BOUND
    while behind() and time.monotonic() < deadline:
        time.sleep(0.05)
    anomalies += behind()
    for cid, saves in sorted(history.acknowledged.items()):
        if cid in history.deleted:
            continue
        current = rollback.get_conversation(cid, user_id=history.owner[cid])
        holders = ([current["messages"]] if current else []) + kept.get(cid, [])
        for saved in saves:
            for message in saved["messages"]:
                if not any(message in holder for holder in holders):
                    anomalies.append(f"LOST from {cid}: {message}")
    return anomalies


def histories(history: History, anomalies: list[str]) -> list[str]:
    """The last calls of each conversation an anomaly names, and the faults' times, for reading the anomalies."""
    named = (re.match(r"(?:STALE|RESURRECTED|NOT-NEWEST|LOST from) ([^:\s]+):", a) for a in anomalies)
    out = [
        f"HISTORY of {cid}:\n" + "\n".join(history.events.get(cid, [])[-40:])
        for cid in sorted({match[1] for match in named if match})
    ]
    if anomalies:
        out.append("HISTORY of the faults:\n" + "\n".join(history.events.get("faults", [])))
    return out


def in_redis(peek: dict, name: str, history: History, cid: str) -> str:
    """What the region's Redis holds for the conversation, but its messages, and its feed mark: for reading an
    anomaly."""
    if name not in peek:
        return ""
    user = history.owner.get(cid, "writer")
    key = f"conv:{{{user}}}:{cid}" if name == "cluster" else f"conv:{user}:{cid}"
    try:
        fields = peek[name].hgetall(key)
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return f" (its Redis could not be read: {exc})"
    held = {k: v for k, v in fields.items() if k != "messages"}
    try:
        mark = peek[name].get("feed:{feed}:mark" if name == "cluster" else "feed:mark")
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        mark = str(exc)
    return f" (its Redis holds {held}; its feed mark {mark})"


def without_created_at(conv: dict) -> dict:
    """A conversation created in two regions before either wrote it back keeps the `created_at` of the first
    written back (PostgreSQL's row keeps its creation time), whichever copy wins: the rest must be the newest save."""
    return {key: value for key, value in conv.items() if key != "created_at"}


def describe(conv: Optional[dict]) -> str:
    if conv is None:
        return "nothing"
    return f"{len(conv['messages'])} messages of {conv['last_modified']}, the last {conv['messages'][-1]['content']!r}"


def _summary(seed: int, seconds: float, took: float, history: History, anomalies: list[str], params) -> str:
    conn = params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM conversation_conflicts")
            kept = cur.fetchone()[0]
    finally:
        conn.close()
    calls = history.calls + history.writer_calls
    lines = [
        f"regions: seed={seed} run={took:.0f}s (workload {seconds:g}s, then write-back and check) "
        f"calls={sum(calls.values())} refused={sum(n for (_, outcome), n in calls.items() if outcome == 'refused')}"
    ]
    for kind in sorted({kind for kind, _ in calls}):
        lines.append(f"  op {kind:13} ok={calls[(kind, 'ok')]:6} refused={calls[(kind, 'refused')]:5}")
    for kind, n in sorted(history.faults.items()):
        lines.append(f"  fault {kind:22} {n}")
    for what, n in sorted(history.bit.items()):
        lines.append(f"    {what}: {n}")
    down = sum(b - a for a, b in history.postgres_down)
    lines.append(f"  PostgreSQL down {down:.1f}s in all; users' hops between places: {history.hops}")
    lines.append(
        f"  reads checked for staleness: {sum(history.reads_checked.values())} "
        f"(against a row {history.reads_checked['row']}, a tombstone {history.reads_checked['tombstone']}), "
        f"stale: {len(history.stale_reads)}; conflict copies kept: {kept}"
    )
    lines.append(f"  anomalies: {len(anomalies)} {dict(Counter(a.split(' ', 1)[0] for a in anomalies))}")
    return "\n".join(lines)
