"""The first hour of a newcomer, against real servers: a misconfigured Redis is a ConfigurationError
naming the cause while a Redis that is down is an outage (README, "Misconfiguration or outage"), every
constructor argument is checked by name (README, "Configuration"), CHAT_HISTORY_MODE chooses the mode
(README, "Modes, and how to choose one"), the README's Quick start runs as is in a fresh virtualenv and
the README stays within 350 lines, and the stubs, the README's table and .env.example list what the
library takes.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

import chat_history_rs
from chat_history_rs import (
    AsyncChatHistoryManager,
    ChatHistoryManager,
    ConfigurationError,
    InvalidTypeError,
    resolve_settings,
)
from chat_history_rs._core import _ENVIRONMENT_VARIABLES, _MANAGER_KEYWORDS
from chat_history_rs.envfile import parse_env_file
from support.redis_support import CLUSTER, make_conversation, pg_conversation_ids
from support.servers import closed_port

ROOT = Path(__file__).resolve().parents[2]
WRONG = "wr0ng-Pa55:w/ord"
RIGHT = "r1ght-Pa55+word"
PROVIDERS = {"redis_credential_provider", "postgres_credential_provider"}

# Every variable a test of this module may find set in the developer's environment.
LIBRARY_ENV = set(_ENVIRONMENT_VARIABLES)


@pytest.fixture
def bare_env(monkeypatch):
    """No variable the library reads is set: each test sets what it means."""
    for name in LIBRARY_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def redis_mode(pg_url: str, url: str, **kwargs):
    return ChatHistoryManager(
        mode="redis", connection_string=pg_url, redis_connection_string=url, background_flush=False, **kwargs
    )


def refused(pg_url: str, url: str, **kwargs) -> str:
    """The ConfigurationError's message of a manager that must refuse to start; no secret in it."""
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as caught:
        redis_mode(pg_url, url, **kwargs)
    message = str(caught.value)
    assert time.monotonic() - started < 10, "a misconfiguration is told within a few timeouts"
    for secret in (WRONG, RIGHT, "r1ght", "wr0ng"):
        assert secret not in message, message
    return message


# --------------------------------------------------------------------------------------------------
# Misconfiguration: a ConfigurationError at construction, naming the cause
# --------------------------------------------------------------------------------------------------


def test_a_wrong_password_is_a_configuration_error(make_redis_server, pg_url):
    server = make_redis_server("--requirepass", RIGHT)
    message = refused(pg_url, f"redis://:{WRONG.replace('/', '%2F')}@127.0.0.1:{server.port}/0")
    assert message.startswith(f"Redis at redis://127.0.0.1:{server.port}/0: the server refused the login"), message
    assert "password" in message
    message = refused(pg_url, f"redis://127.0.0.1:{server.port}/0")
    assert "refused the login" in message and "NOAUTH" in message, message


def test_a_plain_server_behind_rediss_is_a_configuration_error(make_redis_server, pg_url, bare_env):
    server = make_redis_server()
    message = refused(pg_url, f"rediss://127.0.0.1:{server.port}/0")
    assert "speaks plain Redis, not TLS" in message and "redis://" in message, message
    # Redis by parts keeps its Azure defaults (redis_ssl=True): pointed at a local plain Redis, the same.
    with pytest.raises(ConfigurationError, match="speaks plain Redis, not TLS.*redis_ssl=False"):
        ChatHistoryManager(
            mode="redis",
            connection_string=pg_url,
            redis_host="127.0.0.1",
            redis_port=server.port,
            background_flush=False,
        )
    bare_env.setenv("CHAT_HISTORY_MODE", "redis")
    bare_env.setenv("DATABASE_URL", pg_url)
    bare_env.setenv("REDIS_HOST", "127.0.0.1")
    bare_env.setenv("REDIS_PORT", str(server.port))
    with pytest.raises(ConfigurationError, match="REDIS_SSL=false"):
        ChatHistoryManager(background_flush=False)


