"""The example chat app (examples/streamlit_app) under Streamlit's AppTest, in local and redis modes.

Each test drives the app as a user would (new chat, send, reload, rename, delete, "Save all to
database") and then checks the store itself: the JSON files, or Redis keys and PostgreSQL rows.
AppTest runs the script in this process, so the app reads the environment that monkeypatch sets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="streamlit is not installed (it is in requirements-dev.txt)")

import streamlit as st
from support.redis_support import conv_key, dirty_member, dirty_set, seed_fields
from support.servers import fetch_conversation_row, fetch_message_rows
from streamlit.runtime.caching import clear_session_resource_cache
from streamlit.testing.v1 import AppTest

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "streamlit_app"
APP = str(APP_DIR / "app.py")
# AppTest's LocalScriptRunner gives every simulated session this id.
APPTEST_SESSION_ID = "test session id"
APP_VARIABLES = (
    "CHAT_HISTORY_MODE", "DATABASE_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_ADMIN_LOGIN",
    "POSTGRES_ADMIN_PASSWORD", "POSTGRES_DATABASE", "POSTGRES_SSLMODE", "REDIS_ENABLED",
    "REDIS_CONNECTION_STRING", "REDIS_CACHE_TTL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_SSL",
    "REDIS_TTL_SECONDS", "CONVERSATION_HISTORY_DAYS", "LOCAL_TEST_CLIENT_ID", "LOCAL_TEST_USERNAME",
    "CHAT_HISTORY_FLUSH_INTERVAL",
)  # fmt: skip

sys.path.insert(0, str(APP_DIR))
import chat_config  # noqa: E402 - after the sys.path.insert above
import chat_store  # noqa: E402 - after the sys.path.insert above


@pytest.fixture
def app_env(monkeypatch, tmp_path):
    """A clean environment for the app, run from tmp_path (local mode writes ./.chat_history there).

    Afterwards the app's cached managers are closed (Streamlit's on_release), session flushes drained."""
    for name in APP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield monkeypatch
    # As Streamlit would: the session ends (its flush), then the process's managers close.
    clear_session_resource_cache(APPTEST_SESSION_ID)
    chat_store.SESSION_FLUSHER.submit(lambda: None).result(timeout=60)
    st.cache_resource.clear()


@pytest.fixture
def redis_app_env(pg_url, rdb, app_env, user_id):
    """local_redis mode on this test's database and the emptied session Redis; no background flush
    (an hour apart), so only the test's actions write back."""
    app_env.setenv("CHAT_HISTORY_MODE", "local_redis")
    app_env.setenv("DATABASE_URL", pg_url)
    app_env.setenv("REDIS_CONNECTION_STRING", rdb.url)
    app_env.setenv("LOCAL_TEST_CLIENT_ID", user_id)
    app_env.setenv("LOCAL_TEST_USERNAME", "Ada Lovelace")
    app_env.setenv("CHAT_HISTORY_FLUSH_INTERVAL", "3600")
    return app_env


def start(query_params=None) -> AppTest:
    """A new browser session (a page load), with the URL's query parameters."""
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params.update(query_params or {})
    at.run()
    assert not at.exception, at.exception
    return at


def act(at: AppTest, widget) -> AppTest:
    widget.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def transcript(at: AppTest) -> list[tuple[str, str]]:
    return [(m.name, "".join(md.value for md in m.markdown)) for m in at.chat_message]


def sidebar_chats(at: AppTest) -> list[str]:
    return [b.label for b in at.sidebar.button if b.key and b.key.startswith("open-")]


def health(at: AppTest) -> dict[str, str]:
    """The numbers in the sidebar's "Cache and write-back" panel, {name: value}."""
    panel = next(c.value for c in at.sidebar.caption if c.value.startswith("Hit rate: "))
    return {name: value.strip("*") for name, value in (line.strip().split(": ", 1) for line in panel.splitlines())}


def send(at: AppTest, text: str) -> AppTest:
    return act(at, at.chat_input[0].set_value(text))


def open_chat_id(at: AppTest) -> str:
    value = at.query_params["chat"]
    return value[0] if isinstance(value, list) else value  # a list in older AppTests (1.53)


# --------------------------------------------------------------------------------------------------
# Local mode: JSON files
# --------------------------------------------------------------------------------------------------


