"""The Python surface: constructor, context manager, close, flush, stats, errors, logging, version, stubs."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import re
import time
from pathlib import Path

import pytest

import chat_history_rs
from chat_history_rs import (
    ChatHistoryError,
    ChatHistoryManager,
    ConfigurationError,
    DatabaseError,
    InvalidTypeError,
    OwnershipError,
    UnavailableError,
    ValidationError,
)

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ConfigurationError, ValueError),
        (ValidationError, ValueError),
        (InvalidTypeError, TypeError),
        (OwnershipError, PermissionError),
        (UnavailableError, ConnectionError),
        (DatabaseError, Exception),
    ],
)
def test_exception_hierarchy(cls, builtin):
    assert issubclass(ChatHistoryError, Exception)
    assert issubclass(cls, ChatHistoryError)
    assert issubclass(cls, builtin)
    err = cls("message")
    assert str(err) == "message"


def test_exception_classes_are_distinct():
    classes = [ConfigurationError, ValidationError, InvalidTypeError, OwnershipError, UnavailableError, DatabaseError]
    for a in classes:
        for b in classes:
            assert (a is b) == issubclass(a, b), (a, b)


# --------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------


def test_bad_mode_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="mongo") as info:
        ChatHistoryManager(mode="mongo", base_dir=str(tmp_path))
    assert isinstance(info.value, ConfigurationError)


def test_postgres_without_connection_string_or_database_url(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigurationError) as info:
        ChatHistoryManager(mode="postgres")
    assert isinstance(info.value, ValueError)
    assert re.search(r"(?i)connection|DATABASE_URL", str(info.value)), str(info.value)


def test_positional_arguments_in_phase1_order(pg_url, pg_conn, user_id, conv_id, sample_conversation, tmp_path):
    local = ChatHistoryManager("local", str(tmp_path))
    conv = sample_conversation(1)
    local.save_conversation(conv_id, conv)
    assert (tmp_path / ".chat_history" / f"{conv_id}.json").is_file()
    local.close()

    # mode, base_dir, connection_string, history_days, redis_enabled
    pg = ChatHistoryManager("postgres", None, pg_url, 60, False)
    try:
        pg.save_conversation(conv_id, conv, user_id)
        assert pg.get_conversation(conv_id, user_id) == conv
    finally:
        pg.close()


def test_tuning_arguments_are_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        ChatHistoryManager("local", str(tmp_path), None, 7, False, 4)


def test_unknown_keyword_is_a_type_error(tmp_path):
    with pytest.raises(TypeError):
        ChatHistoryManager(mode="local", base_dir=str(tmp_path), no_such_option=1)


def test_tuning_keywords_are_accepted(make_manager, pg_url, user_id, conv_id, sample_conversation):
    manager = make_manager(
        mode="postgres",
        connection_string=pg_url,
        postgres_pool_size=2,
        postgres_connect_timeout=3.0,
        postgres_ca_file=None,
    )
    conv = sample_conversation(1)
    manager.save_conversation(conv_id, conv, user_id)
    assert manager.get_conversation(conv_id, user_id) == conv


# --------------------------------------------------------------------------------------------------
# Lifecycle: context manager, close, flush, stats
# --------------------------------------------------------------------------------------------------


def _backends_on(pg_conn) -> int:
    """Client connections to the test database other than pg_conn itself."""
    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        )
        return cur.fetchone()[0]


def _wait_for_backends(pg_conn, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = _backends_on(pg_conn)
        if n == expected or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def test_context_manager_local(tmp_path, conv_id, sample_conversation):
    conv = sample_conversation(2)
    with ChatHistoryManager(mode="local", base_dir=str(tmp_path)) as history:
        assert isinstance(history, ChatHistoryManager)
        history.save_conversation(conv_id, conv)
        assert history.get_conversation(conv_id) == conv
    with ChatHistoryManager(mode="local", base_dir=str(tmp_path)) as again:
        assert again.get_conversation(conv_id) == conv


def test_context_manager_postgres_releases_connections(pg_url, pg_conn, user_id, conv_id, sample_conversation):
    conv = sample_conversation(2)
    with ChatHistoryManager(mode="postgres", connection_string=pg_url) as history:
        history.save_conversation(conv_id, conv, user_id)
        assert history.get_conversation(conv_id, user_id) == conv
        assert _backends_on(pg_conn) >= 1
    assert _wait_for_backends(pg_conn, 0) == 0


def test_context_manager_does_not_swallow_exceptions(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ChatHistoryManager(mode="local", base_dir=str(tmp_path)):
            raise RuntimeError("boom")


def test_close_is_idempotent_and_releases_connections(pg_url, pg_conn, user_id, tmp_path):
    pg = ChatHistoryManager(mode="postgres", connection_string=pg_url)
    pg.list_conversations(user_id)
    assert pg.close() is None
    pg.close()
    assert _wait_for_backends(pg_conn, 0) == 0

    local = ChatHistoryManager(mode="local", base_dir=str(tmp_path))
    local.close()
    local.close()


def test_close_inside_context_manager_then_exit(tmp_path):
    with ChatHistoryManager(mode="local", base_dir=str(tmp_path)) as history:
        history.close()


def test_flush_returns_zero_without_redis(local_manager, pg_manager, user_id, conv_id, sample_conversation):
    for manager, user in ((local_manager, None), (pg_manager, user_id)):
        manager.save_conversation(conv_id, sample_conversation(2), user)
        count = manager.flush_dirty_conversations()
        assert count == 0
        assert type(count) is int


def test_stats_is_a_dict(local_manager, pg_manager, user_id, conv_id, sample_conversation):
    for manager, user in ((local_manager, None), (pg_manager, user_id)):
        manager.save_conversation(conv_id, sample_conversation(1), user)
        manager.get_conversation(conv_id, user)
        stats = manager.stats()
        assert isinstance(stats, dict)
        assert all(isinstance(k, str) for k in stats)


# --------------------------------------------------------------------------------------------------
# Logging, not printing
# --------------------------------------------------------------------------------------------------


def test_logs_to_chat_history_rs_logger(caplog, pg_url, user_id):
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    with ChatHistoryManager(mode="postgres", connection_string=pg_url) as history:
        history.list_conversations(user_id)
    ours = [r for r in caplog.records if r.name == "chat_history_rs" or r.name.startswith("chat_history_rs.")]
    assert ours, [(r.name, r.getMessage()) for r in caplog.records]


def test_nothing_is_printed(capfd, pg_url, user_id, conv_id, sample_conversation, tmp_path):
    with ChatHistoryManager(mode="postgres", connection_string=pg_url) as history:
        history.save_conversation(conv_id, sample_conversation(2), user_id)
        history.get_conversation(conv_id, user_id)
        history.list_conversations(user_id)
        history.flush_dirty_conversations()
        history.stats()
        history.delete_conversation(conv_id, user_id)
    with ChatHistoryManager(mode="local", base_dir=str(tmp_path)) as history:
        history.save_conversation(conv_id, sample_conversation(1))
        history.list_conversations()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


# --------------------------------------------------------------------------------------------------
# Version and stubs
# --------------------------------------------------------------------------------------------------


def test_version_is_the_cargo_version():
    assert isinstance(chat_history_rs.__version__, str)
    cargo = (ROOT / "Cargo.toml").read_text()
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', cargo)
    assert match
    assert chat_history_rs.__version__ == match.group(1)
    assert importlib.metadata.version("chat-history-rs") == match.group(1)


TYPING_ONLY_BASES = {"TypedDict", "Protocol"}


def _stub_names(path: Path) -> tuple[dict[str, set[str] | None], set[str]]:
    """Top-level names in a .pyi: classes map to their member names, everything else to None.

    Also returns the names that exist for type checkers only (TypedDict and Protocol classes, type
    aliases), which need not exist at runtime.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def names_in(body) -> set[str]:
        out: set[str] = set()
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out.add(node.target.id)
            elif isinstance(node, ast.Assign):
                out.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.If):  # sys.version_info branches
                out |= names_in(node.body) | names_in(node.orelse)
        return out

    def base_name(node) -> str:
        return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")

    result: dict[str, set[str] | None] = {}
    typing_only: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            result[node.name] = names_in(node.body)
            # A TypedDict's subclass (Stats over _CallStats) is one too.
            if {base_name(b) for b in node.bases} & (TYPING_ONLY_BASES | typing_only):
                typing_only.add(node.name)
        else:
            names = names_in([node])
            for name in names:
                result[name] = None
            is_alias = isinstance(node, ast.Assign) or (
                isinstance(node, ast.AnnAssign) and base_name(node.annotation) == "TypeAlias"
            )
            if is_alias:
                typing_only |= names
    return result, typing_only


