"""A seeded, randomized fault checker (model-based, Jepsen-style) for the Redis tier (SPEC sections 4, 5, 7).

Servers of its own: a redis-server with AOF (fsync always) and a maxmemory a "fill" fault can exhaust, behind a
TcpProxy; a PostgreSQL cluster with synchronous_commit=on. Clients: worker threads in this process on two
managers (two app instances), a worker subprocess with its own manager, an intruder worker that tries other
users' ids, and a standalone flusher subprocess (`chat-history flush --loop`). A scheduler meanwhile cuts,
stalls and partitions Redis, kills and restarts it, fills its memory, stops and kills PostgreSQL, and SIGKILLs
the flusher (see chaos_workload.py for the workload).

At the end every fault is healed, everything is flushed until the dirty set is empty, and the history is
checked:
    1. every message of every acknowledged save is retrievable: in its owner's conversation, or in a
       `conversation_conflicts` row of that id and user (SPEC 4.9), unless a later acknowledged delete removed it;
    2. no conversation whose last acknowledged op was a delete exists;
    3. no read or list ever returned another user's data, and no user's save of another user's live id was
       acknowledged;
    4. no call took longer than HUNG_SECONDS, and no worker hung;
    and no call failed with anything but "unavailable" (an owner refused its own id, say).

    CHAOS_SEED     the seed (printed with every anomaly; the fault sequence and each worker's choices follow
                   from it; timings do not, so a rerun explores the same plan, not the same interleaving)
    CHAOS_SECONDS  how long the workload runs (default 45: the whole test takes about 70-90 s)

`make soak` runs it for 600 s and prints the summary: ops per kind, faults per kind, anomalies per kind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import pytest

import redis
from chaos_support import conflict_copies, durable_postgres, durable_redis
import chaos_workload
from chaos_workload import INTRUDER_INDEX, Op, Worker, op_from_json
from redis_support import dirty_set, redis_client, script_env
from servers import ServerError, canonical, create_database, find_pg_bindir
from tcp_proxy import TcpProxy

SEED = int(os.environ.get("CHAOS_SEED", "20261129"))
SECONDS = float(os.environ.get("CHAOS_SECONDS", "45"))
HUNG_SECONDS = 30.0
FAULT_WEIGHTS = {
    "redis-partition": 3,
    "redis-stall": 2,
    "redis-cut": 2,
    "redis-restart": 2,
    "redis-oom": 2,
    "pg-stop": 2,
    "pg-kill": 2,
    "flusher-kill": 3,
}
MANAGER_KWARGS = {"redis_timeout": 0.5, "postgres_connect_timeout": 2.0}
EXPECTED_ERRORS = ("UnavailableError",)  # a call may fail while a server is away, with this error only


# --------------------------------------------------------------------------------------------------
# The world: servers, proxy, flusher
# --------------------------------------------------------------------------------------------------


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pg = durable_postgres()
        self.pg.start()
        self.pg_params = create_database(self.pg.params)
        self.redis = durable_redis("--maxmemory", "24mb", "--maxmemory-policy", "volatile-lru")
        self.redis.start()
        self.direct = redis_client(self.redis.url)
        self.proxy = TcpProxy(self.redis.port)
        self.redis_url = self.proxy.url()
        self.flusher: Optional[subprocess.Popen] = None
        self.flusher_log = open(tmp / "flusher.log", "ab")  # noqa: SIM115 - closed in close()
        self.fillers = 0

    # -- flusher -----------------------------------------------------------------------------------------

    def start_flusher(self) -> None:
        cmd = [
            sys.executable, "-m", "chat_history_rs", "flush", "--loop", "--interval", "0.5",
            "--database-url", self.pg_params.url, "--redis-url", self.redis_url, "--connect-timeout", "2",
        ]  # fmt: skip
        self.flusher = subprocess.Popen(cmd, env=script_env(), stdout=self.flusher_log, stderr=self.flusher_log)

    def kill_flusher(self) -> None:
        if self.flusher is not None and self.flusher.poll() is None:
            self.flusher.send_signal(signal.SIGKILL)
            self.flusher.wait(timeout=30)
        self.flusher = None

    def stop_flusher(self) -> Optional[int]:
        """SIGTERM (final flush, then exit); SIGKILL after 40 s. Returns the exit code."""
        if self.flusher is None:
            return None
        self.flusher.send_signal(signal.SIGTERM)
        try:
            code = self.flusher.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.flusher.kill()
            code = self.flusher.wait()
        self.flusher = None
        return code

    # -- faults ----------------------------------------------------------------------------------------

    def fill_redis(self) -> bool:
        """Keys without a TTL (never evicted under volatile-lru) until Redis refuses writes (OOM)."""
        try:
            for _ in range(2000):
                self.direct.set(f"chaos:filler:{self.fillers}", b"f" * 100_000)
                self.fillers += 1
        except redis.exceptions.ResponseError as exc:
            return "maxmemory" in str(exc) or "OOM" in str(exc)
        except redis.exceptions.ConnectionError:
            return False
        return False

    def free_redis(self) -> None:
        names = [f"chaos:filler:{n}" for n in range(self.fillers)]
        for start in range(0, len(names), 500):
            self.direct.delete(*names[start : start + 500])
        self.fillers = 0

    def heal(self) -> None:
        self.proxy.heal()
        if not self.redis.is_running():
            self.redis.start()
        if self.fillers:
            self.free_redis()
        if not self.pg.is_running():
            self.pg.start()

    def close(self) -> None:
        self.kill_flusher()
        self.flusher_log.close()
        self.proxy.close()
        self.direct.close()
        self.redis.remove()
        self.pg.remove()


class Scheduler(threading.Thread):
    """Injects one fault at a time, drawn from the seed (every kind once first): apply, hold, heal, pause."""

    def __init__(self, world: World, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.world = world
        self.rng = random.Random(f"{seed}/faults")
        self.stop_event = stop
        self.log: list[tuple[float, float, str, str]] = []  # (start, end, kind, detail)
        self.errors: list[str] = []

    def _hold(self, low: float, high: float) -> float:
        seconds = low + self.rng.random() * (high - low)
        self.stop_event.wait(seconds)
        return seconds

    def run(self) -> None:
        kinds = list(FAULT_WEIGHTS)
        weights = list(FAULT_WEIGHTS.values())
        first_round = self.rng.sample(kinds, len(kinds))  # every kind once (in a seeded order), then at random
        self._hold(1.0, 2.0)
        while not self.stop_event.is_set():
            kind = first_round.pop() if first_round else self.rng.choices(kinds, weights=weights)[0]
            start = time.time()
            try:
                detail = self.inject(kind)
            except (ServerError, OSError, redis.exceptions.RedisError, subprocess.SubprocessError) as exc:
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                detail = f"fault tool failed: {exc}"
                try:
                    self.world.heal()
                except (ServerError, OSError, redis.exceptions.RedisError) as heal_exc:
                    self.errors.append(f"heal after {kind}: {heal_exc}")
            self.log.append((start, time.time(), kind, detail))
            self._hold(0.3, 2.0)

    def inject(self, kind: str) -> str:
        w = self.world
        if kind == "redis-partition":
            w.proxy.partition()
            held = self._hold(0.5, 3.0)
            w.proxy.heal()
        elif kind == "redis-stall":
            w.proxy.stall()
            held = self._hold(0.3, 2.0)
            # The stalled requests are dropped, not delivered late: a request that timed out and was then
            # answered by PostgreSQL instead must not also land in Redis seconds later (a fault class of its
            # own, left out here; see tests/faults/test_faults.py for late delivery).
            w.proxy.cut()
            w.proxy.heal()
        elif kind == "redis-cut":
            w.proxy.cut()
            held = 0.0
        elif kind == "redis-restart":
            w.redis.kill()
            held = self._hold(0.2, 2.0)
            w.redis.start()
        elif kind == "redis-oom":
            if not w.fill_redis():
                w.free_redis()
                return "could not fill Redis (not reachable?)"
            held = self._hold(0.5, 3.0)
            w.free_redis()
        elif kind == "pg-stop":
            w.pg.stop("fast")
            held = self._hold(0.5, 3.0)
            w.pg.start()
        elif kind == "pg-kill":
            w.pg.kill()
            held = self._hold(0.2, 2.0)
            w.pg.start()
        elif kind == "flusher-kill":
            w.kill_flusher()
            held = self._hold(0.0, 2.0)
            w.start_flusher()
        else:  # pragma: no cover - FAULT_WEIGHTS lists the kinds
            raise AssertionError(kind)
        return f"held {held:.2f}s"


# --------------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------------


def _message_key(message: dict) -> tuple:
    """(role, content, instant): times compared as instants, whatever their ISO form."""
    try:
        at = canonical(str(message.get("time")))
    except ValueError:
        at = str(message.get("time"))
    return (message.get("role"), message.get("content"), at)


def _describe(op: Op) -> str:
    outcome = "ok" if op.ok else f"FAILED {op.error}"
    extra = f" ({op.note})" if op.note else ""
    size = f" {op.size} msgs" if op.size is not None else ""
    return f"{op.kind}{size} [{op.t0:.3f}s..{op.t1:.3f}s] by {op.worker}: {outcome}{extra}"


def _faults_during(faults, t0: float, t1: float) -> list[str]:
    return [f"{kind} [{s:.3f}s..{e:.3f}s]" for s, e, kind, _ in faults if s <= t1 and e >= t0]


def check_history(ops: list[Op], final: dict, conflicts: dict, pg_rows: dict, faults, seed: int) -> list[str]:
    """The anomalies of a history. final[(user, cid)]: the owner's get_conversation at the end (None: none);
    conflicts[(user, cid)]: messages of its conflict copies; pg_rows[cid]: the user owning the PostgreSQL row."""
    anomalies: list[str] = []
    by_conv: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind in ("get", "save", "rename", "delete"):
            by_conv[(op.user, op.cid)].append(op)
    for history in by_conv.values():
        history.sort(key=lambda o: o.t0)

    for (user, cid), history in sorted(by_conv.items()):
        acked_deletes = [o for o in history if o.kind == "delete" and o.ok]
        failed_deletes = [o for o in history if o.kind == "delete" and not o.ok]
        current = final.get((user, cid))
        kept = conflicts.get((user, cid), [])
        # 1. every acknowledged message is retrievable unless a later acknowledged delete removed it. A save
        # records the messages acknowledged for the first time; the tab never saves after an acknowledged
        # delete, so "a delete after the first save holding it" is "a delete after every save holding it".
        available = {_message_key(m) for pool in ([current["messages"]] if current else []) + kept for m in pool}
        lost: dict[tuple, Op] = {}
        for save in (o for o in history if o.kind in ("save", "rename") and o.ok):
            if any(d.t0 >= save.t1 for d in acked_deletes):
                continue
            for role, content, at in save.saved:
                if _message_key({"role": role, "content": content, "time": at}) not in available:
                    lost.setdefault((role, content, at), save)
        if lost:
            first = min(lost.values(), key=lambda o: o.t0)
            after_failed_delete = any(d.t0 >= first.t1 for d in failed_deletes)
            example = next(iter(lost))
            around = _faults_during(faults, first.t0 - 3, first.t1 + 10)
            at = history.index(first)
            timeline = "\n      ".join(_describe(o) for o in history[max(0, at - 3) : at + 9])
            anomalies.append(
                f"LOST seed={seed} user={user} id={cid}: {len(lost)} acknowledged message(s) are neither in the "
                f"conversation nor in a conflict copy; first acknowledged by {_describe(first)}"
                f"{' (a delete that raised came later: deletes must be all or nothing)' if after_failed_delete else ''}"
                f"\n    expected e.g. {example}\n    got: "
                f"{'no conversation' if current is None else str(len(current['messages'])) + ' messages'}, "
                f"{len(kept)} conflict copies\n    faults around: {around[:6]}"
                f"\n    history from there:\n      {timeline}"
            )
        # 2. a deleted conversation never comes back.
        if acked_deletes:
            last = max(acked_deletes, key=lambda o: o.t0)
            later = [o for o in history if o.kind in ("save", "rename") and o.t0 > last.t0]
            if not later and (current is not None or pg_rows.get(cid) == user):
                at = history.index(last)
                timeline = "\n      ".join(_describe(o) for o in history[max(0, at - 6) : at + 3])
                anomalies.append(
                    f"RESURRECTED seed={seed} user={user} id={cid}: deleted by {_describe(last)}, yet "
                    f"get_conversation -> "
                    f"{'None' if current is None else str(len(current['messages'])) + ' messages'}, "
                    f"PostgreSQL row owner -> {pg_rows.get(cid)}"
                    f"\n    faults around: {_faults_during(faults, last.t0 - 5, last.t1 + 10)[:6]}"
                    f"\n    history up to the delete:\n      {timeline}"
                )

    # 3. no save of another user's live id is acknowledged.
    owners_by_id: dict[str, list[tuple[str, list[Op]]]] = defaultdict(list)
    for (user, cid), history in by_conv.items():
        owners_by_id[cid].append((user, history))
    for op in ops:
        if op.kind != "intrude-save" or not op.ok:
            continue
        for owner, history in owners_by_id.get(op.cid, []):
            held = any(o.kind in ("save", "rename") and o.ok and o.t1 < op.t0 for o in history)
            deleted = any(o.kind == "delete" and o.ok and o.t0 < op.t1 for o in history)
            raised = any(o.kind == "delete" and not o.ok and o.t0 < op.t1 for o in history)
            if held and not deleted:
                anomalies.append(
                    f"CLAIMED seed={seed} id={op.cid}: {op.user}'s save of {owner}'s live conversation was "
                    f"acknowledged [{op.t0:.3f}s..{op.t1:.3f}s]"
                    f"{' (after a delete of it that raised: deletes must be all or nothing)' if raised else ''}; "
                    f"faults then: {_faults_during(faults, op.t0 - 2, op.t1)}"
                )

    # 4. no call hung; and every failure is "unavailable", never a refusal of the user's own id.
    for op in ops:
        if op.t1 - op.t0 > HUNG_SECONDS:
            anomalies.append(f"SLOW seed={seed} {op.user} {op.cid}: {_describe(op)} took {op.t1 - op.t0:.1f}s")
        if op.ok:
            continue
        if op.kind.startswith("intrude"):
            if op.error_type not in EXPECTED_ERRORS + ("OwnershipError",):
                anomalies.append(f"ERROR seed={seed} intruder {op.user} id={op.cid}: {_describe(op)}")
            continue
        if (
            op.kind == "flush"
            and "OOM" in (op.error or "")
            and any(kind == "redis-oom" and s <= op.t1 and e >= op.t0 for s, e, kind, _ in faults)
        ):
            continue  # a flush cannot settle while Redis refuses writes; test_faults.py accepts any error here
        if op.error_type not in EXPECTED_ERRORS:
            anomalies.append(
                f"ERROR seed={seed} user={op.user} id={op.cid}: {_describe(op)}; faults then: "
                f"{_faults_during(faults, op.t0, op.t1)}"
            )
    return anomalies


def _final_state(manager, conn, ops: list[Op]):
    final, conflicts = {}, {}
    keys = {(op.user, op.cid) for op in ops if op.kind in ("save", "rename", "delete", "get")}
    errors = []
    for user, cid in sorted(keys):
        try:
            final[(user, cid)] = manager.get_conversation(cid, user_id=user)
        except Exception as exc:  # noqa: BLE001 - reported as an anomaly, with the id
            errors.append(f"FINAL-READ {user} {cid}: {type(exc).__name__}: {exc}")
            final[(user, cid)] = None
        conflicts[(user, cid)] = conflict_copies(conn, cid, user)
    with conn.cursor() as cur:
        cur.execute("SELECT conversation_id, user_client_id FROM conversations")
        pg_rows = dict(cur.fetchall())
    return final, conflicts, pg_rows, errors


def _summary(counts: Counter, faults, anomalies: list[str], seed: int, seconds: float, observations: Counter) -> str:
    per_kind: dict[str, Counter] = defaultdict(Counter)
    for (kind, ok), n in counts.items():
        per_kind[kind]["ok" if ok else "failed"] += n
    total = sum(counts.values())
    lines = [f"chaos: seed={seed} run={seconds:.0f}s (workload {SECONDS:g}s, then heal, drain, check) calls={total}"]
    for kind in sorted(per_kind):
        lines.append(f"  op {kind:15} ok={per_kind[kind]['ok']:6} failed={per_kind[kind]['failed']:6}")
    for kind, n in sorted(Counter(kind for _, _, kind, _ in faults).items()):
        lines.append(f"  fault {kind:15} {n}")
    for kind, n in sorted(observations.items()):
        lines.append(f"  observed {kind}: {n}")
    by_kind = Counter(a.split(" ", 1)[0] for a in anomalies)
    lines.append(f"  anomalies: {len(anomalies)} {dict(by_kind)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(int(SECONDS) + 300)
def test_randomized_faults_lose_leak_and_hang_nothing(tmp_path):
    if find_pg_bindir() is None:
        pytest.skip("PostgreSQL binaries not found: the checker needs a private cluster to stop and kill")
    import uuid

    run = uuid.uuid4().hex[:6]
    users = [f"chaos-{run}-user{n}" for n in range(4)]
    intruder_user = f"chaos-{run}-intruder"
    world = World(tmp_path)
    managers: list = []
    try:
        anomalies, summary = _run(world, tmp_path, managers, users, intruder_user)
    finally:
        for manager in managers:  # before the servers go: close() flushes
            manager.close()
        world.close()
    print(summary)
    for anomaly in anomalies:
        print(anomaly)
    print(summary)  # again, after the details
    # The first anomaly of each kind, then the rest: one kind must not hide the others.
    firsts = list({a.split(" ", 1)[0]: a for a in reversed(anomalies)}.values())[::-1]
    ordered = firsts + [a for a in anomalies if a not in firsts]
    assert anomalies == [], (
        f"{len(anomalies)} anomalies (reproduce with CHAOS_SEED={SEED} CHAOS_SECONDS={SECONDS:g}):\n"
        + summary
        + "\n"
        + "\n".join(ordered[:25])
    )


def _run(world: World, tmp_path: Path, managers: list, users: list[str], intruder_user: str):
    from chat_history_rs import ChatHistoryManager

    def make_manager(**kwargs):
        managers.append(ChatHistoryManager(**kwargs))
        return managers[-1]

    common = dict(mode="postgres", connection_string=world.pg_params.url, redis_enabled=True,
                  redis_connection_string=world.redis_url, **MANAGER_KWARGS)  # fmt: skip
    app_a = make_manager(**common, background_flush=True, flush_interval=1.0)
    app_b = make_manager(**common, background_flush=False)
    workers = [
        Worker("t0", 0, app_a, users, SEED),
        Worker("t1", 1, app_b, users, SEED),
        Worker("t2", 2, app_b, users, SEED),
        Worker("intruder", INTRUDER_INDEX, app_a, [intruder_user], SEED, intruder=intruder_user),
    ]
    workers[-1].victim_ids = lambda: [
        op.cid for w in workers[:-1] for op in w.ops[-200:] if op.kind == "save" and op.ok
    ]
    victim_workers = [0, 1, 2, 3, 4]

    stop_file = tmp_path / "stop"
    log_path = tmp_path / "worker-process.jsonl"
    config = {
        "pg_url": world.pg_params.url,
        "redis_url": world.redis_url,
        "manager_kwargs": {**MANAGER_KWARGS, "background_flush": True, "flush_interval": 1.0},
        "seconds": SECONDS + 5,
        "users": users,
        "seed": SEED,
        "worker_names": ["p3", "p4"],
        "worker_indexes": [3, 4],
        "stop_file": str(stop_file),
        "log_path": str(log_path),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    process_err = open(tmp_path / "worker-process.err", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, chaos_workload.__file__, str(tmp_path / "config.json")],
        env=script_env(), stdout=process_err, stderr=process_err,
    )  # fmt: skip
    world.start_flusher()

    stop = threading.Event()
    deadline = time.time() + SECONDS
    threads = [
        threading.Thread(target=w.run, args=(stop, deadline, users, victim_workers), daemon=True) for w in workers
    ]
    scheduler = Scheduler(world, SEED, stop)
    started = time.time()
    for thread in threads:
        thread.start()
    scheduler.start()
    while time.time() < deadline:
        time.sleep(0.2)
    stop.set()
    stop_file.touch()
    scheduler.join(timeout=60)
    if scheduler.is_alive():
        raise AssertionError(f"the fault scheduler did not finish its last fault within 60 s: {scheduler.log[-3:]}")

    anomalies: list[str] = []
    for worker, thread in zip(workers, threads):
        thread.join(timeout=HUNG_SECONDS + 10)
        if thread.is_alive():
            anomalies.append(
                f"HUNG seed={SEED} worker {worker.name}: still in a call {HUNG_SECONDS + 10:.0f}s after stop"
            )
    try:
        process_code = process.wait(timeout=HUNG_SECONDS + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        process_code = process.wait()
        anomalies.append(f"HUNG seed={SEED} the worker process did not finish")
    process_err.close()

    # Heal everything, stop the flusher (its final flush), close the apps (theirs), then drain what is left.
    world.heal()
    flusher_code = world.stop_flusher()
    ops: list[Op] = [op for w in workers for op in list(w.ops)]
    live = [a for w in workers for a in w.live_anomalies]
    counts: Counter = Counter()
    for worker in workers:
        counts.update(worker.counts)
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    for line in lines:
        data = json.loads(line)
        if "live_anomalies" in data:
            live += data["live_anomalies"]
            counts.update({(kind, ok): n for kind, ok, n in data["counts"]})
            anomalies += [f"HUNG seed={SEED} worker-process thread {name}" for name in data["hung"]]
        else:
            ops.append(op_from_json(data))
    if not lines:
        anomalies.append(
            f"WORKER-PROCESS seed={SEED} exited {process_code} without a log:\n"
            + (tmp_path / "worker-process.err").read_text(errors="replace")[-3000:]
        )
    anomalies += live
    for manager in (app_a, app_b):
        manager.close()

    checker = make_manager(mode="postgres", connection_string=world.pg_params.url, redis_enabled=True,
                           redis_connection_string=world.redis.url, background_flush=False)  # fmt: skip
    drain_deadline = time.monotonic() + 30
    last_drain_error = None
    while dirty_set(world.direct) and time.monotonic() < drain_deadline:
        try:
            checker.flush_dirty_conversations()
        except Exception as exc:  # noqa: BLE001 - the drain keeps trying until its deadline; reported below
            last_drain_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        else:
            last_drain_error = None
            if dirty_set(world.direct):
                time.sleep(0.2)
    left = sorted(dirty_set(world.direct))
    if left:
        anomalies.append(
            f"UNDRAINED seed={SEED}: {len(left)} conversations still dirty 30 s after every fault healed "
            f"(stuck: {checker.stats()['stuck_conversations'][:10]}, last error: {last_drain_error}): {left[:10]}"
        )

    for op in ops:  # every time printed is seconds since the workload began
        op.t0 -= started
        op.t1 -= started
    faults = [(s - started, e - started, kind, detail) for s, e, kind, detail in scheduler.log]
    conn = world.pg_params.connect()
    try:
        final, conflicts, pg_rows, read_errors = _final_state(checker, conn, ops)
    finally:
        conn.close()
    anomalies += read_errors
    if os.environ.get("CHAOS_DUMP"):  # the whole history, for a closer look at a run
        with open(os.environ["CHAOS_DUMP"], "w") as out:
            json.dump({"seed": SEED, "faults": faults, "ops": [op.__dict__ for op in ops],
                       "final": {f"{u} {c}": v for (u, c), v in final.items()},
                       "conflicts": {f"{u} {c}": v for (u, c), v in conflicts.items() if v}}, out)  # fmt: skip
    anomalies += check_history(ops, final, conflicts, pg_rows, faults, SEED)
    anomalies += [f"FAULT-TOOL seed={SEED} {e}" for e in scheduler.errors]
    if flusher_code not in (0, None, -signal.SIGTERM):
        anomalies.append(f"FLUSHER seed={SEED}: the flush --loop worker exited {flusher_code} on SIGTERM")

    observations = Counter()
    for op in ops:
        if op.note:
            observations[op.note.split(":", 1)[0].split(" after")[0]] += 1
    summary = _summary(counts, faults, anomalies, SEED, time.time() - started, observations)
    total = sum(counts.values())
    assert total > 200, f"the workload barely ran ({total} calls): nothing was tested\n{summary}"
    assert len(scheduler.log) >= 3, f"only {len(scheduler.log)} faults were injected\n{summary}"
    return anomalies, summary


# --------------------------------------------------------------------------------------------------
# The checker can fail: each rule flags a history made to break it
# --------------------------------------------------------------------------------------------------


def _op(kind, user, cid, t0, t1, ok=True, saved=None, error=None, worker="w"):
    return Op(worker, kind, user, cid, t0, t1, ok, error, saved)


def test_checker_flags_every_kind_of_anomaly():
    m = [
        ["user", "<u> c1 turn 1 user", "2025-11-26T00:00:00+00:00"],
        ["assistant", "<u> c1 a", "2025-11-26T00:00:01+00:00"],
    ]
    fresh = [["user", "<u> c1 turn 2 user", "2025-11-26T00:00:02+00:00"]]
    ops = [
        _op("save", "u", "c1", 1.0, 1.1, saved=m),  # its messages vanish: LOST
        _op("save", "u", "c1", 2.0, 2.1, saved=fresh),
        _op("save", "u", "c2", 1.0, 1.1, saved=m),
        _op("delete", "u", "c2", 3.0, 3.1),  # still there at the end: RESURRECTED
        _op("save", "u", "c3", 1.0, 1.1, saved=m),
        _op("intrude-save", "x", "c3", 2.0, 2.1, saved=fresh),  # acknowledged over a live id: CLAIMED
        _op("get", "u", "c3", 4.0, 4.0 + HUNG_SECONDS + 1),  # SLOW
        _op("save", "u", "c3", 5.0, 5.1, ok=False, error="OwnershipError: belongs to another user"),  # ERROR
        _op("save", "u", "c4", 1.0, 1.1, saved=m),  # kept aside in a conflict copy: fine
        _op("save", "u", "c4", 2.0, 2.1, saved=fresh),
        _op("save", "u", "c5", 1.0, 1.1, saved=m),  # deleted later on purpose: fine
        _op("delete", "u", "c5", 2.0, 2.1),
    ]

    def conv(saved):
        return {"title": "t", "model": "m", "messages": [{"role": r, "content": c, "time": t} for r, c, t in saved],
                "created_at": "2025-11-26T00:00:00+00:00", "last_modified": "2025-11-26T00:00:00+00:00"}  # fmt: skip

    final = {("u", "c1"): conv(fresh), ("u", "c2"): conv(m), ("u", "c3"): conv(m), ("u", "c4"): conv(fresh),
             ("u", "c5"): None}  # fmt: skip
    conflicts = {("u", "c4"): [conv(m)["messages"]]}
    anomalies = check_history(ops, final, conflicts, {"c2": "u"}, [], seed=1)
    kinds = sorted(a.split(" ", 1)[0] for a in anomalies)
    assert kinds == ["CLAIMED", "ERROR", "LOST", "RESURRECTED", "SLOW"], anomalies
    assert "id=c1" in next(a for a in anomalies if a.startswith("LOST"))
