"""A seeded, randomized staleness checker for the near cache (docs/design.md, section 10: never stale
beyond Redis's invalidation delay, bounded by the 0.5 s lease).

Four worker processes (near_staleness_worker.py), each with its own manager on one Redis and one
PostgreSQL, share a handful of conversation ids of one user. Each id has one writer, which saves
increasing versions (three processes save through their manager and flush now and then; the fourth
writes like the seed's Python design, a redis-py HSET of the title); every process reads every id
from two threads, and lists the user's conversations now and then (each entry of a manager-written
id is checked like a read). Meanwhile this process kills every tracking connection a few times (CLIENT KILL
TYPE pubsub), so the run crosses resets and reconnects. Every call is logged with its monotonic
start and end (CLOCK_MONOTONIC is one clock for every process on Linux).

The check: no read returns a version older than one whose save completed ALLOWED_DELAY (0.6 s: the
lease plus a margin) before the read began, and none returns a version no save had begun by the
read's end. Reads that were stale within the allowance are measured (how long before the read the
newer version had been saved) and the worst and median are printed.

    NEAR_CHECK_SEED     the seed (default 20261130; printed; it decides each thread's choices and the kill schedule,
                        not the interleaving)
    NEAR_CHECK_SECONDS  how long the workload runs (default 30)
"""

from __future__ import annotations

import bisect
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from support.near_support import ALLOWED_DELAY
from support.redis_support import make_conversation, redis_client, script_env

SEED = int(os.environ.get("NEAR_CHECK_SEED", "20261130"))
SECONDS = float(os.environ.get("NEAR_CHECK_SECONDS", "30"))
WORKER = Path(__file__).with_name("near_staleness_worker.py")
PROCESSES = 4  # the last one writes with redis-py HSET
IDS_PER_WRITER = 2
READERS = 2
# Seconds a writer waits between its saves (uniform): about 50 writes/s in all, reads outnumbering them
# as in a chat app, so copies live long enough to be served (and to be served stale, if they could be).
WRITE_PAUSE = (0.02, 0.15)
LIST_SHARE = 0.2  # of the reader threads' calls, lists (checked per entry) instead of reads


def check(ops_by_process: dict[int, list], allowed: float) -> tuple[list[str], dict]:
    """Anomalies and figures of a run's log (see the module docstring)."""
    saves: dict[str, list[tuple[float, int]]] = {}  # id -> [(end, version)], completed saves
    started: dict[str, list[tuple[float, int]]] = {}  # id -> [(start, version)], every save attempt
    reads = []
    errors = Counter()
    for process, ops in ops_by_process.items():
        for kind, cid, version, t0, t1 in ops:
            if kind == "save":
                saves.setdefault(cid, []).append((t1, version))
                started.setdefault(cid, []).append((t0, version))
            elif kind in ("read", "list"):
                reads.append((process, kind, cid, version, t0, t1))
            elif kind.startswith("error:"):
                errors[kind.split(":")[1] + ":" + kind.split(":")[2]] += 1
                if kind.startswith("error:save"):
                    started.setdefault(cid, []).append((t0, version))
    for table in (saves, started):
        for entries in table.values():
            entries.sort()

    def prefix_max(entries: list[tuple[float, int]]) -> tuple[list[float], list[int]]:
        """(instants, the highest version at or before each) for a bisect."""
        instants, best, top = [], [], -1
        for instant, version in entries:
            top = max(top, version)
            instants.append(instant)
            best.append(top)
        return instants, best

    completed_max = {cid: prefix_max(entries) for cid, entries in saves.items()}
    started_max = {cid: prefix_max(entries) for cid, entries in started.items()}

    def newest(table: dict, cid: str, instant: float, *, inclusive: bool = False) -> int:
        instants, best = table.get(cid, ([], []))
        i = (bisect.bisect_right if inclusive else bisect.bisect_left)(instants, instant)
        return best[i - 1] if i else -1

    def newest_completed_before(cid: str, instant: float) -> int:
        return newest(completed_max, cid, instant)

    def first_completion_above(cid: str, version: int) -> float:
        for t1, v in saves.get(cid, []):
            if v > version:
                return t1
        raise AssertionError("unreachable: a newer version was completed")

    anomalies, delays = [], []
    for process, kind, cid, version, t0, t1 in reads:
        if version is None:
            anomalies.append(f"STALE seed={SEED} process {process} {kind} {cid}: missing at {t0:.3f}")
            continue
        required = newest_completed_before(cid, t0 - allowed)
        if version < required:
            newer_at = first_completion_above(cid, version)
            anomalies.append(
                f"STALE seed={SEED} process {process} {kind} {cid} at [{t0:.3f}, {t1:.3f}] got v{version}; "
                f"v{required} had been saved by {t0 - allowed:.3f} (a newer version than v{version} since "
                f"{newer_at:.3f}, {t0 - newer_at:.3f}s before the read began)"
            )
            continue
        if version < newest_completed_before(cid, t0):
            delays.append(t0 - first_completion_above(cid, version))
        if version > max(0, newest(started_max, cid, t1, inclusive=True)):
            anomalies.append(
                f"FUTURE seed={SEED} process {process} {kind} {cid} at [{t0:.3f}, {t1:.3f}] got v{version}, "
                f"which no save had begun by then"
            )
    figures = {
        "reads": sum(1 for r in reads if r[1] == "read"),
        "list_entries": sum(1 for r in reads if r[1] == "list"),
        "saves": sum(len(v) for v in saves.values()),
        "stale_within_allowance": len(delays),
        "worst_delay_ms": round(max(delays) * 1000, 2) if delays else 0.0,
        "median_delay_ms": round(statistics.median(delays) * 1000, 2) if delays else 0.0,
        "errors": dict(errors),
    }
    return anomalies, figures


