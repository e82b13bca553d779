"""The change feed (docs/design.md, section 17): how long a commit takes to reach every region's caches, and
what the feed's triggers cost a save.

    .venv/bin/python benches/feed.py            # 300 changes, 2,000 saves per mode and schema
    .venv/bin/python benches/feed.py --quick

Two figures, printed as Markdown tables (docs/benchmarks.md quotes them) and written to
benches/results/feed.json:

- **Commit to every region.** Two regions (two Redis servers, each with a redis-mode manager and its near
  cache) over one PostgreSQL. A postgres-mode instance saves a new version of a conversation both regions
  hold; the time from the save's return (its commit) until *each* region's `get_conversation` returns the
  new version, and until both do, p50 / p99 / max. Each region is read every millisecond.
- **Cost per save.** p50 and p95 of `save_conversation` in postgres mode, and of a redis-mode write-back
  (`flush_dirty_conversations()` of 20 saves), each save the last one plus 2 messages (20 to 30 messages,
  then a new conversation, whose first save is not timed), on two
  databases of the same server, one with the feed's triggers and one whose triggers were dropped after
  the schema was made, alternating in chunks so a slow moment of the machine lands on both. Local mode
  does not touch PostgreSQL, and a redis-mode save does not either (the trigger runs in the write-back).

Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psycopg2  # noqa: E402

import chat_history_rs  # noqa: E402
from common import Corpus, Stack, new_conversation_id, new_user_id, percentile, write_report  # noqa: E402
from support.servers import RedisServer  # noqa: E402

FEED_TRIGGERS = [
    ("chat_history_version", "conversations"),
    ("chat_history_inserted", "conversations"),
    ("chat_history_updated", "conversations"),
    ("chat_history_deleted", "conversations"),
    ("chat_history_messages_inserted", "messages"),
    ("chat_history_messages_updated", "messages"),
    ("chat_history_messages_deleted", "messages"),
]


def ms(ns: float) -> float:
    return ns / 1e6


def wait_following(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while not client.exists("feed:mark"):
            if time.monotonic() > deadline:
                raise RuntimeError("no follower took the lease")
            time.sleep(0.01)
    finally:
        client.close()


def commit_to_regions(stack: Stack, second: RedisServer, corpus: Corpus, changes: int) -> Dict[str, object]:
    url = stack.database_url("feed_latency")
    writer = chat_history_rs.ChatHistoryManager(mode="postgres", connection_string=url)
    regions = [
        chat_history_rs.ChatHistoryManager(
            mode="postgres", connection_string=url, redis_enabled=True, redis_connection_string=redis_url
        )
        for redis_url in (stack.redis_url(0), f"redis://127.0.0.1:{second.port}/0")
    ]
    for redis_url in (stack.redis_url(0), f"redis://127.0.0.1:{second.port}/0"):
        wait_following(redis_url)
    user = new_user_id()
    cid = new_conversation_id()
    conv = corpus.conversation(20)
    writer.save_conversation(cid, conv, user_id=user)
    per_region: List[List[int]] = [[], []]
    both: List[int] = []
    try:
        for n in range(changes):
            for region in regions:
                assert region.get_conversation(cid, user_id=user)["title"] == conv["title"]
            conv = dict(conv, title=f"version {n}")
            writer.save_conversation(cid, conv, user_id=user)
            committed = time.perf_counter_ns()
            seen = [0, 0]
            while not all(seen):
                for i, region in enumerate(regions):
                    if not seen[i] and region.get_conversation(cid, user_id=user)["title"] == conv["title"]:
                        seen[i] = time.perf_counter_ns() - committed
                if not all(seen):
                    time.sleep(0.001)
                if time.perf_counter_ns() - committed > 10e9:
                    raise RuntimeError(f"change {n} not served within 10 s: {seen}")
            for i in range(2):
                per_region[i].append(seen[i])
            both.append(max(seen))
            time.sleep(0.013 * (n % 7))  # spread the commits over the follower's poll
    finally:
        for manager in [*regions, writer]:
            manager.close()

    def row(samples: List[int]) -> Dict[str, float]:
        return {
            "p50_ms": ms(percentile(samples, 50)),
            "p99_ms": ms(percentile(samples, 99)),
            "max_ms": ms(max(samples)),
            "n": len(samples),
        }

    return {"region 1": row(per_region[0]), "region 2": row(per_region[1]), "every region": row(both)}


def drop_triggers(url: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name, table in FEED_TRIGGERS:
            cur.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    conn.close()


def next_turn(conversations: List, k: int, corpus: Corpus, first_save=None):
    """Conversation `k` as the app's next turn: the last save plus 2 messages. (Replacing the last 2 instead, a
    regenerate, keeps the replaced copy aside: docs/design.md, "Write order" and "Divergence".) From 30 messages
    on, a new conversation of 20 takes its place, saved first by `first_save` (untimed) when given."""
    cid, conv = conversations[k]
    if len(conv["messages"]) >= 30:
        cid, conv = new_conversation_id(), corpus.conversation(20)
        conversations[k] = (cid, conv)
        if first_save is not None:
            first_save(cid, conv)
    conv["messages"] = conv["messages"] + corpus.messages(2, start=len(conv["messages"]))
    return cid, conv


def save_costs(stack: Stack, corpus: Corpus, saves: int) -> Dict[str, object]:
    urls = {"with the feed": stack.database_url("feed_on"), "without": stack.database_url("feed_off")}
    managers = {}
    for label, url in urls.items():
        managers[label] = {
            "postgres": chat_history_rs.ChatHistoryManager(mode="postgres", connection_string=url),
            "redis": chat_history_rs.ChatHistoryManager(
                mode="postgres",
                connection_string=url,
                redis_enabled=True,
                redis_connection_string=stack.redis_url(1 if label == "without" else 2),
                background_flush=False,
            ),
        }
    # The managers made the schema; the feed's triggers go from one database now (a manager started
    # later would put them back).
    drop_triggers(urls["without"])
    user = new_user_id()
    cached_user = {label: new_user_id() for label in urls}
    conversations = {label: [(new_conversation_id(), corpus.conversation(20)) for _ in range(50)] for label in urls}
    # The redis-mode manager's own conversations: the same ones saved in both modes would diverge.
    cached_conversations = {
        label: [(new_conversation_id(), corpus.conversation(20)) for _ in range(20)] for label in urls
    }
    for label in urls:
        for cid, conv in conversations[label]:
            managers[label]["postgres"].save_conversation(cid, conv, user_id=user)
    samples: Dict[str, Dict[str, List[int]]] = {label: {"postgres": [], "redis": []} for label in urls}
    chunk = 50
    try:
        for start in range(0, saves, chunk):
            for label in urls:
                pg = managers[label]["postgres"]
                first_save = functools.partial(pg.save_conversation, user_id=user)
                for i in range(chunk):
                    k = (start + i) % len(conversations[label])
                    cid, conv = next_turn(conversations[label], k, corpus, first_save)
                    began = time.perf_counter_ns()
                    pg.save_conversation(cid, conv, user_id=user)
                    samples[label]["postgres"].append(time.perf_counter_ns() - began)
                cached = managers[label]["redis"]
                for k in range(len(cached_conversations[label])):
                    cid, conv = next_turn(cached_conversations[label], k, corpus)
                    cached.save_conversation(cid, conv, user_id=cached_user[label])
                began = time.perf_counter_ns()
                cached.flush_dirty_conversations()
                samples[label]["redis"].append(time.perf_counter_ns() - began)
    finally:
        for label in urls:
            for manager in managers[label].values():
                manager.close()
    out: Dict[str, object] = {}
    for mode in ("postgres", "redis"):
        on = samples["with the feed"][mode]
        off = samples["without"][mode]
        out[mode] = {
            "with_p50_us": percentile(on, 50) / 1000,
            "with_p95_us": percentile(on, 95) / 1000,
            "without_p50_us": percentile(off, 50) / 1000,
            "without_p95_us": percentile(off, 95) / 1000,
            "cost_p50": percentile(on, 50) / percentile(off, 50) - 1,
            "n": len(on),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations: a smoke run with noisy numbers")
    args = parser.parse_args()
    changes, saves = (40, 300) if args.quick else (300, 2000)
    stack = Stack().start()
    second = RedisServer()
    second.start()
    corpus = Corpus()
    try:
        latency = commit_to_regions(stack, second, corpus, changes)
        costs = save_costs(stack, corpus, saves)
    finally:
        second.remove()
        stack.remove()
    print("\nCommit to every region (a postgres-mode save, two regions each with its own Redis and near cache)\n")
    print("| | p50 (ms) | p99 (ms) | max (ms) | changes |")
    print("|---|---:|---:|---:|---:|")
    for label, row in latency.items():
        print(f"| {label} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['max_ms']:.0f} | {row['n']} |")
    print("\nCost per save, the feed's triggers on and off (same server, alternating chunks)\n")
    print("| mode | call | with p50 (µs) | without p50 (µs) | cost (p50) | with p95 (µs) | without p95 (µs) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    calls = {"postgres": "save_conversation (20 + 2 messages)", "redis": "flush of 20 saves (write-back)"}
    for mode, row in costs.items():
        print(
            f"| {mode} | {calls[mode]} | {row['with_p50_us']:.0f} | {row['without_p50_us']:.0f} | "
            f"{row['cost_p50'] * 100:+.1f} % | {row['with_p95_us']:.0f} | {row['without_p95_us']:.0f} |"
        )
    print("| local | save_conversation | (no PostgreSQL: unchanged) | | | | |")
    print("| redis | save_conversation | (Redis only: unchanged; the trigger runs in the write-back) | | | | |")
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    write_report(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "feed.json"),
        {"commit_to_regions": latency, "save_costs": costs, "quick": args.quick},
    )
    print(json.dumps({"p99_every_region_ms": latency["every region"]["p99_ms"]}))


if __name__ == "__main__":
    main()
