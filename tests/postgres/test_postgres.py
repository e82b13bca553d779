"""PostgreSQL mode against a real throwaway server: schema, Phase 1 rows, timestamps, upserts, faults, pool."""

from __future__ import annotations

import re
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg2
import psycopg2.errors
import pytest

from chat_history_rs import ChatHistoryError, UnavailableError
from support.servers import (
    assert_row_matches,
    closed_port,
    create_phase1_schema,
    expected_message_rows,
    fetch_conversation_row,
    fetch_message_rows,
    insert_phase1_conversation,
)

UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def count_rows(conn, table: str, conversation_id: str) -> int:
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table} WHERE conversation_id = %s", (conversation_id,))
        return cur.fetchone()[0]


# --------------------------------------------------------------------------------------------------
# Fixture sanity
# --------------------------------------------------------------------------------------------------


def test_fixture_database_is_fresh_and_reachable(pg_conn, pg_params):
    with pg_conn.cursor() as cur:
        cur.execute("SELECT current_database(), current_setting('server_encoding')")
        assert cur.fetchone() == (pg_params.dbname, "UTF8")
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert cur.fetchone()[0] == 0


def test_fixture_new_york_database_has_non_utc_timezone(pg_params_new_york):
    conn = pg_params_new_york.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW TimeZone")
            assert cur.fetchone()[0] == "America/New_York"
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


def test_schema_is_created_when_missing(pg_manager, pg_conn, user_id):
    assert pg_manager.list_conversations(user_id) == []
    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable"
            " FROM information_schema.columns WHERE table_schema = 'public'"
            " AND table_name IN ('conversations', 'messages') ORDER BY table_name, ordinal_position"
        )
        columns = {(t, c): (dt, length, nullable) for t, c, dt, length, nullable in cur.fetchall()}
    # Extra columns (an idempotent migration, README "Schema") are allowed; these must be exactly so.
    assert columns[("conversations", "conversation_id")] == ("character varying", 50, "NO")
    assert columns[("conversations", "user_client_id")] == ("character varying", 255, "NO")
    assert columns[("conversations", "title")] == ("text", None, "NO")
    assert columns[("conversations", "model")] == ("character varying", 100, "NO")
    assert columns[("conversations", "created_at")] == ("timestamp with time zone", None, "NO")
    assert columns[("conversations", "last_modified")] == ("timestamp with time zone", None, "NO")
    assert columns[("messages", "message_id")] == ("integer", None, "NO")
    assert columns[("messages", "conversation_id")] == ("character varying", 50, "NO")
    assert columns[("messages", "sequence_number")] == ("integer", None, "NO")
    assert columns[("messages", "role")] == ("character varying", 20, "NO")
    assert columns[("messages", "content")] == ("text", None, "NO")
    assert columns[("messages", "timestamp")] == ("timestamp with time zone", None, "NO")

    with pg_conn.cursor() as cur:
        cur.execute("SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        indexes = cur.fetchall()

    def has_index(table: str, columns_sql: str) -> bool:
        return any(t == table and f"USING btree ({columns_sql})" in d for t, d in indexes)

    assert has_index("conversations", "conversation_id"), indexes  # primary key
    assert has_index("conversations", "user_client_id, last_modified DESC"), indexes
    assert has_index("conversations", "user_client_id, created_at DESC"), indexes
    assert has_index("messages", "conversation_id, sequence_number"), indexes

    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT rc.delete_rule FROM information_schema.referential_constraints rc"
            " JOIN information_schema.table_constraints tc ON tc.constraint_name = rc.constraint_name"
            " WHERE tc.table_name = 'messages' AND tc.constraint_type = 'FOREIGN KEY'"
        )
        assert cur.fetchall() == [("CASCADE",)]


def test_created_schema_enforces_role_check_and_unique_sequence(pg_manager, pg_conn, user_id, conv_id):
    pg_manager.list_conversations(user_id)
    insert_phase1_conversation(
        pg_conn, conv_id, user_id, title="t", model="m", created_at=utc(2025, 1, 1), last_modified=utc(2025, 1, 1),
        messages=[("user", "hi", utc(2025, 1, 1))],
    )  # fmt: skip
    with pytest.raises(psycopg2.errors.CheckViolation), pg_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO messages (conversation_id, sequence_number, role, content) VALUES (%s, 1, 'system', 'x')",
            (conv_id,),
        )
    with pytest.raises(psycopg2.errors.UniqueViolation), pg_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO messages (conversation_id, sequence_number, role, content) VALUES (%s, 0, 'user', 'x')",
            (conv_id,),
        )