def test_check_finds_a_stale_read():
    """The checker itself: a read of v1 long after v2 was saved is an anomaly; one just after is a delay."""
    ops = {
        0: [["save", "a", 1, 0.0, 0.1], ["save", "a", 2, 1.0, 1.1]],
        1: [["read", "a", 1, 1.15, 1.16], ["list", "a", 1, 1.8, 1.81], ["read", "a", 3, 2.0, 2.01]],
    }
    anomalies, figures = check(ops, allowed=0.6)
    assert len(anomalies) == 2 and anomalies[0].startswith("STALE") and anomalies[1].startswith("FUTURE"), anomalies
    assert figures["stale_within_allowance"] == 1 and figures["worst_delay_ms"] == pytest.approx(50, abs=0.01)


@pytest.mark.slow
@pytest.mark.timeout(int(SECONDS) + 120)
def test_no_read_is_staler_than_the_lease(make_redis_server, make_redis_manager, pg_url, user_id, tmp_path):
    server = make_redis_server()
    client = redis_client(server.url)
    setup = make_redis_manager(redis_url=server.url)
    created_at = make_conversation(0)["created_at"]
    writers = {p: [f"5a1e{p:01x}{j:03x}" for j in range(IDS_PER_WRITER)] for p in range(PROCESSES)}
    writers[PROCESSES - 1] = writers[PROCESSES - 1][:1]  # the redis-py writer: one id
    all_ids = [cid for ids in writers.values() for cid in ids]
    listed_ids = [cid for p in range(PROCESSES - 1) for cid in writers[p]]
    for cid in all_ids:
        setup.save_conversation(
            cid,
            {**make_conversation(0), "title": "v0", "created_at": created_at, "last_modified": created_at},
            user_id=user_id,
        )
    setup.flush_dirty_conversations()

    start_at = time.monotonic() + 6  # the processes start and warm up meanwhile
    procs = []
    for p in range(PROCESSES):
        config = {
            "index": p, "seed": SEED, "user": user_id, "pg_url": pg_url, "redis_url": server.url,
            "write_ids": writers[p], "read_ids": all_ids, "versions": {cid: 0 for cid in writers[p]},
            "raw": p == PROCESSES - 1, "readers": READERS, "created_at": created_at, "write_pause": WRITE_PAUSE,
            "list_share": LIST_SHARE, "list_ids": listed_ids,
            "start_at": start_at, "seconds": SECONDS, "log": str(tmp_path / f"ops-{p}.json"),
        }  # fmt: skip
        (tmp_path / f"config-{p}.json").write_text(json.dumps(config))
        err = open(tmp_path / f"err-{p}.txt", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"config-{p}.json")],
                                       env=script_env(), stdout=err, stderr=err), err))  # fmt: skip

    kills: list[tuple[float, int]] = []
    stop = threading.Event()

    def killer() -> None:
        rng = random.Random(f"{SEED}/kills")
        time.sleep(max(0.0, start_at - time.monotonic()))
        while not stop.wait(rng.uniform(2.0, 6.0)):
            if time.monotonic() > start_at + SECONDS - 1:
                return
            killed = int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
            kills.append((round(time.monotonic() - start_at, 2), killed))

    killing = threading.Thread(target=killer, daemon=True)
    killing.start()
    problems = []
    for p, (proc, err) in enumerate(procs):
        try:
            code = proc.wait(timeout=max(0.0, start_at + SECONDS - time.monotonic()) + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            problems.append(f"HUNG seed={SEED} process {p} did not finish")
        err.close()
        if code != 0:
            problems.append(f"process {p} exited {code}:\n{(tmp_path / f'err-{p}.txt').read_text()[-3000:]}")
    stop.set()
    killing.join(timeout=10)
    assert not problems, "\n".join(problems)

    ops_by_process, near = {}, {}
    for p in range(PROCESSES):
        data = json.loads((tmp_path / f"ops-{p}.json").read_text())
        ops_by_process[p] = data["ops"]
        near[p] = data["near"]
        problems += [f"HUNG seed={SEED} process {p} thread {name}" for name in data["hung"]]
    anomalies, figures = check(ops_by_process, ALLOWED_DELAY)
    hits = sum(n["near_cache_hits"] for n in near.values())
    resets = {p: n["near_cache_resets"] for p, n in near.items()}
    summary = (
        f"near staleness: seed={SEED} seconds={SECONDS:g} processes={PROCESSES} reads={figures['reads']} "
        f"list_entries={figures['list_entries']} "
        f"saves={figures['saves']} near_hits={hits} stale_within_{ALLOWED_DELAY}s={figures['stale_within_allowance']} "
        f"worst_delay={figures['worst_delay_ms']}ms median_delay={figures['median_delay_ms']}ms "
        f"kills(t, killed)={kills} resets={resets} errors={figures['errors']}"
    )
    print("\n" + summary)
    assert not problems, "\n".join(problems)
    assert not anomalies, (
        f"{len(anomalies)} anomalies (replay the plan with NEAR_CHECK_SEED={SEED} NEAR_CHECK_SECONDS={SECONDS:g}):\n"
        + "\n".join(anomalies[:20])
        + "\n"
        + summary
    )
    # The run exercised what it claims to: copies served, tracking lost and regained in every process.
    assert hits > figures["reads"] // 4, f"the near cache served few reads: {summary}"
    assert kills and all(killed >= PROCESSES for _, killed in kills), f"a kill found no tracking connection: {summary}"
    assert all(n >= len(kills) for n in resets.values()), f"a process missed a reset: {summary}"
    assert not figures["errors"], f"calls failed: {summary}"
