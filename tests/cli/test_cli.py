"""The `chat-history` command line, against the fixture servers: as a user runs it (`python -m
chat_history_rs ...` in a subprocess, which also checks exit codes and that nothing leaks a password)
and in-process through `main([...])`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from chat_history_rs import __version__
from chat_history_rs.cli import format_human, format_prometheus, main
from support.redis_support import dirty_set, make_conversation, pg_conversation_ids, wait_until, write_seed_hash
from support.servers import assert_row_matches, closed_port

SECRET = "s3cret-Pa55:word@x/y"
SECRET_QUOTED = "s3cret-Pa55%3Aword%40x%2Fy"

# stats() keys docs/monitoring.md promises ("What `stats()` returns"), all present in redis mode.
STATS_KEYS = {
    "cache_hits",
    "cache_misses",
    "hit_rate",
    "dirty_count",
    "oldest_dirty_age_seconds",
    "flushes",
    "conversations_flushed",
    "flush_failures",
    "stuck_conversations",
    "postgres_fallbacks",
    "redis_available",
    "redis_used_memory",
    "redis_maxmemory",
    "redis_maxmemory_policy",
}

# One sample line of the Prometheus text format: name, optional {labels}, a float value.
SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})?'
    r" (?P<value>\S+)$"
)

CLEARED_ENV = (
    "CHAT_HISTORY_MODE",
    "NEAR_CACHE_BYTES",
    "REDIS_COMPRESSION",
    "DATABASE_URL",
    "REDIS_ENABLED",
    "REDIS_CONNECTION_STRING",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_SSL",
    "REDIS_CA_FILE",
    "REDIS_CACHE_TTL",
    "REDIS_TTL_SECONDS",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_ADMIN_LOGIN",
    "POSTGRES_ADMIN_PASSWORD",
    "POSTGRES_DATABASE",
    "POSTGRES_SSLMODE",
)


def cli_env(**extra: str) -> dict:
    """The environment without any setting the CLI would read, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: PLW1510 - the exit code is what the tests check
        [sys.executable, "-m", "chat_history_rs", *args],
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def ready_pg_url(pg_url):
    """pg_url with the schema made, as `chat-history init-db` makes it: stats and doctor create no table."""
    from chat_history_rs import ChatHistoryManager

    ChatHistoryManager(mode="postgres", connection_string=pg_url).close()
    return pg_url


@pytest.fixture
def clean_env(monkeypatch):
    """For in-process main(): the settings the CLI reads are unset."""
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)


