"""Redis memory and CPU per conversation for each `redis_compression` setting.

    .venv/bin/python benches/memory.py                 # 200 conversations per text, size and setting
    .venv/bin/python benches/memory.py --quick         # 40 of each (a smoke run)
    .venv/bin/python benches/memory.py --text random   # one text only

For each text (benches/common.py's Corpus: messages of about 300 characters; `english`, chat-like text of
common words drawn by frequency, and `random`, words of random letters, compression's worst case), each
setting (off, zlib, on) and each size, saves the same app-shaped conversations with a manager of that setting, then
saves each again (timed: a save of a conversation Redis holds, one staged hash; the first save of an id
also asks PostgreSQL who owns it) and reads each back once with the near cache off (a Redis hit).
Reports, per setting:
- Redis memory per conversation: the median `MEMORY USAGE` of the hashes (every field, the key and Redis's
  overhead), and its ratio to plain's; the median stored `messages` field (`HSTRLEN`);
- per save and per Redis hit: p50 wall time, and p50 CPU time of this process (the client's work:
  building, compressing or decompressing, parsing), each as a ratio to plain's p50, measured in the same
  run with the settings interleaved in chunks, the benchmark and Redis pinned to one CPU as run.py is.
Prints a Markdown table and writes benches/results/memory.json. Not a test: nothing is asserted, but the
goals (zstd at most 0.45x plain memory, zlib at most 0.65x, on chat-like text) are printed as met or missed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import redis

import chat_history_rs
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

SETTINGS = ["off", "zlib", "on"]
GOALS = {"zlib": 0.65, "on": 0.45}
CHUNK = 20


def main() -> None:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--count", type=int, default=None, help="conversations per text, size and setting")
        parser.add_argument("--text", choices=[*Corpus.TEXTS, "both"], default="both", help="which Corpus text")

    args = parse_args(__doc__, more)
    count = args.count or (40 if args.quick else 200)
    texts = list(Corpus.TEXTS) if args.text == "both" else [args.text]
    stack = Stack().start()
    managers: Dict[str, chat_history_rs.ChatHistoryManager] = {}
    results: Dict[str, Dict[int, Dict[str, Dict[str, float]]]] = {text: {} for text in texts}
    try:
        database = stack.database_url("memory")
        for setting in SETTINGS:
            managers[setting] = chat_history_rs.ChatHistoryManager(
                mode="redis",
                connection_string=database,
                redis_connection_string=stack.redis_url(0),
                background_flush=False,
                near_cache_bytes=0,
                redis_compression=setting,
            )
        client = redis.Redis(host="127.0.0.1", port=stack.redis.port, db=0)
        pinning = pinning_report(stack, enabled=not args.no_pin)
        for text, size in ((text, size) for text in texts for size in (20, 200)):
            corpus = Corpus(text=text)
            conversations = [corpus.conversation(size) for _ in range(count)]
            user = {s: new_user_id() for s in SETTINGS}
            ids = {s: [new_conversation_id() for _ in range(count)] for s in SETTINGS}
            samples: Dict[str, Dict[str, List[int]]] = {
                s: {"save_wall": [], "save_cpu": [], "get_wall": [], "get_cpu": []} for s in SETTINGS
            }
            # Warm-up: a few saves and reads per setting, not counted.
            for setting in SETTINGS:
                for conv in conversations[:5]:
                    warm = new_conversation_id()
                    managers[setting].save_conversation(warm, conv, user_id=user[setting])
                    managers[setting].get_conversation(warm, user_id=user[setting])
                    client.delete(f"conv:{user[setting]}:{warm}")
            wall, cpu = time.perf_counter_ns, time.process_time_ns
            for start in range(0, count, CHUNK):
                for setting in SETTINGS:
                    manager, got = managers[setting], samples[setting]
                    for i in range(start, min(start + CHUNK, count)):
                        # The first save of an id also asks PostgreSQL who owns it (and stages the hash
                        # twice): untimed. What is timed is the app's usual save, of a conversation Redis
                        # holds (the same content again, so that every setting's save is one stage).
                        manager.save_conversation(ids[setting][i], conversations[i], user_id=user[setting])
                    for i in range(start, min(start + CHUNK, count)):
                        w0, c0 = wall(), cpu()
                        manager.save_conversation(ids[setting][i], conversations[i], user_id=user[setting])
                        w1, c1 = wall(), cpu()
                        got["save_wall"].append(w1 - w0)
                        got["save_cpu"].append(c1 - c0)
                    for i in range(start, min(start + CHUNK, count)):
                        w0, c0 = wall(), cpu()
                        manager.get_conversation(ids[setting][i], user_id=user[setting])
                        w1, c1 = wall(), cpu()
                        got["get_wall"].append(w1 - w0)
                        got["get_cpu"].append(c1 - c0)
            by_setting: Dict[str, Dict[str, float]] = {}
            for setting in SETTINGS:
                keys = [f"conv:{user[setting]}:{cid}" for cid in ids[setting]]
                memory = [client.memory_usage(key, samples=0) for key in keys]
                field = [client.hstrlen(key, "messages") for key in keys]
                assert manager_reads_back(managers[setting], ids[setting][0], user[setting], conversations[0])
                by_setting[setting] = {
                    "memory_median": statistics.median(memory),
                    "messages_field_median": statistics.median(field),
                    **{f"{name}_p50_us": percentile(v, 50) / 1000 for name, v in samples[setting].items()},
                }
            plain = by_setting["off"]
            for row in by_setting.values():
                row["memory_ratio"] = row["memory_median"] / plain["memory_median"]
                for name in ("save_wall", "save_cpu", "get_wall", "get_cpu"):
                    row[f"{name}_ratio"] = row[f"{name}_p50_us"] / plain[f"{name}_p50_us"]
            results[text][size] = by_setting
        versions = stack.versions()
    finally:
        for m in managers.values():
            m.close()
        stack.remove()

    print(pinning_line(pinning))
    print(f"{count} conversations per text, size and setting; Corpus messages of about 300 characters\n")
    print(
        "| text | messages | setting | Redis memory per conversation (median) | × plain | `messages` field (median) "
        "| save p50 µs (× plain) | save CPU p50 µs (× plain) | Redis hit p50 µs (× plain) | hit CPU p50 µs (× plain) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for text, by_size in results.items():
        for size, by_setting in by_size.items():
            for setting, r in by_setting.items():
                print(
                    f"| {text} | {size} | {setting} | {r['memory_median']:.0f} B | {r['memory_ratio']:.2f} "
                    f"| {r['messages_field_median']:.0f} B "
                    f"| {r['save_wall_p50_us']:.0f} ({r['save_wall_ratio']:.2f}) "
                    f"| {r['save_cpu_p50_us']:.0f} ({r['save_cpu_ratio']:.2f}) "
                    f"| {r['get_wall_p50_us']:.0f} ({r['get_wall_ratio']:.2f}) "
                    f"| {r['get_cpu_p50_us']:.0f} ({r['get_cpu_ratio']:.2f}) |"
                )
    print()
    for text, by_size in results.items():
        for setting, goal in GOALS.items():
            for size, by_setting in by_size.items():
                ratio = by_setting[setting]["memory_ratio"]
                verdict = ("met" if ratio <= goal else "MISSED") if text == "english" else "worst case, no goal"
                print(f"{text}: {setting} <= {goal:.2f}x plain memory at {size} messages: {ratio:.3f} ({verdict})")
    write_report(
        str(RESULTS / "memory.json"),
        {"machine": machine_info(), "versions": versions, "pinning": pinning, "count": count, "results": results},
    )


def manager_reads_back(manager, conversation_id: str, user_id: str, conversation: dict) -> bool:
    """A sanity check that what was measured is what was saved."""
    return manager.get_conversation(conversation_id, user_id=user_id) == conversation


if __name__ == "__main__":
    main()