def test_existing_phase1_schema_and_rows_are_kept(make_manager, pg_url, pg_conn, user_id, conv_id):
    create_phase1_schema(pg_conn)
    insert_phase1_conversation(
        pg_conn, conv_id, user_id, title="Old chat", model="gpt-35-turbo",
        created_at=utc(2024, 2, 29, 12, 0, 0, 1), last_modified=utc(2024, 3, 1, 8, 30),
        messages=[("user", "hello", utc(2024, 2, 29, 12, 0, 1)), ("assistant", "hi!", utc(2024, 2, 29, 12, 0, 2))],
    )  # fmt: skip
    row_before = fetch_conversation_row(pg_conn, conv_id)
    messages_before = fetch_message_rows(pg_conn, conv_id)

    for _ in range(2):  # twice: creating the schema must be idempotent
        manager = make_manager(mode="postgres", connection_string=pg_url)
        assert manager.get_conversation(conv_id, user_id) == {
            "title": "Old chat",
            "model": "gpt-35-turbo",
            "messages": [
                {"role": "user", "content": "hello", "time": "2024-02-29T12:00:01+00:00"},
                {"role": "assistant", "content": "hi!", "time": "2024-02-29T12:00:02+00:00"},
            ],
            "created_at": "2024-02-29T12:00:00.000001+00:00",
            "last_modified": "2024-03-01T08:30:00+00:00",
        }
        manager.close()

    assert fetch_conversation_row(pg_conn, conv_id) == row_before
    assert fetch_message_rows(pg_conn, conv_id) == messages_before


def test_second_manager_keeps_data_of_the_first(make_manager, pg_url, pg_conn, user_id, conv_id, sample_conversation):
    conv = sample_conversation(3)
    first = make_manager(mode="postgres", connection_string=pg_url)
    first.save_conversation(conv_id, conv, user_id)
    first.close()

    second = make_manager(mode="postgres", connection_string=pg_url)
    assert second.get_conversation(conv_id, user_id) == conv
    assert_row_matches(pg_conn, conv_id, user_id, conv)


# --------------------------------------------------------------------------------------------------
# Phase 1 rows, inserted with plain SQL, read through the product
# --------------------------------------------------------------------------------------------------


def test_phase1_rows_read_back_equal(pg_manager, pg_conn, user_id, conv_id):
    pg_manager.list_conversations(user_id)  # schema
    with pg_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO conversations (conversation_id, user_client_id, title, model, created_at, last_modified)"
            " VALUES (%s, %s, %s, %s, '2025-11-26 00:35:21.123456+00', '2025-11-26 09:40:00+09')",
            (conv_id, user_id, "Grüße — 你好 🚀", "gpt-4o"),
        )
        # Inserted out of order: the product must order by sequence_number, not by insertion.
        rows = [
            (2, "user", "third", "2025-11-26 00:36:00.5+00"),
            (0, "user", "first ünïcödé", "2025-11-25 19:35:22-05"),
            (1, "assistant", "second\nwith\nnewlines", "2025-11-26 00:35:59.999999+00"),
        ]
        for seq, role, content, ts in rows:
            cur.execute(
                "INSERT INTO messages (conversation_id, sequence_number, role, content, timestamp)"
                " VALUES (%s, %s, %s, %s, %s)",
                (conv_id, seq, role, content, ts),
            )

    assert pg_manager.get_conversation(conv_id, user_id) == {
        "title": "Grüße — 你好 🚀",
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "first ünïcödé", "time": "2025-11-26T00:35:22+00:00"},
            {"role": "assistant", "content": "second\nwith\nnewlines", "time": "2025-11-26T00:35:59.999999+00:00"},
            {"role": "user", "content": "third", "time": "2025-11-26T00:36:00.500000+00:00"},
        ],
        "created_at": "2025-11-26T00:35:21.123456+00:00",
        "last_modified": "2025-11-26T00:40:00+00:00",
    }


def test_phase1_conversation_without_messages(pg_manager, pg_conn, user_id, conv_id):
    pg_manager.list_conversations(user_id)
    insert_phase1_conversation(
        pg_conn, conv_id, user_id, title="empty", model="m",
        created_at=utc(2025, 6, 1), last_modified=utc(2025, 6, 1), messages=[],
    )  # fmt: skip
    assert pg_manager.get_conversation(conv_id, user_id) == {
        "title": "empty",
        "model": "m",
        "messages": [],
        "created_at": "2025-06-01T00:00:00+00:00",
        "last_modified": "2025-06-01T00:00:00+00:00",
    }


