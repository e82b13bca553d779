"""Scale check: does a request cost more when Redis holds many conversations, and what does a big flush cost?

    .venv/bin/python benches/scale.py            # 1,000 vs 100,000 conversations (make bench runs it)
    .venv/bin/python benches/scale.py --quick    # 1,000 vs 10,000

Starts its own throwaway PostgreSQL and Redis (pinned with this process to CPU 0, like run.py), then,
through the product (`ChatHistoryManager` in redis mode, background_flush=False):

1. fills Redis with 1,000 small dirty conversations (2 messages each, 10 per user) and measures the
   p50 of a cache-hit get and of a save of one 20-message probe conversation;
2. fills up to 100,000 and measures the same again;
3. times one `flush_dirty_conversations()` of everything dirty (100,000 + the probe) into the empty
   database, and reports the process's peak RSS during it (getrusage, after resetting the peak).

The fill is untimed (each new id's first save also asks PostgreSQL who owns it, as a first save
does). If filling takes longer than the budget, the run stops at the size reached and says so. Results are
printed as a table and written to benches/results/scale.json. No timing is asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Dict, List

import psycopg2
import redis

import chat_history_rs
from common import (
    RESULTS,
    Corpus,
    Stack,
    current_rss_kib,
    machine_info,
    new_conversation_id,
    new_user_id,
    now_iso,
    peak_rss_reset,
    pin_or_reexec,
    pinning_line,
    pinning_report,
    summary_us,
    write_report,
)

perf_ns = time.perf_counter_ns
PER_USER = 10
FILL_THREADS = 4
FILL_CHUNK = 5000


def fill(manager, client: redis.Redis, corpus: Corpus, count: int) -> None:
    """`count` new dirty conversations of 2 messages, 10 per user, saved through the product."""
    users = [new_user_id() for _ in range(-(-count // PER_USER))]
    for start in range(0, count, FILL_CHUNK):
        items = [
            (users[i // PER_USER], new_conversation_id(), corpus.conversation(2))
            for i in range(start, min(count, start + FILL_CHUNK))
        ]

        def save(part):
            for user, cid, conv in part:
                manager.save_conversation(cid, conv, user_id=user)

        workers = [threading.Thread(target=save, args=(items[k::FILL_THREADS],)) for k in range(FILL_THREADS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


def per_request(manager, corpus: Corpus, user: str, cid: str, base: list, iterations: int) -> Dict[str, dict]:
    """p50/p95 of a cache-hit get and of a save (a new last message) of the 20-message probe."""
    conv = manager.get_conversation(cid, user_id=user)
    for _ in range(iterations // 10):  # warm-up
        manager.get_conversation(cid, user_id=user)
    gets = []
    for _ in range(iterations):
        t0 = perf_ns()
        manager.get_conversation(cid, user_id=user)
        gets.append(perf_ns() - t0)
    saves = []
    for _ in range(iterations):
        conv["messages"] = base + [corpus.message(19)]
        conv["last_modified"] = now_iso()
        t0 = perf_ns()
        manager.save_conversation(cid, conv, user_id=user)
        saves.append(perf_ns() - t0)
    return {"get_hit": summary_us(gets), "save": summary_us(saves)}


def pg_scan_counts(url: str) -> Dict[str, tuple]:
    """(seq_scan, seq_tup_read, idx_scan) per table, from pg_stat_user_tables."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT relname, seq_scan, seq_tup_read, COALESCE(idx_scan, 0) FROM pg_stat_user_tables")
            return {name: (seq, tup, idx) for name, seq, tup, idx in cur.fetchall()}
    finally:
        conn.close()