def public_tables(conn) -> set[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        return {row[0] for row in cur.fetchall()}


def parse_prometheus(text: str) -> dict[str, list[tuple[str, float]]]:
    """Checks the exposition format line by line; returns {name: [(labels, value), ...]}."""
    assert text.endswith("\n")
    samples: dict[str, list[tuple[str, float]]] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        assert line.strip(), "no blank lines"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE"), line
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge"), line
                typed[parts[2]] = parts[3]
            continue
        match = SAMPLE.match(line)
        assert match, f"not `name{{labels}} value`: {line!r}"
        value = float(match["value"])  # raises on anything but a float
        name = match["name"]
        assert name in typed, f"{name} has no # TYPE line before it"
        if typed[name] == "counter":
            assert name.endswith("_total") and value >= 0, line
        samples.setdefault(name, []).append((match["labels"] or "", value))
    return samples


def save_dirty(manager, user_id: str, n: int) -> dict[str, dict]:
    """n conversations saved through a redis manager without a background flusher: dirty in Redis."""
    saved = {}
    for i in range(n):
        conversation_id = f"c11{i:05d}"
        conversation = make_conversation(2 + i, prefix=f"{i}-")
        manager.save_conversation(conversation_id, conversation, user_id=user_id)
        saved[conversation_id] = conversation
    return saved


# --------------------------------------------------------------------------------------------------
# Help, version, usage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["init-db", "--help"], ["flush", "--help"], ["stats", "--help"]])
def test_help_exits_0(args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: chat-history")
    assert result.stderr == ""


def test_help_names_every_command_and_the_exit_codes():
    out = run_cli("--help").stdout
    for command in ("init-db", "flush", "stats", "doctor"):
        assert command in out
    assert "exit codes" in out


def test_doctor_help_documents_its_exit_codes(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["doctor", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "Exit 0 all OK, 1 a WARN, 2 a FAIL" in " ".join(out.split())


def test_stats_help_says_hit_counters_are_per_process():
    out = " ".join(run_cli("stats", "--help").stdout.split())
    assert "this command is a fresh process: they are 0 here" in out
    assert "The gauges are global" in out


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"chat-history {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["no-such-command"],
        ["stats", "--no-such-option"],
        ["stats", "--json", "--prometheus"],
        ["flush", "--interval", "5"],
        ["flush", "--loop", "--interval", "0"],
        ["flush", "--loop", "--interval", "soon"],
        ["doctor", "--max-dirty", "many"],
    ],
)
def test_usage_errors_exit_2_without_a_traceback(args):
    result = run_cli(*args, env=cli_env(DATABASE_URL="postgresql://127.0.0.1:1/x"))
    assert result.returncode == 2, result
    assert result.stderr.startswith("usage: chat-history")
    assert "Traceback" not in result.stderr


def test_main_raises_system_exit_2_on_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["stats", "--json", "--prometheus"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_console_script_is_declared():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        entry_points = distribution("chat-history-rs").entry_points
    except PackageNotFoundError:
        pytest.skip("chat-history-rs is not installed with metadata (only on sys.path)")
    scripts = {ep.name: ep.value for ep in entry_points if ep.group == "console_scripts"}
    assert scripts.get("chat-history") == "chat_history_rs.cli:main"


def test_console_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "chat-history")
    if not os.path.exists(script):
        pytest.skip("no chat-history script beside this interpreter (package not installed into it)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, f"chat-history {__version__}")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_ENABLED": "true"}, "REDIS_ENABLED is true but no Redis is configured: set REDIS_CONNECTION_STRING"),
        ({"REDIS_ENABLED": "maybe"}, "REDIS_ENABLED must be true or false, got 'maybe'"),
    ],
)
def test_bad_redis_settings_are_one_line_errors(pg_url, env, message):
    result = run_cli("stats", env=cli_env(DATABASE_URL=pg_url, **env))
    assert result.returncode == 1
    assert result.stderr == f"chat-history: error: {message}\n"


# --------------------------------------------------------------------------------------------------
# init-db
# --------------------------------------------------------------------------------------------------


def test_init_db_creates_the_schema(pg_url, pg_conn):
    assert public_tables(pg_conn) == set()
    result = run_cli("init-db", env=cli_env(DATABASE_URL=pg_url))
    assert result.returncode == 0, result.stderr
    assert "schema ready" in result.stdout
    assert {"conversations", "messages", "conversation_tombstones", "conversation_conflicts"} <= public_tables(pg_conn)
    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = 'conversations' AND column_name = 'cache_version'"
        )
        assert cur.fetchone() is not None


def test_init_db_in_process_is_idempotent_and_keeps_rows(pg_url, pg_conn, clean_env, capsys):
    assert main(["init-db", "--database-url", pg_url]) == 0
    with pg_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO conversations (conversation_id, user_client_id, title, model)"
            " VALUES ('keepme01', 'u', 't', 'm')"
        )
    assert main(["--database-url", pg_url, "init-db"]) == 0  # the option before the command works too
    assert pg_conversation_ids(pg_conn) == {"keepme01"}
    assert capsys.readouterr().out.count("schema ready") == 2


def test_init_db_does_not_need_redis(pg_url, pg_conn):
    # REDIS_ENABLED=true without a Redis location would stop the app; init-db does not use Redis at all.
    result = run_cli("init-db", env=cli_env(DATABASE_URL=pg_url, REDIS_ENABLED="true"))
    assert result.returncode == 0, result.stderr
    assert "conversations" in public_tables(pg_conn)