def _seed_list_rows(pg_conn, user_id, other_user_id):
    """Phase 1 rows for list tests. Returns {id: (created_at, last_modified, title)}."""
    now = datetime.now(UTC).replace(microsecond=123456)
    rows = {
        # id: (created_at, last_modified): last_modified order differs from created_at order
        "aaaa0001": (now - timedelta(days=1), now - timedelta(hours=5)),
        "bbbb0002": (now - timedelta(days=3), now - timedelta(minutes=1)),
        "cccc0003": (now - timedelta(hours=2), now - timedelta(hours=1)),
        # created 30 days ago, touched recently: outside 7 days, inside 60
        "dddd0004": (now - timedelta(days=30), now - timedelta(seconds=30)),
    }
    for cid, (created, modified) in rows.items():
        insert_phase1_conversation(
            pg_conn, cid, user_id, title=f"title {cid}", model="gpt-4o", created_at=created, last_modified=modified,
            messages=[("user", f"q {cid}", created), ("assistant", f"a {cid}", modified)],
        )  # fmt: skip
    insert_phase1_conversation(
        pg_conn, "eeee0005", other_user_id, title="someone else's", model="gpt-4o",
        created_at=now, last_modified=now, messages=[("user", "mine", now)],
    )  # fmt: skip
    return rows


def _list_item(cid, created, modified):
    return (
        cid,
        {
            "title": f"title {cid}",
            "model": "gpt-4o",
            "messages": [],
            "created_at": created.isoformat(),
            "last_modified": modified.isoformat(),
        },
    )


def test_list_is_metadata_only_newest_first_within_history_days(pg_manager, pg_conn, user_id, other_user_id):
    pg_manager.list_conversations(user_id)
    rows = _seed_list_rows(pg_conn, user_id, other_user_id)

    listed = pg_manager.list_conversations(user_id)
    assert listed == [
        _list_item("bbbb0002", *rows["bbbb0002"]),
        _list_item("cccc0003", *rows["cccc0003"]),
        _list_item("aaaa0001", *rows["aaaa0001"]),
    ]
    assert all(isinstance(item, tuple) for item in listed)


def test_list_history_days_60_includes_older_conversation(make_manager, pg_url, pg_conn, user_id, other_user_id):
    manager = make_manager(mode="postgres", connection_string=pg_url, history_days=60)
    manager.list_conversations(user_id)
    rows = _seed_list_rows(pg_conn, user_id, other_user_id)

    assert manager.list_conversations(user_id) == [
        _list_item("dddd0004", *rows["dddd0004"]),
        _list_item("bbbb0002", *rows["bbbb0002"]),
        _list_item("cccc0003", *rows["cccc0003"]),
        _list_item("aaaa0001", *rows["aaaa0001"]),
    ]


def test_list_of_user_without_conversations_is_empty(pg_manager, user_id):
    assert pg_manager.list_conversations(user_id) == []


def test_resave_moves_conversation_to_top_of_list(pg_manager, user_id, sample_conversation):
    first = sample_conversation(1, title="first")
    second = sample_conversation(1, title="second")
    pg_manager.save_conversation("11111111", first, user_id)
    pg_manager.save_conversation("22222222", second, user_id)
    assert [cid for cid, _ in pg_manager.list_conversations(user_id)] == ["22222222", "11111111"]

    first_again = sample_conversation(2, title="first, continued", created_at=first["created_at"])
    pg_manager.save_conversation("11111111", first_again, user_id)
    listed = pg_manager.list_conversations(user_id)
    assert [cid for cid, _ in listed] == ["11111111", "22222222"]
    assert listed[0][1] == dict(first_again, messages=[])


def test_phase1_writer_after_the_product_is_read_back(pg_manager, pg_conn, user_id, conv_id, sample_conversation):
    # An old (Phase 1) process still running during a rolling upgrade re-saves and deletes with plain SQL.
    pg_manager.save_conversation(conv_id, sample_conversation(3), user_id)
    with pg_conn.cursor() as cur:
        cur.execute(
            "INSERT INTO conversations (conversation_id, user_client_id, title, model, created_at, last_modified)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (conversation_id) DO UPDATE SET"
            " title = EXCLUDED.title, model = EXCLUDED.model, last_modified = EXCLUDED.last_modified",
            (conv_id, user_id, "edited by phase 1", "gpt-35-turbo", utc(2020, 1, 1), utc(2030, 1, 1, 12)),
        )
        cur.execute("DELETE FROM messages WHERE conversation_id = %s", (conv_id,))
        cur.execute(
            "INSERT INTO messages (conversation_id, sequence_number, role, content, timestamp)"
            " VALUES (%s, 0, 'user', 'only one now', %s)",
            (conv_id, utc(2030, 1, 1, 11, 59, 59, 999999)),
        )
    got = pg_manager.get_conversation(conv_id, user_id)
    assert got["title"] == "edited by phase 1"
    assert got["model"] == "gpt-35-turbo"
    assert got["last_modified"] == "2030-01-01T12:00:00+00:00"
    assert got["messages"] == [{"role": "user", "content": "only one now", "time": "2030-01-01T11:59:59.999999+00:00"}]

    with pg_conn.cursor() as cur:
        cur.execute("DELETE FROM conversations WHERE conversation_id = %s", (conv_id,))
    assert pg_manager.get_conversation(conv_id, user_id) is None
    assert pg_manager.list_conversations(user_id) == []