def test_a_tls_server_behind_a_plain_url_is_a_configuration_error(tls_redis_server, pg_url):
    message = refused(pg_url, f"redis://localhost:{tls_redis_server.port}/0")
    assert "the server speaks TLS: use a rediss:// URL" in message, message


def test_a_certificate_that_does_not_verify_is_a_configuration_error(tls_redis_server, pki, pg_url):
    url = f"rediss://localhost:{tls_redis_server.port}/0"
    message = refused(pg_url, url)  # the test CA is not among the built-in roots
    assert "TLS failed: the server's certificate does not verify" in message and "redis_ca_file" in message, message
    with redis_mode(pg_url, url, redis_ca_file=str(pki.ca)) as manager:
        assert manager.stats()["redis_available"] is True


def test_a_database_number_on_a_cluster_url_is_a_configuration_error(redis_cluster_servers, pg_url):
    redis_cluster_servers.wait_healthy()
    url = re.sub(r"/0$", "", redis_cluster_servers.url) + "/1"
    message = refused(pg_url, url)
    assert "database 1 on a Redis Cluster, which has only database 0: remove '/1'" in message, message


@pytest.fixture
def not_redis():
    """A loopback port whose server answers every connection like a web server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def test_a_server_that_is_not_redis_is_a_configuration_error(not_redis, pg_server, pg_url):
    message = refused(pg_url, f"redis://127.0.0.1:{not_redis}/0")
    assert "the server does not speak Redis's protocol" in message, message
    # The database's own address given as Redis's: PostgreSQL closes on Redis's bytes without a word.
    message = refused(pg_url, f"redis://127.0.0.1:{pg_server.port}/0")
    assert "the server is PostgreSQL, not Redis" in message, message


# --------------------------------------------------------------------------------------------------
# An outage is not a misconfiguration: fall back to PostgreSQL, and say why
# --------------------------------------------------------------------------------------------------


def test_a_redis_that_is_down_at_start_serves_from_postgres(pg_url, pg_conn, user_id):
    port = closed_port()
    started = time.monotonic()
    with redis_mode(pg_url, f"redis://:{RIGHT}@127.0.0.1:{port}/0") as manager:
        assert time.monotonic() - started < 5
        conversation = make_conversation(2)
        manager.save_conversation("d0wn0001", conversation, user_id=user_id)
        assert "d0wn0001" in pg_conversation_ids(pg_conn), "the save went straight to PostgreSQL"
        assert manager.get_conversation("d0wn0001", user_id=user_id) == conversation
        stats = manager.stats()
        assert stats["redis_available"] is False
        assert f"127.0.0.1:{port}" in stats["redis_error"] and "refused" in stats["redis_error"], stats
        assert RIGHT not in repr(stats)


def test_a_password_changed_after_construction_falls_back_and_names_the_cause(
    make_redis_server, pg_url, pg_conn, user_id, caplog
):
    server = make_redis_server("--requirepass", RIGHT)
    url = f"redis://:{RIGHT.replace('+', '%2B')}@127.0.0.1:{server.port}/0"
    with redis_mode(pg_url, url, near_cache_bytes=0) as manager:
        assert manager.stats()["redis_available"] is True
        admin = redis.Redis(host="127.0.0.1", port=server.port, password=RIGHT)
        admin.config_set("requirepass", WRONG)
        admin.close()
        admin = redis.Redis(host="127.0.0.1", port=server.port, password=WRONG)
        admin.client_kill_filter(_type="normal", skipme=True)
        admin.close()
        caplog.set_level(logging.WARNING, logger="chat_history_rs")
        conversation = make_conversation(2)
        manager.save_conversation("r0tated1", conversation, user_id=user_id)  # no exception: it falls back
        assert "r0tated1" in pg_conversation_ids(pg_conn)
        why = manager.stats()["redis_error"]
        assert why and re.search(r"WRONGPASS|[Aa]uthentication", why), why
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert re.search(r"Redis is unavailable \(.*(WRONGPASS|[Aa]uthentication)", logged), logged
        for text in (why, logged):
            assert RIGHT not in text and WRONG not in text


# --------------------------------------------------------------------------------------------------
# Every keyword argument is checked, by name
# --------------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("near_cache_bytes", -1),
    ("redis_pool_size", -2),
    ("redis_pool_size", 0),
    ("redis_pool_size", 2**70),
    ("redis_timeout", 0),
    ("redis_timeout", -0.5),
    ("redis_timeout", math.nan),
    ("postgres_pool_size", 0),
    ("postgres_connect_timeout", 0),
    ("postgres_statement_timeout", -1.0),
    ("postgres_lock_timeout", math.inf),
    ("credential_refresh_margin", math.nan),
    ("flush_interval", 0),
    ("close_timeout", -1),
    ("history_days", -1),
    ("redis_port", 0),
    ("redis_port", 65536),
    ("redis_ttl", 0),
    ("flush_batch_size", 0),
    ("mode", "cloud"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
@pytest.mark.parametrize("manager_class", [ChatHistoryManager, AsyncChatHistoryManager])
def test_a_bad_value_is_a_configuration_error_naming_the_argument(manager_class, name, value, tmp_path, bare_env):
    kwargs = {"mode": "local", "base_dir": str(tmp_path), name: value}
    with pytest.raises(ConfigurationError, match=f"^{name} must be"):
        manager_class(**kwargs)
    with pytest.raises(ConfigurationError, match=f"^{name} must be"):
        resolve_settings({}, **{name: value})


WRONG_TYPES = [
    ("mode", 3),
    ("base_dir", 42),
    ("connection_string", b"postgresql://h/db"),
    ("history_days", "7"),
    ("redis_enabled", "yes"),
    ("redis_pool_size", "8"),
    ("redis_pool_size", 8.0),
    ("redis_timeout", "0.5"),
    ("redis_port", True),
    ("redis_ssl", 1),
    ("near_cache_bytes", 1.5),
    ("flush_batch_size", 10.0),
    ("background_flush", "false"),
]


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES)
def test_a_wrong_type_is_an_invalid_type_error_naming_the_argument(name, value, tmp_path, bare_env):
    kwargs = {"mode": "local", "base_dir": str(tmp_path), name: value}
    with pytest.raises(InvalidTypeError, match=f"^{name} must be .*, got {type(value).__name__}$"):
        ChatHistoryManager(**kwargs)


def test_every_keyword_argument_is_checked(tmp_path, bare_env):
    """Something no keyword takes is refused by name for each of them, whichever it is."""
    assert "near_cache_bytes" in _MANAGER_KEYWORDS and len(_MANAGER_KEYWORDS) == len(set(_MANAGER_KEYWORDS))
    for name in _MANAGER_KEYWORDS:
        kwargs = {"base_dir": str(tmp_path), name: object()}
        with pytest.raises((InvalidTypeError, ConfigurationError), match=f"^{name} must be"):
            ChatHistoryManager(**kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'redis_pool'"):
        ChatHistoryManager(mode="local", base_dir=str(tmp_path), redis_pool=4)


def test_none_means_not_given(tmp_path, bare_env):
    bare_env.setenv("NEAR_CACHE_BYTES", "1024")
    resolved = resolve_settings(near_cache_bytes=None, redis_pool_size=None)
    assert (resolved.value("near_cache_bytes"), resolved.source("near_cache_bytes")) == (1024, "env NEAR_CACHE_BYTES")
    assert (resolved.value("redis_pool_size"), resolved.source("redis_pool_size")) == (8, "default")
    ChatHistoryManager(mode=None, base_dir=str(tmp_path), history_days=None, redis_timeout=None).close()


def _stub_parameters(tree: ast.Module, owner: str | None, function: str) -> list[str]:
    for node in tree.body:
        body = node.body if owner is not None and isinstance(node, ast.ClassDef) and node.name == owner else None
        candidates = body if body is not None else ([node] if owner is None else [])
        for item in candidates:
            if isinstance(item, ast.FunctionDef) and item.name == function:
                args = item.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                return [n for n in names if n not in ("self", "cls", "environ")]
    raise AssertionError(f"{owner}.{function} not in the stubs")


def test_the_stubs_and_the_readme_list_every_keyword_argument():
    package = Path(chat_history_rs.__file__).parent
    stubs = ast.parse((package / "_core.pyi").read_text())
    every_stub = ast.Module(
        body=[n for f in sorted(package.glob("*.pyi")) for n in ast.parse(f.read_text()).body], type_ignores=[]
    )
    # pyo3's constructor is __new__; the Python class's is __init__.
    for owner, constructor in (("ChatHistoryManager", "__new__"), ("AsyncChatHistoryManager", "__init__")):
        assert _stub_parameters(every_stub, owner, constructor) == list(_MANAGER_KEYWORDS), owner
    settings = [name for name in _MANAGER_KEYWORDS if name not in PROVIDERS]
    assert _stub_parameters(stubs, None, "resolve_settings") == settings
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ", 5)]
    listed = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert set(_MANAGER_KEYWORDS) <= listed, set(_MANAGER_KEYWORDS) - listed


APP_VARIABLES = {
    "LOCAL_TEST_CLIENT_ID",
    "LOCAL_TEST_USERNAME",
    "CONVERSATION_HISTORY_DAYS",
    "CHAT_HISTORY_FLUSH_INTERVAL",
}
OTHER_VARIABLES = {
    "CHAT_HISTORY_ASYNC_THREADS",
    "REDIS_AUTH",
    "POSTGRES_AUTH",
    "POSTGRES_ENTRA_USER",
    "AZURE_CLIENT_ID",
}
# Read by the library as parts of the connection string POSTGRES_HOST builds (its source says POSTGRES_HOST).
POSTGRES_PARTS = {
    "POSTGRES_PORT",
    "POSTGRES_DATABASE",
    "POSTGRES_ADMIN_LOGIN",
    "POSTGRES_ADMIN_PASSWORD",
    "POSTGRES_SSLMODE",
}


def test_env_example_is_complete_and_resolves():
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    named = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert LIBRARY_ENV | APP_VARIABLES | OTHER_VARIABLES <= named, (
        LIBRARY_ENV | APP_VARIABLES | OTHER_VARIABLES
    ) - named
    assert named <= LIBRARY_ENV | APP_VARIABLES | OTHER_VARIABLES | {"DATABASE_URL"}, "a variable nobody reads"
    # The values it sets are what the library resolves, each from its own variable.
    example = parse_env_file(ROOT / ".env.example")
    resolved = resolve_settings(example)
    resolved.check()
    sources = {entry["source"] for entry in resolved.entries()}
    for name in set(example) & LIBRARY_ENV - POSTGRES_PARTS:
        assert f"env {name}" in sources, name


# --------------------------------------------------------------------------------------------------
# CHAT_HISTORY_MODE
# --------------------------------------------------------------------------------------------------


def test_chat_history_mode_chooses_the_mode_when_no_argument_does(bare_env, pg_url, rdb, tmp_path):
    # As App Service sets it for the example app.
    for name, value in (
        ("CHAT_HISTORY_MODE", "redis"),
        ("DATABASE_URL", pg_url),
        ("REDIS_CONNECTION_STRING", rdb.url),
        ("REDIS_ENABLED", "true"),
    ):
        bare_env.setenv(name, value)
    with ChatHistoryManager(background_flush=False) as manager:
        assert manager.redis_enabled is True and manager.stats()["mode"] == "redis"
    assert resolve_settings().source("mode") == "env CHAT_HISTORY_MODE"
    with ChatHistoryManager(mode="local", base_dir=str(tmp_path)) as manager:  # a keyword still wins
        assert manager.mode == "local"
    bare_env.delenv("REDIS_ENABLED")
    bare_env.setenv("CHAT_HISTORY_MODE", "local_psql")
    with ChatHistoryManager() as manager:
        assert (manager.mode, manager.redis_enabled) == ("postgres", False)
    bare_env.setenv("CHAT_HISTORY_MODE", "local_redis")
    with ChatHistoryManager(background_flush=False) as manager:
        assert manager.stats()["mode"] == "redis"
    bare_env.setenv("REDIS_ENABLED", "false")  # the rollback switch takes Redis away
    with ChatHistoryManager() as manager:
        assert (manager.stats()["mode"], manager.redis_enabled) == ("postgres", False)


def test_without_chat_history_mode_the_mode_is_local(bare_env, tmp_path, pg_url):
    bare_env.setenv("DATABASE_URL", pg_url)
    with ChatHistoryManager(base_dir=str(tmp_path)) as manager:
        assert manager.mode == "local"


def test_an_unknown_chat_history_mode_names_the_variable(bare_env, tmp_path):
    bare_env.setenv("CHAT_HISTORY_MODE", "cloud")
    with pytest.raises(ConfigurationError, match="^CHAT_HISTORY_MODE must be 'local', 'postgres' or 'redis'"):
        ChatHistoryManager(base_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# The README's Quick start, and smaller things a newcomer meets
# --------------------------------------------------------------------------------------------------


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quick start") :]
    match = re.search(r"```python\n(.*?)```", section[: section.index("\n## ", 5)], flags=re.DOTALL)
    assert match, "the Quick start has a python block"
    return match.group(1)


def test_the_quick_start_shows_a_conversations_shape_and_runs_as_is_in_a_fresh_virtualenv(tmp_path):
    code = quick_start()
    for key in ('"title"', '"model"', '"messages"', '"role"', '"content"', '"time"', '"created_at"', '"last_modified"'):
        assert key in code, key
    assert "uuid" in code, "it shows random ids"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # The installed package alone (its compiled core included): nothing else of this environment.
    package = Path(chat_history_rs.__file__).parent
    shutil.copytree(package, Path(site) / "chat_history_rs", ignore=shutil.ignore_patterns("__pycache__"))
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "quick_start.py").write_text(code, encoding="utf-8")
    result = subprocess.run(
        [str(python), "quick_start.py"],
        cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "messages[0].role must be 'user' or 'assistant'" in result.stdout
    assert "Trip to Lisbon 2 messages" in result.stdout
    assert len(list((workdir / ".chat_history").glob("*.json"))) == 1


README_MAX_LINES = 350  # issue 20: the design, the guarantees and the tables live in docs/


def test_the_readme_stays_short_enough_for_a_newcomer():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move detail to docs/ and link it"
    )


def test_reads_made_before_tracking_is_up_count_as_near_cache_misses(make_redis_server, pg_url, user_id):
    """A login whose ACL refuses pub/sub keeps the near cache from ever serving: every read goes to Redis,
    and each is a miss, so the near cache's hit rate is not overstated."""
    server = make_redis_server()
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    admin.execute_command("ACL", "SETUSER", "nochannels", "on", ">pw-n", "~*", "resetchannels", "+@all")
    admin.close()
    with redis_mode(pg_url, f"redis://nochannels:pw-n@127.0.0.1:{server.port}/0") as manager:
        manager.save_conversation("m1ss0001", make_conversation(2), user_id=user_id)
        for _ in range(5):
            manager.get_conversation("m1ss0001", user_id=user_id)
        stats = manager.stats()
        assert stats["near_cache_tracking"] is False
        assert (stats["near_cache_hits"], stats["near_cache_misses"]) == (0, 5), stats


def test_redis_layout_is_named_for_what_it_is(make_redis_manager, user_id):
    manager = make_redis_manager()
    manager.save_conversation("l4y0ut01", make_conversation(1), user_id=user_id)
    assert manager.stats()["redis_layout"] == ("cluster" if CLUSTER else "single")