def progress(present: int, started: float) -> None:
    print(f"  {present:>7,} conversations: measured ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)


def mib(kib) -> str:
    return "—" if kib is None else f"{kib / 1024:,.0f}"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 vs 10,000 conversations, fewer iterations")
    parser.add_argument("--large", type=int, help="the large size (default 100,000; 10,000 with --quick)")
    parser.add_argument("--fill-budget", type=float, default=90.0, help="seconds the fill may take (default 90)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the benchmark and servers to CPU 0")
    parser.add_argument("--json", default=str(RESULTS / "scale.json"), help="where to write the results")
    args = parser.parse_args(argv)
    pin_or_reexec([os.path.abspath(__file__), *argv], enabled=not args.no_pin)

    small = 1000
    large = args.large or (10_000 if args.quick else 100_000)
    iterations = 200 if args.quick else 1000
    corpus = Corpus(seed=7)
    started = time.monotonic()
    stack = Stack()
    manager = None
    notes: List[str] = []
    try:
        stack.start()
        pinning = pinning_report(stack, enabled=not args.no_pin)
        db_url = stack.database_url("bench_scale")
        redis_url = stack.redis_url(0)
        # The schema first, by a manager that closes: creating it builds indexes (sequential scans
        # of the new tables), and a backend that stays open may report its counts only seconds
        # later, in the middle of the measured flush.
        chat_history_rs.ChatHistoryManager(mode="postgres", connection_string=db_url).close()
        manager = chat_history_rs.ChatHistoryManager(
            mode="postgres",
            connection_string=db_url,
            redis_enabled=True,
            redis_connection_string=redis_url,
            background_flush=False,
        )
        client = redis.Redis.from_url(redis_url)

        print(f"# Scale check: {small:,} vs {large:,} conversations in Redis\n")
        machine = machine_info()
        print(f"Machine: {machine['cpu']}, {machine['cores']} cores; chat_history_rs {chat_history_rs.__version__}")
        print(pinning_line(pinning))
        print(f"Iterations: {iterations} per measurement, after {iterations // 10} warm-up gets", flush=True)

        probe_user, probe_id = new_user_id(), new_conversation_id()
        probe = corpus.conversation(20)
        base = probe["messages"][:-1]
        manager.save_conversation(probe_id, probe, user_id=probe_user)

        sizes: Dict[int, dict] = {}
        fill_started = time.monotonic()
        fill(manager, client, corpus, small)
        present = small
        sizes[present] = per_request(manager, corpus, probe_user, probe_id, base, iterations)
        progress(present, started)
        step = 10_000
        while present < large:
            if time.monotonic() - fill_started > args.fill_budget:
                notes.append(
                    f"{large:,} conversations did not fit the {args.fill_budget:.0f} s fill budget on this machine:"
                    f" measured at {present:,} instead."
                )
                break
            add = min(step - present % step, large - present)
            fill(manager, client, corpus, add)
            present += add
        if present != small:
            sizes[present] = per_request(manager, corpus, probe_user, probe_id, base, iterations)
            progress(present, started)
        used_memory = client.info("memory")["used_memory"]
        dirty = client.scard("dirty:convs")

        scans_before = pg_scan_counts(db_url)
        peak_before_flush = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_before = current_rss_kib()
        reset = peak_rss_reset()
        t0 = time.perf_counter()
        written = manager.flush_dirty_conversations()
        flush_seconds = time.perf_counter() - t0
        peak_during = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if reset else None
        time.sleep(1.0)  # PostgreSQL publishes table statistics up to a second late
        scans_after = pg_scan_counts(db_url)
        if not reset:
            notes.append("the kernel did not allow resetting the peak RSS; the peak shown is the whole process's")
    finally:
        if manager is not None:
            manager.close()
        stack.remove()

    (s_small, r_small), (s_large, r_large) = list(sizes.items())[0], list(sizes.items())[-1]
    lines = [
        f"| per request (20-message probe) | {s_small:,} conversations | {s_large:,} conversations | ratio |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("get_hit", "get, cache hit"), ("save", "save")):
        for p in ("p50_us", "p95_us"):
            a, b = r_small[key][p], r_large[key][p]
            lines.append(f"| {label}, {p[:3]} (µs) | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    print()
    print("\n".join(lines))

    seq = {t: scans_after.get(t, (0, 0, 0))[0] - scans_before.get(t, (0, 0, 0))[0] for t in scans_after}
    seq_rows = {t: scans_after.get(t, (0, 0, 0))[1] - scans_before.get(t, (0, 0, 0))[1] for t in scans_after}
    print()
    print(f"| one flush of {dirty:,} dirty conversations (2 messages each) | value |")
    print("|---|---:|")
    print(f"| conversations written | {written:,} |")
    print(f"| duration (s) | {flush_seconds:.2f} |")
    print(f"| conversations per second | {written / flush_seconds:,.0f} |")
    print(f"| peak RSS during the flush (MiB) | {mib(peak_during)} |")
    print(f"| RSS before the flush (MiB) | {mib(rss_before)} |")
    print(f"| Redis used_memory before the flush (MiB) | {used_memory / 1048576:,.0f} |")
    for table in ("conversations", "messages"):
        if table in seq:
            label = f"PostgreSQL sequential scans of {table} during the flush (rows read)"
            print(f"| {label} | {seq[table]:,} ({seq_rows[table]:,}) |")
    for note in notes:
        print(f"\nNote: {note}")
    elapsed = time.monotonic() - started
    print(f"\nTotal {elapsed:.0f} s.")

    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "quick": args.quick,
        "machine": machine,
        "chat_history_rs": chat_history_rs.__version__,
        "pinning": pinning,
        "iterations": iterations,
        "requested_sizes": [small, large],
        "per_request": {str(size): r for size, r in sizes.items()},
        "flush": {
            "dirty": dirty,
            "written": written,
            "seconds": flush_seconds,
            "conversations_per_second": written / flush_seconds,
            "peak_rss_kib_during": peak_during,
            "rss_kib_before": rss_before,
            "peak_rss_kib_before": peak_before_flush,
            "redis_used_memory_bytes": used_memory,
            "postgres_seq_scans": seq,
            "postgres_seq_rows_read": seq_rows,
        },
        "notes": notes,
        "duration_seconds": round(elapsed, 1),
    }
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