# --------------------------------------------------------------------------------------------------
# Saving through the product
# --------------------------------------------------------------------------------------------------


def test_save_then_get_is_equal_and_rows_match(pg_manager, pg_conn, user_id, conv_id, sample_conversation):
    conv = sample_conversation(
        4,
        title="Grüße — 你好 🚀",
        contents=["hello", "ünïcödé ✨ answer", "", "multi\nline\n\ttabbed"],
    )
    pg_manager.save_conversation(conv_id, conv, user_id)

    assert pg_manager.get_conversation(conv_id, user_id) == conv
    assert_row_matches(pg_conn, conv_id, user_id, conv)


def test_save_large_conversation(pg_manager, pg_conn, user_id, conv_id, sample_conversation):
    big = "x" * 1_000_000 + "ü"
    conv = sample_conversation(300)
    conv["messages"][123]["content"] = big
    pg_manager.save_conversation(conv_id, conv, user_id)

    got = pg_manager.get_conversation(conv_id, user_id)
    assert got == conv
    assert count_rows(pg_conn, "messages", conv_id) == 300


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("2025-11-26T00:35:21.123456Z", "2025-11-26T00:35:21.123456+00:00", id="Z"),
        pytest.param("2025-11-26T02:35:21.123456+02:00", "2025-11-26T00:35:21.123456+00:00", id="plus-02"),
        pytest.param("2025-11-25T19:35:21.123456-05:00", "2025-11-26T00:35:21.123456+00:00", id="minus-05-other-day"),
        pytest.param("2025-11-26T00:35:21.123456", "2025-11-26T00:35:21.123456+00:00", id="naive-is-utc"),
        pytest.param("2025-11-26T00:35:21+00:00", "2025-11-26T00:35:21+00:00", id="no-fraction"),
        pytest.param("2025-11-26T00:35:21.000000+00:00", "2025-11-26T00:35:21+00:00", id="zero-fraction-dropped"),
        pytest.param("2025-11-26T00:35:21.5+00:00", "2025-11-26T00:35:21.500000+00:00", id="short-fraction"),
        pytest.param(utc(2025, 11, 26, 0, 35, 21, 123456), "2025-11-26T00:35:21.123456+00:00", id="datetime-utc"),
        pytest.param(
            datetime(2025, 11, 26, 9, 35, 21, 123456, tzinfo=timezone(timedelta(hours=9))),
            "2025-11-26T00:35:21.123456+00:00",
            id="datetime-plus-09",
        ),
        pytest.param(datetime(2025, 11, 26, 0, 35, 21), "2025-11-26T00:35:21+00:00", id="datetime-naive-is-utc"),
    ],
)
def test_timestamps_are_normalised_to_canonical_utc(pg_manager, pg_conn, user_id, conv_id, given, expected):
    conv = {
        "title": "t",
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "time": given}],
        "created_at": given,
        "last_modified": given,
    }
    pg_manager.save_conversation(conv_id, conv, user_id)

    got = pg_manager.get_conversation(conv_id, user_id)
    assert got == {
        "title": "t",
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "time": expected}],
        "created_at": expected,
        "last_modified": expected,
    }
    instant = datetime.fromisoformat(expected)
    row = fetch_conversation_row(pg_conn, conv_id)
    assert (row["created_at"], row["last_modified"]) == (instant, instant)
    assert fetch_message_rows(pg_conn, conv_id) == [(0, "user", "hi", instant)]


def test_naive_timestamps_are_utc_even_when_process_tz_is_not(pg_manager, user_id, conv_id, monkeypatch):
    # Naive means UTC (`ConversationInput` in chat_history_rs/_core.pyi). A product that used the machine's local
    # zone would shift it.
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        conv = {
            "title": "t",
            "model": "m",
            "messages": [{"role": "user", "content": "hi", "time": "2025-11-26T00:35:21"}],
            "created_at": datetime(2025, 11, 26, 0, 35, 21),
            "last_modified": "2025-11-26T00:35:21.250000",
        }
        pg_manager.save_conversation(conv_id, conv, user_id)
        got = pg_manager.get_conversation(conv_id, user_id)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert got["messages"][0]["time"] == "2025-11-26T00:35:21+00:00"
    assert got["created_at"] == "2025-11-26T00:35:21+00:00"
    assert got["last_modified"] == "2025-11-26T00:35:21.250000+00:00"