def test_local_mode_chat_round_trip(app_env, tmp_path):
    at = start()
    assert at.subheader[0].value == "New chat"
    assert sidebar_chats(at) == []
    assert not [b for b in at.button if b.key == "flush"], "no Redis, no flush button"

    send(at, "What is the capital of Portugal?")
    reply = "[gpt-4o stub, turn 1] You said: What is the capital of Portugal?"
    assert transcript(at) == [("user", "What is the capital of Portugal?"), ("assistant", reply)]
    chat_id = open_chat_id(at)
    assert sidebar_chats(at) == ["What is the capital of Portugal?"]
    stored = json.loads((tmp_path / ".chat_history" / f"{chat_id}.json").read_text(encoding="utf-8"))
    assert stored["title"] == "What is the capital of Portugal?"
    assert stored["model"] == "gpt-4o"
    assert [(m["role"], m["content"]) for m in stored["messages"]] == transcript(at)

    # A reload of the page (a new session with the same URL) reopens the chat from the files.
    at = start(query_params={"chat": chat_id})
    assert transcript(at)[-1] == ("assistant", reply)

    act(at, at.sidebar.text_input(key=f"title-{chat_id}").set_value("Lisbon"))
    act(at, at.sidebar.button(key="rename").click())
    assert sidebar_chats(at) == ["Lisbon"]
    assert at.subheader[0].value == "Lisbon"
    assert json.loads((tmp_path / ".chat_history" / f"{chat_id}.json").read_text())["title"] == "Lisbon"

    # A second chat with another model; the newest is listed first.
    act(at, at.sidebar.button(key="new-chat").click())
    assert transcript(at) == []
    act(at, at.sidebar.selectbox(key="model").select("gpt-4.1"))
    send(at, "Hello")
    second = open_chat_id(at)
    assert second != chat_id
    assert transcript(at) == [("user", "Hello"), ("assistant", "[gpt-4.1 stub, turn 1] You said: Hello")]
    assert sidebar_chats(at) == ["Hello", "Lisbon"]

    # Back to the first chat: its transcript and its model come back.
    act(at, at.sidebar.button(key=f"open-{chat_id}").click())
    assert transcript(at)[0] == ("user", "What is the capital of Portugal?")
    assert at.sidebar.selectbox(key="model").value == "gpt-4o"

    act(at, at.sidebar.button(key="delete").click())
    assert [s.value for s in at.success] == ["Chat deleted."]
    assert sidebar_chats(at) == ["Hello"]
    assert transcript(at) == []
    assert sorted(p.stem for p in (tmp_path / ".chat_history").glob("*.json")) == [second]

    # A stale or hand-edited link opens a new chat rather than an error.
    for link in (chat_id, "../../etc/passwd", "a:b"):
        at = start(query_params={"chat": link})
        assert (at.subheader[0].value, transcript(at), at.error) == ("New chat", [], [])


# --------------------------------------------------------------------------------------------------
# Redis over PostgreSQL (local_redis)
# --------------------------------------------------------------------------------------------------


def test_redis_mode_chat_round_trip(redis_app_env, rdb, pg_conn, user_id):
    at = start()
    assert "Ada Lovelace" in at.sidebar.caption[0].value
    send(at, "Plan two days in Lisbon.")
    chat_id = open_chat_id(at)
    reply = "[gpt-4o stub, turn 1] You said: Plan two days in Lisbon."
    assert transcript(at) == [("user", "Plan two days in Lisbon."), ("assistant", reply)]

    # Written to Redis, dirty, and not yet to PostgreSQL (write-back).
    cached = seed_fields(rdb.client, user_id, chat_id)
    assert cached["dirty"] == "1"
    assert [(m["role"], m["content"]) for m in cached["messages"]] == transcript(at)
    assert dirty_set(rdb.client) == {dirty_member(user_id, chat_id)}
    assert fetch_conversation_row(pg_conn, chat_id) is None
    assert at.sidebar.expander[-1].label == "Cache and write-back"
    assert health(at)["Dirty"].startswith("1, oldest ")

    # A reload sees the dirty chat (served from Redis).
    at = start(query_params={"chat": chat_id})
    assert transcript(at) == [("user", "Plan two days in Lisbon."), ("assistant", reply)]
    assert sidebar_chats(at) == ["Plan two days in Lisbon."]

    act(at, at.sidebar.button(key="flush").click())
    assert [s.value for s in at.sidebar.success] == ["Saved 1 conversation to the database."]
    assert health(at)["Dirty"] == "0"
    assert health(at)["Written back"] == "1"
    row = fetch_conversation_row(pg_conn, chat_id)
    assert (row["user_client_id"], row["title"], row["model"]) == (user_id, "Plan two days in Lisbon.", "gpt-4o")
    assert [(r[1], r[2]) for r in fetch_message_rows(pg_conn, chat_id)] == transcript(at)
    assert seed_fields(rdb.client, user_id, chat_id)["dirty"] == "0"

    # Nothing left to write: the button says so.
    act(at, at.sidebar.button(key="flush").click())
    assert [s.value for s in at.sidebar.success] == ["Saved 0 conversations to the database."]

    send(at, "And a third day?")
    act(at, at.sidebar.text_input(key=f"title-{chat_id}").set_value("Lisbon, three days"))
    act(at, at.sidebar.button(key="rename").click())
    assert sidebar_chats(at) == ["Lisbon, three days"]
    act(at, at.sidebar.button(key="flush").click())
    assert [s.value for s in at.sidebar.success] == ["Saved 1 conversation to the database."]
    assert fetch_conversation_row(pg_conn, chat_id)["title"] == "Lisbon, three days"
    assert len(fetch_message_rows(pg_conn, chat_id)) == 4

    act(at, at.sidebar.button(key="delete").click())
    assert sidebar_chats(at) == []
    assert fetch_conversation_row(pg_conn, chat_id) is None
    assert not rdb.client.exists(conv_key(user_id, chat_id))
    assert start(query_params={"chat": chat_id}).subheader[0].value == "New chat"


