"""A throwaway Redis and PostgreSQL under a local folder, for the examples.

`LocalStack(root).start()` runs both on free loopback ports and returns their URLs; `stop()` ends
them. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user. When the server
binaries are missing, `start()` raises `StackUnavailable` and the caller falls back to local mode.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class StackUnavailable(RuntimeError):
    """The server binaries are not installed."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise StackUnavailable("PostgreSQL server binaries (initdb) not found")
    return Path(candidates[-1]).parent


class LocalStack:
    """PostgreSQL and Redis in `root/pg` and `root/redis`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.pg_port = _free_port()
        self.redis_port = _free_port()
        self._redis: subprocess.Popen[bytes] | None = None
        self._pg_started = False
        self._as_postgres = os.geteuid() == 0

    def _pg(self, *args: str) -> None:
        cmd = [str(_pg_bindir() / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> tuple[str, str]:
        """Starts both servers; returns (postgres_url, redis_url)."""
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise StackUnavailable("redis-server not found")
        pgdata = self.root / "pg"
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            if self._as_postgres:
                shutil.chown(pgdata, "postgres")
            self._pg("initdb", "-D", str(pgdata), "-A", "trust", "-U", "postgres", "--encoding", "UTF8", "--locale", "C")
        options = f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root}"
        self._pg("pg_ctl", "-D", str(pgdata), "-o", options, "-l", str(self.root / "pg.log"), "-w", "start")
        self._pg_started = True
        redis_dir = self.root / "redis"
        redis_dir.mkdir(exist_ok=True)
        self._redis = subprocess.Popen(
            [redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
             "--save", "", "--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres", f"redis://127.0.0.1:{self.redis_port}/0"

    def stop(self) -> None:
        """Stops both servers; the data folder stays for the next run."""
        if self._redis is not None:
            self._redis.terminate()
            self._redis.wait(timeout=10)
            self._redis = None
        if self._pg_started:
            self._pg("pg_ctl", "-D", str(self.root / "pg"), "-m", "fast", "-w", "stop")
            self._pg_started = False