def test_missing_timestamps_default_to_now_utc(pg_manager, pg_conn, user_id, conv_id):
    conv = {
        "title": "t",
        "model": "m",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    before = datetime.now(UTC) - timedelta(seconds=2)
    pg_manager.save_conversation(conv_id, conv, user_id)
    after = datetime.now(UTC) + timedelta(seconds=2)

    got = pg_manager.get_conversation(conv_id, user_id)
    stamps = [got["created_at"], got["last_modified"]] + [m["time"] for m in got["messages"]]
    assert len(stamps) == 4
    for stamp in stamps:
        assert isinstance(stamp, str)
        assert stamp.endswith("+00:00"), stamp
        parsed = datetime.fromisoformat(stamp)
        assert parsed.isoformat() == stamp  # canonical form
        assert before <= parsed <= after, (stamp, before, after)
    assert [(m["role"], m["content"]) for m in got["messages"]] == [("user", "q"), ("assistant", "a")]
    row = fetch_conversation_row(pg_conn, conv_id)
    assert before <= row["created_at"] <= after
    assert before <= row["last_modified"] <= after


def test_resave_keeps_created_at_and_updates_the_rest(pg_manager, pg_conn, user_id, conv_id, sample_conversation):
    original_created = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    first = sample_conversation(2, title="first", model="gpt-4o", created_at=original_created)
    pg_manager.save_conversation(conv_id, first, user_id)

    second = sample_conversation(3, title="renamed", model="gpt-4o-mini")  # a different, newer created_at
    assert second["created_at"] != original_created
    pg_manager.save_conversation(conv_id, second, user_id)

    expected = dict(second, created_at=original_created)
    assert pg_manager.get_conversation(conv_id, user_id) == expected
    assert_row_matches(pg_conn, conv_id, user_id, expected)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM conversations WHERE conversation_id = %s", (conv_id,))
        assert cur.fetchone()[0] == 1


def test_resave_shrinking_messages_leaves_exactly_the_new_rows(
    pg_manager, pg_conn, user_id, conv_id, sample_conversation
):
    five = sample_conversation(5, contents=["m0", "m1", "m2", "m3", "m4"])
    pg_manager.save_conversation(conv_id, five, user_id)
    assert [r[0] for r in fetch_message_rows(pg_conn, conv_id)] == [0, 1, 2, 3, 4]

    two = sample_conversation(2, contents=["new 0", "new 1"], created_at=five["created_at"])
    pg_manager.save_conversation(conv_id, two, user_id)

    assert fetch_message_rows(pg_conn, conv_id) == expected_message_rows(two)
    assert count_rows(pg_conn, "messages", conv_id) == 2
    assert pg_manager.get_conversation(conv_id, user_id) == two


def test_resave_with_edited_middle_message_rewrites_it(pg_manager, pg_conn, user_id, conv_id, sample_conversation):
    three = sample_conversation(3, contents=["q0", "a1", "q2"])
    pg_manager.save_conversation(conv_id, three, user_id)

    edited = sample_conversation(4, contents=["q0", "a1 (regenerated)", "q2", "a3"], created_at=three["created_at"])
    edited["messages"][0] = three["messages"][0]
    pg_manager.save_conversation(conv_id, edited, user_id)

    assert fetch_message_rows(pg_conn, conv_id) == expected_message_rows(edited)
    assert pg_manager.get_conversation(conv_id, user_id) == edited


def test_resave_to_empty_message_list(pg_manager, pg_conn, user_id, conv_id, sample_conversation):
    conv = sample_conversation(3)
    pg_manager.save_conversation(conv_id, conv, user_id)
    emptied = dict(conv, messages=[])
    pg_manager.save_conversation(conv_id, emptied, user_id)
    assert count_rows(pg_conn, "messages", conv_id) == 0
    assert pg_manager.get_conversation(conv_id, user_id) == emptied


# --------------------------------------------------------------------------------------------------
# user_id required; get / delete
# --------------------------------------------------------------------------------------------------


def test_user_id_none_is_a_value_error_for_every_call(pg_manager, pg_conn, conv_id, sample_conversation):
    with pytest.raises(ValueError, match=r"(?i)user"):
        pg_manager.save_conversation(conv_id, sample_conversation(1))
    with pytest.raises(ValueError, match=r"(?i)user"):
        pg_manager.save_conversation(conv_id, sample_conversation(1), user_id=None)
    with pytest.raises(ValueError, match=r"(?i)user"):
        pg_manager.get_conversation(conv_id)
    with pytest.raises(ValueError, match=r"(?i)user"):
        pg_manager.list_conversations()
    with pytest.raises(ValueError, match=r"(?i)user"):
        pg_manager.delete_conversation(conv_id)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.conversations') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("SELECT count(*) FROM conversations")
            assert cur.fetchone()[0] == 0


def test_get_unknown_id_is_none(pg_manager, user_id):
    assert pg_manager.get_conversation("00000000", user_id) is None


def test_delete_removes_row_and_messages_only_of_that_conversation(
    pg_manager, pg_conn, user_id, conv_id, sample_conversation
):
    doomed = sample_conversation(3)
    kept = sample_conversation(2, title="kept")
    pg_manager.save_conversation(conv_id, doomed, user_id)
    pg_manager.save_conversation("keep0000", kept, user_id)

    assert pg_manager.delete_conversation(conv_id, user_id) is None

    assert fetch_conversation_row(pg_conn, conv_id) is None
    assert count_rows(pg_conn, "messages", conv_id) == 0
    assert pg_manager.get_conversation(conv_id, user_id) is None
    assert_row_matches(pg_conn, "keep0000", user_id, kept)
    assert [cid for cid, _ in pg_manager.list_conversations(user_id)] == ["keep0000"]


def test_delete_of_unknown_id_is_a_noop(pg_manager, pg_conn, user_id, sample_conversation):
    kept = sample_conversation(1)
    pg_manager.save_conversation("keep0000", kept, user_id)
    pg_manager.delete_conversation("00000000", user_id)
    assert_row_matches(pg_conn, "keep0000", user_id, kept)


def test_seed_postgres_backend_method_names(pg_manager, pg_conn, user_id, conv_id, sample_conversation):
    backend = pg_manager.postgres_backend
    conv = sample_conversation(2)
    backend.save_conversation(conv_id, user_id, conv)
    assert backend.get_conversation(conv_id, user_id) == conv
    assert_row_matches(pg_conn, conv_id, user_id, conv)
    assert backend.list_conversations(user_id, 7) == [(conv_id, dict(conv, messages=[]))]
    assert pg_manager.get_conversation(conv_id, user_id) == conv
    backend.delete_conversation(conv_id, user_id)
    assert backend.get_conversation(conv_id, user_id) is None
    assert fetch_conversation_row(pg_conn, conv_id) is None


def test_seed_backend_list_days_argument(pg_manager, pg_conn, user_id, other_user_id):
    pg_manager.list_conversations(user_id)
    _seed_list_rows(pg_conn, user_id, other_user_id)
    assert [cid for cid, _ in pg_manager.postgres_backend.list_conversations(user_id, 7)] == [
        "bbbb0002",
        "cccc0003",
        "aaaa0001",
    ]
    assert [cid for cid, _ in pg_manager.postgres_backend.list_conversations(user_id, 60)] == [
        "dddd0004",
        "bbbb0002",
        "cccc0003",
        "aaaa0001",
    ]


# --------------------------------------------------------------------------------------------------
# Server time zone is not UTC
# --------------------------------------------------------------------------------------------------


def _check_tz_independence(manager, params, user_id, conv_id, sample_conversation):
    # 03:00:00.5 UTC is the previous evening in New York and midday in Tokyo.
    conv = sample_conversation(
        2,
        created_at="2025-11-26T03:00:00.500000+00:00",
        last_modified="2025-11-26T03:00:01+00:00",
    )
    conv["messages"][0]["time"] = "2025-11-26T03:00:00.750000+00:00"
    conv["messages"][1]["time"] = "2025-11-26T23:59:59.999999+00:00"
    manager.save_conversation(conv_id, conv, user_id)
    assert manager.get_conversation(conv_id, user_id) == conv

    conn = params.connect()
    try:
        assert_row_matches(conn, conv_id, user_id, conv)
        # A Phase 1 writer whose session zone is the database default wrote a local wall-clock time.
        with conn.cursor() as cur:
            cur.execute("SET TimeZone = 'America/New_York'")
        insert_phase1_conversation(
            conn, "ny000001", user_id, title="from NY", model="m",
            created_at="2025-11-25 22:00:00", last_modified="2025-11-25 22:00:00.25",
            messages=[("user", "hi", "2025-07-01 20:00:00")],  # summer: UTC-4
        )  # fmt: skip
    finally:
        conn.close()
    assert manager.get_conversation("ny000001", user_id) == {
        "title": "from NY",
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "time": "2025-07-02T00:00:00+00:00"}],
        "created_at": "2025-11-26T03:00:00+00:00",
        "last_modified": "2025-11-26T03:00:00.250000+00:00",
    }


