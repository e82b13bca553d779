"""The operator's commands that only look write nothing (docs/monitoring.md, "The `chat-history` command"):
`stats` in its three formats, `doctor` and `conflicts` leave every dirty conversation dirty and create no table,
checked in PostgreSQL and Redis before and after; only `flush`, `init-db` and `conflicts --restore` write. Every
command resolves the mode as `ChatHistoryManager()` does (CHAT_HISTORY_MODE), reads ./.env, and doctor
names the cause of a Redis it cannot use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.redis_support import CLUSTER, dirty_set, pg_conversation_ids, pg_snapshot
from support.servers import closed_port
from test_cli import cli_env, doctor_lines, public_tables, run_cli, save_dirty

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "streamlit_app"))
import chat_config  # noqa: E402 - after the sys.path.insert above

PASSWORD = "s3cret-Pa55:word@x/y"
PASSWORD_QUOTED = "s3cret-Pa55%3Aword%40x%2Fy"

LOOKING = [
    ["stats"],
    ["stats", "--json"],
    ["stats", "--prometheus"],
    ["doctor"],
    ["conflicts"],
    ["conflicts", "--json"],
]


def init_db(pg_url: str) -> None:
    result = run_cli("init-db", env=cli_env(DATABASE_URL=pg_url))
    assert result.returncode == 0, result.stderr


def redis_state(client) -> dict:
    """What a write-back or a schema change in Redis would change: the dirty members and every key. The change
    feed's lease and mark (`feed:*`) are left out: the setup's manager keeps following PostgreSQL meanwhile."""
    keys = sorted(key for key in client.scan_iter(count=1000) if not key.startswith("feed:"))
    return {"dirty": dirty_set(client), "keys": keys}


@pytest.mark.parametrize("command", LOOKING, ids=" ".join)
def test_a_command_that_looks_leaves_every_dirty_conversation_dirty(
    command, make_redis_manager, rdb, pg_url, pg_conn, user_id
):
    saved = save_dirty(make_redis_manager(), user_id, 3)
    before = (redis_state(rdb.client), pg_snapshot(pg_conn), public_tables(pg_conn))
    assert len(before[0]["dirty"]) == 3
    result = run_cli(*command, env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url))
    assert result.returncode in (0, 1), result.stderr  # doctor may warn (an allkeys-* policy on a shared server)
    assert "Traceback" not in result.stderr
    after = (redis_state(rdb.client), pg_snapshot(pg_conn), public_tables(pg_conn))
    assert after == before, f"`{' '.join(command)}` changed something"
    assert not set(saved) & pg_conversation_ids(pg_conn), "nothing was written back"


@pytest.mark.parametrize("command", LOOKING, ids=" ".join)
def test_a_command_that_looks_creates_no_table(command, rdb, pg_url, pg_conn):
    result = run_cli(*command, env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url))
    assert public_tables(pg_conn) == set(), f"`{' '.join(command)}` created tables"
    assert result.returncode != 0, "a database without the schema is reported"
    assert "Traceback" not in result.stderr
    if command[0] == "doctor":
        status, detail = doctor_lines(result.stdout)["schema"]
        assert status == "FAIL" and "chat-history init-db" in detail, result.stdout
        assert result.returncode == 2
    elif command[0] == "stats":
        assert "the tables are missing: run `chat-history init-db`" in result.stderr, result.stderr


def test_only_flush_init_db_and_restore_write(make_redis_manager, rdb, pg_url, pg_conn, user_id):
    """The counterpart: init-db creates the tables, flush writes the dirty conversations back."""
    saved = save_dirty(make_redis_manager(), user_id, 2)
    env = cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url)
    assert run_cli("flush", env=env).returncode == 0
    assert set(saved) <= pg_conversation_ids(pg_conn)
    assert dirty_set(rdb.client) == set()


# --------------------------------------------------------------------------------------------------
# One mode for everyone: CHAT_HISTORY_MODE
# --------------------------------------------------------------------------------------------------


def app_service_env(pg_url: str, redis_url: str, **extra: str) -> dict:
    """The environment as App Service sets it for the example app."""
    return cli_env(
        CHAT_HISTORY_MODE="redis", DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=redis_url, REDIS_ENABLED="true", **extra
    )


def test_with_chat_history_mode_redis_the_library_config_stats_and_the_app_all_say_redis(rdb, pg_url):
    init_db(pg_url)
    env = app_service_env(pg_url, rdb.url)
    script = (
        "from chat_history_rs import ChatHistoryManager\n"
        "with ChatHistoryManager(background_flush=False) as m:\n"
        "    print(m.stats()['mode'], m.redis_enabled)\n"
    )
    library = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert library.stdout.split() == ["redis", "True"], library.stderr
    config = run_cli("config", "--json", env=env)
    assert config.returncode == 0, config.stderr
    resolved = json.loads(config.stdout)
    assert resolved["settings"]["mode"] == {"value": "redis", "source": "env CHAT_HISTORY_MODE"}
    assert resolved["effective_mode"] == "redis"
    text = run_cli("config", env=env).stdout
    assert "effective mode: redis (mode redis, env CHAT_HISTORY_MODE)" in text
    stats = run_cli("stats", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["mode"] == "redis"
    assert "mode:                     redis" in run_cli("stats", env=env).stdout
    prometheus = run_cli("stats", "--prometheus", env=env).stdout
    assert 'mode="redis"' in prometheus
    assert (
        "OK    mode: redis: Redis over PostgreSQL, write-back (env CHAT_HISTORY_MODE)"
        in run_cli("doctor", env=env).stdout
    )
    app = chat_config.load_settings(env)
    assert (app.mode, app.redis_enabled) == ("redis", True)


def test_a_postgres_mode_with_redis_configured_is_reported_as_postgres(rdb, pg_url):
    init_db(pg_url)
    env = cli_env(CHAT_HISTORY_MODE="postgres", DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url)
    stats = run_cli("stats", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["mode"] == "postgres"
    # During a rollback the operator still sees what Redis holds.
    assert json.loads(stats.stdout)["redis_enabled"] is True
    assert "not used by the app in postgres mode" in run_cli("stats", env=env).stdout


def test_a_local_mode_has_no_servers_and_the_flag_wins(pg_url):
    init_db(pg_url)
    env = cli_env(CHAT_HISTORY_MODE="local", DATABASE_URL=pg_url)
    result = run_cli("stats", "--json", env=env)
    assert result.returncode == 1
    assert "the mode is local (env CHAT_HISTORY_MODE)" in result.stderr and "--mode postgres" in result.stderr
    flagged = run_cli("stats", "--json", "--mode", "postgres", env=env)
    assert flagged.returncode == 0, flagged.stderr
    assert json.loads(flagged.stdout)["mode"] == "postgres"
    config = json.loads(run_cli("config", "--json", "--mode", "local_psql", env=env).stdout)
    assert config["settings"]["mode"] == {"value": "local_psql", "source": "keyword"}
    assert config["effective_mode"] == "postgres"


def test_an_unknown_mode_is_one_line_naming_the_variable(pg_url):
    result = run_cli("stats", env=cli_env(CHAT_HISTORY_MODE="cloud", DATABASE_URL=pg_url))
    assert result.returncode == 1
    assert result.stderr.startswith("chat-history: error: CHAT_HISTORY_MODE must be 'local', 'postgres' or 'redis'")


# --------------------------------------------------------------------------------------------------
# doctor and stats name the real cause
# --------------------------------------------------------------------------------------------------


def test_doctor_names_a_refused_login_and_still_checks_postgres(make_redis_server, pg_url):
    init_db(pg_url)
    server = make_redis_server("--requirepass", "the-right-one")
    url = f"redis://:{PASSWORD_QUOTED}@127.0.0.1:{server.port}/0"
    result = run_cli("doctor", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=url))
    assert result.returncode == 2, result.stdout
    checks = doctor_lines(result.stdout)
    status, detail = checks["Redis"]
    assert status == "FAIL" and "the server refused the login" in detail, result.stdout
    assert "unreachable" not in detail
    assert checks["PostgreSQL"][0] == checks["schema"][0] == "OK", result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def test_doctor_names_tls_on_one_side_only(make_redis_server, pg_url):
    init_db(pg_url)
    server = make_redis_server()
    result = run_cli(
        "doctor", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=f"rediss://127.0.0.1:{server.port}/0")
    )
    status, detail = doctor_lines(result.stdout)["Redis"]
    assert status == "FAIL" and "speaks plain Redis, not TLS" in detail, result.stdout


def test_stats_of_a_misconfigured_redis_is_one_line_naming_the_cause(make_redis_server, pg_url):
    init_db(pg_url)
    server = make_redis_server("--requirepass", "the-right-one")
    url = f"redis://:{PASSWORD_QUOTED}@127.0.0.1:{server.port}/0"
    result = run_cli("stats", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=url))
    assert result.returncode == 1
    assert "refused the login" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "s3cret" not in result.stdout + result.stderr


def test_doctor_names_the_cause_of_an_outage(pg_url):
    init_db(pg_url)
    port = closed_port()
    result = run_cli("doctor", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=f"redis://127.0.0.1:{port}/0"))
    status, detail = doctor_lines(result.stdout)["Redis"]
    assert status == "FAIL" and f"unreachable at redis://127.0.0.1:{port}/0: " in detail, result.stdout
    assert "refused" in detail, detail


def test_stats_reports_the_layout_by_its_name(make_redis_manager, rdb, pg_url, user_id):
    save_dirty(make_redis_manager(), user_id, 1)
    result = run_cli("stats", "--json", env=cli_env(DATABASE_URL=pg_url, REDIS_CONNECTION_STRING=rdb.url))
    assert json.loads(result.stdout)["redis_layout"] == ("cluster" if CLUSTER else "single")


# --------------------------------------------------------------------------------------------------
# conflicts: a long title is shortened in the listing
# --------------------------------------------------------------------------------------------------


def test_conflicts_shortens_a_megabyte_title(pg_url, pg_conn, user_id):
    init_db(pg_url)
    title = "T" * 1_000_000
    with pg_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO conversation_conflicts (conversation_id, user_client_id, title, model, created_at,"
            " last_modified, messages, fingerprint, reason) VALUES (%s, %s, %s, 'gpt-4o', NOW(), NOW(),"
            " %s::jsonb, 1, 'kept in a test')",
            (
                "b1gt1tle",
                user_id,
                title,
                json.dumps([{"role": "user", "content": "C" * 100_000, "time": "2026-01-01T00:00:00+00:00"}]),
            ),
        )
    env = cli_env(DATABASE_URL=pg_url)
    listing = run_cli("conflicts", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "b1gt1tle" in listing.stdout and "TTT..." in listing.stdout
    assert len(listing.stdout) < 2_000, len(listing.stdout)
    (conflict_id,) = [line.split()[0] for line in listing.stdout.splitlines() if "b1gt1tle" in line]
    shown = run_cli("conflicts", "--show", conflict_id, env=env)
    assert len(shown.stdout) < 2_000, len(shown.stdout)
    whole = json.loads(run_cli("conflicts", "--json", env=env).stdout)
    assert whole[0]["conversation"]["title"] == title, "--json keeps it whole"


# --------------------------------------------------------------------------------------------------
# .env
# --------------------------------------------------------------------------------------------------


def test_the_cli_reads_dot_env_and_the_environment_wins(tmp_path, pg_url):
    (tmp_path / ".env").write_text(
        f"# the app's settings\nexport CHAT_HISTORY_MODE=redis\nDATABASE_URL='{pg_url}'\n"
        'REDIS_CONNECTION_STRING="redis://127.0.0.1:1/0"\nREDIS_TTL_SECONDS=77  # seconds\n',
        encoding="utf-8",
    )

    def config(env: dict, *args: str) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "chat_history_rs", "config", "--json", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    settings = config(cli_env())["settings"]
    assert settings["mode"] == {"value": "redis", "source": "env CHAT_HISTORY_MODE"}
    assert settings["redis_ttl"] == {"value": 77, "source": "env REDIS_TTL_SECONDS"}
    assert settings["connection_string"]["source"] == "env DATABASE_URL"
    assert config(cli_env(REDIS_TTL_SECONDS="88"))["settings"]["redis_ttl"]["value"] == 88, "a variable set wins"
    other = tmp_path / "other.env"
    other.write_text("REDIS_TTL_SECONDS=99\n", encoding="utf-8")
    assert config(cli_env(), "--env-file", str(other))["settings"]["redis_ttl"]["value"] == 99
    missing = subprocess.run(
        [sys.executable, "-m", "chat_history_rs", "config", "--env-file", str(tmp_path / "nope")],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "no such file" in missing.stderr
