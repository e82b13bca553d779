"""asyncio benchmark: AsyncChatHistoryManager against the seed's design on redis.asyncio and asyncpg.

    .venv/bin/python benches/async_run.py            # the table (what `make bench-async` runs)
    .venv/bin/python benches/async_run.py --quick    # a smoke run: fewer calls, noisy numbers
    .venv/bin/python benches/async_run.py --no-pin   # let the process and the servers use every CPU
    .venv/bin/python benches/async_run.py --general-path   # ours through future_into_py on every loop

Both implementations run on one event loop in this process, against the same throwaway PostgreSQL and
Redis (each with its own databases and Redis database number), measured alternately in rounds so a slow
moment of the machine lands on both. For each operation and each number of calls in flight (1 and 64),
`in flight` tasks each await one call after another until the round's calls are done: p50 is the
median time of one call (from the call to the end of its await), calls/s the round's calls over its
wall time. Prints a Markdown table and writes benches/results/async.json. Nothing here asserts a timing;
the harness stops with an error if an implementation returns wrong data.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Awaitable, Callable, Dict, List, Tuple

import chat_history_rs
from async_reference import AsyncChatHistoryManager as ReferenceManager
from common import (
    RESULTS,
    Corpus,
    Stack,
    machine_info,
    new_conversation_id,
    new_user_id,
    percentile,
    parse_args,
    pinning_line,
    pinning_report,
    write_report,
)

perf_ns = time.perf_counter_ns
Call = Callable[[int], Awaitable[object]]
LEVELS = (1, 64)
GOALS = {1: "p50 <= 0.5 x", 64: "calls/s >= 3 x"}


class HarnessError(RuntimeError):
    """An implementation returned the wrong data: not a timing."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise HarnessError(what)


async def timed_round(call: Call, calls: int, in_flight: int) -> Tuple[List[int], float]:
    """`calls` calls, `in_flight` at a time; the per-call durations (ns) and the wall time (s)."""
    durations: List[int] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < calls:
            index = next_index
            next_index += 1
            started = perf_ns()
            await call(index)
            durations.append(perf_ns() - started)

    started = perf_ns()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return durations, (perf_ns() - started) / 1e9


async def prepare(name: str, manager, corpus: Corpus) -> Dict[str, Call]:
    """Untimed setup for one implementation; returns its operations (each a call by index)."""
    user = new_user_id()
    # get_hit20: conversations of 20 messages, saved (so cached in Redis) and read back once.
    readable = {new_conversation_id(): corpus.conversation(20) for _ in range(64)}
    for cid, conversation in readable.items():
        await manager.save_conversation(cid, conversation, user_id=user)
    read_ids = list(readable)
    for cid in read_ids:
        got = await manager.get_conversation(cid, user_id=user)
        expect(got == readable[cid], f"{name}: get_conversation({cid}) does not read back what was saved")
    # save20: each call saves a 20-message conversation, one id per task so tasks do not contend.
    writable = [new_conversation_id() for _ in range(64)]
    to_save = corpus.conversation(20)
    # list30: a user with 30 conversations, listed once untimed (so the reference's list is cached).
    lister = new_user_id()
    for _ in range(30):
        await manager.save_conversation(new_conversation_id(), corpus.conversation(2), user_id=lister)
    # The seed's list reads PostgreSQL when its cached list is missing: write back first.
    await manager.flush_dirty_conversations()
    listed = await manager.list_conversations(user_id=lister)
    expect(len(listed) == 30, f"{name}: list_conversations returned {len(listed)} of 30")

    async def get_hit(index: int) -> object:
        return await manager.get_conversation(read_ids[index % len(read_ids)], user_id=user)

    async def save(index: int) -> object:
        return await manager.save_conversation(writable[index % len(writable)], to_save, user_id=user)

    async def list30(index: int) -> object:
        return await manager.list_conversations(user_id=lister)

    return {"get_hit20": get_hit, "save20": save, "list30": list30}


