"""Redis Cluster beside one Redis node: the same calls through the product, and a big flush.

    .venv/bin/python benches/cluster.py            # 100,000 conversations flushed (make bench runs it)
    .venv/bin/python benches/cluster.py --quick    # 10,000

Starts a throwaway PostgreSQL, one redis-server, and a Redis Cluster of 3 primaries with a replica
each (tests/support/cluster_support.py), all on this machine, then, through `ChatHistoryManager` in redis
mode (background_flush=False), for each of the two:

1. p50 of a save of a 20-message conversation, of a cache-hit get of it, and of a list of 30;
2. fills Redis with N small dirty conversations (2 messages, 10 per user; untimed) and times one
   `flush_dirty_conversations()` of all of them into an empty database, then the same with two
   flushers (two managers in two threads flushing at once) on a new fill.

Both setups share this machine's cores, so the cluster's shards compete with each other and with
the client: the table shows what sharding costs per call here, not what more machines would give.
Results are printed and written to benches/results/cluster.json. No timing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import chat_history_rs  # noqa: E402
from support.cluster_support import RedisClusterServers  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    Corpus,
    Stack,
    machine_info,
    new_conversation_id,
    new_user_id,
    summary_us,
    write_report,
)

PER_USER = 10
FILL_THREADS = 4


def manager(db_url: str, redis_url: str):
    return chat_history_rs.ChatHistoryManager(
        mode="postgres",
        connection_string=db_url,
        redis_enabled=True,
        redis_connection_string=redis_url,
        background_flush=False,
    )


def per_call(m, corpus: Corpus, iterations: int) -> Dict[str, dict]:
    user, cid = new_user_id(), new_conversation_id()
    conv = corpus.conversation(20)
    m.save_conversation(cid, conv, user_id=user)
    for _ in range(29):
        m.save_conversation(new_conversation_id(), corpus.conversation(2), user_id=user)
    out: Dict[str, List[int]] = {"save20": [], "get_hit20": [], "list30": []}
    for _ in range(iterations // 10):
        m.get_conversation(cid, user_id=user)
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        m.save_conversation(cid, conv, user_id=user)
        t1 = time.perf_counter_ns()
        m.get_conversation(cid, user_id=user)
        t2 = time.perf_counter_ns()
        m.list_conversations(user)
        t3 = time.perf_counter_ns()
        out["save20"].append(t1 - t0)
        out["get_hit20"].append(t2 - t1)
        out["list30"].append(t3 - t2)
    return {k: summary_us(v) for k, v in out.items()}


def fill(m, corpus: Corpus, count: int) -> None:
    users = [new_user_id() for _ in range(-(-count // PER_USER))]
    items = [(users[i // PER_USER], new_conversation_id(), corpus.conversation(2)) for i in range(count)]

    def save(part):
        for user, cid, conv in part:
            m.save_conversation(cid, conv, user_id=user)

    workers = [threading.Thread(target=save, args=(items[k::FILL_THREADS],)) for k in range(FILL_THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def timed_flush(managers: list) -> tuple:
    written = [0] * len(managers)

    def run(i: int) -> None:
        written[i] = managers[i].flush_dirty_conversations()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(managers))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(written)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 conversations, fewer iterations")
    parser.add_argument("--count", type=int, help="conversations per flush (default 100,000; 10,000 with --quick)")
    parser.add_argument("--json", default=str(RESULTS / "cluster.json"), help="where to write the results")
    args = parser.parse_args(argv)
    count = args.count or (10_000 if args.quick else 100_000)
    iterations = 200 if args.quick else 1000
    corpus = Corpus(seed=11)
    stack = Stack()
    cluster = RedisClusterServers()
    report: Dict[str, object] = {"machine": machine_info(), "count": count, "iterations": iterations}
    try:
        stack.start()
        cluster.start()
        setups = {"one node": stack.redis_url(0), "cluster, 3 shards": cluster.url}
        print(f"# Redis Cluster beside one node: {count:,} conversations per flush\n")
        machine = report["machine"]
        print(f"Machine: {machine['cpu']}, {machine['cores']} cores; chat_history_rs {chat_history_rs.__version__}\n")
        rows = {}
        for name, redis_url in setups.items():
            db_url = stack.database_url("bench_cluster")
            m = manager(db_url, redis_url)
            calls = per_call(m, corpus, iterations)
            m.flush_dirty_conversations()
            fill(m, corpus, count)
            one, written_one = timed_flush([m])
            fill(m, corpus, count)
            other = manager(db_url, redis_url)
            two, written_two = timed_flush([m, other])
            other.close()
            m.close()
            rows[name] = {
                "calls": calls,
                "flush_1": {"seconds": one, "written": written_one},
                "flush_2": {"seconds": two, "written": written_two},
                "layout": name,
            }
            print(f"{name}: done", flush=True)
        report["rows"] = rows
        print()
        print("| setup | save20 p50 µs | get hit20 p50 µs | list30 p50 µs | flush, 1 flusher | flush, 2 flushers |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            c = {k: v["p50_us"] for k, v in row["calls"].items()}
            f1, f2 = row["flush_1"], row["flush_2"]
            print(
                f"| {name} | {c['save20']:.0f} | {c['get_hit20']:.0f} | {c['list30']:.0f} "
                f"| {f1['seconds']:.1f} s ({f1['written'] / f1['seconds']:,.0f}/s) "
                f"| {f2['seconds']:.1f} s ({f2['written'] / f2['seconds']:,.0f}/s) |"
            )
        write_report(args.json, report)
    finally:
        cluster.remove()
        stack.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
