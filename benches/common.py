"""What the harnesses share: CPU pinning, throwaway servers, app-shaped data, percentiles, the network floor.

The servers are the test suite's (`tests/support/servers.py`, imported through sys.path and used as is):
a PostgreSQL cluster and a redis-server on free loopback ports in temporary directories, removed at
exit. PostgreSQL runs with fsync and synchronous_commit off there, for both implementations alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import shutil
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
RESULTS = BENCHES / "results"
sys.path.insert(0, str(ROOT / "tests"))

from support.servers import PostgresServer, RedisServer, create_database  # noqa: E402 - after the sys.path above

PINNED_ENV = "CHR_BENCH_PINNED"
PIN_CPU = 0


# --------------------------------------------------------------------------------------------------
# CPU pinning
# --------------------------------------------------------------------------------------------------


def pin_or_reexec(argv: List[str], enabled: bool) -> None:
    """Runs the rest of this process on CPU 0 only, so the servers it starts (which inherit the
    affinity) share that CPU with it: on a 2-core machine, loopback round trips are otherwise
    dominated by cross-CPU wake-ups. Re-execs under `taskset -c 0` (the whole process, every
    thread); without taskset, sets the affinity directly before any thread exists."""
    if not enabled or os.environ.get(PINNED_ENV) == "1":
        return
    if os.cpu_count() == 1 or PIN_CPU not in os.sched_getaffinity(0):
        return
    env = dict(os.environ, **{PINNED_ENV: "1"})
    taskset = shutil.which("taskset")
    if taskset:
        sys.stdout.flush()
        os.execve(taskset, [taskset, "-c", str(PIN_CPU), sys.executable, *argv], env)
    os.environ[PINNED_ENV] = "1"
    os.sched_setaffinity(0, {PIN_CPU})


def parse_args(doc: str, more: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The flags the benchmarks share (`--quick`, `--no-pin`) and those `more` adds; then pins the
    process (`pin_or_reexec`) unless `--no-pin`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few iterations, noisy numbers")
    parser.add_argument("--no-pin", action="store_true", help="leave the process and its servers on every CPU")
    if more is not None:
        more(parser)
    args = parser.parse_args()
    pin_or_reexec(sys.argv, enabled=not args.no_pin)
    return args


def cpus_allowed(pid: int) -> str:
    """`Cpus_allowed_list` of a process (e.g. "0" or "0-1"), or "?" when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def pinning_report(stack: "Stack", enabled: bool) -> Dict[str, str]:
    """Which CPUs the harness and each server may run on, read back from /proc."""
    report = {"harness": cpus_allowed(os.getpid()), "redis": cpus_allowed(stack.redis.proc.pid)}
    try:
        postmaster = int((stack.pg.datadir / "postmaster.pid").read_text().split()[0])
        report["postgres"] = cpus_allowed(postmaster)
    except (OSError, ValueError, IndexError):
        report["postgres"] = "?"
    report["requested"] = f"taskset -c {PIN_CPU}" if enabled else "none (--no-pin)"
    return report


def pinning_line(report: Dict[str, str]) -> str:
    where = f"harness on CPU {report['harness']}, PostgreSQL on {report['postgres']}, Redis on {report['redis']}"
    if report["requested"].startswith("taskset"):
        return f"Pinning: benchmark process and servers pinned with `{report['requested']}` ({where})"
    return f"Pinning: off ({where}); timings include cross-CPU wake-ups"


# --------------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> Dict[str, object]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------


class Stack:
    """A throwaway PostgreSQL and Redis, started in this (pinned) process so they inherit its CPU."""

    def __init__(self) -> None:
        self.pg = PostgresServer()
        self.redis = RedisServer()

    def start(self) -> "Stack":
        self.pg.start()
        self.redis.start()
        return self

    def database_url(self, prefix: str) -> str:
        """A fresh, empty database: `postgresql://postgres@127.0.0.1:<port>/<prefix>_<random>`."""
        return create_database(self.pg.params, prefix=prefix).url

    def redis_url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/{db}"

    def versions(self) -> Dict[str, str]:
        import redis

        conn = self.pg.params.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                pg_version = cur.fetchone()[0]
        finally:
            conn.close()
        client = redis.Redis(host="127.0.0.1", port=self.redis.port)
        try:
            redis_version = client.info("server")["redis_version"]
        finally:
            client.close()
        return {"postgresql": pg_version, "redis": redis_version}

    def remove(self) -> None:
        self.redis.remove()
        self.pg.remove()


# --------------------------------------------------------------------------------------------------
# App-shaped data
# --------------------------------------------------------------------------------------------------


