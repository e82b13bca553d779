"""One process of the near cache's staleness checker (test_near_staleness.py); not a test module.

`python near_staleness_worker.py CONFIG.json` opens its own manager and, from config["start_at"]
(time.monotonic(), which is CLOCK_MONOTONIC and so shared by every process of the machine) for
config["seconds"], runs:

    a writer thread   saves version n+1 of one of its own ids (title "v<n>", a message naming n),
                      one at a time, each id's versions increasing; now and then it flushes.
                      With config["raw"], it writes like the seed's Python design instead: a
                      redis-py HSET of the title field of the conversation hash.
    reader threads    read random ids of every process and note the version each read returned;
                      now and then (config["list_share"]) list the user's conversations instead and
                      note the version (title) of each id in config["list_ids"] the list holds (the
                      ids saved through managers: a redis-py HSET of a hash is not in the list).

Every call is logged as [kind, id, version, start, end] (monotonic seconds; version None for a read
of nothing or a failure, kind "error:<what>" for a call that raised) and written to config["log"] as
JSON at the end, with the near cache's figures.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time


def conversation(created_at: str, n: int) -> dict:
    return {
        "title": f"v{n}",
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "the question", "time": created_at},
            {"role": "assistant", "content": f"version {n}", "time": created_at},
        ],
        "created_at": created_at,
        "last_modified": created_at,
    }


def version_of(found) -> int | None:
    if found is None:
        return None
    title = found["title"]
    assert title.startswith("v"), title
    return int(title[1:])


def main(config_path: str) -> int:
    from chat_history_rs import ChatHistoryManager

    with open(config_path) as f:
        config = json.load(f)
    index = config["index"]
    user = config["user"]
    manager = ChatHistoryManager(
        mode="postgres",
        connection_string=config["pg_url"],
        redis_enabled=True,
        redis_connection_string=config["redis_url"],
        background_flush=False,
    )
    log: list[list] = []
    lock = threading.Lock()
    start_at, end_at = config["start_at"], config["start_at"] + config["seconds"]

    def record(entry: list) -> None:
        with lock:
            log.append(entry)

    def writer() -> None:
        rng = random.Random(f"{config['seed']}/writer/{index}")
        versions = dict(config["versions"])  # id -> the version saved before the run
        raw = None
        if config["raw"]:
            import redis

            raw = redis.Redis.from_url(config["redis_url"], decode_responses=True, socket_timeout=10)
        saves = 0
        while time.monotonic() < end_at:
            cid = rng.choice(config["write_ids"])
            n = versions[cid] + 1
            versions[cid] = n
            t0 = time.monotonic()
            try:
                if raw is not None:
                    raw.hset(f"conv:{user}:{cid}", "title", f"v{n}")
                else:
                    manager.save_conversation(cid, conversation(config["created_at"], n), user_id=user)
                record(["save", cid, n, t0, time.monotonic()])
            except Exception as exc:  # noqa: BLE001 - logged: it may or may not have been applied
                record([f"error:save:{type(exc).__name__}:{exc}", cid, n, t0, time.monotonic()])
            saves += 1
            if raw is None and saves % 25 == 0:
                t0 = time.monotonic()
                try:
                    manager.flush_dirty_conversations()
                    record(["flush", None, None, t0, time.monotonic()])
                except Exception as exc:  # noqa: BLE001
                    record([f"error:flush:{type(exc).__name__}:{exc}", None, None, t0, time.monotonic()])
            time.sleep(rng.uniform(config["write_pause"][0], config["write_pause"][1]))

    def reader(number: int) -> None:
        rng = random.Random(f"{config['seed']}/reader/{index}/{number}")
        while time.monotonic() < end_at:
            if rng.random() < config["list_share"]:
                t0 = time.monotonic()
                try:
                    listed = dict(manager.list_conversations(user))
                    t1 = time.monotonic()
                    for cid in config["list_ids"]:
                        record(["list", cid, version_of(listed.get(cid)), t0, t1])
                except Exception as exc:  # noqa: BLE001
                    record([f"error:list:{type(exc).__name__}:{exc}", None, None, t0, time.monotonic()])
                continue
            cid = rng.choice(config["read_ids"])
            t0 = time.monotonic()
            try:
                found = manager.get_conversation(cid, user_id=user)
                record(["read", cid, version_of(found), t0, time.monotonic()])
            except Exception as exc:  # noqa: BLE001
                record([f"error:read:{type(exc).__name__}:{exc}", cid, None, t0, time.monotonic()])
            time.sleep(rng.uniform(0, 0.002))

    # Warm up before the start: tracking on, so the run measures the near cache, not its start.
    deadline = time.monotonic() + 10
    while not manager.stats()["near_cache_tracking"] and time.monotonic() < deadline:
        time.sleep(0.01)
    threads = [threading.Thread(target=writer, daemon=True)]
    threads += [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(config["readers"])]
    time.sleep(max(0.0, start_at - time.monotonic()))
    for thread in threads:
        thread.start()
    hung = []
    for thread in threads:
        thread.join(timeout=max(1.0, end_at - time.monotonic()) + 30)
        if thread.is_alive():
            hung.append(thread.name)
    stats = manager.stats()
    near = {key: value for key, value in stats.items() if key.startswith("near_cache_")}
    with lock:
        entries = list(log)
    with open(config["log"], "w") as f:
        json.dump({"index": index, "ops": entries, "near": near, "hung": hung}, f)
    manager.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