def test_postgres_settings_by_parts(pg_params, pg_conn):
    """Without DATABASE_URL, the example app's POSTGRES_* variables are used (the password is quoted)."""
    env = cli_env(
        POSTGRES_HOST=pg_params.host,
        POSTGRES_PORT=str(pg_params.port),
        POSTGRES_ADMIN_LOGIN=pg_params.user,
        POSTGRES_ADMIN_PASSWORD="it's a pass word\\",  # trust auth ignores it; it must survive quoting
        POSTGRES_DATABASE=pg_params.dbname,
        POSTGRES_SSLMODE="disable",
    )
    result = run_cli("init-db", env=env)
    assert result.returncode == 0, result.stderr
    assert f"/{pg_params.dbname}?sslmode=disable" in result.stdout
    assert "conversations" in public_tables(pg_conn)
    assert "pass word" not in result.stdout + result.stderr


def test_no_postgres_configured_is_a_one_line_error():
    result = run_cli("init-db")
    assert result.returncode == 1
    assert (
        result.stderr
        == "chat-history: error: no PostgreSQL configured: pass --database-url or set DATABASE_URL (or POSTGRES_HOST)\n"
    )


# --------------------------------------------------------------------------------------------------
# flush
# --------------------------------------------------------------------------------------------------


def test_flush_writes_dirty_conversations(make_redis_manager, rdb, pg_url, pg_conn, user_id):
    manager = make_redis_manager()
    saved = save_dirty(manager, user_id, 3)
    assert pg_conversation_ids(pg_conn) == set()
    assert len(dirty_set(rdb.client)) == 3

    result = run_cli("flush", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url))

    assert result.returncode == 0, result.stderr
    assert result.stdout == "wrote 3 conversations back to PostgreSQL\n"
    for conversation_id, conversation in saved.items():
        assert_row_matches(pg_conn, conversation_id, user_id, conversation)
    assert dirty_set(rdb.client) == set()


def test_flush_in_process_with_flags(make_redis_manager, rdb, pg_url, pg_conn, user_id, clean_env, capsys):
    manager = make_redis_manager()
    saved = save_dirty(manager, user_id, 1)
    assert main(["flush", "--database-url", pg_url, "--redis-url", rdb.url]) == 0
    assert capsys.readouterr().out == "wrote 1 conversation back to PostgreSQL\n"
    ((conversation_id, conversation),) = saved.items()
    assert_row_matches(pg_conn, conversation_id, user_id, conversation)
    # Nothing dirty: a second run writes nothing and says so.
    assert main(["flush", "--database-url", pg_url, "--redis-url", rdb.url]) == 0
    assert capsys.readouterr().out == "wrote 0 conversations back to PostgreSQL\n"


