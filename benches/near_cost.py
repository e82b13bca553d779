"""Where a near-cache hit's time goes, against the ways Python itself could hand out a cached copy.

    .venv/bin/python benches/near_cost.py            # 20 and 200 messages (make bench runs it)
    .venv/bin/python benches/near_cost.py --quick

For a conversation of 20 and of 200 app-shaped messages, p50 in microseconds, in one process
pinned to one CPU like run.py:
- `dict lookup`: `cache[key]` on a Python dict, the same object every time (not a fresh copy: the
  floor of any in-process cache);
- `shallow copies`: a fresh outer dict, messages list and message dicts copied from a cached Python
  copy (`{**conv, "messages": [m.copy() for m in ...]}`): the cheapest fresh copy Python can make;
- `copy.deepcopy` and `json.loads` of the stored JSON: the obvious ways;
- `near hit`: `get_conversation` answered by our near cache (the default);
- `near hit, Rust side`: the same minus building the dicts, i.e. the call with a conversation
  of no messages and the same title (what the lookup, the checks and the call itself cost);
- `Redis hit`: `get_conversation` with `near_cache_bytes=0`: one round trip.
Prints a Markdown table and the ratios docs/benchmarks.md quotes. Not a test: nothing is asserted.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Callable, Dict

import chat_history_rs
from common import Corpus, Stack, new_conversation_id, new_user_id, parse_args, summary_us, wait_for_near_cache


def timed(fn: Callable[[], object], iterations: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    perf = time.perf_counter_ns
    for _ in range(iterations):
        t0 = perf()
        fn()
        samples.append(perf() - t0)
    return summary_us(samples)["p50_us"]


def main() -> None:
    args = parse_args(__doc__)
    iterations, warmup = (500, 50) if args.quick else (5000, 500)
    corpus = Corpus()
    stack = Stack().start()
    managers = []
    try:
        database = stack.database_url("near_cost")

        def manager(**kwargs):
            m = chat_history_rs.ChatHistoryManager(
                mode="postgres",
                connection_string=database,
                redis_enabled=True,
                redis_connection_string=stack.redis_url(0),
                background_flush=False,
                **kwargs,
            )
            managers.append(m)
            return m

        near, far = manager(), manager(near_cache_bytes=0)
        wait_for_near_cache(near)
        rows: Dict[str, Dict[int, float]] = {}
        for size in (20, 200):
            user, cid, empty_cid = new_user_id(), new_conversation_id(), new_conversation_id()
            conv = corpus.conversation(size)
            near.save_conversation(cid, conv, user_id=user)
            near.save_conversation(empty_cid, {**conv, "messages": []}, user_id=user)
            near.flush_dirty_conversations()
            for _ in range(3):
                near.get_conversation(cid, user_id=user)
                near.get_conversation(empty_cid, user_id=user)
            hits_before = near.stats()["near_cache_hits"]
            cached = near.get_conversation(cid, user_id=user)
            stored = json.dumps(cached["messages"])
            pydict = {cid: cached}

            def shallow(c=cached):
                return {**c, "messages": [m.copy() for m in c["messages"]]}

            def loads(c=cached, s=stored):
                return {**c, "messages": json.loads(s)}

            cases = {
                "dict lookup (same object, not a copy)": lambda d=pydict, k=cid: d[k],
                "shallow copies of a cached Python copy": shallow,
                "copy.deepcopy": lambda c=cached: copy.deepcopy(c),
                "json.loads of the stored messages": loads,
                "near hit (get_conversation)": lambda c=cid, u=user: near.get_conversation(c, user_id=u),
                "near hit, no messages (call and lookup)": lambda c=empty_cid, u=user: near.get_conversation(
                    c, user_id=u
                ),
                "Redis hit (near_cache_bytes=0)": lambda c=cid, u=user: far.get_conversation(c, user_id=u),
            }
            for label, fn in cases.items():
                rows.setdefault(label, {})[size] = timed(fn, iterations, warmup)
            served = near.stats()["near_cache_hits"] - hits_before
            if served < iterations:
                print(f"warning: only {served} near hits for {size} messages", file=sys.stderr)
    finally:
        for m in managers:
            m.close()
        stack.remove()

    print("| p50 (µs) | 20 messages | 200 messages |")
    print("|---|---:|---:|")
    for label, by_size in rows.items():
        print(f"| {label} | {by_size[20]:.2f} | {by_size[200]:.2f} |")
    near_label, floor_label = "near hit (get_conversation)", "near hit, no messages (call and lookup)"
    for size in (20, 200):
        hit, floor = rows[near_label][size], rows[floor_label][size]
        print(
            f"\n{size} messages: building the dicts is {100 * (hit - floor) / hit:.0f}% of a near hit; a hit costs"
            f" {hit / rows['dict lookup (same object, not a copy)'][size]:.0f}x a dict lookup and"
            f" {hit / rows['shallow copies of a cached Python copy'][size]:.2f}x Python's cheapest fresh copy;"
            f" a Redis hit costs {rows['Redis hit (near_cache_bytes=0)'][size] / hit:.1f}x a near hit."
        )
    print(f"\n(pid {os.getpid()}, {iterations} iterations per row)")


if __name__ == "__main__":
    main()
