"""Side-by-side benchmarks: chat_history_rs against the seed plan's design in pure Python.

    .venv/bin/python benches/run.py                 # the full table (what `make bench` runs, with --scale)
    .venv/bin/python benches/run.py --quick         # a smoke run: few iterations, noisy numbers
    .venv/bin/python benches/run.py --only save20,get_hit20
    .venv/bin/python benches/run.py --scale         # then benches/scale.py

Starts its own throwaway PostgreSQL and Redis on free loopback ports, pinned with the benchmark to
one CPU (`taskset -c 0`; `--no-pin` to turn that off). Each implementation gets its own databases
and its own Redis database number, so neither sees the other's data. Prints a Markdown table (p50
and p95 per operation in microseconds, the ratio ours/reference of the p50s, and the issue's
target) and writes the same results to benches/results/latest.json. Benchmarks are not tests:
nothing here asserts a timing. See benches/README.md for what each row measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import psycopg2
import redis

import chat_history_rs
import reference
from common import (
    RESULTS,
    Corpus,
    Stack,
    machine_info,
    network_floor,
    new_conversation_id,
    new_user_id,
    now_iso,
    pin_or_reexec,
    pinning_line,
    pinning_report,
    summary_us,
    wait_for_near_cache,
    write_report,
)

perf_ns = time.perf_counter_ns
Step = Callable[[], int]


# --------------------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One implementation in its two configurations, plus a plain Redis client on its Redis database
    for untimed setup (deleting a key before a cache-miss read)."""

    name: str
    cached: object  # Redis over PostgreSQL
    pg_only: object  # PostgreSQL only
    redis: redis.Redis
    # Redis over PostgreSQL without the near cache (ours with near_cache_bytes=0; the reference has
    # none, so it is its `cached`): what a read costs when it goes to Redis.
    far: Optional[object] = None

    def flush(self) -> int:
        return self.cached.flush_dirty_conversations()

    def close(self) -> None:
        for manager in {id(m): m for m in (self.cached, self.pg_only, self.far) if m is not None}.values():
            try:
                manager.close()
            except Exception as e:  # noqa: BLE001 - closing at the end must not hide the results
                print(f"warning: closing {self.name}: {e}", file=sys.stderr)
        self.redis.close()


def make_impls(stack: Stack) -> List[Impl]:
    ours_redis, ref_redis = stack.redis_url(0), stack.redis_url(1)
    ours_database = stack.database_url("bench_ours")

    def ours_cached(**kwargs) -> chat_history_rs.ChatHistoryManager:
        # Both of ours on one database and one Redis database: the far one reads what the other saved.
        return chat_history_rs.ChatHistoryManager(
            mode="postgres",
            connection_string=ours_database,
            redis_enabled=True,
            redis_connection_string=ours_redis,
            background_flush=False,
            **kwargs,
        )

    ours = Impl(
        "ours",
        ours_cached(),
        chat_history_rs.ChatHistoryManager(mode="postgres", connection_string=stack.database_url("bench_ours_pg")),
        redis.Redis.from_url(ours_redis),
        ours_cached(near_cache_bytes=0),
    )
    ref = Impl(
        "reference",
        reference.ChatHistoryManager(
            mode="postgres",
            connection_string=stack.database_url("bench_ref"),
            redis_enabled=True,
            redis_connection_string=ref_redis,
        ),
        reference.ChatHistoryManager(mode="postgres", connection_string=stack.database_url("bench_ref_pg")),
        redis.Redis.from_url(ref_redis),
    )
    ref.far = ref.cached
    wait_for_near_cache(ours.cached)
    return [ours, ref]


