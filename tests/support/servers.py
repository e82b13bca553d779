"""Throwaway PostgreSQL and Redis servers for the test suite.

Each server runs on a free loopback port in its own temporary directory and is deleted when the test
session ends (redis-rs's test servers, killed on drop). Fault tests can `stop()`, `kill()`,
`start()` and `restart()` them; the port and URL stay the same across restarts so a client can
reconnect.

When `CHR_TEST_POSTGRES_URL` / `CHR_TEST_REDIS_URL` name running servers, `ExternalPostgres` /
`ExternalRedis` wrap them instead: same attributes, but they cannot be stopped (`controllable` is
False); fault tests cut them off with a TCP proxy in front instead (tests/tcp_proxy.py).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import psycopg2
import psycopg2.extensions

PG_SUPERUSER = "postgres"
POSTGRES_OS_USER = "postgres"


class ServerError(RuntimeError):
    """A throwaway server could not be started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scratch_dir() -> Optional[str]:
    """Where server data lives: $CHR_TEST_TMPDIR, else /dev/shm when usable (a tmpfs makes
    CREATE DATABASE ~10x faster than an ext4 disk), else the default temp dir."""
    env = os.environ.get("CHR_TEST_TMPDIR")
    if env:
        return env
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1 << 30:
            return shm
    except OSError:
        pass
    return None


def closed_port() -> int:
    """A loopback port with nothing behind it: connecting there is refused at once."""
    return free_port()


# --------------------------------------------------------------------------------------------------
# Connection parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgParams:
    """Where a PostgreSQL database is and how to log in, in both libpq connection-string forms."""

    host: str
    port: int
    user: str
    dbname: str
    password: Optional[str] = None

    @classmethod
    def parse(cls, conninfo: str) -> "PgParams":
        """From a libpq URL or key=value string (as in CHR_TEST_POSTGRES_URL)."""
        parts = psycopg2.extensions.parse_dsn(conninfo)
        return cls(
            host=parts.get("host", "127.0.0.1"),
            port=int(parts.get("port", 5432)),
            user=parts.get("user", PG_SUPERUSER),
            dbname=parts.get("dbname", "postgres"),
            password=parts.get("password"),
        )

    def with_db(self, dbname: str) -> "PgParams":
        return replace(self, dbname=dbname)

    def with_login(self, user: str, password: Optional[str]) -> "PgParams":
        return replace(self, user=user, password=password)

    @property
    def url(self) -> str:
        """`postgresql://user[:password]@host:port/dbname`, with the parts percent-encoded."""
        auth = quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(self.dbname, safe='')}"

    @property
    def dsn(self) -> str:
        """The key=value form: `host=... port=... user=... dbname=... [password=...]`."""

        def val(v: str) -> str:
            if v and all(c not in v for c in " '\\"):
                return v
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"

        out = f"host={val(self.host)} port={self.port} user={val(self.user)} dbname={val(self.dbname)}"
        if self.password is not None:
            out += f" password={val(self.password)}"
        return out

    def connect(self, autocommit: bool = True, **kwargs) -> "psycopg2.extensions.connection":
        conn = psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            connect_timeout=5,
            **kwargs,
        )
        conn.autocommit = autocommit
        return conn


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