def test_redis_mode_end_of_session_flushes(redis_app_env, rdb, pg_conn, user_id):
    """When Streamlit releases a session (its websocket closed), the app writes back what is dirty."""
    at = start()
    send(at, "Remember this.")
    chat_id = open_chat_id(at)
    assert fetch_conversation_row(pg_conn, chat_id) is None

    clear_session_resource_cache(APPTEST_SESSION_ID)  # what Streamlit does when the browser goes away
    chat_store.SESSION_FLUSHER.submit(lambda: None).result(timeout=60)

    assert [(r[1], r[2]) for r in fetch_message_rows(pg_conn, chat_id)] == transcript(at)
    assert dirty_set(rdb.client) == set()


def test_redis_mode_users_see_only_their_chats(redis_app_env, rdb, other_user_id):
    mine = open_chat_id(send(start(), "mine"))
    redis_app_env.setenv("LOCAL_TEST_CLIENT_ID", other_user_id)
    at = start(query_params={"chat": mine})  # even with a link to it
    assert (sidebar_chats(at), transcript(at)) == ([], [])
    send(at, "theirs")
    assert sidebar_chats(at) == ["theirs"]


def test_redis_health_panel_flags_the_seed_thresholds(redis_app_env, monkeypatch):
    at = start()
    assert not at.sidebar.warning and not at.sidebar.error
    bad = {
        "redis_enabled": True, "redis_available": True, "cache_hits": 10, "cache_misses": 30, "hit_rate": 0.25,
        "dirty_count": 150, "oldest_dirty_age_seconds": 42.0, "flush_failures": 0, "stuck_conversations": [],
        "redis_used_memory": 90 * 2**20, "redis_maxmemory": 100 * 2**20, "redis_maxmemory_policy": "volatile-lru",
    }  # fmt: skip
    monkeypatch.setattr(chat_store, "cache_alerts", lambda _stats, real=chat_store.cache_alerts: real(bad))
    at = start()
    assert [w.value for w in at.sidebar.warning] == [
        "Cache hit rate 25% is below the 80% target.",
        "150 conversations await write-back (alert above 100).",
    ]
    assert [e.value for e in at.sidebar.error] == ["Redis memory at 90% of maxmemory (alert above 80%)."]


# --------------------------------------------------------------------------------------------------
# Configuration and identity (no server needed)
# --------------------------------------------------------------------------------------------------


def test_alert_thresholds():
    healthy = {
        "redis_enabled": True, "redis_available": True, "cache_hits": 90, "cache_misses": 10, "hit_rate": 0.9,
        "dirty_count": 100, "flush_failures": 0, "stuck_conversations": [], "redis_used_memory": 80,
        "redis_maxmemory": 100, "redis_maxmemory_policy": "volatile-lru",
    }  # fmt: skip
    assert chat_store.cache_alerts(healthy) == []
    # Few lookups: no verdict on the hit rate yet. No maxmemory: no memory alert.
    assert chat_store.cache_alerts({**healthy, "cache_hits": 1, "cache_misses": 4, "hit_rate": 0.2}) == []
    assert chat_store.cache_alerts({**healthy, "redis_maxmemory": 0, "redis_used_memory": 10**9}) == []
    assert [level for level, _ in chat_store.cache_alerts({**healthy, "hit_rate": 0.79})] == ["warning"]
    assert [level for level, _ in chat_store.cache_alerts({**healthy, "dirty_count": 101})] == ["warning"]
    assert [level for level, _ in chat_store.cache_alerts({**healthy, "redis_used_memory": 81})] == ["error"]
    assert [level for level, _ in chat_store.cache_alerts({**healthy, "redis_available": False})] == ["error"]
    assert [level for level, _ in chat_store.cache_alerts({**healthy, "flush_failures": 2})] == ["warning"]
    stuck = chat_store.cache_alerts({**healthy, "flush_failures": 2, "stuck_conversations": ["u:abc"]})
    assert stuck == [("error", "1 conversation(s) PostgreSQL refused, retried with backoff: u:abc")]
    assert "volatile-lru" in chat_store.cache_alerts({**healthy, "redis_maxmemory_policy": "allkeys-lru"})[0][1]
    assert chat_store.cache_alerts({"redis_enabled": False, "mode": "postgres"}) == []