async def bench(stack: Stack, rounds: int, calls: Dict[int, int]) -> Dict[str, Dict]:
    corpus = Corpus()
    ours = chat_history_rs.AsyncChatHistoryManager(
        mode="postgres",
        connection_string=stack.database_url("abench_ours"),
        redis_enabled=True,
        redis_connection_string=stack.redis_url(0),
        background_flush=False,
    )
    reference = await ReferenceManager.open(stack.database_url("abench_ref"), stack.redis_url(1))
    impls = {"ours": ours, "reference": reference}
    ops = {name: await prepare(name, manager, corpus) for name, manager in impls.items()}
    results: Dict[str, Dict] = {}
    for op in ops["ours"]:
        for level in LEVELS:
            samples: Dict[str, List[int]] = {name: [] for name in impls}
            wall: Dict[str, float] = {name: 0.0 for name in impls}
            for name in impls:  # warm-up, untimed
                await timed_round(ops[name][op], max(level, 20), level)
            for _ in range(rounds):
                for name in impls:
                    durations, seconds = await timed_round(ops[name][op], calls[level], level)
                    samples[name] += durations
                    wall[name] += seconds
            results[f"{op}@{level}"] = {
                name: {
                    "p50_us": percentile(samples[name], 50) / 1000,
                    "p95_us": percentile(samples[name], 95) / 1000,
                    "calls_per_s": len(samples[name]) / wall[name],
                    "n": len(samples[name]),
                }
                for name in impls
            }
            print(f"  {op} at {level} in flight done", file=sys.stderr)
    await ours.flush_dirty_conversations()
    await ours.close()
    await reference.flush_dirty_conversations()
    await reference.close()
    return results


def table(results: Dict[str, Dict]) -> str:
    lines = [
        "| operation | in flight | ours p50 µs | reference p50 µs | p50 ours/ref | ours calls/s | reference calls/s "
        "| calls/s ours/ref | goal | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for key, r in results.items():
        op, level = key.split("@")
        ours, ref = r["ours"], r["reference"]
        p50_ratio = ours["p50_us"] / ref["p50_us"]
        rate_ratio = ours["calls_per_s"] / ref["calls_per_s"]
        met = p50_ratio <= 0.5 if level == "1" else rate_ratio >= 3
        lines.append(
            f"| {op} | {level} | {ours['p50_us']:.0f} | {ref['p50_us']:.0f} | {p50_ratio:.2f} | "
            f"{ours['calls_per_s']:,.0f} | {ref['calls_per_s']:,.0f} | {rate_ratio:.1f} | {GOALS[int(level)]} | "
            f"{'yes' if met else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--general-path",
            action="store_true",
            help="resolve our futures through pyo3-async-runtimes' future_into_py, as loops that cannot watch a"
            " socket do",
        )

    args = parse_args(__doc__, more)
    if args.general_path:
        chat_history_rs._core._set_asyncio_fast_path(False)
    rounds = 2 if args.quick else 6
    calls = {1: 100, 64: 640} if args.quick else {1: 400, 64: 3200}
    stack = Stack().start()
    try:
        pinning = pinning_report(stack, enabled=not args.no_pin)
        versions = stack.versions()
        results = asyncio.run(bench(stack, rounds, calls))
    finally:
        stack.remove()
    import asyncpg
    import redis

    info = machine_info()
    print(
        f"\nasyncio: chat_history_rs {chat_history_rs.__version__} AsyncChatHistoryManager vs the seed's design on "
        f"redis.asyncio {redis.__version__} + asyncpg {asyncpg.__version__}; one event loop; Python {info['python']}, "
        f"PostgreSQL {versions['postgresql']}, Redis {versions['redis']}; {info['cpu']}, {info['cores']} cores"
    )
    print(pinning_line(pinning))
    if args.general_path:
        print("Ours through pyo3-async-runtimes' future_into_py (--general-path), not the socket-watching fast path")
    print(f"{rounds} rounds of {calls[1]} calls at 1 in flight and {calls[64]} at 64, alternating implementations\n")
    print(table(results))
    write_report(
        os.path.join(RESULTS, "async.json"),
        {
            "machine": info,
            "versions": versions,
            "pinning": pinning,
            "rounds": rounds,
            "calls": calls,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
