"""Every PostgreSQL statement is bounded, and starting a manager never makes other clients queue
behind a lock (docs/design.md, "Faults"). A manager starting on an existing schema reads the catalog
and runs no DDL; a statement blocked by someone else's lock ends at postgres_lock_timeout (or
postgres_statement_timeout) with UnavailableError instead of hanging.
"""

from __future__ import annotations

import threading
import time

import pytest

from chat_history_rs import ChatHistoryManager, UnavailableError
from support.redis_support import make_conversation


def _in_thread(fn):
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.timeout(90)
def test_a_start_on_an_existing_schema_does_not_queue_behind_a_long_reader(pg_url, pg_params, make_manager):
    make_manager(mode="postgres", connection_string=pg_url).close()  # the schema exists
    reader = pg_params.connect(autocommit=False)
    with reader.cursor() as cur:  # a report or pg_dump: a long transaction that read the table
        cur.execute("SELECT count(*) FROM conversations")
    try:
        thread, out = _in_thread(lambda: ChatHistoryManager(mode="postgres", connection_string=pg_url))
        thread.join(20)
        assert not thread.is_alive(), "starting a manager waited behind another session's transaction"
        assert "error" not in out, out.get("error")
        out["value"].close()
        # And a third client is not queued behind a lock the start left waiting.
        third = pg_params.connect()
        try:
            with third.cursor() as cur:
                cur.execute("SET statement_timeout = '5s'")
                cur.execute("SELECT count(*) FROM conversations")
                assert cur.fetchone() == (0,)
        finally:
            third.close()
    finally:
        reader.rollback()
        reader.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("bound", ["lock", "statement"])
def test_a_statement_blocked_by_a_lock_ends_with_unavailable_error(pg_url, pg_params, make_manager, user_id, bound):
    timeouts = (
        {"postgres_lock_timeout": 1.0, "postgres_statement_timeout": 30.0}
        if bound == "lock"
        else {"postgres_lock_timeout": 30.0, "postgres_statement_timeout": 1.0}
    )
    manager = make_manager(mode="postgres", connection_string=pg_url, **timeouts)
    first = make_conversation(1)
    manager.save_conversation("10c00001", first, user_id=user_id)
    holder = pg_params.connect(autocommit=False)
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
    try:
        for call in (
            lambda: manager.save_conversation("10c00001", make_conversation(2), user_id=user_id),
            lambda: manager.get_conversation("10c00001", user_id=user_id),
        ):
            started = time.monotonic()
            with pytest.raises(UnavailableError, match="PostgreSQL") as info:
                call()
            waited = time.monotonic() - started
            assert waited < 1.0 * 3 + 2, f"blocked for {waited:.1f}s with a 1 s bound"
            assert "timeout" in str(info.value)
    finally:
        holder.rollback()
        holder.close()
    assert manager.get_conversation("10c00001", user_id=user_id) == first  # the refused save changed nothing


@pytest.mark.parametrize("name", ["postgres_statement_timeout", "postgres_lock_timeout"])
@pytest.mark.parametrize("value", [0, -1.0])
def test_timeouts_must_be_positive(pg_url, name, value):
    with pytest.raises(ValueError, match=name):
        ChatHistoryManager(mode="postgres", connection_string=pg_url, **{name: value})


def test_timeouts_are_set_on_every_session(pg_url, pg_params, make_manager, user_id):
    manager = make_manager(
        mode="postgres", connection_string=pg_url, postgres_statement_timeout=12.5, postgres_lock_timeout=3.0
    )
    manager.save_conversation("10c00002", make_conversation(1), user_id=user_id)
    conn = pg_params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chat_history_rs' AND datname = %s",
                (pg_params.dbname,),
            )
            assert cur.fetchone()[0] >= 1
    finally:
        conn.close()
    # The settings, as the product's own sessions see them: a statement that waits longer than the
    # lock bound is cut at 3 s, not at 12.5 s.
    holder = pg_params.connect(autocommit=False)
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            manager.get_conversation("10c00002", user_id=user_id)
        assert 2.5 < time.monotonic() - started < 3.0 * 3
    finally:
        holder.rollback()
        holder.close()