def wait_for_near_cache(manager, timeout: float = 10.0) -> None:
    """Until `manager`'s near cache serves: its tracking connection comes up shortly after the
    first call tells it what Redis is."""
    deadline = time.monotonic() + timeout
    manager.list_conversations(user_id="bench-warm-up")
    while not manager.stats()["near_cache_tracking"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the near cache did not start tracking")
        time.sleep(0.02)


def now_iso() -> str:
    """What the app writes: `datetime.now(timezone.utc).isoformat()`."""
    return datetime.now(timezone.utc).isoformat()


def new_user_id() -> str:
    return str(uuid.uuid4())


_issued_ids: set = set()


def new_conversation_id() -> str:
    """8 hex characters, like the app's ids, never the same twice in this process: at a few
    thousand random ids a collision (which the product rightly refuses as another user's id)
    would otherwise be likely enough to break a run."""
    while True:
        cid = secrets.token_hex(4)
        if cid not in _issued_ids:
            _issued_ids.add(cid)
            return cid


# Common English words, most frequent first (chat-like text is drawn from them by rank: see Corpus).
ENGLISH_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side
been now find any new work part take get place made live where after back little only round man year came
show every good me give our under name very through just form sentence great think say help low line differ
turn cause much mean before move right boy old too same tell does set three want air well also play small
end put home read hand port large spell add even land here must big high such follow act why ask men change
went light kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food sun four
between state keep eye never last let thought city tree cross farm hard start might story saw far sea draw
left late run don't while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car feet care
second book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure
watch color face wood main enough plain girl usual young ready above ever red list though feel talk bird
soon body dog family direct pose leave song measure door product black short numeral class wind question
happen complete ship area half rock order fire south problem piece told knew pass since top whole king space
heard best hour better true during hundred five remember step early hold west ground interest reach fast
verb sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice unit power town fine
certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound
done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free minute
strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force
blue object decide surface deep moon island foot system busy test record boat common gold possible plane
stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes
distant fill east paint language among function variable return value string error file data model python
code query database cache server request response client token user message assistant prompt context window
""".split()


class Corpus:
    """Chat-like text: messages of about 300 characters, conversations of alternating turns.

    `text="english"` (the default) draws common English words by Zipf's law (the word of rank r with weight
    1/r), as prose does; `text="random"` draws uniformly from 2,000 words of random letters, a worst case for
    compression (four words in five of a 20-message conversation appear in it for the first time)."""

    TEXTS = ("english", "random")

    def __init__(self, seed: int = 42, message_chars: int = 300, pool_size: int = 512, text: str = "english") -> None:
        if text not in self.TEXTS:
            raise ValueError(f"text must be one of {self.TEXTS}, got {text!r}")
        self.rng = random.Random(seed)
        if text == "english":
            self.words = ENGLISH_WORDS
            self.weights: Optional[List[float]] = [1.0 / rank for rank in range(1, len(ENGLISH_WORDS) + 1)]
        else:
            letters = "abcdefghijklmnopqrstuvwxyz"
            self.words = ["".join(self.rng.choices(letters, k=self.rng.randint(2, 10))) for _ in range(2000)]
            self.weights = None
        self.contents = [self._sentence(message_chars) for _ in range(pool_size)]
        self._next = 0

    def _sentence(self, chars: int) -> str:
        words: List[str] = []
        length = -1
        while length < chars:
            word = self.rng.choices(self.words, self.weights)[0]
            words.append(word)
            length += len(word) + 1
        text = " ".join(words)
        return text[0].upper() + text[1:] + "."

    def content(self) -> str:
        self._next = (self._next + 1) % len(self.contents)
        return self.contents[self._next]

    def message(self, index: int) -> Dict[str, str]:
        """The message at position `index`: user turns at even positions, assistant at odd."""
        return {"role": "user" if index % 2 == 0 else "assistant", "content": self.content(), "time": now_iso()}

    def messages(self, count: int, start: int = 0) -> List[Dict[str, str]]:
        return [self.message(i) for i in range(start, start + count)]

    def conversation(self, message_count: int, title: Optional[str] = None) -> Dict[str, object]:
        now = now_iso()
        return {
            "title": title or " ".join(self.rng.choices(self.words, k=4)).capitalize(),
            "model": "gpt-4o",
            "messages": self.messages(message_count),
            "created_at": now,
            "last_modified": now,
        }


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def percentile(samples: List[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100), at least 1
    return ordered[int(rank) - 1]


def summary_us(samples_ns: List[int]) -> Dict[str, float]:
    """p50 and p95 in microseconds, and the sample count."""
    return {
        "p50_us": percentile(samples_ns, 50) / 1000,
        "p95_us": percentile(samples_ns, 95) / 1000,
        "n": len(samples_ns),
    }


def network_floor(stack: Stack, iterations: int, warmup: int) -> Dict[str, Dict[str, float]]:
    """One bare round trip with the reference's clients, after `warmup` untimed ones: redis-py `PING`
    (on Redis database 2, which no implementation uses) and psycopg2 `SELECT 1`; p50/p95 of each."""
    import psycopg2
    import redis

    client = redis.Redis.from_url(stack.redis_url(2))
    conn = psycopg2.connect(stack.pg.url)
    conn.autocommit = True
    cur = conn.cursor()
    perf_ns = time.perf_counter_ns

    def ping() -> int:
        t0 = perf_ns()
        client.ping()
        return perf_ns() - t0

    def select1() -> int:
        t0 = perf_ns()
        cur.execute("SELECT 1")
        cur.fetchone()
        return perf_ns() - t0

    out = {}
    try:
        for name, step in (("redis_ping", ping), ("pg_select1", select1)):
            for _ in range(warmup):
                step()
            out[name] = summary_us([step() for _ in range(iterations)])
    finally:
        cur.close()
        conn.close()
        client.close()
    return out


def peak_rss_reset() -> bool:
    """Resets the process's peak RSS (Linux: `echo 5 > /proc/self/clear_refs`), so the next
    getrusage's ru_maxrss is the peak since now. False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_kib() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def write_report(path: str, report: Dict[str, object]) -> None:
    """The results as indented JSON at `path` (its folder made when missing), and a line saying where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"Results written to {os.path.relpath(path)}")