def test_flush_needs_redis(pg_url):
    result = run_cli("flush", env=cli_env(DATABASE_URL=pg_url))
    assert result.returncode == 1
    assert "no Redis configured: pass --redis-url or set REDIS_CONNECTION_STRING" in result.stderr


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _wait_for_line(lines: queue.Queue, seen: list[str], needle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not logged within {timeout}s; stderr so far:\n{''.join(seen)}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_flush_loop_writes_on_signal_and_exits_0(make_redis_manager, rdb, pg_url, pg_conn, user_id, signum):
    """The worker, with an hour between runs, gets a signal: it makes a final flush and exits 0."""
    manager = make_redis_manager()
    env = cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chat_history_rs", "flush", "--loop", "--interval", "3600"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_reader, args=(proc.stderr, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        _wait_for_line(lines, seen, "flush worker started")
        _wait_for_line(lines, seen, "flush run: 0 written")  # the first run found nothing
        saved = save_dirty(manager, user_id, 2)  # dirty now; the next run is an hour away
        assert pg_conversation_ids(pg_conn) == set()
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        proc.stderr.close()
    while not lines.empty():
        line = lines.get()
        if line is not None:
            seen.append(line)
    log = "".join(seen)
    assert f"received {signal.Signals(signum).name}: final flush, then exit" in log
    assert "flush worker stopped" in log
    assert "Traceback" not in log
    for conversation_id, conversation in saved.items():
        assert_row_matches(pg_conn, conversation_id, user_id, conversation)
    assert dirty_set(rdb.client) == set()


def test_flush_loop_outlives_a_postgres_outage(rdb):
    """With PostgreSQL down the worker logs each failed run (no password) and keeps going; SIGTERM ends it."""
    port = closed_port()
    env = cli_env(
        DATABASE_URL=f"postgresql://app:{SECRET_QUOTED}@127.0.0.1:{port}/chat", REDIS_CONNECTION_STRING=rdb.url
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "chat_history_rs", "flush", "--loop", "--interval", "0.2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_reader, args=(proc.stderr, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        first = _wait_for_line(lines, seen, "flush run failed")
        _wait_for_line(lines, seen, "flush run failed")  # and again at the next interval
        assert "PostgreSQL is unavailable" in first and f"127.0.0.1:{port}" in first
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        proc.stderr.close()
    while not lines.empty():
        seen.append(lines.get() or "")
    log = "".join(seen)
    assert "received SIGTERM: final flush, then exit" in log
    assert "s3cret" not in log


def test_flush_loop_in_process_stops_on_sigterm(make_redis_manager, rdb, pg_url, pg_conn, user_id, clean_env, capsys):
    manager = make_redis_manager()
    saved = save_dirty(manager, user_id, 1)
    before = signal.getsignal(signal.SIGTERM)

    def stop_when_installed() -> None:
        # Only once the worker handles SIGTERM: the default action would end pytest itself.
        deadline = time.monotonic() + 30
        while signal.getsignal(signal.SIGTERM) is before:
            if time.monotonic() > deadline:
                return  # main() never got that far; the test fails on its result instead
            time.sleep(0.01)
        time.sleep(0.3)
        if signal.getsignal(signal.SIGTERM) is not before:  # still the worker's
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=stop_when_installed)
    killer.start()
    try:
        code = main(["flush", "--loop", "--interval", "3600", "--database-url", pg_url, "--redis-url", rdb.url])
    finally:
        killer.join()
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) is before, "the previous SIGTERM handler is restored"
    err = capsys.readouterr().err
    assert "received SIGTERM" in err
    ((conversation_id, conversation),) = saved.items()
    assert_row_matches(pg_conn, conversation_id, user_id, conversation)


# --------------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------------


