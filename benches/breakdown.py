"""Where a call's time goes: a save, a cache miss and a Redis hit of 20 messages, split into parts.

    .venv/bin/python benches/breakdown.py            # about 2 minutes
    .venv/bin/python benches/breakdown.py --quick    # a smoke run: few iterations, noisy numbers

Ours only (no reference), in one process pinned to one CPU with its servers, like run.py:
`ChatHistoryManager(mode="postgres", ..., redis_enabled=True, ..., background_flush=False)`.
Operations, each on a 20-message conversation of app-shaped data (benches/README.md):
- `save20`: the same conversation re-saved with a new last message each time (run.py's save);
- `save20_new`: the first save of a fresh id (the same user each time), which asks PostgreSQL
  who owns the id;
- `miss20`: saved and flushed; before each read its Redis hash `conv:<user>:<id>` is deleted
  (untimed, by a separate redis-py client);
- `hit20`: a Redis hit with the near cache off (`near_cache_bytes=0`);
- `near_hit20`: the default manager's second read, answered by the near cache.

Four passes per operation, each after its own warm-up:
1. timing: p50/p95 of the call alone (`time.perf_counter_ns`), with Redis `INFO commandstats`
   (reset first: the scripts' µs per call inside Redis) and `pg_stat_statements` (the statements and
   their time inside PostgreSQL) over the same loop; the bare round-trip floors (redis-py PING,
   psycopg2 SELECT 1) in the same run;
2. counts (needs strace): the loop under `strace -f -yy`, the sockets named by their endpoints, so
   the round trips of the calling thread to each server are counted, not guessed (a round trip: a
   send after the socket last received), and Redis's SLOWLOG with a 0 µs threshold names every
   command each connection sent and how long Redis ran it;
3. CPU split (needs perf): `perf record -a` on the pinned CPU with the monotonic clock, keeping only
   the samples inside the timed calls' windows: what the CPU did during the call, by process (ours,
   redis-server, postgres, idle, anything else) and, for ours, by symbol group;
4. ownership: the owner check of the save script (GET and SET of `owner:<id>`) timed inside Redis
   by the same commands in a script of their own against an empty script, and the first save of a
   fresh id (which asks PostgreSQL) against a re-save.

Prints Markdown tables and writes benches/results/breakdown.json. A pass whose tool is missing
(strace, perf, the pg_stat_statements library) is skipped with a note. Not a test: nothing asserted.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import psycopg2
import redis

import chat_history_rs
import common
from common import (
    RESULTS,
    ROOT,
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
mono_ns = time.monotonic_ns  # CLOCK_MONOTONIC, the clock `perf record -k CLOCK_MONOTONIC` stamps samples with
HARNESS_NAME = "bench-harness"
SCRIPTS_DIR = ROOT / "src" / "cache" / "scripts"
MARK_START, MARK_END = b"CHR-BREAKDOWN-START", b"CHR-BREAKDOWN-END"

# (timed, warm-up) per pass; counts: calls under strace; perf: calls under perf (a near hit takes
# ~4 µs, so it needs many calls for enough samples inside the windows).
ITERATIONS = {
    "full": {"timing": (3000, 300), "counts": 300, "perf": {"slow": 3000, "fast": 20000, "near": 100000}},
    "quick": {"timing": (300, 30), "counts": 50, "perf": {"slow": 400, "fast": 2000, "near": 10000}},
}


# --------------------------------------------------------------------------------------------------
# Servers: the harness's, with pg_stat_statements preloaded when the library is there
# --------------------------------------------------------------------------------------------------


class TracedStack(Stack):
    """common.Stack, with PostgreSQL started with `shared_preload_libraries=pg_stat_statements` when
    the library is installed (contrib), so statements are counted by the server."""

    def __init__(self) -> None:
        super().__init__()
        lib = Path(self.pg.bindir).parent / "lib" / "pg_stat_statements.so"
        self.pg_stat_statements = lib.exists()
        if self.pg_stat_statements:
            self.pg.settings["shared_preload_libraries"] = "pg_stat_statements"
            self.pg.settings["pg_stat_statements.max"] = "1000"


def script_names() -> Dict[str, str]:
    """EVALSHA's SHA-1 -> the script's file name (the extension embeds each file as is)."""
    names = {}
    for path in sorted(SCRIPTS_DIR.glob("*.lua")):
        names[hashlib.sha1(path.read_bytes()).hexdigest()] = path.stem
    return names


# --------------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------------

corpus = Corpus()


@dataclass
class Op:
    key: str
    label: str
    before: Callable[[], None]  # untimed, before each call
    call: Callable[[], object]  # the timed call
    perf_size: str  # "slow", "fast" or "near": how many calls the perf pass makes
    manager: object = None  # the manager the call goes through (its stats() after each pass)


def make_ops(near, far, harness: redis.Redis) -> List[Op]:
    ops: List[Op] = []

    # save20: run.py's prepare_save
    user, cid = new_user_id(), new_conversation_id()
    conv = corpus.conversation(20)
    base = conv["messages"][:-1]
    near.save_conversation(cid, conv, user_id=user)

    def before_save(conv=conv, base=base) -> None:
        conv["messages"] = base + [corpus.message(19)]
        conv["last_modified"] = now_iso()

    ops.append(
        Op(
            "save20",
            "save, 20 messages (new last message)",
            before_save,
            lambda c=cid, v=conv, u=user: near.save_conversation(c, v, user_id=u),
            "slow",
            near,
        )  # fmt: skip
    )

    # save20_new: a fresh id each time, one user (who has dirty conversations already)
    new_user = new_user_id()
    near.save_conversation(new_conversation_id(), corpus.conversation(20), user_id=new_user)
    fresh = {"cid": "", "conv": corpus.conversation(20)}

    def before_new(fresh=fresh) -> None:
        fresh["cid"] = new_conversation_id()
        fresh["conv"]["last_modified"] = now_iso()

    ops.append(
        Op(
            "save20_new",
            "save, 20 messages, new id (first save)",
            before_new,
            lambda f=fresh, u=new_user: near.save_conversation(f["cid"], f["conv"], user_id=u),
            "slow",
            near,
        )  # fmt: skip
    )

    # miss20: saved and flushed; the hash deleted before each read
    miss_user, miss_cid = new_user_id(), new_conversation_id()
    near.save_conversation(miss_cid, corpus.conversation(20), user_id=miss_user)
    near.flush_dirty_conversations()
    miss_key = f"conv:{miss_user}:{miss_cid}"
    harness.delete(miss_key)
    got = near.get_conversation(miss_cid, user_id=miss_user)
    if got is None or len(got["messages"]) != 20 or not harness.exists(miss_key):
        raise RuntimeError("a miss does not read PostgreSQL and cache the conversation again")
    ops.append(
        Op(
            "miss20",
            "get, cache miss, 20 messages",
            lambda k=miss_key: harness.delete(k),
            lambda c=miss_cid, u=miss_user: near.get_conversation(c, user_id=u),
            "slow",
            near,
        )  # fmt: skip
    )

    # hit20 (near cache off) and near_hit20: saved, flushed, read once
    hit_user, hit_cid = new_user_id(), new_conversation_id()
    near.save_conversation(hit_cid, corpus.conversation(20), user_id=hit_user)
    near.flush_dirty_conversations()
    for manager in (near, far):
        got = manager.get_conversation(hit_cid, user_id=hit_user)
        if got is None or len(got["messages"]) != 20:
            raise RuntimeError("a saved conversation does not read back")
    ops.append(
        Op(
            "hit20",
            "get, Redis hit (near cache off), 20 messages",
            lambda: None,
            lambda c=hit_cid, u=hit_user: far.get_conversation(c, user_id=u),
            "fast",
            far,
        )  # fmt: skip
    )
    ops.append(
        Op(
            "near_hit20",
            "get, near-cache hit, 20 messages",
            lambda: None,
            lambda c=hit_cid, u=hit_user: near.get_conversation(c, user_id=u),
            "near",
            near,
        )  # fmt: skip
    )
    return ops


def run_loop(op: Op, n: int, windows: Optional[List[Tuple[int, int]]] = None) -> List[int]:
    """n calls, each after its untimed `before`; returns the durations (ns). With `windows`, also
    appends each call's (start, end) on CLOCK_MONOTONIC."""
    before, call = op.before, op.call
    samples = []
    if windows is None:
        for _ in range(n):
            before()
            t0 = perf_ns()
            call()
            samples.append(perf_ns() - t0)
    else:
        for _ in range(n):
            before()
            m0 = mono_ns()
            t0 = perf_ns()
            call()
            t1 = perf_ns()
            m1 = mono_ns()
            samples.append(t1 - t0)
            windows.append((m0, m1))
    return samples


