"""One configuration (README, "Configuration"): a keyword argument beats its environment variable,
which beats the default, resolved once by the library for ChatHistoryManager, `chat-history` and the
example app alike; `chat-history config` shows the result without a secret in it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from chat_history_rs import ChatHistoryManager, ConfigurationError, resolve_settings
from test_cli import CLEARED_ENV, SECRET, SECRET_QUOTED, cli_env, run_cli

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "streamlit_app"
sys.path.insert(0, str(APP_DIR))
import chat_config  # noqa: E402 - after the sys.path.insert above

# Every variable the library reads, cleared from the process for the in-process tests.
LIBRARY_VARIABLES = (*CLEARED_ENV, "REDIS_CLUSTER")


@pytest.fixture
def no_library_env(monkeypatch):
    for name in LIBRARY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# (setting, keyword value, variable, its value, the value it gives, the default)
PRECEDENCE = [
    ("connection_string", "postgresql://kw@h/db", "DATABASE_URL", "postgresql://e@h/db", "postgresql://e@h/db", None),
    ("redis_enabled", False, "REDIS_ENABLED", "yes", True, False),
    ("redis_connection_string", "redis://kw:1/0", "REDIS_CONNECTION_STRING", "redis://e:1/0", "redis://e:1/0", None),
    ("redis_host", "kw.example", "REDIS_HOST", "env.example", "env.example", None),
    ("redis_port", 7001, "REDIS_PORT", "7002", 7002, 6380),
    ("redis_ssl", True, "REDIS_SSL", "off", False, True),
    ("redis_ttl", 11, "REDIS_TTL_SECONDS", "22", 22, 1800),
    ("redis_ttl", 11, "REDIS_CACHE_TTL", "33", 33, 1800),
    ("redis_ca_file", "/kw/ca.pem", "REDIS_CA_FILE", "/env/ca.pem", "/env/ca.pem", None),
    ("redis_cluster", False, "REDIS_CLUSTER", "true", True, None),
    ("redis_compression", "zlib", "REDIS_COMPRESSION", "on", "zstd", "off"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "keyword", "variable", "raw", "from_env", "default"), PRECEDENCE)
def test_keyword_beats_environment_beats_default(name, keyword, variable, raw, from_env, default):
    environ = {variable: raw}
    by_keyword = resolve_settings(environ, **{name: keyword})
    assert (by_keyword.value(name), by_keyword.source(name)) == (keyword, "keyword")
    by_env = resolve_settings(environ)
    assert (by_env.value(name), by_env.source(name)) == (from_env, f"env {variable}")
    by_default = resolve_settings({})
    assert (by_default.value(name), by_default.source(name)) == (default, "default")


def test_process_environment_is_the_default_mapping(no_library_env):
    no_library_env.setenv("REDIS_TTL_SECONDS", "44")
    assert resolve_settings().value("redis_ttl") == 44
    assert resolve_settings({}).value("redis_ttl") == 1800, "a given mapping replaces the process environment"


def test_the_two_ttl_variables():
    both = resolve_settings({"REDIS_TTL_SECONDS": "70", "REDIS_CACHE_TTL": "60"})
    assert (both.value("redis_ttl"), both.source("redis_ttl")) == (70, "env REDIS_TTL_SECONDS")
    for variable in ("REDIS_TTL_SECONDS", "REDIS_CACHE_TTL"):
        with pytest.raises(ConfigurationError, match=f"^{variable} must be a whole number of seconds, got 'soon'$"):
            resolve_settings({variable: "soon"})


def test_redis_location_url_beats_parts_within_each_level():
    env = {"REDIS_HOST": "parts.example", "REDIS_CONNECTION_STRING": "redis://url.example:1/0", "REDIS_ENABLED": "1"}
    postgres = {"mode": "postgres", "connection_string": "postgresql://h/db"}
    assert resolve_settings(env, **postgres).redis_url == "redis://url.example:1/0"
    assert resolve_settings(env, redis_host="kw.example", **postgres).redis_url == "rediss://kw.example:6380/0"
    kw_url = resolve_settings(env, redis_host="kw.example", redis_connection_string="redis://kwurl:2/0", **postgres)
    assert kw_url.redis_url == "redis://kwurl:2/0"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_PORT", "abc"),
        ("REDIS_PORT", "70000"),
        ("REDIS_SSL", "maybe"),
        ("REDIS_ENABLED", "maybe"),
        ("REDIS_CLUSTER", "sometimes"),
        ("REDIS_TTL_SECONDS", "-5"),
        ("POSTGRES_PORT", "x"),
    ],
)
def test_a_bad_value_names_its_variable(no_library_env, tmp_path, variable, value):
    with pytest.raises(ConfigurationError, match=f"^{variable} must be .*, got '{value}'$"):
        resolve_settings({variable: value, "POSTGRES_HOST": "h"})
    no_library_env.setenv(variable, value)
    no_library_env.setenv("POSTGRES_HOST", "h")
    with pytest.raises(ConfigurationError, match=variable):
        ChatHistoryManager(base_dir=str(tmp_path))
    result = run_cli("config", env=cli_env(**{variable: value, "POSTGRES_HOST": "h"}))
    assert result.returncode == 1
    assert result.stderr.startswith(f"chat-history: error: {variable} must be ")
    with pytest.raises(chat_config.SettingsError, match=variable):
        chat_config.load_settings({"CHAT_HISTORY_MODE": "local_redis", variable: value, "POSTGRES_HOST": "h"})


def test_a_bad_connection_string_names_where_it_came_from():
    with pytest.raises(ConfigurationError, match="^DATABASE_URL: the PostgreSQL connection string is not valid"):
        resolve_settings({"DATABASE_URL": f"host=h password='{SECRET}"}, mode="postgres").check()
    with pytest.raises(ConfigurationError, match="^redis_connection_string: the Redis connection string is not valid"):
        resolve_settings(mode="redis", connection_string="host=h", redis_connection_string="http://h").check()


SECRET_ENV = {
    "DATABASE_URL": f"postgresql://app:{SECRET_QUOTED}@db.example.com:5432/chat?sslmode=verify-full",
    "REDIS_CONNECTION_STRING": f"rediss://:{SECRET}@cache.example.com:6380/0",
    "REDIS_PASSWORD": SECRET,
    "REDIS_ENABLED": "true",
    "POSTGRES_HOST": "parts.example.com",
    "POSTGRES_ADMIN_PASSWORD": SECRET,
}


def assert_no_secret(text: str) -> None:
    for secret in (SECRET, SECRET_QUOTED, "s3cret", "Pa55"):
        assert secret not in text, f"{secret!r} leaked: {text}"


@pytest.mark.parametrize("as_json", [False, True])
def test_config_command_never_prints_a_secret(as_json):
    flags = ["--redis-url", f"redis://user:{SECRET_QUOTED}@flag.example:6379/1", "config", "--mode", "postgres"]
    result = run_cli(*flags, *(["--json"] if as_json else []), env=cli_env(**SECRET_ENV))
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr)
    if as_json:
        report = json.loads(result.stdout)
        settings = report["settings"]
        assert report["effective_mode"] == "redis"
        assert settings["connection_string"] == {
            "value": "postgresql://app@db.example.com:5432/chat?sslmode=verify-full",
            "source": "env DATABASE_URL",
        }
        assert settings["redis_connection_string"] == {"value": "redis://flag.example:6379/1", "source": "keyword"}
        assert settings["redis_password"] == {"value": "<redacted>", "source": "env REDIS_PASSWORD"}
        assert settings["history_days"] == {"value": 7, "source": "default"}
    else:
        lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
        assert lines["connection_string"] == [
            "postgresql://app@db.example.com:5432/chat?sslmode=verify-full", "env", "DATABASE_URL"
        ]  # fmt: skip
        assert lines["redis_password"] == ["<redacted>", "env", "REDIS_PASSWORD"]
        assert lines["redis_connection_string"] == ["redis://flag.example:6379/1", "keyword"]
        assert lines["redis_ttl"] == ["1800", "default"]


def test_config_command_shows_a_connection_string_that_does_not_parse_as_hidden():
    env = cli_env(DATABASE_URL=f"host=h password='{SECRET}")
    result = run_cli("config", "--json", env=env)
    assert result.returncode == 0, "local mode does not need it"
    assert_no_secret(result.stdout + result.stderr)
    value = json.loads(result.stdout)["settings"]["connection_string"]["value"]
    assert "hidden" in value
    refused = run_cli("config", "--mode", "postgres", env=env)
    assert refused.returncode == 1
    assert "DATABASE_URL: the PostgreSQL connection string is not valid" in refused.stderr
    assert_no_secret(refused.stdout + refused.stderr)


def app_environments(pg_params, rdb_url: str) -> list[dict[str, str]]:
    parts = {
        "POSTGRES_HOST": pg_params.host,
        "POSTGRES_PORT": str(pg_params.port),
        "POSTGRES_ADMIN_LOGIN": pg_params.user,
        "POSTGRES_DATABASE": pg_params.dbname,
        "POSTGRES_SSLMODE": "disable",
    }
    return [
        {"CHAT_HISTORY_MODE": "local_psql", **parts},
        {"CHAT_HISTORY_MODE": "local_redis", **parts, "REDIS_CONNECTION_STRING": rdb_url, "REDIS_TTL_SECONDS": "77"},
        {"CHAT_HISTORY_MODE": "local_psql", "DATABASE_URL": pg_params.url, **parts, "REDIS_CACHE_TTL": "66"},
    ]


def test_cli_example_and_binding_agree(pg_params, rdb, no_library_env):
    for environ in app_environments(pg_params, rdb.url):
        library = resolve_settings(environ, mode="postgres")
        app = chat_config.load_settings(environ)
        assert app.connection_string == library.value("connection_string")
        assert app.redis_connection_string == library.value("redis_connection_string")
        if library.source("redis_ttl") != "default":
            assert app.redis_ttl == library.value("redis_ttl")
        result = run_cli("config", "--mode", "postgres", "--json", env=cli_env(**environ))
        assert result.returncode == 0, result.stderr
        cli = json.loads(result.stdout)["settings"]
        assert {e["name"]: {"value": e["value"], "source": e["source"]} for e in library.entries()} == cli
        # The manager the app opens resolves the same PostgreSQL (its repr() is redacted the same way).
        with ChatHistoryManager(**{**app.manager_kwargs(), "background_flush": False}) as manager:
            assert f'postgres="{library.postgres_url}"' in repr(manager)
            if app.redis_enabled:
                assert manager.stats()["redis_url"] == library.redis_url


def test_repr_of_resolved_settings_holds_no_secret():
    resolved = resolve_settings(SECRET_ENV, mode="postgres")
    assert_no_secret(repr(resolved))
    assert_no_secret(repr(resolved.entries()))
    assert resolved.value("redis_password") == SECRET, "value() is for passing on, whole"
