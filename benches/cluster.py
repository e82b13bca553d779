"""Redis Cluster beside one Redis node: the same calls through the product, and a big flush.

    .venv/bin/python benches/cluster.py            # 100,000 conversations flushed (make bench runs it)
    .venv/bin/python benches/cluster.py --quick    # 10,000

Starts a throwaway PostgreSQL, one redis-server, and a Redis Cluster of 3 primaries with a replica
each (tests/support/cluster_support.py), all on this machine, then, through `ChatHistoryManager` in redis
mode (background_flush=False), for each of the two:

1. p50 of a save of a 20-message conversation (the next turn of one saved with 18, as the app saves
   after a reply), of a Redis hit of it and of a list of 30, both by a manager with the near cache
   off (`near_cache_bytes=0`: with it on, both are answered in the process, on a cluster as on one
   node), measured alternately on the two setups in chunks of 50 calls, so a slow moment of the
   machine lands on both; the ratio cluster ÷ one node of each p50;
2. fills Redis with N small dirty conversations (2 messages, 10 per user; untimed) and times one
   `flush_dirty_conversations()` of all of them into an empty database, then the same with two
   flushers (two managers in two threads flushing at once) on a new fill.

Pinned like benches/run.py (`--no-pin` turns it off): the harness re-executes itself under
`taskset -c 0` and starts every server from there, so the client, PostgreSQL, the one node and all
six cluster processes share CPU 0. The cluster's shards and replicas then compete with each other
and with the client: the table shows what sharding costs per call here, not what more machines
would give.
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
    parse_args,
    pinning_line,
    pinning_report,
    summary_us,
    write_report,
)

PER_USER = 10
FILL_THREADS = 4


def manager(db_url: str, redis_url: str, **kwargs):
    return chat_history_rs.ChatHistoryManager(
        mode="postgres",
        connection_string=db_url,
        redis_enabled=True,
        redis_connection_string=redis_url,
        background_flush=False,
        **kwargs,
    )


CHUNK = 50


class PerCall:
    """One setup's per-call measurements: a user with 30 conversations. Each turn replaces one with a
    fresh conversation of 18 messages (the old one deleted, untimed), then saves its next turn (20
    messages: the app's save after a reply, timed), reads it and lists, with a manager without the
    near cache."""

    def __init__(self, db_url: str, redis_url: str, corpus: Corpus) -> None:
        self.corpus = corpus
        self.saver = manager(db_url, redis_url)
        self.reader = manager(db_url, redis_url, near_cache_bytes=0)
        self.user, self.cid = new_user_id(), new_conversation_id()
        self.saver.save_conversation(self.cid, corpus.conversation(20), user_id=self.user)
        for _ in range(29):
            self.saver.save_conversation(new_conversation_id(), corpus.conversation(2), user_id=self.user)
        self.samples: Dict[str, List[int]] = {"save20": [], "get_hit20": [], "list30": []}

    def chunk(self, record: bool) -> None:
        for _ in range(CHUNK):
            self.saver.delete_conversation(self.cid, user_id=self.user)
            self.cid, conv = new_conversation_id(), self.corpus.conversation(18)
            self.saver.save_conversation(self.cid, conv, user_id=self.user)
            conv["messages"] = conv["messages"] + self.corpus.messages(2, start=18)
            t0 = time.perf_counter_ns()
            self.saver.save_conversation(self.cid, conv, user_id=self.user)
            t1 = time.perf_counter_ns()
            got = self.reader.get_conversation(self.cid, user_id=self.user)
            t2 = time.perf_counter_ns()
            listed = self.reader.list_conversations(self.user)
            t3 = time.perf_counter_ns()
            if got is None or len(got["messages"]) != 20 or len(listed) != 30:
                raise SystemExit("a saved conversation did not read back (or the list is short)")
            if record:
                self.samples["save20"].append(t1 - t0)
                self.samples["get_hit20"].append(t2 - t1)
                self.samples["list30"].append(t3 - t2)
        # Flushed between chunks (untimed), as the background flush would.
        self.saver.flush_dirty_conversations()

    def close(self) -> Dict[str, dict]:
        self.reader.close()
        self.saver.close()
        return {k: summary_us(v) for k, v in self.samples.items()}


def per_call(setups: Dict[str, "PerCall"], iterations: int) -> Dict[str, Dict[str, dict]]:
    """Alternates chunks between the setups: a warm-up chunk each, then `iterations` calls each."""
    for setup in setups.values():
        setup.chunk(record=False)
    for _ in range(max(1, iterations // CHUNK)):
        for setup in setups.values():
            setup.chunk(record=True)
    return {name: setup.close() for name, setup in setups.items()}


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


def main() -> int:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--count", type=int, help="conversations per flush (default 100,000; 10,000 with --quick)")
        parser.add_argument("--json", default=str(RESULTS / "cluster.json"), help="where to write the results")

    args = parse_args(__doc__, more)
    count = args.count or (10_000 if args.quick else 100_000)
    iterations = 200 if args.quick else 1000
    corpus = Corpus(seed=11)
    stack = Stack()
    cluster = RedisClusterServers()
    report: Dict[str, object] = {"machine": machine_info(), "count": count, "iterations": iterations}
    try:
        stack.start()
        cluster.start()
        pinning = pinning_report(stack, enabled=not args.no_pin)
        report["pinning"] = pinning
        setups = {"one node": stack.redis_url(0), "cluster, 3 shards": cluster.url}
        print(f"# Redis Cluster beside one node: {count:,} conversations per flush\n")
        machine = report["machine"]
        print(f"Machine: {machine['cpu']}, {machine['cores']} cores; chat_history_rs {chat_history_rs.__version__}")
        print(pinning_line(pinning) + "; the cluster's six processes start from the same process\n")
        databases = {name: stack.database_url("bench_cluster") for name in setups}
        calls = per_call(
            {name: PerCall(databases[name], url, corpus) for name, url in setups.items()},
            iterations,
        )
        print("per-call measurements: done", flush=True)
        rows = {}
        for name, redis_url in setups.items():
            db_url = databases[name]
            m = manager(db_url, redis_url)
            m.flush_dirty_conversations()
            fill(m, corpus, count)
            one, written_one = timed_flush([m])
            fill(m, corpus, count)
            other = manager(db_url, redis_url)
            two, written_two = timed_flush([m, other])
            other.close()
            m.close()
            rows[name] = {
                "calls": calls[name],
                "flush_1": {"seconds": one, "written": written_one},
                "flush_2": {"seconds": two, "written": written_two},
                "layout": name,
            }
            print(f"{name}: done", flush=True)
        report["rows"] = rows
        print()
        print("| setup | save20 p50 µs | Redis hit20 p50 µs | list30 p50 µs | flush, 1 flusher | flush, 2 flushers |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            c = {k: v["p50_us"] for k, v in row["calls"].items()}
            f1, f2 = row["flush_1"], row["flush_2"]
            print(
                f"| {name} | {c['save20']:.0f} | {c['get_hit20']:.0f} | {c['list30']:.0f} "
                f"| {f1['seconds']:.1f} s ({f1['written'] / f1['seconds']:,.0f}/s) "
                f"| {f2['seconds']:.1f} s ({f2['written'] / f2['seconds']:,.0f}/s) |"
            )
        one_node, sharded = (rows[name]["calls"] for name in setups)
        ratios = {k: sharded[k]["p50_us"] / one_node[k]["p50_us"] for k in one_node}
        report["ratios"] = ratios
        print(
            f"| cluster ÷ one node (p50) | {ratios['save20']:.2f}× | {ratios['get_hit20']:.2f}× "
            f"| {ratios['list30']:.2f}× | | |"
        )
        write_report(args.json, report)
    finally:
        cluster.remove()
        stack.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