def test_server_timezone_new_york_still_gives_utc(
    make_manager, pg_params_new_york, user_id, conv_id, sample_conversation
):
    manager = make_manager(mode="postgres", connection_string=pg_params_new_york.url)
    _check_tz_independence(manager, pg_params_new_york, user_id, conv_id, sample_conversation)


def test_session_timezone_from_url_options(make_manager, pg_params, user_id, conv_id, sample_conversation):
    url = pg_params.url + "?options=-c%20TimeZone%3DAsia/Tokyo"
    manager = make_manager(mode="postgres", connection_string=url)
    _check_tz_independence(manager, pg_params, user_id, conv_id, sample_conversation)


def test_session_timezone_from_key_value_options(make_manager, pg_params, user_id, conv_id, sample_conversation):
    dsn = pg_params.dsn + " options='-c TimeZone=Pacific/Chatham'"  # UTC+13:45
    manager = make_manager(mode="postgres", connection_string=dsn)
    _check_tz_independence(manager, pg_params, user_id, conv_id, sample_conversation)


# --------------------------------------------------------------------------------------------------
# Connection strings
# --------------------------------------------------------------------------------------------------


def _round_trip(manager, pg_conn, user_id, conv_id, conv):
    manager.save_conversation(conv_id, conv, user_id)
    assert manager.get_conversation(conv_id, user_id) == conv
    assert_row_matches(pg_conn, conv_id, user_id, conv)