def test_stats_json_has_the_keys(make_redis_manager, rdb, pg_url, user_id):
    save_dirty(make_redis_manager(), user_id, 2)
    result = run_cli("stats", "--json", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert STATS_KEYS <= set(stats)
    assert stats["mode"] == "redis"
    assert stats["dirty_count"] == 2  # global: saved by another manager
    assert stats["oldest_dirty_age_seconds"] >= 0
    assert stats["cache_hits"] == stats["cache_misses"] == 0  # per process: this one read nothing
    assert stats["redis_available"] is True and stats["postgres_available"] is True
    assert stats["redis_url"] == rdb.url


def test_stats_json_postgres_only(pg_url, clean_env, capsys):
    # stats creates no table (tests/cli/test_read_only_commands.py): the database is initialised first.
    assert main(["init-db", "--database-url", pg_url]) == 0
    capsys.readouterr()
    assert main(["stats", "--json", "--database-url", pg_url]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["mode"] == "postgres"
    assert stats["redis_enabled"] is False
    assert stats["postgres_available"] is True


def test_stats_prometheus_parses_line_by_line(make_redis_manager, rdb, pg_url, user_id, clean_env, capsys):
    save_dirty(make_redis_manager(), user_id, 3)
    assert main(["stats", "--prometheus", "--database-url", pg_url, "--redis-url", rdb.url]) == 0
    samples = parse_prometheus(capsys.readouterr().out)
    for name in (
        "chat_history_cache_hits_total",
        "chat_history_cache_misses_total",
        "chat_history_flush_failures_total",
        "chat_history_oldest_dirty_age_seconds",
        "chat_history_redis_used_memory_bytes",
        "chat_history_redis_maxmemory_bytes",
    ):
        assert name in samples, name
    assert samples["chat_history_dirty_conversations"] == [("", 3.0)]
    assert samples["chat_history_redis_up"] == [("", 1.0)]
    assert samples["chat_history_postgres_up"] == [("", 1.0)]
    assert samples["chat_history_oldest_dirty_age_seconds"][0][1] >= 0
    assert samples["chat_history_redis_used_memory_bytes"][0][1] > 0
    assert samples["chat_history_info"] == [(f'{{version="{__version__}",mode="redis"}}', 1.0)]
    ((labels, value),) = samples["chat_history_redis_maxmemory_policy_info"]
    assert labels.startswith('{policy="') and value == 1.0


def test_stats_prometheus_without_dirty_reports_zero_lag(rdb, ready_pg_url):
    pg_url = ready_pg_url
    result = run_cli("stats", "--prometheus", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url))
    assert result.returncode == 0, result.stderr
    samples = parse_prometheus(result.stdout)
    assert samples["chat_history_dirty_conversations"] == [("", 0.0)]
    assert samples["chat_history_oldest_dirty_age_seconds"] == [("", 0.0)]
    assert "chat_history_cache_hit_ratio" not in samples  # no read yet: left out, not 0


def test_stats_text(make_redis_manager, rdb, pg_url, user_id):
    save_dirty(make_redis_manager(), user_id, 1)
    result = run_cli("stats", "--database-url", pg_url, "--redis-url", rdb.url)
    assert result.returncode == 0, result.stderr
    assert re.search(r"dirty conversations +1 ", result.stdout), result.stdout
    assert "This process only" in result.stdout
    assert f"{rdb.url} (up)" in result.stdout


def test_stats_with_redis_down_reports_it_and_exits_1(ready_pg_url):
    pg_url = ready_pg_url
    port = closed_port()
    result = run_cli(
        "stats",
        "--prometheus",
        env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=f"redis://:{SECRET_QUOTED}@127.0.0.1:{port}/0"),
    )
    assert result.returncode == 1
    samples = parse_prometheus(result.stdout)
    assert samples["chat_history_redis_up"] == [("", 0.0)]
    assert samples["chat_history_postgres_up"] == [("", 1.0)]
    assert "chat_history_dirty_conversations" not in samples  # unknown, not 0
    # The library's reason, not a bare "unavailable".
    assert result.stderr.startswith(f"chat-history: error: Redis is unavailable at redis://127.0.0.1:{port}/0: ")
    assert "refused" in result.stderr, result.stderr
    assert "s3cret" not in result.stdout + result.stderr


def test_format_prometheus_escapes_labels_and_skips_unknown_values():
    text = format_prometheus(
        {
            "mode": 'we"ird\\mode\n',
            "redis_enabled": True,
            "redis_available": True,
            "dirty_count": None,
            "hit_rate": None,
        }
    )
    samples = parse_prometheus(text)
    assert samples["chat_history_info"][0][0] == f'{{version="{__version__}",mode="we\\"ird\\\\mode\\n"}}'
    assert samples["chat_history_redis_up"] == [("", 0.0)]  # gauges unreadable: Redis did not answer
    assert "chat_history_dirty_conversations" not in samples
    assert "chat_history_cache_hit_ratio" not in samples
    assert all(not math.isnan(v) for values in samples.values() for _, v in values)


# --------------------------------------------------------------------------------------------------
# doctor
# --------------------------------------------------------------------------------------------------


def doctor_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """{check name: (status, detail)} from doctor's `STATUS name: detail` lines."""
    checks = {}
    for line in stdout.splitlines():
        match = re.match(r"^(OK|WARN|FAIL) +([^:]+): (.*)$", line)
        if match:
            checks[match[2]] = (match[1], match[3])
    return checks