def test_settings_from_the_environment():
    load = chat_config.load_settings
    assert load({}).manager_kwargs() == {"mode": "local", "history_days": 7}
    pg = {"POSTGRES_HOST": "db.example.com", "POSTGRES_ADMIN_LOGIN": "chat", "POSTGRES_ADMIN_PASSWORD": "p w'\\x"}
    redis = load({"CHAT_HISTORY_MODE": "redis", **pg, "REDIS_CONNECTION_STRING": "rediss://:k@h:6380/0",
                  "REDIS_CACHE_TTL": "600", "CONVERSATION_HISTORY_DAYS": "30"})  # fmt: skip
    assert redis.manager_kwargs() == {
        "mode": "postgres",
        "connection_string": (
            r"host=db.example.com port=5432 dbname=postgres user=chat password='p w\'\\x' sslmode=require"
        ),
        "history_days": 30,
        "redis_enabled": True,
        "flush_interval": 10.0,
        "redis_connection_string": "rediss://:k@h:6380/0",
        "redis_ttl": 600,
    }
    assert "p w" not in repr(redis) and "rediss://:k@" not in repr(redis), "no password in repr()"
    local_pg = load({"CHAT_HISTORY_MODE": "local_psql", "POSTGRES_HOST": "localhost", "POSTGRES_DATABASE": "chats"})
    assert local_pg.connection_string == "host=localhost port=5432 dbname=chats user=postgres sslmode=prefer"
    assert local_pg.redis_enabled is False
    # DATABASE_URL wins over the parts; REDIS_ENABLED=false is the seed's rollback to plain PostgreSQL.
    rollback = load(
        {"CHAT_HISTORY_MODE": "local_redis", "DATABASE_URL": "postgresql://x/y", **pg, "REDIS_ENABLED": "false"}
    )
    assert (rollback.connection_string, rollback.redis_enabled) == ("postgresql://x/y", False)
    assert load({"CHAT_HISTORY_MODE": "postgres", **pg, "REDIS_ENABLED": "true"}).redis_enabled is True
    for bad, variable in [
        ({"CHAT_HISTORY_MODE": "mongo"}, "CHAT_HISTORY_MODE"),
        ({"CHAT_HISTORY_MODE": "redis"}, "POSTGRES_HOST"),
        ({"CHAT_HISTORY_MODE": "redis", **pg, "REDIS_CACHE_TTL": "soon"}, "REDIS_CACHE_TTL"),
        ({"CHAT_HISTORY_MODE": "redis", **pg, "REDIS_ENABLED": "maybe"}, "REDIS_ENABLED"),
        ({"CONVERSATION_HISTORY_DAYS": "-1"}, "CONVERSATION_HISTORY_DAYS"),
    ]:
        with pytest.raises(chat_config.SettingsError, match=variable):
            load(bad)


def test_user_identity_by_mode():
    headers = {"x-ms-client-principal-id": "oid-1", "X-MS-CLIENT-PRINCIPAL-NAME": "ada@example.com"}
    env = {"LOCAL_TEST_CLIENT_ID": "tester", "LOCAL_TEST_USERNAME": "Test User"}
    production = chat_config.AppSettings(mode="redis", connection_string="x", redis_enabled=True)
    assert chat_config.current_user(production, headers, env) == chat_config.User("oid-1", "ada@example.com")
    assert chat_config.current_user(production, {}, env) is None, "never the test user in production"
    local_redis = chat_config.AppSettings(mode="local_redis", connection_string="x", redis_enabled=True)
    assert chat_config.current_user(local_redis, headers, env) == chat_config.User("tester", "Test User")
    assert chat_config.current_user(local_redis, {}, {}).id == chat_config.DEFAULT_TEST_CLIENT_ID
    assert chat_config.current_user(chat_config.AppSettings(mode="local"), headers, {}).id is None


def test_production_mode_without_sign_in_headers_refuses(app_env, pg_url):
    app_env.setenv("CHAT_HISTORY_MODE", "postgres")
    app_env.setenv("DATABASE_URL", pg_url)
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("Not signed in")
    assert not at.chat_input


def test_bad_settings_are_reported_in_the_page(app_env):
    app_env.setenv("CHAT_HISTORY_MODE", "redis")
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert "POSTGRES_HOST" in at.error[0].value