@pytest.mark.parametrize("form", ["url", "key-value"])
@pytest.mark.parametrize("sslmode", [None, "disable", "prefer", "allow"])
def test_connection_string_forms_and_sslmodes(
    make_manager, pg_params, pg_conn, user_id, conv_id, sample_conversation, form, sslmode
):
    if form == "url":
        cs = pg_params.url + (f"?sslmode={sslmode}" if sslmode else "")
    else:
        cs = pg_params.dsn + (f" sslmode={sslmode}" if sslmode else "")
    manager = make_manager(mode="postgres", connection_string=cs)
    _round_trip(manager, pg_conn, user_id, conv_id, sample_conversation(2))


def test_postgres_scheme_alias(make_manager, pg_params, pg_conn, user_id, conv_id, sample_conversation):
    url = pg_params.url.replace("postgresql://", "postgres://", 1)
    manager = make_manager(mode="postgres", connection_string=url)
    _round_trip(manager, pg_conn, user_id, conv_id, sample_conversation(1))


def test_database_url_env_is_used_without_connection_string(
    make_manager, pg_url, pg_conn, user_id, conv_id, sample_conversation, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL", pg_url)
    manager = make_manager(mode="postgres")
    _round_trip(manager, pg_conn, user_id, conv_id, sample_conversation(2))


def test_connection_string_argument_wins_over_database_url(
    make_manager, pg_url, pg_conn, user_id, conv_id, sample_conversation, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere")
    manager = make_manager(mode="postgres", connection_string=pg_url)
    _round_trip(manager, pg_conn, user_id, conv_id, sample_conversation(1))


def _expect_unavailable_everywhere(make_manager, connection_string, user_id, conv_id, conversation, **kwargs):
    """Construction raises UnavailableError, or construction succeeds and every call does."""
    try:
        manager = make_manager(mode="postgres", connection_string=connection_string, **kwargs)
    except UnavailableError as exc:
        _check_unavailable(exc)
        return
    calls = [
        lambda: manager.get_conversation(conv_id, user_id),
        lambda: manager.list_conversations(user_id),
        lambda: manager.save_conversation(conv_id, conversation, user_id),
        lambda: manager.delete_conversation(conv_id, user_id),
    ]
    for call in calls:
        with pytest.raises(UnavailableError) as info:
            call()
        _check_unavailable(info.value)


def _check_unavailable(exc: BaseException) -> None:
    assert isinstance(exc, ConnectionError)
    assert isinstance(exc, ChatHistoryError)
    assert re.search(r"(?i)postgres", str(exc)), str(exc)


def test_sslmode_require_against_plain_server_raises_connection_error(
    make_manager, pg_params, user_id, conv_id, sample_conversation
):
    started = time.monotonic()
    _expect_unavailable_everywhere(
        make_manager, pg_params.url + "?sslmode=require", user_id, conv_id, sample_conversation(1),
        postgres_connect_timeout=2.0,
    )  # fmt: skip
    assert time.monotonic() - started < 30


def test_unreachable_database_raises_unavailable_never_none(make_manager, user_id, conv_id, sample_conversation):
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    started = time.monotonic()
    _expect_unavailable_everywhere(
        make_manager, url, user_id, conv_id, sample_conversation(1), postgres_connect_timeout=2.0
    )
    assert time.monotonic() - started < 30


def test_connect_timeout_bounds_a_server_that_never_answers(make_manager, user_id, conv_id, sample_conversation):
    # A listener that completes the TCP handshake (the kernel does) but never speaks: only a timeout
    # covering the whole connection setup, not just the TCP connect, gets out of it.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    try:
        started = time.monotonic()
        _expect_unavailable_everywhere(
            make_manager, f"postgresql://postgres@127.0.0.1:{port}/postgres", user_id, conv_id,
            sample_conversation(1), postgres_connect_timeout=1.0,
        )  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert elapsed < 30, f"calls against a silent server took {elapsed:.1f}s with postgres_connect_timeout=1"


@pytest.mark.slow
def test_server_stopped_then_restarted(own_pg_server, make_manager, user_id, conv_id, sample_conversation):
    # own_pg_server is requested first, so it outlives the managers (fixtures tear down in reverse).
    manager = make_manager(mode="postgres", connection_string=own_pg_server.url, postgres_connect_timeout=2.0)
    conv = sample_conversation(3)
    manager.save_conversation(conv_id, conv, user_id)
    assert manager.get_conversation(conv_id, user_id) == conv

    own_pg_server.stop()
    started = time.monotonic()
    for call in (
        lambda: manager.get_conversation(conv_id, user_id),
        lambda: manager.list_conversations(user_id),
        lambda: manager.save_conversation(conv_id, sample_conversation(1), user_id),
    ):
        with pytest.raises(UnavailableError) as info:
            call()
        _check_unavailable(info.value)
    assert time.monotonic() - started < 30

    own_pg_server.start()
    # The pool replaces its dead connections: the next calls succeed with the data intact.
    assert manager.get_conversation(conv_id, user_id) == conv
    newer = sample_conversation(4, created_at=conv["created_at"])
    manager.save_conversation(conv_id, newer, user_id)
    assert manager.get_conversation(conv_id, user_id) == newer
    conn = own_pg_server.params.connect()
    try:
        assert_row_matches(conn, conv_id, user_id, newer)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# Pool under concurrency
# --------------------------------------------------------------------------------------------------


def test_manager_shared_by_eight_threads(make_manager, pg_url, pg_conn, user_id, sample_conversation):
    manager = make_manager(mode="postgres", connection_string=pg_url, postgres_pool_size=4)
    shared = sample_conversation(3, title="shared")
    manager.save_conversation("5ba4ed00", shared, user_id)

    n_threads, rounds = 8, 8
    final: dict[str, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        try:
            barrier.wait(timeout=30)
            cid = f"{t:02x}00beef"
            created_at = sample_conversation(0)["created_at"]  # a re-save keeps the first created_at
            for r in range(rounds):
                conv = sample_conversation(
                    title=f"thread {t} round {r}",
                    contents=[f"t{t}r{r}m{i}" for i in range(r + 1)],
                    created_at=created_at,
                )
                manager.save_conversation(cid, conv, user_id)
                got = manager.get_conversation(cid, user_id)
                assert got == conv, (t, r)
                assert manager.get_conversation("5ba4ed00", user_id) == shared
            final[cid] = conv
        except BaseException as exc:  # noqa: BLE001 - reported below with the thread's id
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=100)
    assert not any(thread.is_alive() for thread in threads), "threads hung"
    assert errors == []
    assert len(final) == n_threads
    for cid, conv in final.items():
        assert manager.get_conversation(cid, user_id) == conv
        assert_row_matches(pg_conn, cid, user_id, conv)
    listed = dict(manager.list_conversations(user_id))
    assert set(listed) == set(final) | {"5ba4ed00"}


def test_sessions_ended_by_the_server_are_replaced_without_a_failed_call(
    make_manager, pg_url, pg_conn, pg_params, user_id, conv_id, sample_conversation
):
    """An administrator (or a failover's shutdown) ends every session of the database: the pooled
    connections get a FATAL before their sockets look closed. Each call runs again on a fresh
    connection instead of raising, however many pooled sessions were ended."""
    manager = make_manager(mode="postgres", connection_string=pg_url, postgres_pool_size=4)
    conv = sample_conversation(2)
    manager.save_conversation(conv_id, conv, user_id)
    barrier = threading.Barrier(4)
    errors = []

    def fill_the_pool() -> None:  # four sessions in the pool, all idle afterwards
        try:
            barrier.wait()
            assert manager.get_conversation(conv_id, user_id) == conv
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fill_the_pool) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for _ in range(3):
        with pg_conn.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (pg_params.dbname,),
            )
            assert cur.fetchone()[0] >= 1
        for _ in range(5):
            assert manager.get_conversation(conv_id, user_id) == conv
        manager.save_conversation(conv_id, conv, user_id)