@pytest.mark.parametrize(
    ("policy", "status", "code"),
    [("allkeys-lru", "WARN", 1), ("allkeys-lfu", "WARN", 1), ("volatile-lru", "OK", 0), ("noeviction", "OK", 0)],
)
def test_doctor_checks_the_eviction_policy(make_redis_server, ready_pg_url, policy, status, code):
    pg_url = ready_pg_url
    server = make_redis_server("--maxmemory", "64mb", "--maxmemory-policy", policy)
    result = run_cli("doctor", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=server.url))
    checks = doctor_lines(result.stdout)
    assert checks["Redis eviction policy"][0] == status, result.stdout
    assert policy in checks["Redis eviction policy"][1]
    assert result.returncode == code, result.stdout
    assert checks["PostgreSQL"][0] == checks["schema"][0] == checks["Redis"][0] == "OK", result.stdout
    assert checks["Redis memory"][0] == "OK"
    assert f"(exit {code})" in result.stdout.splitlines()[-1]


def test_doctor_warns_when_redis_refuses_the_near_caches_channels(make_redis_server, ready_pg_url):
    pg_url = ready_pg_url
    """A login whose ACL has no pub/sub channels (Redis 7's default for a new user): the near cache
    cannot be kept correct, so it stays off and doctor says so; everything else is fine."""
    server = make_redis_server()
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    admin.execute_command("ACL", "SETUSER", "nochannels", "on", ">pw-n", "~*", "resetchannels", "+@all")
    admin.close()
    url = f"redis://nochannels:pw-n@127.0.0.1:{server.port}/0"
    result = run_cli("doctor", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=url))
    checks = doctor_lines(result.stdout)
    assert checks["Redis"][0] == "OK", result.stdout
    status, detail = checks["near cache"]
    assert status == "WARN" and "refused CLIENT TRACKING" in detail, result.stdout
    assert result.returncode == 1


def test_doctor_allkeys_warning_says_why(make_redis_server, ready_pg_url, clean_env, capsys):
    pg_url = ready_pg_url
    server = make_redis_server("--maxmemory-policy", "allkeys-lru")
    assert main(["doctor", "--database-url", pg_url, "--redis-url", server.url]) == 1
    status, detail = doctor_lines(capsys.readouterr().out)["Redis eviction policy"]
    assert status == "WARN"
    assert "may evict dirty conversations" in detail and "volatile-lru" in detail


def test_doctor_warns_on_backlog_and_lag(make_redis_manager, rdb, pg_url, user_id, clean_env, capsys):
    save_dirty(make_redis_manager(), user_id, 3)
    time.sleep(0.05)
    code = main(
        ["doctor", "--database-url", pg_url, "--redis-url", rdb.url, "--max-dirty", "2", "--max-dirty-age", "0"]
    )
    checks = doctor_lines(capsys.readouterr().out)
    assert checks["write-back backlog"][0] == "WARN"
    assert "3 dirty conversations (threshold 2)" in checks["write-back backlog"][1]
    assert checks["write-back lag"][0] == "WARN"
    assert code == 1


def test_doctor_within_thresholds(make_redis_manager, rdb, pg_url, user_id, clean_env, capsys):
    save_dirty(make_redis_manager(), user_id, 3)
    main(["doctor", "--database-url", pg_url, "--redis-url", rdb.url])
    checks = doctor_lines(capsys.readouterr().out)
    assert checks["write-back backlog"] == ("OK", "3 dirty conversations (threshold 100)")
    assert checks["write-back lag"][0] == "OK"


def test_doctor_warns_when_redis_is_disabled_but_holds_unsaved_chats(make_redis_manager, rdb, pg_url, user_id):
    save_dirty(make_redis_manager(), user_id, 1)
    env = cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url, REDIS_ENABLED="false")
    result = run_cli("doctor", env=env)
    status, detail = doctor_lines(result.stdout)["rollback"]
    assert status == "WARN" and "run `chat-history flush`" in detail


def test_doctor_without_redis(ready_pg_url):
    pg_url = ready_pg_url
    result = run_cli("doctor", env=cli_env(DATABASE_URL=pg_url))
    assert result.returncode == 0, result.stdout
    assert doctor_lines(result.stdout)["Redis"][0] == "OK"