STUB = ROOT / "python" / "chat_history_rs" / "_core.pyi"


def test_stub_file_and_py_typed_exist():
    assert STUB.is_file()
    assert (ROOT / "python" / "chat_history_rs" / "py.typed").is_file()


def test_every_runtime_name_is_in_the_stub():
    from chat_history_rs import _core

    stub, _ = _stub_names(STUB)
    runtime_public = sorted(n for n in dir(_core) if not n.startswith("_"))
    assert runtime_public, "the compiled module exports nothing"
    assert [n for n in runtime_public if n not in stub] == []

    for name in runtime_public:
        obj = getattr(_core, name)
        if not isinstance(obj, type):
            continue
        members = {m for m in vars(obj) if not m.startswith("_") or m in ("__enter__", "__exit__")}
        missing = sorted(members - (stub[name] or set()))
        assert missing == [], f"{name}: runtime members missing from the stub"


def test_every_stub_name_exists_at_runtime():
    from chat_history_rs import _core

    stub, typing_only = _stub_names(STUB)
    public = {n: members for n, members in stub.items() if not n.startswith("_") and n not in typing_only}
    assert [n for n in public if not hasattr(_core, n)] == []
    for name, members in public.items():
        if members is None:
            continue
        obj = getattr(_core, name)
        absent = sorted(m for m in members if not m.startswith("_") and not hasattr(obj, m))
        assert absent == [], f"{name}: stub members missing at runtime"


