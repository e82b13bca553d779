"""A throwaway Redis and PostgreSQL under a local folder, for the examples (`make demo`).

`LocalStack(root).start()` runs both on free loopback ports and returns their URLs; `stop()` ends
them. The data stays in `root` between runs: PostgreSQL's cluster in `root/pg`, Redis's append-only
file in `root/redis` (so even conversations not yet written back survive a hard kill of the demo).
PostgreSQL refuses to run as root, so as root it runs as the `postgres` user. When the server
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
from typing import Optional


class StackUnavailable(RuntimeError):
    """The server binaries are not installed, or a server would not start; the message says which."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bindir() -> Path:
    # Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<version>/bin.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise StackUnavailable("the PostgreSQL server (initdb, pg_ctl) is not installed")


class LocalStack:
    """PostgreSQL in `root/pg` and Redis in `root/redis`, both on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.pg_port = free_port()
        self.redis_port = free_port()
        self._redis: Optional[subprocess.Popen[bytes]] = None
        self._pg_started = False
        self._as_postgres = os.geteuid() == 0

    @property
    def pgdata(self) -> Path:
        return self.root / "pg"

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(_pg_bindir() / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # A session of its own, so the terminal's Ctrl-C reaches the app but not the server: the app
        # still writes back to it while it shuts down, and stop() ends it afterwards.
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if check and done.returncode != 0:
            raise StackUnavailable(f"{args[0]} failed: {done.stdout.strip()} (log: {self.root / 'pg.log'})")
        return done

    def start(self) -> tuple[str, str]:
        """Starts both servers; returns (postgres_url, redis_url)."""
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise StackUnavailable("redis-server is not installed")
        _pg_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if self._as_postgres:
                shutil.chown(self.pgdata, "postgres")
            self._pg(
                "initdb", "-D", str(self.pgdata), "-A", "trust", "-U", "postgres", "--encoding", "UTF8", "--locale", "C"
            )
        elif self._pg("pg_ctl", "-D", str(self.pgdata), "status", check=False).returncode == 0:
            # A demo killed without its cleanup left the server running (on an old port): restart it here.
            self._pg("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
        options = f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root}"
        self._pg("pg_ctl", "-D", str(self.pgdata), "-o", options, "-l", str(self.root / "pg.log"), "-w", "start")
        self._pg_started = True
        redis_dir = self.root / "redis"
        redis_dir.mkdir(exist_ok=True)
        command = [
            redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
            "--save", "", "--appendonly", "yes", "--logfile", str(self.root / "redis.log"),
            # volatile-lru evicts only keys with a TTL, that is clean copies: never unsaved chats.
            "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru",
        ]  # fmt: skip
        # As for PostgreSQL: Ctrl-C is for the app, which still needs Redis while it shuts down.
        self._redis = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_for_redis()
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres", f"redis://127.0.0.1:{self.redis_port}/0"

    def _wait_for_redis(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._redis is not None and self._redis.poll() is not None:
                raise StackUnavailable(
                    f"redis-server exited with {self._redis.returncode} (log: {self.root / 'redis.log'})"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise StackUnavailable(
            f"redis-server did not answer on port {self.redis_port} (log: {self.root / 'redis.log'})"
        )

    def stop(self) -> None:
        """Stops both servers; the data folder stays for the next run."""
        if self._redis is not None:
            if self._redis.poll() is None:
                self._redis.terminate()
            try:
                self._redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._redis.kill()
                self._redis.wait()
            self._redis = None
        if self._pg_started:
            self._pg("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop", check=False)
            self._pg_started = False