def test_doctor_fails_when_redis_is_unreachable(ready_pg_url):
    pg_url = ready_pg_url
    port = closed_port()
    result = run_cli("doctor", "--database-url", pg_url, "--redis-url", f"redis://:{SECRET_QUOTED}@127.0.0.1:{port}/0")
    assert result.returncode == 2, result.stdout
    status, detail = doctor_lines(result.stdout)["Redis"]
    assert status == "FAIL" and f"127.0.0.1:{port}" in detail
    assert "s3cret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_fails_when_postgres_is_unreachable():
    port = closed_port()
    result = run_cli("doctor", "--database-url", f"postgresql://app:{SECRET_QUOTED}@127.0.0.1:{port}/chat")
    assert result.returncode == 2
    status, detail = doctor_lines(result.stdout)["PostgreSQL"]
    assert status == "FAIL" and f"127.0.0.1:{port}" in detail
    assert "s3cret" not in result.stdout + result.stderr


def test_doctor_reports_a_missing_configuration():
    result = run_cli("doctor")
    assert result.returncode == 2
    assert doctor_lines(result.stdout)["configuration"][0] == "FAIL"


# --------------------------------------------------------------------------------------------------
# Connection failures: one line naming the server, never the password, exit 1
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["init-db"],
        ["stats"],
        ["stats", "--json"],
        ["stats", "--prometheus"],
        ["stats", "--prometheus", "--no-redis"],
        ["flush"],
    ],
    ids=" ".join,
)
def test_postgres_unreachable(rdb, args):
    port = closed_port()
    env = cli_env(
        DATABASE_URL=f"postgresql://app:{SECRET_QUOTED}@127.0.0.1:{port}/chat", REDIS_CONNECTION_STRING=rdb.url
    )
    result = run_cli(*args, env=env)
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("chat-history: error:")]
    assert len(errors) == 1, result.stderr
    assert "PostgreSQL" in errors[0] and f"127.0.0.1:{port}" in errors[0]
    assert "s3cret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if "--prometheus" in args:
        assert parse_prometheus(result.stdout)["chat_history_postgres_up"] == [("", 0.0)]
    if "--json" in args:
        assert json.loads(result.stdout)["postgres_available"] is False


def test_redis_unreachable_on_flush(pg_url):
    port = closed_port()
    result = run_cli("flush", "--database-url", pg_url, "--redis-url", f"redis://:{SECRET_QUOTED}@127.0.0.1:{port}/0")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("chat-history: error: flush failed; nothing is lost")
    assert f"Redis at redis://127.0.0.1:{port}/0" in result.stderr
    assert "s3cret" not in result.stderr


def test_wrong_password_is_never_printed(pg_scram_params):
    params = pg_scram_params.with_login("postgres", SECRET)
    result = run_cli("init-db", "--database-url", params.url)
    assert result.returncode == 1
    assert result.stderr.startswith("chat-history: error: ")
    assert "password authentication failed" in result.stderr or "PostgreSQL" in result.stderr
    assert SECRET not in result.stderr and SECRET_QUOTED not in result.stderr and "s3cret" not in result.stderr


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


def test_verbose_sets_the_library_log_level(pg_url, clean_env, capsys):
    import logging

    logger = logging.getLogger("chat_history_rs")
    before = logger.level
    assert main(["init-db", "--database-url", pg_url]) == 0
    assert "INFO" not in capsys.readouterr().err
    assert main(["-v", "init-db", "--database-url", pg_url]) == 0
    assert re.search(r"INFO chat_history_rs\.store\.postgres[.\w]*: PostgreSQL schema ready", capsys.readouterr().err)
    assert main(["init-db", "-vv", "--database-url", pg_url]) == 0
    assert "DEBUG chat_history_rs" in capsys.readouterr().err
    assert logger.level == before, "main() leaves the logger as it found it"