def test_manager_methods_exist_with_seed_names():
    for method in (
        "list_conversations",
        "get_conversation",
        "save_conversation",
        "delete_conversation",
        "flush_dirty_conversations",
        "close",
        "stats",
        "__enter__",
        "__exit__",
    ):
        assert callable(getattr(ChatHistoryManager, method)), method


# --------------------------------------------------------------------------------------------------
# Fixture sanity (the throwaway servers later tiers rely on)
# --------------------------------------------------------------------------------------------------


def test_redis_fixture_serves(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        assert client.ping()
        key = f"chr-smoke-{time.monotonic_ns()}"
        client.set(key, "1", ex=60)
        assert client.get(key) == b"1"
        client.delete(key)
    finally:
        client.close()


def test_redis_server_helper_kills_and_restarts_on_the_same_port():
    # A private server: restarting the session's shared one would cut other tests' connections.
    import redis

    from support.servers import RedisServer, ServerError

    try:
        server = RedisServer()
    except ServerError as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            client.set("k", "v")
            port = server.port
            server.kill()
            assert not server.is_running()
            with pytest.raises(redis.ConnectionError):
                client.ping()
            server.start()
            assert server.port == port
            assert client.ping()
            assert client.get("k") is None  # no persistence: a restart forgets everything
        finally:
            client.close()
    finally:
        server.remove()


def test_own_pg_server_stops_and_restarts(own_pg_server):
    import psycopg2

    conn = own_pg_server.params.connect()
    conn.close()
    own_pg_server.stop()
    with pytest.raises(psycopg2.OperationalError):
        own_pg_server.params.connect()
    own_pg_server.start()
    conn = own_pg_server.params.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()
