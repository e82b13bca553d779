"""Users hopping between two regions while faults hit (docs/design.md, section 17): a seeded randomized run.

Two regions (a Redis server each, with its own redis-mode manager and background flusher) over one private
PostgreSQL, and a postgres-mode writer alongside. Users read, append and save their conversations in
whichever region the coin sends them to, and now and then delete one; the postgres-mode writer appends to
conversations of its own, which the regions only read. Meanwhile a fault thread kills every PostgreSQL
connection (the followers' included), restarts PostgreSQL, or restarts a region's Redis empty (after
flushing it, with the users held: a Redis that loses its memory loses what was dirty in it, a documented
limit this run does not test).

At the end: nothing lost (every acknowledged message is in its conversation or kept aside in
`conversation_conflicts`), nothing resurrected (a deleted conversation is served by no region and is not in
PostgreSQL), both regions end on the newest save, and no region served one of the writer's conversations
staler than STALE_BOUND seconds after the writer's save returned.

`CHAOS_SEED=n` replays a run; `CHAOS_SECONDS` sets its length (20 s by default; `make soak` runs longer).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field

import pytest

from chat_history_rs import ChatHistoryError
from support.redis_support import grown, make_conversation
from support.servers import RedisServer, ServerError, create_database

# How long after a commit a region may still serve the older copy: a poll (0.2 s) plus a PostgreSQL
# restart or a killed connection the follower must get over (its retry is 1 s, a restart about 2 s).
STALE_BOUND = 5.0


@dataclass
class History:
    acknowledged: dict[str, list[dict]] = field(default_factory=dict)  # conversation id -> saves returned
    deleted: set[str] = field(default_factory=set)
    last: dict[str, dict] = field(default_factory=dict)  # conversation id -> the last save returned
    owner: dict[str, str] = field(default_factory=dict)
    writer_saves: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # id -> (returned at, n)
    stale_reads: list[str] = field(default_factory=list)
    operations: int = 0
    failed: int = 0
    faults: list[str] = field(default_factory=list)


@pytest.mark.timeout(int(float(os.environ.get("CHAOS_SECONDS") or 20)) + 300)
def test_users_hopping_regions_under_faults_lose_and_resurrect_nothing(own_pg_server, make_manager):
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    seconds = float(os.environ.get("CHAOS_SECONDS") or 20)
    print(f"CHAOS_SEED={seed} CHAOS_SECONDS={seconds:g}")
    rng = random.Random(seed)
    try:
        redis_servers = [RedisServer(), RedisServer()]
    except ServerError as exc:
        pytest.skip(str(exc))
    for server in redis_servers:
        server.start()
    params = create_database(own_pg_server.params, prefix="regions")
    try:
        regions = [
            make_manager(
                mode="postgres",
                connection_string=params.url,
                redis_enabled=True,
                redis_connection_string=server.url,
                flush_interval=0.5,
            )
            for server in redis_servers
        ]
        writer = make_manager(mode="postgres", connection_string=params.url)
        history = run(rng, seconds, regions, writer, redis_servers, own_pg_server, params)
        check(history, regions, params)
        print(
            f"{history.operations} operations ({history.failed} refused by a fault), faults: "
            f"{', '.join(sorted(set(history.faults)))} ({len(history.faults)}); writer reads checked for staleness"
        )
    finally:
        for server in redis_servers:
            server.remove()


def run(rng, seconds, regions, writer, redis_servers, pg_server, params) -> History:
    history = History()
    users = [f"user-{n}" for n in range(4)]
    hop_ids = {user: [f"{user[-1]}hop{k}" for k in range(3)] for user in users}
    writer_ids = [f"w{k}feed" for k in range(3)]
    hold = threading.Lock()  # held by a fault that needs the users to wait (a region's Redis restarting)
    stop = threading.Event()

    def faults() -> None:
        fault_rng = random.Random(rng.random())
        while not stop.wait(fault_rng.uniform(1.0, 3.0)):
            kind = fault_rng.choice(["kill-connections", "restart-postgres", "restart-redis"])
            history.faults.append(kind)
            if kind == "kill-connections":
                conn = pg_server.params.connect()
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()",
                        (params.dbname,),
                    )
                conn.close()
            elif kind == "restart-postgres":
                pg_server.restart()
            else:
                n = fault_rng.randrange(2)
                with hold:
                    for _ in range(20):
                        try:
                            regions[n].flush_dirty_conversations()
                            if regions[n].stats()["dirty_count"] == 0:
                                break
                        except ChatHistoryError:
                            time.sleep(0.5)
                    else:
                        continue  # could not empty it into PostgreSQL: no restart this time
                    redis_servers[n].restart()

    fault_thread = threading.Thread(target=faults, daemon=True)
    for cid in writer_ids:
        conv = make_conversation(2, prefix=f"{cid} ")
        writer.save_conversation(cid, conv, user_id="writer")
        history.writer_saves[cid] = [(time.monotonic(), 2)]
    fault_thread.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            with hold:
                step(rng, history, users, hop_ids, writer_ids, regions, writer)
    finally:
        stop.set()
        fault_thread.join(timeout=60)
    return history


def step(rng, history, users, hop_ids, writer_ids, regions, writer) -> None:
    history.operations += 1
    region = rng.choice(regions)
    try:
        roll = rng.random()
        if roll < 0.15:
            cid = rng.choice(writer_ids)
            count = history.writer_saves[cid][-1][1]
            conv = writer.get_conversation(cid, user_id="writer")
            conv = grown(conv, 2, text=f"writer {history.operations}")
            writer.save_conversation(cid, conv, user_id="writer")
            history.writer_saves[cid].append((time.monotonic(), count + 2))
        elif roll < 0.35:
            cid = rng.choice(writer_ids)
            began = time.monotonic()
            conv = region.get_conversation(cid, user_id="writer")
            due = [n for at, n in history.writer_saves[cid] if at < began - STALE_BOUND]
            if conv is not None and due and len(conv["messages"]) < max(due):
                history.stale_reads.append(f"{cid}: {len(conv['messages'])} messages, {max(due)} due")
        else:
            user = rng.choice(users)
            live = [cid for cid in hop_ids[user] if cid not in history.deleted]
            if not live:
                return
            cid = rng.choice(live)
            conv = region.get_conversation(cid, user_id=user)
            if roll < 0.38 and conv is not None:
                region.delete_conversation(cid, user_id=user)
                history.deleted.add(cid)
                return
            conv = make_conversation(2, prefix=f"{cid} ") if conv is None else conv
            conv = grown(conv, 2, text=f"{cid} op {history.operations}")
            region.save_conversation(cid, conv, user_id=user)
            history.acknowledged.setdefault(cid, []).append(conv)
            history.last[cid] = conv
            history.owner[cid] = user
    except ChatHistoryError:
        history.failed += 1  # refused while PostgreSQL or a Redis restarted: not acknowledged
        time.sleep(0.05)


def check(history: History, regions, params) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            for region in regions:
                region.flush_dirty_conversations()
            break
        except ChatHistoryError:
            assert time.monotonic() < deadline, "the regions could not write back after the faults"
            time.sleep(0.5)
    stale = history.stale_reads
    assert not stale, f"{len(stale)} reads staler than {STALE_BOUND} s, the first: {stale[:10]}"
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
    resurrected = sorted(history.deleted & in_postgres)
    assert resurrected == [], f"deleted, yet in PostgreSQL: {resurrected}"
    for cid in history.deleted:
        user = history.owner[cid]
        for region in regions:
            assert region.get_conversation(cid, user_id=user) is None, f"{cid} deleted, yet served"

    def settled() -> bool:
        for cid, last in history.last.items():
            if cid in history.deleted:
                continue
            for region in regions:
                if region.get_conversation(cid, user_id=history.owner[cid]) != last:
                    return False
        return True

    deadline = time.monotonic() + STALE_BOUND
    while not settled():
        assert time.monotonic() < deadline, "the regions do not both serve the newest save"
        time.sleep(0.05)
    for cid, saves in history.acknowledged.items():
        if cid in history.deleted:
            continue
        current = regions[0].get_conversation(cid, user_id=history.owner[cid])
        places = [current["messages"]] + kept.get(cid, [])
        for saved in saves:
            for message in saved["messages"]:
                assert any(message in place for place in places), f"lost from {cid}: {message}"