def find_pg_bindir() -> Optional[Path]:
    """The directory holding initdb/pg_ctl: $CHR_PG_BINDIR, Debian's newest version, or PATH."""
    env = os.environ.get("CHR_PG_BINDIR")
    if env:
        return Path(env)
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if versions:
        return Path(versions[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; drop to the postgres OS user when we are root.
    if os.geteuid() == 0:
        return ["runuser", "-u", POSTGRES_OS_USER, "--", *cmd]
    return cmd


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user=POSTGRES_OS_USER)


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb into a temp dir, pg_ctl on a free loopback port).

    `auth` is initdb's `-A` method. With "scram-sha-256" the superuser gets `superuser_password`,
    and every connection, including the fixtures' own, needs it.
    """

    controllable = True

    def __init__(
        self,
        *,
        auth: str = "trust",
        superuser_password: Optional[str] = None,
        settings: Optional[dict[str, str]] = None,
        bindir: Optional[Path] = None,
    ) -> None:
        self.bindir = bindir or find_pg_bindir()
        if self.bindir is None or not (self.bindir / "initdb").exists():
            raise ServerError("PostgreSQL binaries (initdb, pg_ctl) not found; set CHR_PG_BINDIR")
        if auth != "trust" and superuser_password is None:
            raise ServerError(f"auth={auth!r} needs a superuser_password")
        self.auth = auth
        self.superuser_password = superuser_password
        self.settings = dict(settings or {})
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="chr-pg-", dir=scratch_dir()))
        _chown_to_postgres(self.root)
        self.datadir = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self._initialised = False
        self._removed = False
        atexit.register(self.remove)

    # -- connection details ------------------------------------------------------------------------

    @property
    def params(self) -> PgParams:
        return PgParams("127.0.0.1", self.port, PG_SUPERUSER, "postgres", self.superuser_password)

    @property
    def url(self) -> str:
        """URL of the maintenance database `postgres`, as the superuser."""
        return self.params.url

    # -- lifecycle ---------------------------------------------------------------------------------

    def _run(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            _as_postgres(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, text=True
        )
        if proc.returncode != 0:
            raise ServerError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{self.log_tail()}")
        return proc

    def _initdb(self) -> None:
        cmd = [
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-A", self.auth,
            "-U", PG_SUPERUSER,
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
        ]  # fmt: skip
        if self.superuser_password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.superuser_password + "\n")
            _chown_to_postgres(pwfile)
            cmd += ["--pwfile", str(pwfile)]
        try:
            self._run(cmd)
        finally:
            if self.superuser_password is not None:
                (self.root / "pwfile").unlink(missing_ok=True)
        self._initialised = True

    def start(self) -> None:
        """Start the server (initdb on first start) and wait until it accepts connections."""
        if not self._initialised:
            self._initdb()
        options = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=300",
        ] + [f"-c {k}={v}" for k, v in self.settings.items()]
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                " ".join(options),
            ]  # fmt: skip
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: Optional[Exception] = None
        while time.monotonic() < deadline:
            try:
                self.params.connect().close()
                return
            except psycopg2.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise ServerError(f"PostgreSQL on port {self.port} not ready after {timeout}s: {last}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server. mode: "smart", "fast" (disconnect clients) or "immediate" (crash-like)."""
        if self.is_running():
            self._run([str(self.bindir / "pg_ctl"), "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.datadir)])

    def kill(self) -> None:
        """Stop abruptly, as a crash would (`pg_ctl stop -m immediate`)."""
        self.stop(mode="immediate")

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        if not self._initialised:
            return False
        proc = subprocess.run(
            _as_postgres([str(self.bindir / "pg_ctl"), "status", "-D", str(self.datadir)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return proc.returncode == 0

    def standby(self) -> "PostgresServer":
        """A streaming replica of this server (`pg_basebackup -R`), started and read-only; `promote()` makes it
        a primary, as a failover does. Only for a server started here (trust auth)."""
        replica = PostgresServer(settings=self.settings, bindir=self.bindir)
        self._run(
            [
                str(self.bindir / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                PG_SUPERUSER,
                "-D",
                str(replica.datadir),
                "-R",  # a standby, streaming from this server
                "-X",
                "stream",
                "--checkpoint=fast",  # else it waits for a spread checkpoint: a minute and more
                "--no-sync",
            ]  # fmt: skip
        )
        replica._initialised = True
        replica.start()
        return replica

    def promote(self) -> None:
        """Ends a standby's recovery: it becomes a primary on a new timeline."""
        self._run([str(self.bindir / "pg_ctl"), "promote", "-w", "-t", "60", "-D", str(self.datadir)])

    def replayed(self, primary: "PostgresServer") -> bool:
        """Whether this standby has replayed everything `primary` has written so far."""

        def one(server: "PostgresServer", sql: str, *args):
            conn = server.params.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(sql, args)
                    return cur.fetchone()[0]
            finally:
                conn.close()

        written = one(primary, "SELECT pg_current_wal_lsn()::text")
        return bool(one(self, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", written))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def remove(self) -> None:
        """Stop the server and delete its directory (idempotent; also registered with atexit)."""
        if self._removed:
            return
        self._removed = True
        try:
            self.stop(mode="immediate")
        except (ServerError, OSError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<PostgresServer 127.0.0.1:{self.port} auth={self.auth} dir={self.root}>"


class ExternalPostgres:
    """A PostgreSQL server named by CHR_TEST_POSTGRES_URL; used as is, never stopped."""

    controllable = False

    def __init__(self, conninfo: str) -> None:
        base = PgParams.parse(conninfo)
        self.params = base
        self.port = base.port
        self.url = base.url

    def _refuse(self, *_args, **_kwargs) -> None:
        raise ServerError("an external PostgreSQL (CHR_TEST_POSTGRES_URL) cannot be stopped or restarted")

    start = stop = kill = restart = _refuse

    def remove(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ExternalPostgres {self.params.host}:{self.port}>"


def create_database(server_params: PgParams, prefix: str = "test") -> PgParams:
    """CREATE DATABASE <prefix>_<random> on the server; returns the parameters to reach it."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    conn = server_params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
    finally:
        conn.close()
    return server_params.with_db(name)


def drop_database(server_params: PgParams, dbname: str) -> None:
    """DROP DATABASE, disconnecting whoever still uses it (a manager a test forgot to close)."""
    conn = server_params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server subprocess on a free loopback port, no persistence."""

    controllable = True

    def __init__(self, *, extra_args: Optional[list[str]] = None, executable: Optional[str] = None) -> None:
        self.executable = executable or os.environ.get("CHR_REDIS_SERVER") or shutil.which("redis-server")
        if not self.executable:
            raise ServerError("redis-server not found on PATH; set CHR_REDIS_SERVER or CHR_TEST_REDIS_URL")
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="chr-redis-", dir=scratch_dir()))
        self.logfile = self.root / "redis.log"
        self.proc: Optional[subprocess.Popen] = None
        self._removed = False
        atexit.register(self.remove)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server (same port as before) and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.root),
            "--logfile", str(self.logfile),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    # A server started with a password answers -NOAUTH: it is up all the same.
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ServerError(f"redis-server on port {self.port} not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-operation."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a stalled server)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<RedisServer 127.0.0.1:{self.port}>"


class ExternalRedis:
    """A Redis server named by CHR_TEST_REDIS_URL; used as is, never stopped."""

    controllable = False

    def __init__(self, url: str) -> None:
        from urllib.parse import urlparse

        self.url = url
        self.port = urlparse(url).port or 6379

    def _refuse(self, *_args, **_kwargs) -> None:
        raise ServerError("an external Redis (CHR_TEST_REDIS_URL) cannot be stopped or restarted")

    start = stop = kill = restart = pause = resume = _refuse

    def remove(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ExternalRedis {self.url.split('@')[-1]}>"


# --------------------------------------------------------------------------------------------------
# Phase 1 data, written and read with plain SQL (what the pure-Python ChatHistoryManager did)
# --------------------------------------------------------------------------------------------------

# The schema's one copy, which the product runs too (src/store/postgres/schema.rs). The repository's root is the
# folder that holds Cargo.toml.
REPOSITORY = next(p for p in Path(__file__).resolve().parents if (p / "Cargo.toml").exists())
SCHEMA_SQL = REPOSITORY / "src" / "store" / "postgres" / "schema.sql"


def phase1_schema() -> str:
    """The production schema (README, "Schema": the Phase 1 tables), as Phase 1 created it: schema.sql up to its
    "Phase 1 ends here" line. The messages index gets Phase 1's name, a guess: the product must accept an existing
    schema whatever its index names are."""
    phase1, marker, _ = SCHEMA_SQL.read_text().partition("\n-- Phase 1 ends here")
    assert marker, f"{SCHEMA_SQL} has no line '-- Phase 1 ends here'"
    return phase1.replace("idx_messages_conversation_seq", "idx_messages_conversation")


PHASE1_SCHEMA = phase1_schema()


def create_phase1_schema(conn) -> None:
    with conn.cursor() as cur:
        cur.execute(PHASE1_SCHEMA)


def insert_phase1_conversation(conn, conversation_id, user_id, *, title, model, created_at, last_modified, messages):
    """INSERT one conversation the way Phase 1 did. messages: [(role, content, timestamp), ...] in order.

    Timestamps may be aware datetimes or strings PostgreSQL understands.
    """
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO conversations (conversation_id, user_client_id, title, model, created_at, last_modified)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (conversation_id, user_id, title, model, created_at, last_modified),
        )
        for seq, (role, content, ts) in enumerate(messages):
            cur.execute(
                "INSERT INTO messages (conversation_id, sequence_number, role, content, timestamp)"
                " VALUES (%s, %s, %s, %s, %s)",
                (conversation_id, seq, role, content, ts),
            )
    if not conn.autocommit:
        conn.commit()


def fetch_conversation_row(conn, conversation_id) -> Optional[dict]:
    """The conversations row as a dict (timestamps as aware datetimes), or None."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT conversation_id, user_client_id, title, model, created_at, last_modified"
            " FROM conversations WHERE conversation_id = %s",
            (conversation_id,),
        )
        row = cur.fetchone()
    if row is None:
        return None
    keys = ("conversation_id", "user_client_id", "title", "model", "created_at", "last_modified")
    return dict(zip(keys, row))


def fetch_message_rows(conn, conversation_id) -> list[tuple]:
    """[(sequence_number, role, content, timestamp), ...] ordered by sequence_number."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT sequence_number, role, content, timestamp FROM messages"
            " WHERE conversation_id = %s ORDER BY sequence_number",
            (conversation_id,),
        )
        return cur.fetchall()


def expected_message_rows(conversation: dict) -> list[tuple]:
    """What the messages table must hold for a conversation whose timestamps are canonical."""
    return [
        (i, m["role"], m["content"], datetime.fromisoformat(m["time"])) for i, m in enumerate(conversation["messages"])
    ]


def assert_row_matches(conn, conversation_id: str, user_id: str, conversation: dict) -> None:
    """The conversations row and the message rows hold exactly `conversation` (canonical timestamps)."""
    row = fetch_conversation_row(conn, conversation_id)
    assert row == {
        "conversation_id": conversation_id,
        "user_client_id": user_id,
        "title": conversation["title"],
        "model": conversation["model"],
        "created_at": datetime.fromisoformat(conversation["created_at"]),
        "last_modified": datetime.fromisoformat(conversation["last_modified"]),
    }
    assert fetch_message_rows(conn, conversation_id) == expected_message_rows(conversation)


def canonical(ts) -> str:
    """The form the product returns (`Timestamp` in src/model.rs): Python's isoformat() of the UTC instant.

    Accepts an aware datetime or an ISO 8601 string (naive = UTC).
    """
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00")) if isinstance(ts, str) else ts
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat()