def test_flush_names_what_postgres_refused_and_exits_1(make_redis_manager, rdb, pg_url, pg_conn, user_id):
    manager = make_redis_manager()
    saved = save_dirty(manager, user_id, 1)
    # A hash as the seed's Python could leave it, with a role PostgreSQL's CHECK refuses.
    bad = make_conversation(1)
    bad["messages"][0]["role"] = "system"
    write_seed_hash(rdb.client, user_id, "badc0ffe", bad)

    result = run_cli("flush", "--database-url", pg_url, "--redis-url", rdb.url)

    assert result.returncode == 1, result
    assert result.stdout.startswith("wrote 1 conversation back to PostgreSQL\n")
    assert "1 still dirty in Redis" in result.stdout
    last = result.stderr.splitlines()[-1]
    assert last.startswith("chat-history: error: 1 could not be written and stay dirty in Redis")
    assert f"{user_id}:badc0ffe" in last
    ((conversation_id, conversation),) = saved.items()
    assert_row_matches(pg_conn, conversation_id, user_id, conversation)
    assert dirty_set(rdb.client) == {f"{user_id}:badc0ffe"}


def test_conflicts_lists_shows_and_restores_a_kept_copy(make_redis_manager, rdb, pg_url, pg_conn, user_id):
    """A copy that lost a divergence is listed, shown with its messages, and restored; the copy the
    restore replaces is kept aside in turn."""
    manager = make_redis_manager()
    in_redis = make_conversation(3, prefix="only in redis ")
    manager.save_conversation("c0f11c70", in_redis, user_id=user_id)
    # A newer copy reaches PostgreSQL another way (say, while this Redis was unreachable).
    in_postgres = make_conversation(2, prefix="only in postgres ")
    manager.postgres_backend.save_conversation("c0f11c70", user_id, in_postgres)
    manager.flush_dirty_conversations()
    assert manager.get_conversation("c0f11c70", user_id=user_id) == in_postgres
    env = cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url)

    listed = run_cli("conflicts", "--json", "--user", user_id, env=env)
    assert listed.returncode == 0, listed.stderr
    kept = json.loads(listed.stdout)
    assert [(c["conversation_id"], c["conversation"]) for c in kept] == [("c0f11c70", in_redis)]
    conflict_id = kept[0]["conflict_id"]

    shown = run_cli("conflicts", "--show", str(conflict_id), env=env)
    assert shown.returncode == 0, shown.stderr
    for message in in_redis["messages"]:
        assert message["content"] in shown.stdout

    restored = run_cli("conflicts", "--restore", str(conflict_id), env=env)
    assert restored.returncode == 0, restored.stderr
    assert f"restored copy {conflict_id} as conversation c0f11c70 of user {user_id}" in restored.stdout
    assert manager.get_conversation("c0f11c70", user_id=user_id)["messages"] == in_redis["messages"]
    after = {c["conversation"]["messages"][0]["content"]: c for c in manager.list_conflicts(user_id)}
    assert set(after) == {"only in redis message 0", "only in postgres message 0"}  # nothing lost either way
    assert after["only in redis message 0"]["restored_at"] is not None

    missing = run_cli("conflicts", "--show", "999999", env=env)
    assert missing.returncode == 1
    assert "no kept copy has conflict_id 999999" in missing.stderr


def test_format_prometheus_reports_an_apps_near_cache(make_redis_manager, user_id):
    """An app's own stats() through format_prometheus: the near cache's hits, invalidations and size,
    counted by the manager that served them."""
    manager = make_redis_manager()
    conv = make_conversation(3)
    manager.save_conversation("e1ea0001", conv, user_id=user_id)
    wait_until(
        lambda: (
            manager.get_conversation("e1ea0001", user_id=user_id) == conv and manager.stats()["near_cache_hits"] > 0
        ),
        timeout=10,
        what="a read answered by the near cache",
    )
    samples = parse_prometheus(format_prometheus(manager.stats()))
    assert samples["chat_history_near_cache_hits_total"][0][1] >= 1
    assert samples["chat_history_near_cache_entries"] == [("", 1.0)]
    assert samples["chat_history_near_cache_bytes"][0][1] > 0
    assert samples["chat_history_near_cache_serving"] == [("", 1.0)]
    assert "chat_history_near_cache_invalidations_total" in samples
    text = format_human(manager.stats(), "up")
    assert re.search(r"near cache +serving; \d+ hits", text), text