# --------------------------------------------------------------------------------------------------
# Server-side counters
# --------------------------------------------------------------------------------------------------


def commandstats(client: redis.Redis) -> Dict[str, Dict[str, float]]:
    return {k.removeprefix("cmdstat_"): v for k, v in client.info("commandstats").items()}


class PgStats:
    """pg_stat_statements, for one database (the product's)."""

    def __init__(self, stack: TracedStack, database_url: str) -> None:
        self.enabled = stack.pg_stat_statements
        self.conn = None
        if not self.enabled:
            return
        self.conn = psycopg2.connect(database_url)
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            cur.execute("SELECT oid FROM pg_database WHERE datname = current_database()")
            self.dbid = cur.fetchone()[0]

    def reset(self) -> None:
        if self.conn is not None:
            with self.conn.cursor() as cur:
                cur.execute("SELECT pg_stat_statements_reset()")

    def read(self) -> Dict[str, Dict[str, float]]:
        """query text -> calls, exec ms, plan ms; the product's database only, without this
        harness's own queries."""
        if self.conn is None:
            return {}
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT query, calls, total_exec_time, total_plan_time FROM pg_stat_statements"
                " WHERE dbid = %s AND query NOT LIKE '%%pg_stat_statements%%'",
                (self.dbid,),
            )
            out: Dict[str, Dict[str, float]] = {}
            for query, calls, exec_ms, plan_ms in cur.fetchall():
                text = " ".join(query.split())
                entry = out.setdefault(text, {"calls": 0, "exec_ms": 0.0, "plan_ms": 0.0})
                entry["calls"] += calls
                entry["exec_ms"] += exec_ms
                entry["plan_ms"] += plan_ms or 0.0
            return out

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def statement_kind(query: str) -> str:
    """A short name for a statement: its first words and the table it touches."""
    words = query.split()
    head = words[0].upper() if words else "?"
    tables = re.findall(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+([a-z_][a-z_0-9.]*)", query, re.IGNORECASE)
    return f"{head} {','.join(dict.fromkeys(tables))}".strip()


def pass_timing(op: Op, iterations: int, warmup: int, harness: redis.Redis, pg: PgStats) -> Dict[str, object]:
    run_loop(op, warmup)
    harness.config_resetstat()
    pg.reset()
    t0 = time.monotonic()
    samples = run_loop(op, iterations)
    elapsed = time.monotonic() - t0
    stats = commandstats(harness)
    statements = pg.read()
    out: Dict[str, object] = {**summary_us(samples), "loop_seconds": round(elapsed, 3)}
    evalsha = stats.get("evalsha")
    if evalsha:
        out["evalsha_per_call"] = evalsha["calls"] / iterations
        out["evalsha_us_per_invocation"] = evalsha["usec_per_call"]
    out["redis_commandstats_per_call"] = {
        name: round(s["calls"] / iterations, 3) for name, s in sorted(stats.items()) if s["calls"] >= iterations / 20
    }
    out["pg_statements"] = {
        q: {
            "calls_per_call": s["calls"] / iterations,
            "exec_us_per_statement": 1000 * s["exec_ms"] / s["calls"] if s["calls"] else 0.0,
            "plan_us_per_statement": 1000 * s["plan_ms"] / s["calls"] if s["calls"] else 0.0,
        }
        for q, s in statements.items()
    }
    return out


# --------------------------------------------------------------------------------------------------
# Counts: strace for round trips, SLOWLOG for the commands each connection sent
# --------------------------------------------------------------------------------------------------

SYSCALLS = "sendto,recvfrom,sendmsg,recvmsg,write,read,writev,readv"
SEND = {"sendto", "sendmsg", "write", "writev"}
LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<name>\w+)\((?P<fd>\d+)<(?P<rest>.*)$")
RESUMED = re.compile(r"^(?P<tid>\d+)\s+<\.\.\. (?P<name>\w+) resumed>.*=\s*(?P<ret>-?\d+)")
RETURN = re.compile(r"=\s*(?P<ret>-?\d+)(?:\s+\w+.*)?$")
TCP = re.compile(r"TCP:\[(?P<local>[\d.]+:\d+)->(?P<peer>[\d.]+:\d+)\]>")


def parse_strace(path: str, main_tid: int) -> Tuple[List[dict], bool]:
    """The socket syscalls between the start and end markers: (tid, name, local, peer, ret)."""
    events: List[dict] = []
    pending: Dict[int, dict] = {}
    inside, saw_end = False, False
    with open(path, errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if MARK_START.decode() in line:
                inside = True
                continue
            if MARK_END.decode() in line:
                saw_end = True
                break
            if not inside:
                continue
            resumed = RESUMED.match(line)
            if resumed:
                event = pending.pop(int(resumed["tid"]), None)
                if event is not None:
                    event["ret"] = int(resumed["ret"])
                    events.append(event)
                continue
            m = LINE.match(line)
            if not m:
                continue
            tcp = TCP.match(m["rest"])
            if not tcp:
                continue
            event = {
                "tid": int(m["tid"]),
                "main": int(m["tid"]) == main_tid,
                "name": m["name"],
                "local": tcp["local"],
                "peer": tcp["peer"],
            }
            if "<unfinished ...>" in m["rest"]:
                pending[event["tid"]] = event
                continue
            ret = RETURN.search(m["rest"])
            event["ret"] = int(ret["ret"]) if ret else -1
            events.append(event)
    return events, saw_end


def round_trips(events: List[dict], who_of: Callable[[dict], str]) -> Dict[Tuple[str, str], Dict[str, int]]:
    """Per (socket, who): round trips (a send after the socket last received something, or the
    first send), and the sends and receives that moved bytes. `who_of` names the side of an event
    (the call's thread, a background thread, the harness): a pooled connection may carry both."""
    out: Dict[Tuple[str, str], Dict[str, int]] = {}
    for e in events:
        key = (f"{e['local']}->{e['peer']}", who_of(e))
        s = out.setdefault(key, {"round_trips": 0, "sends": 0, "recvs": 0, "received_since_send": 1})
        if e["name"] in SEND:
            if e["ret"] > 0:
                s["sends"] += 1
                if s["received_since_send"]:
                    s["round_trips"] += 1
                    s["received_since_send"] = 0
        elif e["ret"] > 0:
            s["recvs"] += 1
            s["received_since_send"] = 1
    return out


def client_names(client: redis.Redis) -> Dict[str, str]:
    """Redis's view of its clients: 'ip:port' -> name ('' when unnamed)."""
    return {c["addr"]: c.get("name", "") for c in client.client_list()}


def slowlog_all(client: redis.Redis) -> List[dict]:
    """Every SLOWLOG entry, oldest first: duration (µs), arguments, client address."""
    entries = client.execute_command("SLOWLOG", "GET", "-1")
    out = []
    for entry in reversed(entries):
        # [id, timestamp, duration µs, [args...], client addr, client name]
        args = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in entry[3]]
        addr = entry[4] if len(entry) > 4 else ""
        addr = addr.decode() if isinstance(addr, bytes) else str(addr)
        out.append({"us": int(entry[2]), "args": args, "addr": addr})
    return out


def command_label(args: List[str], scripts: Dict[str, str]) -> str:
    name = args[0].upper() if args else "?"
    if name == "EVALSHA" and len(args) > 1:
        return f"EVALSHA {scripts.get(args[1], args[1][:8])}.lua"
    return name


# A MONITOR client in a process of its own: one line per command, "<client>\t<command args>", where
# <client> is "lua" for a command a script ran. SLOWLOG cannot tell those apart (Redis 7 logs a
# script's commands too, under its caller's address); MONITOR can.
MONITOR_CHILD = r"""
import sys, redis
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]))
with r.monitor() as m, open(sys.argv[2], "w") as out:
    print("ready", flush=True)
    for c in m.listen():
        who = "lua" if c.get("client_type") == "lua" else f"{c.get('client_address')}:{c.get('client_port')}"
        out.write(who + "\t" + c.get("command", "") + "\n")
        out.flush()
        if "CHR-BREAKDOWN-END" in c.get("command", ""):
            break
"""


def read_monitor(path: str) -> List[Tuple[str, List[str]]]:
    """(client, args) between the markers the harness ECHOes."""
    out, inside = [], False
    with open(path, errors="replace") as f:
        for line in f:
            who, _, command = line.rstrip("\n").partition("\t")
            if MARK_START.decode() in command:
                inside = True
                continue
            if MARK_END.decode() in command:
                break
            if inside:
                # redis-py's Monitor gives the arguments space-separated, each quoted when it has spaces
                name = command.split(" ", 1)[0].strip('"').upper()
                sha = command.split(" ", 2)[1].strip('"') if name == "EVALSHA" and " " in command else ""
                out.append((who, [name, sha] if sha else [name]))
    return out


def pass_counts(
    op: Op, calls: int, harness: redis.Redis, pg: PgStats, stack: TracedStack, scripts: Dict[str, str]
) -> Dict[str, object]:
    """The loop under strace (round trips per socket and thread), with Redis's MONITOR (the commands
    each client sent) and SLOWLOG at 0 µs (how long Redis ran each), and pg_stat_statements."""
    strace = shutil.which("strace")
    run_loop(op, 20)
    # Background traffic (the change feed's poll, the tracker's heartbeats) is measured idle first.
    idle_seconds = 1.0
    pg.reset()
    time.sleep(idle_seconds)
    idle_statements = pg.read()

    # How long Redis runs each command, from SLOWLOG at 0 µs, in a loop of its own: MONITOR (below)
    # makes Redis format every command for it, which would count in their times.
    harness.config_set("slowlog-log-slower-than", 0)
    harness.config_set("slowlog-max-len", 200000)
    harness.slowlog_reset()
    run_loop(op, calls)
    log = slowlog_all(harness)
    harness.config_set("slowlog-log-slower-than", 10000)
    harness.slowlog_reset()
    devnull = os.open(os.devnull, os.O_WRONLY)
    tmp = tempfile.mkdtemp(prefix="chr-breakdown-")
    trace_path = os.path.join(tmp, "strace.txt")
    monitor_path = os.path.join(tmp, "monitor.txt")
    proc = None
    strace_note = "strace not found: round trips not counted"
    monitor = subprocess.Popen(
        [sys.executable, "-c", MONITOR_CHILD, str(stack.redis.port), monitor_path], stdout=subprocess.PIPE, text=True
    )
    try:
        if monitor.stdout.readline().strip() != "ready":
            raise RuntimeError("the MONITOR client did not start")
        if strace:
            proc = subprocess.Popen(
                [strace, "-f", "-yy", "-s", "32", "-e", f"trace={SYSCALLS}", "-e", "signal=none",
                 "-o", trace_path, "-p", str(os.getpid())],
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            # Wait until strace says it attached ("Process N attached with M threads").
            line = proc.stderr.readline()
            if "attached" not in line:
                proc.kill()
                proc.wait()
                proc = None
                strace_note = f"strace could not attach ({line.strip()[:200]}): round trips not counted"
            time.sleep(0.2)
        pg.reset()
        harness.echo(MARK_START)
        t0 = time.monotonic()
        os.write(devnull, MARK_START)
        run_loop(op, calls)
        os.write(devnull, MARK_END)
        elapsed = time.monotonic() - t0
        harness.echo(MARK_END)
        statements = pg.read()
        names = client_names(harness)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            monitor.wait(timeout=10)
        except subprocess.TimeoutExpired:
            monitor.kill()
        os.close(devnull)

    out: Dict[str, object] = {"calls": calls, "seconds": round(elapsed, 3)}
    redis_port = f"127.0.0.1:{stack.redis.port}"
    pg_port = f"127.0.0.1:{stack.pg.port}"
    main_tid = os.getpid()
    if proc is not None:
        events, complete = parse_strace(trace_path, main_tid=main_tid)

        def who_of(e: dict) -> str:
            if e["peer"] == redis_port and names.get(e["local"], "") == HARNESS_NAME:
                return "harness (redis-py)"
            return "the call" if e["tid"] == main_tid else "background threads"

        per_server: Dict[str, Dict[str, float]] = {}
        for (sock, who), s in round_trips(events, who_of).items():
            peer = sock.split("->")[1]
            server = "redis" if peer == redis_port else "postgres" if peer == pg_port else f"other {peer}"
            entry = per_server.setdefault(f"{server}: {who}", {"round_trips": 0, "sends": 0, "recvs": 0, "sockets": 0})
            for k in ("round_trips", "sends", "recvs"):
                entry[k] += s[k]
            entry["sockets"] += 1
        out["round_trips_per_call"] = {
            k: {m: (v[m] / calls if m != "sockets" else v[m]) for m in v} for k, v in sorted(per_server.items())
        }
        out["strace_complete"] = complete
        if not complete:
            out["note"] = "strace's trace did not hold both markers: round trips not counted"
            out["round_trips_per_call"] = None
    else:
        out["round_trips_per_call"] = None
        out["note"] = strace_note

    # The commands each client sent itself (MONITOR), and how long Redis ran each (SLOWLOG): a
    # command a script also runs is told apart by its arguments only for the staging HSET (the one
    # that carries the transcript); other such commands get no time.
    sent = read_monitor(monitor_path)
    shutil.rmtree(tmp, ignore_errors=True)
    in_scripts = {args[0] for who, args in sent if who == "lua"}
    durations: Dict[str, List[int]] = {}
    for entry in log:
        if not entry["args"] or names.get(entry["addr"], "") == HARNESS_NAME:
            continue
        name = entry["args"][0].upper()
        if name == "HSET" and "messages" in entry["args"]:
            durations.setdefault("HSET", []).append(entry["us"])
        elif name not in in_scripts and name != "EVALSHA":
            durations.setdefault(name, []).append(entry["us"])
    commands: Dict[str, Dict[str, float]] = {}
    for who_addr, args in sent:
        if who_addr == "lua":
            continue
        name = names.get(who_addr, "")
        who = "harness" if name == HARNESS_NAME else f"background ({name})" if name else "call"
        c = commands.setdefault(f"{who}: {command_label(args, scripts)}", {"count": 0, "name": args[0]})
        c["count"] += 1
    out["redis_commands_per_call"] = {
        k: {
            "per_call": v["count"] / calls,
            "us_inside_redis": (
                sum(durations[v["name"]]) / len(durations[v["name"]])
                if v["name"] in durations and not k.startswith("harness")
                else None
            ),
        }
        for k, v in sorted(commands.items())
    }
    out["redis_commands_run_by_scripts_per_call"] = sum(1 for who, _ in sent if who == "lua") / calls
    # PostgreSQL statements per call, less the rate the same statements ran at while idle.
    pg_out = {}
    for q, s in statements.items():
        idle = idle_statements.get(q, {}).get("calls", 0) * elapsed / idle_seconds
        per_call = max(0.0, (s["calls"] - idle) / calls)
        pg_out[q] = {
            "per_call": round(per_call, 3),
            "background_per_second": round(idle_statements.get(q, {}).get("calls", 0) / idle_seconds, 2),
        }
    out["pg_statements_per_call"] = pg_out
    return out


# --------------------------------------------------------------------------------------------------
# CPU split: perf record on the pinned CPU, samples inside the timed windows
# --------------------------------------------------------------------------------------------------

PERF_LINE = re.compile(
    r"^\s*(?P<comm>.+?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s+(?P<time>\d+\.\d+):\s+(?:\d+\s+\S+:\s+)?"
    r"(?P<ip>[0-9a-f]+)\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$"
)

# Our process's groups, first match wins: (group, substrings of the symbol).
RUST_GROUPS: List[Tuple[str, Tuple[str, ...]]] = [
    ("fork gate (process::CallGuard)", ("process::CallGuard", "process::before_fork", "FORK_GENERATION")),
    ("tainted/seen maps (cached::tainted, cached::seen)", ("cached::tainted", "cached::seen")),
    ("hashing (xxhash, content_sig, fingerprints)", ("xxh", "content_sig", "prefix_fingerprints", "fingerprint")),
    ("near cache (cache::near, cache::tracking)", ("cache::near", "cache::tracking")),
    ("Python<->Rust conversion (bindings::convert)", ("bindings::convert",)),
    (
        "JSON encode/parse (messages_json, serde_json, codec)",
        ("messages_json", "serde_json", "codec::stage", "CachedConversation", "cache::codec", "ListEntry"),
    ),
    ("Redis client (redis, combine, pool)", ("redis::", "combine::", "cache::pool", "r2d2", "cache::redis")),
    ("PostgreSQL client (postgres, tokio)", ("postgres", "tokio", "bytes::")),
    ("pyo3 glue (arguments, GIL hand-off)", ("pyo3",)),
]
CPYTHON_OBJECTS = re.compile(
    r"dict|Dict|unicode|Unicode|list|List|tuple|Tuple|_Py_Dealloc|PyObject_Malloc|PyObject_Free|"
    r"pymalloc|_PyObject_GC|gc_|PyLong|long_|PyMem|object_dealloc|subtype_dealloc|_PyObject_New"
)
CPYTHON_GIL = re.compile(r"take_gil|drop_gil|PyEval_SaveThread|PyEval_RestoreThread|PyGILState")
LIBC_MEMORY = re.compile(r"malloc|free|realloc|calloc|memcpy|memmove|memset|memcmp|_int_|tcache|mem\w*_avx|strlen")
GROUP_ORDER = [
    "Python<->Rust conversion (bindings::convert)",
    "CPython objects (dicts/strings built, read, freed)",
    "JSON encode/parse (messages_json, serde_json, codec)",
    "hashing (xxhash, content_sig, fingerprints)",
    "near cache (cache::near, cache::tracking)",
    "fork gate (process::CallGuard)",
    "tainted/seen maps (cached::tainted, cached::seen)",
    "Redis client (redis, combine, pool)",
    "PostgreSQL client (postgres, tokio)",
    "pyo3 glue (arguments, GIL hand-off)",
    "CPython GIL release/reacquire",
    "CPython interpreter (the call, the loop around it)",
    "libc malloc/free/memcpy (callers unknown)",
    "rest of the extension (manager, validation, keys, cached tier)",
    "rest of our process (libc, other)",
    "kernel, in our process (syscalls, loopback TCP, scheduling)",
    "our background threads (change feed, tracker)",
    "redis-server (user + kernel)",
    "postgres (user + kernel)",
    "idle (waiting, nothing runnable)",
    "other processes (perf, the machine's other work)",
]


def classify(sample: dict, our_pid: int, main_tid: int) -> str:
    pid, tid, comm, sym, dso = sample["pid"], sample["tid"], sample["comm"], sample["sym"], sample["dso"]
    if pid == 0:
        return "idle (waiting, nothing runnable)"
    if pid != our_pid:
        if comm.startswith("redis-server") or "redis-server" in dso:
            return "redis-server (user + kernel)"
        if comm.startswith("postgres") or "/postgres" in dso:
            return "postgres (user + kernel)"
        return "other processes (perf, the machine's other work)"
    if tid != main_tid:
        return "our background threads (change feed, tracker)"
    if "kernel" in dso or dso.startswith("[") and dso != "[unknown]":
        return "kernel, in our process (syscalls, loopback TCP, scheduling)"
    if "_core" in dso:
        for group, needles in RUST_GROUPS:
            if any(n in sym for n in needles):
                return group
        return "rest of the extension (manager, validation, keys, cached tier)"
    if "python" in dso or "libpython" in dso:
        if CPYTHON_GIL.search(sym):
            return "CPython GIL release/reacquire"
        if CPYTHON_OBJECTS.search(sym):
            return "CPython objects (dicts/strings built, read, freed)"
        return "CPython interpreter (the call, the loop around it)"
    if "libc" in dso and LIBC_MEMORY.search(sym):
        return "libc malloc/free/memcpy (callers unknown)"
    return "rest of our process (libc, other)"


class PerfRecord:
    """`perf record` of the given CPUs on CLOCK_MONOTONIC, started disabled and switched on and off
    through its control FIFO (each switch acknowledged), so sampling is surely on for the loop."""

    def __init__(self, perf: str, cpus: str, freq: int, tmp: str) -> None:
        self.data = os.path.join(tmp, "perf.data")
        ctl, ack = os.path.join(tmp, "ctl"), os.path.join(tmp, "ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        cmd = [perf, "record", "-q", "-F", str(freq), "-k", "CLOCK_MONOTONIC", "-o", self.data]
        cmd += ["-D", "-1", "--control", f"fifo:{ctl},{ack}"]
        cmd += ["-a"] if cpus == "all" else ["-C", cpus]

        def unpin() -> None:  # perf runs on any CPU, so less of its own work lands on the pinned one
            try:
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
            except OSError:
                pass

        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=unpin
        )
        # perf opens both FIFOs once it runs; until then a writer cannot open the control FIFO.
        deadline = time.monotonic() + 30
        while True:
            try:
                self.ctl = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise OSError(f"perf record did not start: {self.proc.stderr.read().strip()[:300]}") from None
                time.sleep(0.05)
        os.set_blocking(self.ctl, True)
        self.ack = os.open(ack, os.O_RDONLY)

    def switch(self, on: bool) -> None:
        os.write(self.ctl, b"enable\n" if on else b"disable\n")
        os.read(self.ack, 16)

    def stop(self) -> bool:
        os.close(self.ctl)
        os.close(self.ack)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return False


def pass_perf(op: Op, calls: int, freq: int, cpus: str, p50_us: float) -> Dict[str, object]:
    perf = shutil.which("perf") or ("/usr/bin/perf" if os.path.exists("/usr/bin/perf") else None)
    if perf is None:
        return {"note": "perf not found: no CPU split"}
    tmp = tempfile.mkdtemp(prefix="chr-breakdown-perf-")
    data = os.path.join(tmp, "perf.data")
    run_loop(op, max(20, calls // 20))
    try:
        rec = PerfRecord(perf, cpus, freq, tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return {"note": f"perf record could not start: {e}"}
    windows: List[Tuple[int, int]] = []
    rec.switch(True)
    run_loop(op, calls, windows)
    rec.switch(False)
    if not rec.stop():
        shutil.rmtree(tmp, ignore_errors=True)
        return {"note": "perf record did not stop"}
    script = subprocess.run(
        [perf, "script", "-i", data, "-F", "comm,pid,tid,time,ip,sym,dso", "--ns"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)
    # Typical calls only: a call preempted by another process or a background thread's turn would
    # weigh in by its length otherwise. Not a percentile: a sample's own interrupt lengthens the
    # call it lands in by a few µs, which for a 4 µs call would put every sampled call in the tail.
    cutoff = 3 * sorted(b - a for a, b in windows)[len(windows) // 2] + 20_000
    kept = [w for w in windows if w[1] - w[0] <= cutoff]
    starts = [w[0] for w in kept]
    our_pid = os.getpid()
    groups: Dict[str, int] = {}
    symbols: Dict[str, int] = {}
    others: Dict[str, int] = {}
    background: Dict[str, int] = {}  # samples of our background threads, by thread name
    background_symbols: Dict[str, int] = {}
    total = 0
    parsed = 0
    for line in script.stdout.splitlines():
        m = PERF_LINE.match(line)
        if not m:
            continue
        parsed += 1
        secs, _, frac = m["time"].partition(".")
        t = int(secs) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
        i = bisect.bisect_right(starts, t) - 1
        if i < 0 or t > kept[i][1]:
            continue
        sample = {"pid": int(m["pid"]), "tid": int(m["tid"]), "comm": m["comm"], "sym": m["sym"], "dso": m["dso"]}
        group = classify(sample, our_pid, our_pid)
        groups[group] = groups.get(group, 0) + 1
        if sample["pid"] == our_pid:
            key = f"{sample['sym'] or '?'} ({os.path.basename(sample['dso'])})"
            symbols[key] = symbols.get(key, 0) + 1
        if group.startswith("our background"):
            background[sample["comm"]] = background.get(sample["comm"], 0) + 1
            key = f"{sample['comm']}: {sample['sym'] or '?'} ({os.path.basename(sample['dso'])})"
            background_symbols[key] = background_symbols.get(key, 0) + 1
        elif group.startswith("other"):
            others[sample["comm"]] = others.get(sample["comm"], 0) + 1
        total += 1
    if total == 0:
        return {"note": f"no perf samples inside the calls ({parsed} parsed)"}
    window_us = sum(b - a for a, b in kept) / 1000 / len(kept)
    ours = sum(n for g, n in groups.items() if not g.startswith(("redis-server", "postgres", "idle", "other")))
    return {
        "calls": calls,
        "samples_in_calls": total,
        "samples_in_our_process": ours,
        "windows_kept": len(kept),
        "mean_call_us_under_perf": round(window_us, 2),
        "groups": {
            g: {
                "samples": groups.get(g, 0),
                "share": groups.get(g, 0) / total,
                "us_at_p50": groups.get(g, 0) / total * p50_us,
            }
            for g in GROUP_ORDER
        },
        "top_symbols_ours": dict(sorted(symbols.items(), key=lambda kv: -kv[1])[:25]),
        "other_processes": dict(sorted(others.items(), key=lambda kv: -kv[1])[:10]),
        "background_threads": dict(sorted(background.items(), key=lambda kv: -kv[1])),
        "top_symbols_background": dict(sorted(background_symbols.items(), key=lambda kv: -kv[1])[:25]),
    }


# --------------------------------------------------------------------------------------------------
# The owner check
# --------------------------------------------------------------------------------------------------


OWNER_CHECK = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def owner_check_in_redis(harness: redis.Redis, iterations: int) -> Dict[str, float]:
    """The save script's owner check (GET the record, compare, SET it) as a script of its own,
    against an empty script, each timed by Redis's SLOWLOG: what the check adds inside Redis."""
    empty = harness.script_load("return 1")
    check = harness.script_load(OWNER_CHECK)
    harness.set("owner:breakdown-probe", "bench-user")
    harness.config_set("slowlog-log-slower-than", 0)
    harness.config_set("slowlog-max-len", 200000)
    try:
        harness.slowlog_reset()
        for _ in range(iterations):
            harness.evalsha(empty, 0)
            harness.evalsha(check, 1, "owner:breakdown-probe", "bench-user")
        log = slowlog_all(harness)
    finally:
        harness.config_set("slowlog-log-slower-than", 10000)
        harness.slowlog_reset()
        harness.delete("owner:breakdown-probe")
    by_sha: Dict[str, List[int]] = {empty: [], check: []}
    for entry in log:
        if len(entry["args"]) > 1 and entry["args"][0].upper() == "EVALSHA" and entry["args"][1] in by_sha:
            by_sha[entry["args"][1]].append(entry["us"])
    e = sum(by_sha[empty]) / max(1, len(by_sha[empty]))
    c = sum(by_sha[check]) / max(1, len(by_sha[check]))
    return {"empty_script_us": e, "owner_check_script_us": c, "owner_check_us": c - e, "n": len(by_sha[check])}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def f1(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2f}"


def print_tables(report: Dict[str, object]) -> None:
    ops: Dict[str, dict] = report["ops"]
    keys = list(ops)
    floor = report["network_floor"]
    print("\n### Wall time\n")
    print("| operation | p50 (µs) | p95 (µs) | p50 ÷ Redis PING | p50 ÷ PostgreSQL SELECT 1 |")
    print("|---|---:|---:|---:|---:|")
    for k in keys:
        t = ops[k]["timing"]
        print(
            f"| {ops[k]['label']} | {f1(t['p50_us'])} | {f1(t['p95_us'])}"
            f" | {t['p50_us'] / floor['redis_ping']['p50_us']:.1f}"
            f" | {t['p50_us'] / floor['pg_select1']['p50_us']:.1f} |"
        )
    print(
        f"| floor: Redis PING (redis-py) | {f1(floor['redis_ping']['p50_us'])}"
        f" | {f1(floor['redis_ping']['p95_us'])} | 1 | — |"
    )
    print(
        f"| floor: PostgreSQL SELECT 1 (psycopg2) | {f1(floor['pg_select1']['p50_us'])}"
        f" | {f1(floor['pg_select1']['p95_us'])} | — | 1 |"
    )

    print("\n### Round trips and server time per call\n")
    print("| operation | Redis round trips | Redis commands sent (µs inside Redis each) | PostgreSQL round trips"
          " | PostgreSQL statements (µs inside PostgreSQL each) |")  # fmt: skip
    print("|---|---:|---|---:|---|")
    for k in keys:
        counts = ops[k].get("counts") or {}
        rt = counts.get("round_trips_per_call")
        counted = rt is not None  # counted, and a socket the call never used made no round trip
        rt = rt or {}
        redis_rt = rt.get("redis: the call", {}).get("round_trips", 0 if counted else None)
        pg_rt = rt.get("postgres: the call", {}).get("round_trips", 0 if counted else None)
        evalsha_us = ops[k]["timing"].get("evalsha_us_per_invocation")
        cmds = [
            f"{name.split(': ', 1)[1]} ×{v['per_call']:.2f}"
            f" ({f1(evalsha_us if name.startswith('call: EVALSHA') else v['us_inside_redis'])})"
            for name, v in (counts.get("redis_commands_per_call") or {}).items()
            if name.startswith("call: ") and v["per_call"] >= 0.05
        ]
        if (counts.get("redis_commands_run_by_scripts_per_call") or 0) >= 0.5:  # not the change feed's
            cmds.append(f"and {counts['redis_commands_run_by_scripts_per_call']:.0f} run by the script")
        timing_pg = ops[k]["timing"].get("pg_statements", {})
        stmts = []
        for q, v in (counts.get("pg_statements_per_call") or {}).items():
            if v["per_call"] >= 0.05:
                exec_us = timing_pg.get(q, {}).get("exec_us_per_statement")
                stmts.append(f"{statement_kind(q)} ×{v['per_call']:.2f} ({f1(exec_us)})")
        print(
            f"| {ops[k]['label']} | {f1(redis_rt) if redis_rt is not None else '—'} | {'; '.join(cmds) or '—'}"
            f" | {f1(pg_rt) if pg_rt is not None else '—'} | {'; '.join(stmts) or '—'} |"
        )
    scripts = [
        (ops[k]["label"], ops[k]["timing"]["evalsha_per_call"], ops[k]["timing"]["evalsha_us_per_invocation"])
        for k in keys
        if ops[k]["timing"].get("evalsha_per_call", 0) >= 0.5  # not the change feed's few scripts
    ]
    if scripts:
        print("\nScripts over the timed loop (`INFO commandstats`, evalsha): " + "; ".join(
            f"{label}: {n:.2f} per call, {us:.1f} µs inside Redis each" for label, n, us in scripts))  # fmt: skip

    with_perf = [k for k in keys if "groups" in (ops[k].get("perf") or {})]
    if with_perf:
        print("\n### Where the call's time goes (perf samples inside the timed calls; µs at the p50, share)\n")
        print("| part | " + " | ".join(ops[k]["label"] for k in with_perf) + " |")
        print("|---|" + "---:|" * len(with_perf))
        for g in GROUP_ORDER:
            cells = []
            for k in with_perf:
                e = ops[k]["perf"]["groups"][g]
                cells.append(f"{f1(e['us_at_p50'])} ({100 * e['share']:.0f} %)" if e["samples"] else "0")
            print(f"| {g} | " + " | ".join(cells) + " |")
        print(
            "| samples inside the calls (ours) | "
            + " | ".join(
                f"{ops[k]['perf']['samples_in_calls']} ({ops[k]['perf']['samples_in_our_process']})" for k in with_perf
            )
            + " |"
        )
    for k in keys:
        note = (ops[k].get("perf") or {}).get("note")
        if note:
            print(f"note ({k}): {note}")

    own = report.get("ownership") or {}
    if own:
        print("\n### Ownership checks\n")
        print(
            f"- inside the save script (GET owner, compare, SET owner): {own['in_redis']['owner_check_us']:.2f} µs"
            f" inside Redis (a script doing just that {own['in_redis']['owner_check_script_us']:.2f} µs, an empty"
            f" one {own['in_redis']['empty_script_us']:.2f} µs)"
        )
        if "new_id_extra_us" in own:
            print(
                f"- first save of a new id: p50 {f1(own['save_new_p50_us'])} µs against {f1(own['save_p50_us'])} µs for"
                f" a re-save: +{f1(own['new_id_extra_us'])} µs"
            )


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few iterations, noisy numbers")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the benchmark and servers to one CPU")
    parser.add_argument("--cpu", type=int, default=common.PIN_CPU, help="the CPU to pin to (default 0, as run.py)")
    parser.add_argument("--freq", type=int, default=5000, help="perf sampling frequency (Hz)")
    parser.add_argument("--no-perf", action="store_true", help="skip the CPU split")
    parser.add_argument("--no-strace", action="store_true", help="skip counting round trips")
    parser.add_argument("--only", help="comma-separated operations: save20,save20_new,miss20,hit20,near_hit20")
    parser.add_argument("--json", default=str(RESULTS / "breakdown.json"), help="where to write the results")
    args = parser.parse_args(argv)
    common.PIN_CPU = args.cpu
    pin_or_reexec([os.path.abspath(__file__), *argv], enabled=not args.no_pin)
    profile = "quick" if args.quick else "full"
    iters = ITERATIONS[profile]
    started = time.monotonic()
    pinned = not args.no_pin and os.sched_getaffinity(0) == {args.cpu}
    cpus = str(args.cpu) if pinned else "all"

    stack = TracedStack()
    managers = []
    report: Dict[str, object] = {}
    notes: List[str] = []
    try:
        stack.start()
        pinning = pinning_report(stack, enabled=not args.no_pin)
        versions = {
            "python": sys.version.split()[0],
            **stack.versions(),
            "chat_history_rs": chat_history_rs.__version__,
        }
        database = stack.database_url("breakdown")
        redis_url = stack.redis_url(0)

        def manager(**kwargs):
            m = chat_history_rs.ChatHistoryManager(
                mode="postgres",
                connection_string=database,
                redis_enabled=True,
                redis_connection_string=redis_url,
                background_flush=False,
                **kwargs,
            )
            managers.append(m)
            return m

        near, far = manager(), manager(near_cache_bytes=0)
        wait_for_near_cache(near)
        harness = redis.Redis.from_url(redis_url, client_name=HARNESS_NAME)
        pg = PgStats(stack, database)
        if not pg.enabled:
            notes.append("pg_stat_statements is not installed: PostgreSQL statements not counted")
        scripts = script_names()
        ops = make_ops(near, far, harness)
        if args.only:
            wanted = {k.strip() for k in args.only.split(",")}
            ops = [op for op in ops if op.key in wanted]
        if not args.no_strace and not shutil.which("strace"):
            notes.append("strace not found: round trips not counted")
        if not args.no_perf and not (shutil.which("perf") or os.path.exists("/usr/bin/perf")):
            notes.append("perf not found: no CPU split")

        print("# Where the time goes: save, miss and hit of 20 messages\n")
        machine = machine_info()
        print(f"Machine: {machine['cpu']}, {machine['cores']} cores, Linux {machine['kernel']}")
        print(
            f"Versions: Python {versions['python']}, PostgreSQL {versions['postgresql']}, Redis {versions['redis']},"
            f" chat_history_rs {versions['chat_history_rs']}"
        )
        print(pinning_line(pinning).replace("CPU 0", f"CPU {args.cpu}").replace("-c 0", f"-c {args.cpu}"))
        load = os.getloadavg()
        print(f"Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
        n, w = iters["timing"]
        print(f"Iterations ({profile}): timing {n} (+{w} warm-up), counts {iters['counts']}, perf {iters['perf']}\n")

        floor = network_floor(stack, 2000 if profile == "full" else 200, 200 if profile == "full" else 20)
        results: Dict[str, dict] = {}
        for op in ops:
            t_op = time.monotonic()
            entry: Dict[str, object] = {"label": op.label}
            fallbacks = op.manager.stats()["postgres_fallbacks"]
            entry["timing"] = pass_timing(op, n, w, harness, pg)
            if not args.no_strace:
                entry["counts"] = pass_counts(op, iters["counts"], harness, pg, stack, scripts)
            if not args.no_perf:
                entry["perf"] = pass_perf(op, iters["perf"][op.perf_size], args.freq, cpus, entry["timing"]["p50_us"])
            # A call that Redis did not answer in time went to PostgreSQL: its counts are not this path's.
            entry["postgres_fallbacks"] = op.manager.stats()["postgres_fallbacks"] - fallbacks
            if entry["postgres_fallbacks"]:
                notes.append(
                    f"{op.key}: {entry['postgres_fallbacks']} calls went to PostgreSQL instead of Redis during the"
                    " passes (timeouts under strace or a loaded machine): its counts include them"
                )
            results[op.key] = entry
            print(
                f"  {op.key:<11} p50 {f1(entry['timing']['p50_us']):>7} µs  ({time.monotonic() - t_op:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        ownership: Dict[str, object] = {"in_redis": owner_check_in_redis(harness, 2000 if profile == "full" else 200)}
        if "save20" in results and "save20_new" in results:
            a, b = results["save20"]["timing"]["p50_us"], results["save20_new"]["timing"]["p50_us"]
            ownership.update({"save_p50_us": a, "save_new_p50_us": b, "new_id_extra_us": b - a})
        load_end = os.getloadavg()
        report = {
            "generated_at": datetime.now(timezone.utc).isoformat(),
            "profile": profile,
            "machine": machine,
            "versions": versions,
            "pinning": pinning,
            "load_average": {"start": load, "end": load_end},
            "perf_frequency_hz": args.freq,
            "units": "microseconds per call unless named otherwise",
            "network_floor": floor,
            "ops": results,
            "ownership": ownership,
            "notes": notes,
        }
        harness.close()
        pg.close()
    finally:
        for m in managers:
            try:
                m.close()
            except Exception as e:  # noqa: BLE001 - closing at the end must not hide the results
                print(f"warning: closing a manager: {e}", file=sys.stderr)
        stack.remove()

    print_tables(report)
    for note in notes:
        print(f"note: {note}")
    print(f"\nLoad average at end: {' '.join(f'{x:.2f}' for x in report['load_average']['end'])}")
    print(f"Total {time.monotonic() - started:.0f} s.")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