class HarnessError(RuntimeError):
    """The harness itself went wrong (an implementation returned the wrong data): not a timing."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise HarnessError(what)


# --------------------------------------------------------------------------------------------------
# Operations: each `prepare(impl)` does the untimed setup and returns a step that runs one timed
# call (plus its own untimed preparation) and returns the call's duration in nanoseconds.
# --------------------------------------------------------------------------------------------------

corpus = Corpus()


def prepare_save(impl: Impl, messages: int, pg_only: bool = False) -> Step:
    """The app's save after a reply: a conversation saved with `messages` - 2 messages saved again with
    the next user message and reply. Its size stays `messages`: each step takes a fresh one, saved
    first (untimed) in batches of 100, so no step follows its own first save."""
    manager = impl.pg_only if pg_only else impl.cached
    user = new_user_id()
    ready: List[tuple] = []

    def step() -> int:
        if not ready:
            for _ in range(100):
                cid, conv = new_conversation_id(), corpus.conversation(messages - 2)
                manager.save_conversation(cid, conv, user_id=user)
                ready.append((cid, conv))
        cid, conv = ready.pop()
        conv["messages"] = conv["messages"] + corpus.messages(2, start=messages - 2)
        conv["last_modified"] = now_iso()
        t0 = perf_ns()
        manager.save_conversation(cid, conv, user_id=user)
        return perf_ns() - t0

    return step


def prepare_regenerate(impl: Impl, messages: int) -> Step:
    """The same conversation re-saved with a new last message each time (a regenerated reply); its size
    stays `messages`. Ours keeps each replaced copy aside (docs/design.md, "Write order")."""
    manager = impl.cached
    user, cid = new_user_id(), new_conversation_id()
    conv = corpus.conversation(messages)
    base = conv["messages"][:-1]
    manager.save_conversation(cid, conv, user_id=user)

    def step() -> int:
        conv["messages"] = base + [corpus.message(messages - 1)]
        conv["last_modified"] = now_iso()
        t0 = perf_ns()
        manager.save_conversation(cid, conv, user_id=user)
        return perf_ns() - t0

    return step


def saved_and_flushed(impl: Impl, messages: int, pg_only: bool = False):
    """A new conversation of `messages` messages, in PostgreSQL (and clean in Redis)."""
    manager = impl.pg_only if pg_only else impl.cached
    user, cid = new_user_id(), new_conversation_id()
    manager.save_conversation(cid, corpus.conversation(messages), user_id=user)
    if not pg_only:
        impl.flush()
    got = manager.get_conversation(cid, user_id=user)
    expect(got is not None and len(got["messages"]) == messages, f"{impl.name}: a saved conversation reads back")
    return manager, user, cid


def prepare_get_hit(impl: Impl, messages: int, far: bool = False) -> Step:
    """A conversation cached clean in Redis (saved, flushed, read once), read again: from our near
    cache (on by default), or with `far` from Redis (ours with the near cache off)."""
    manager, user, cid = saved_and_flushed(impl, messages)
    if far:
        manager = impl.far

    def step() -> int:
        t0 = perf_ns()
        manager.get_conversation(cid, user_id=user)
        return perf_ns() - t0

    return step


def prepare_get_miss(impl: Impl, messages: int) -> Step:
    """A conversation only PostgreSQL has: its Redis hash `conv:<user>:<id>` is deleted (untimed)
    before each read, which then reads PostgreSQL and caches it again."""
    manager, user, cid = saved_and_flushed(impl, messages)
    key = f"conv:{user}:{cid}"
    # The read in saved_and_flushed left a copy in our near cache, which drops it when its tracker
    # hears of the DEL: a read in between (a few percent of the time on one CPU) is a near hit and
    # caches nothing in Redis. So the first DEL and read are tried again until the read was a miss;
    # from then on the near cache holds no copy (a miss does not fill it), and every step misses.
    for _ in range(5):
        impl.redis.delete(key)
        got = manager.get_conversation(cid, user_id=user)
        expect(got is not None and len(got["messages"]) == messages, f"{impl.name}: a miss reads PostgreSQL")
        # Ours sends the backfill without waiting for it: give Redis a moment to run it.
        deadline = time.monotonic() + 2.0
        while impl.redis.exists(key) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        if impl.redis.exists(key) == 1:
            break
    expect(impl.redis.exists(key) == 1, f"{impl.name}: a miss caches the conversation again")

    def step() -> int:
        impl.redis.delete(key)
        t0 = perf_ns()
        manager.get_conversation(cid, user_id=user)
        return perf_ns() - t0

    return step


LIST_SIZE = 30


def user_with_conversations(impl: Impl, count: int, messages: int = 20) -> str:
    user = new_user_id()
    for _ in range(count):
        impl.cached.save_conversation(new_conversation_id(), corpus.conversation(messages), user_id=user)
    impl.flush()
    return user


def prepare_list(impl: Impl, warm: bool) -> Step:
    """A user with 30 conversations (20 messages each, flushed). Warm: the user's cached list is
    there (the reference's convlist primed by one list, ours listed twice first). Cold: the list key
    `user:<user>:convlist` is deleted (untimed) before each call."""
    user = user_with_conversations(impl, LIST_SIZE)
    list_key = f"user:{user}:convlist"
    manager = impl.cached

    def warm_up() -> None:
        for _ in range(2 if impl.name == "ours" else 1):
            listed = manager.list_conversations(user_id=user)
            expect(len(listed) == LIST_SIZE, f"{impl.name}: list returns {LIST_SIZE} conversations")
        expect(impl.redis.exists(list_key) == 1, f"{impl.name}: the list is cached after a list")

    warm_up()

    def step() -> int:
        if warm:
            if not impl.redis.exists(list_key):  # its 300 s TTL ran out: warm it again, untimed
                warm_up()
        else:
            impl.redis.delete(list_key)
        t0 = perf_ns()
        manager.list_conversations(user_id=user)
        return perf_ns() - t0

    return step


FLUSH_CONVERSATIONS = 1000
FLUSH_USERS = 100


def prepare_flush(impl: Impl) -> Step:
    """Each step: 1,000 fresh conversations (10 per user) saved with 18 messages and flushed, then
    saved again with 20 (the app's next turn), all untimed; then one flush call, timed."""

    def step() -> int:
        impl.flush()  # nothing else dirty
        users = [new_user_id() for _ in range(FLUSH_USERS)]
        convs = [
            (users[i % FLUSH_USERS], new_conversation_id(), corpus.conversation(18)) for i in range(FLUSH_CONVERSATIONS)
        ]
        for user, cid, conv in convs:
            impl.cached.save_conversation(cid, conv, user_id=user)
        expect(impl.flush() == FLUSH_CONVERSATIONS, f"{impl.name}: the first flush writes every conversation")
        for user, cid, conv in convs:
            conv["messages"] = conv["messages"] + corpus.messages(2, start=18)
            conv["last_modified"] = now_iso()
            impl.cached.save_conversation(cid, conv, user_id=user)
        t0 = perf_ns()
        written = impl.flush()
        elapsed = perf_ns() - t0
        expect(written == FLUSH_CONVERSATIONS, f"{impl.name}: flush wrote {written}, not {FLUSH_CONVERSATIONS}")
        return elapsed

    return step


def prepare_pg_get(impl: Impl, messages: int) -> Step:
    manager, user, cid = saved_and_flushed(impl, messages, pg_only=True)

    def step() -> int:
        t0 = perf_ns()
        manager.get_conversation(cid, user_id=user)
        return perf_ns() - t0

    return step


@dataclass
class Op:
    """One row of the table."""

    key: str
    label: str
    prepare: Callable[[Impl], Step]
    size: str  # "fast", "medium", "slow", "flush": how many iterations
    target: Optional[float] = None  # ours/reference p50 must be at most this


OPS: List[Op] = [
    Op("save20", "save, 20 messages (the next turn)", lambda i: prepare_save(i, 20), "fast", 0.25),
    Op("save200", "save, 200 messages (the next turn)", lambda i: prepare_save(i, 200), "medium", 0.30),
    Op("regen20", "save, 20 messages, last one replaced", lambda i: prepare_regenerate(i, 20), "fast"),
    Op("regen200", "save, 200 messages, last one replaced", lambda i: prepare_regenerate(i, 200), "medium"),
    Op("get_hit20", "get, cache hit, 20 messages", lambda i: prepare_get_hit(i, 20), "fast", 0.10),
    Op("get_hit200", "get, cache hit, 200 messages", lambda i: prepare_get_hit(i, 200), "medium", 0.25),
    Op(
        "get_far20",
        "get, Redis hit (near cache off), 20 msgs",
        lambda i: prepare_get_hit(i, 20, far=True),
        "fast",
        0.35,
    ),
    Op(
        "get_far200",
        "get, Redis hit (near cache off), 200 msgs",
        lambda i: prepare_get_hit(i, 200, far=True),
        "medium",
        0.50,
    ),
    Op("get_miss20", "get, cache miss, 20 messages", lambda i: prepare_get_miss(i, 20), "medium", 0.25),
    Op("get_miss200", "get, cache miss, 200 messages", lambda i: prepare_get_miss(i, 200), "slow"),
    Op("list30", "list, 30 conversations (cached list)", lambda i: prepare_list(i, warm=True), "medium", 0.10),
    Op("list30_cold", "list, 30 conversations (list not cached)", lambda i: prepare_list(i, warm=False), "slow"),
    Op("flush1000", "flush 1,000 dirty (20 msgs, 18 already stored)", prepare_flush, "flush", 0.05),
    Op("pg_save20", "postgres only: save, 20 messages", lambda i: prepare_save(i, 20, pg_only=True), "slow", 0.25),
    Op("pg_get20", "postgres only: get, 20 messages", lambda i: prepare_pg_get(i, 20), "medium", 0.40),
]
THROUGHPUT_KEY = "threads"
# Our 8-thread cache-hit gets/s ÷ the reference's 8-thread gets/s.
THROUGHPUT_VS_REFERENCE_TARGET = 5.0
ALL_KEYS = [op.key for op in OPS] + [THROUGHPUT_KEY]

# (timed iterations, warm-up iterations) per size; quick is a smoke run only.
ITERATIONS = {
    "full": {"floor": (2000, 200), "fast": (2000, 200), "medium": (1000, 100), "slow": (500, 50), "flush": (7, 1)},
    "quick": {"floor": (200, 20), "fast": (100, 10), "medium": (50, 5), "slow": (30, 3), "flush": (1, 0)},
}
THROUGHPUT_SECONDS = {"full": 1.0, "quick": 0.5}  # per run
THROUGHPUT_ROUNDS = {"full": 7, "quick": 1}
CHUNK = {"fast": 100, "medium": 50, "slow": 25, "flush": 1}


def measure(op: Op, impls: List[Impl], iterations: int, warmup: int) -> Dict[str, List[int]]:
    """Warms both up, then alternates between them in chunks, so a slow patch of a noisy machine
    lands on both."""
    steps = {impl.name: op.prepare(impl) for impl in impls}
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: Dict[str, List[int]] = {name: [] for name in steps}
    chunk = CHUNK[op.size]
    while len(samples[impls[0].name]) < iterations:
        count = min(chunk, iterations - len(samples[impls[0].name]))
        for name, step in steps.items():
            samples[name].extend(step() for _ in range(count))
    return samples


# --------------------------------------------------------------------------------------------------
# Throughput with threads
# --------------------------------------------------------------------------------------------------


def throughput_data(impl: Impl, threads: int, per_thread: int = 4) -> List[tuple]:
    """For each of `threads` threads, a user and `per_thread` conversations (20 messages) cached clean."""
    manager = impl.cached
    own = []
    for _ in range(threads):
        user = new_user_id()
        cids = [new_conversation_id() for _ in range(per_thread)]
        for cid in cids:
            manager.save_conversation(cid, corpus.conversation(20), user_id=user)
        own.append((user, cids))
    impl.flush()
    for user, cids in own:
        for cid in cids:
            expect(manager.get_conversation(cid, user_id=user) is not None, f"{impl.name}: throughput data")
    return own


def throughput(impl: Impl, own: List[tuple], seconds: float) -> float:
    """Cache-hit gets per second, one Python thread per entry of `own` sharing one manager, each
    reading its own conversations in turn for `seconds`."""
    manager = impl.cached
    threads = len(own)
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def worker(index: int) -> None:
        user, cids = own[index]
        get = manager.get_conversation
        n = 0
        start.wait()
        while not stop.is_set():
            get(cids[n % len(cids)], user_id=user)
            n += 1
        counts[index] = n

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def fmt_us(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}"


@dataclass
class Results:
    rows: List[dict] = field(default_factory=list)
    floor: Dict[str, Dict[str, float]] = field(default_factory=dict)
    throughput: Dict[str, Dict[str, float]] = field(default_factory=dict)


def table(results: Results) -> str:
    lines = [
        "| operation | ours p50 (µs) | ours p95 (µs) | reference p50 (µs) | reference p95 (µs) | ratio p50 | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in results.rows:
        ours, ref = row["ours"], row["reference"]
        if row["target"] is None:
            target = "—"
        else:
            target = f"≤ {row['target']:.2f} {'met' if row['met'] else 'not met'}"
        lines.append(
            f"| {row['label']} | {fmt_us(ours['p50_us'])} | {fmt_us(ours['p95_us'])} | {fmt_us(ref['p50_us'])}"
            f" | {fmt_us(ref['p95_us'])} | {fmt_ratio(row['ratio_p50'])} | {target} |"
        )
    tp = results.throughput
    if tp:
        for threads in ("1", "8"):
            ours, ref = tp["ours"][threads], tp["reference"][threads]
            target = "—"
            if threads == "8":
                met = "met" if ours / ref >= THROUGHPUT_VS_REFERENCE_TARGET else "not met"
                target = f"≥ {THROUGHPUT_VS_REFERENCE_TARGET:.0f}× {met}"
            lines.append(
                f"| cache-hit gets/s, {threads} thread{'s' if threads != '1' else ''} (higher is better)"
                f" | {ours:,.0f} | — | {ref:,.0f} | — | {ours / ref:.2f} | {target} |"
            )
        # No goal for 8 threads ÷ 1 thread: a near-cache hit waits on nothing, so threads add
        # no parallelism it could use on one pinned CPU.
        ours_x, ref_x = tp["ours"]["scaling"], tp["reference"]["scaling"]
        lines.append(f"| gets/s, 8 threads ÷ 1 thread | {ours_x:.2f}× | — | {ref_x:.2f}× | — | — | — |")
    for key, label in (("redis_ping", "network floor: Redis PING (redis-py)"),
                       ("pg_select1", "network floor: PostgreSQL SELECT 1 (psycopg2)")):  # fmt: skip
        if key in results.floor:
            f = results.floor[key]
            lines.append(f"| {label} | — | — | {fmt_us(f['p50_us'])} | {fmt_us(f['p95_us'])} | — | one round trip |")
    return "\n".join(lines)


def round_trip_table(results: Results) -> str:
    """Each of our p50s in bare round trips: how close an operation is to one trip to its server."""
    ping, select1 = results.floor["redis_ping"]["p50_us"], results.floor["pg_select1"]["p50_us"]
    lines = [
        "| operation | ours p50 ÷ Redis PING | ours p50 ÷ PostgreSQL SELECT 1 |",
        "|---|---:|---:|",
    ]
    for row in results.rows:
        if row["key"] == "flush1000":  # a bulk operation: its round trips are not the point
            continue
        p50 = row["ours"]["p50_us"]
        lines.append(f"| {row['label']} | {p50 / ping:.1f} | {p50 / select1:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run: few iterations, noisy numbers")
    parser.add_argument("--only", help=f"comma-separated operations to run, of: {','.join(ALL_KEYS)}")
    parser.add_argument("--scale", action="store_true", help="then run benches/scale.py (make bench does)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the benchmark and servers to CPU 0")
    parser.add_argument("--json", default=str(RESULTS / "latest.json"), help="where to write the results")
    args = parser.parse_args(argv)
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in ALL_KEYS]
        if unknown:
            parser.error(f"unknown operation(s) {', '.join(unknown)}; choose from {', '.join(ALL_KEYS)}")
        args.only = wanted
    else:
        args.only = ALL_KEYS
    return args


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    pin_or_reexec([os.path.abspath(__file__), *argv], enabled=not args.no_pin)
    profile = "quick" if args.quick else "full"
    iters = ITERATIONS[profile]
    started = time.monotonic()

    stack = Stack()
    impls: List[Impl] = []
    results = Results()
    try:
        stack.start()
        pinning = pinning_report(stack, enabled=not args.no_pin)
        versions = {
            "python": sys.version.split()[0],
            **stack.versions(),
            "chat_history_rs": chat_history_rs.__version__,
            "redis-py": redis.__version__,
            "psycopg2": psycopg2.__version__.split()[0],
        }
        machine = machine_info()
        impls = make_impls(stack)

        print("# chat_history_rs benchmarks: ours vs the seed plan in Python\n")
        print(f"Machine: {machine['cpu']}, {machine['cores']} cores, Linux {machine['kernel']}")
        print(
            f"Versions: Python {versions['python']}, PostgreSQL {versions['postgresql']}, Redis {versions['redis']},"
            f" chat_history_rs {versions['chat_history_rs']}, redis-py {versions['redis-py']},"
            f" psycopg2 {versions['psycopg2']}"
        )
        print(pinning_line(pinning))
        print(
            f"Iterations ({profile}): timed/warm-up per implementation: "
            + ", ".join(f"{size} {n}/{w}" for size, (n, w) in iters.items())
            + f"; throughput: the median of {THROUGHPUT_ROUNDS[profile]} runs of {THROUGHPUT_SECONDS[profile]:g} s"
            + (" — a smoke run, numbers are noisy" if args.quick else "")
        )
        print(
            "Servers: throwaway PostgreSQL (fsync off) and Redis on loopback; each implementation on its own"
            " databases and Redis db\n",
            flush=True,
        )

        n, w = iters["floor"]
        results.floor = network_floor(stack, n, w)

        for op in OPS:
            if op.key not in args.only:
                continue
            n, w = iters[op.size]
            t_op = time.monotonic()
            samples = measure(op, impls, n, w)
            ours, ref = summary_us(samples["ours"]), summary_us(samples["reference"])
            ratio = ours["p50_us"] / ref["p50_us"]
            results.rows.append(
                {
                    "key": op.key,
                    "label": op.label,
                    "ours": ours,
                    "reference": ref,
                    "ratio_p50": ratio,
                    "target": op.target,
                    "met": None if op.target is None else ratio <= op.target,
                }
            )
            print(
                f"  {op.key:<12} ours p50 {fmt_us(ours['p50_us']):>9} µs   reference p50 {fmt_us(ref['p50_us']):>9} µs"
                f"   ratio {ratio:.2f}   ({time.monotonic() - t_op:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

        if THROUGHPUT_KEY in args.only:
            seconds, rounds = THROUGHPUT_SECONDS[profile], THROUGHPUT_ROUNDS[profile]
            data = {(impl.name, n): throughput_data(impl, n) for impl in impls for n in (1, 8)}
            runs: Dict[tuple, List[float]] = {key: [] for key in data}
            # Short runs, alternating 1 and 8 threads and the two implementations, so a slow patch
            # of a shared machine lands on all four; each figure is the median of its runs.
            for _ in range(rounds):
                for impl in impls:
                    for n in (1, 8):
                        runs[(impl.name, n)].append(throughput(impl, data[(impl.name, n)], seconds))
            tp: Dict[str, Dict[str, float]] = {impl.name: {} for impl in impls}
            for (name, n), values in runs.items():
                tp[name][str(n)] = statistics.median(values)
            for impl in impls:
                tp[impl.name]["scaling"] = tp[impl.name]["8"] / tp[impl.name]["1"]
            results.throughput = tp
            ours_x, ref_x = tp["ours"]["scaling"], tp["reference"]["scaling"]
            print(
                f"  {THROUGHPUT_KEY:<12} 8 threads ÷ 1 thread: ours {ours_x:.2f}×, reference {ref_x:.2f}×",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for impl in impls:
            impl.close()
        stack.remove()

    print(table(results))
    if results.rows:
        print("\nHow many bare round trips each of our operations costs (p50 ÷ the network floor's p50):\n")
        print(round_trip_table(results))
    elapsed = time.monotonic() - started
    print(f"\nTotal {elapsed:.0f} s. Ratios are ours ÷ reference of the p50s; lower is better.")

    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "profile": profile,
        "only": args.only,
        "machine": machine,
        "versions": versions,
        "pinning": pinning,
        "iterations": {size: {"timed": n, "warmup": w} for size, (n, w) in iters.items()},
        "throughput_seconds": THROUGHPUT_SECONDS[profile],
        "throughput_rounds": THROUGHPUT_ROUNDS[profile],
        "units": "microseconds (throughput: gets per second)",
        "rows": results.rows,
        "throughput": results.throughput,
        "network_floor": results.floor,
        "duration_seconds": round(elapsed, 1),
    }
    write_report(args.json, report)

    if args.scale:
        print(flush=True)
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale.py")]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--no-pin"] if args.no_pin else []
        return subprocess.call(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
