"""The Redis tier (docs/design.md, "Keys and rows", "Write-back" and "Ownership"; docs/monitoring.md, "What
`stats()` returns") against real throwaway Redis and PostgreSQL servers.

Every test checks the data itself: the Redis keys with redis-py (seed layout: `conv:<user>:<conv>` hashes,
`user:<user>:convlist`, `dirty:convs`) and the PostgreSQL rows with psycopg2, row by row.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest

from chat_history_rs import ChatHistoryError, InvalidTypeError, OwnershipError, ValidationError
from support.leaks import assert_no_secret, exception_texts, log_texts
from support.tcp_proxy import TcpProxy
from support.redis_support import (
    DIRTY_SET,
    assert_cached,
    conv_key,
    dirty_member,
    dirty_set,
    grown,
    iso,
    list_key,
    make_conversation,
    metadata,
    now_iso,
    owner_key,
    pg_conversation_ids,
    pg_message_count,
    pg_message_identities,
    pg_snapshot,
    redis_client,
    run_script,
    script_env,
    seed_fields,
    user_dirty_key,
    seed_view,
    wait_until,
    write_seed_hash,
)
from support.servers import (
    assert_row_matches,
    create_phase1_schema,
    fetch_conversation_row,
    insert_phase1_conversation,
)

UTC = timezone.utc


# --------------------------------------------------------------------------------------------------
# Write path: Redis first, dirty
# --------------------------------------------------------------------------------------------------


def test_save_lands_in_redis_dirty_and_not_in_postgres(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    conversation = make_conversation(3, title="First chat")
    manager.save_conversation(conv_id, conversation, user_id=user_id)

    assert_cached(rdb.client, user_id, conv_id, conversation, dirty=True)
    assert dirty_set(rdb.client) == {dirty_member(user_id, conv_id)}
    assert conv_id not in pg_conversation_ids(pg_conn)
    assert pg_message_count(pg_conn) == 0
    assert manager.stats()["dirty_count"] == 1


def test_get_is_a_cache_hit_equal_to_the_input(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    conversation = make_conversation(4)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    hits = manager.stats()["cache_hits"]

    # Not in PostgreSQL yet, so this can only have come from Redis.
    assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    assert conv_id not in pg_conversation_ids(pg_conn)
    assert manager.stats()["cache_hits"] == hits + 1
    assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    assert manager.stats()["cache_hits"] == hits + 2


def test_a_flush_settles_each_conversation_of_a_large_batch_by_its_own_outcome(
    make_redis_manager, make_manager, pg_url, rdb, pg_conn
):  # fmt: skip
    # More conversations than one settle script takes (100), so several calls, each with
    # conversations to mark clean and, at positions across the calls, ones PostgreSQL already has
    # a newer version of, which must be dropped from Redis rather than marked clean.
    manager = make_redis_manager(redis_ttl=600)
    direct = make_manager(mode="postgres", connection_string=pg_url)  # Redis unreachable, say
    users = [f"{n:08x}-0000-4000-8000-000000000000" for n in range(3)]
    items = [(users[n % 3], f"b{n:07x}", make_conversation(2, prefix=f"batch {n} ")) for n in range(230)]
    for user, cid, conv in items:
        manager.save_conversation(cid, conv, user_id=user)
    newer_at = {0, 99, 100, 101, 157, 229}
    newer = {}
    for n in newer_at:
        user, cid, conv = items[n]
        newer[n] = grown({**conv, "title": "newer in PostgreSQL"}, 1)
        direct.save_conversation(cid, newer[n], user_id=user)

    assert manager.flush_dirty_conversations() == len(items) - len(newer_at)

    assert dirty_set(rdb.client) == set()
    for n, (user, cid, conv) in enumerate(items):
        if n in newer_at:
            assert not rdb.client.exists(conv_key(user, cid)), n
            assert_row_matches(pg_conn, cid, user, newer[n])
            assert manager.get_conversation(cid, user_id=user) == newer[n]
        else:
            assert_cached(rdb.client, user, cid, conv, dirty=False, ttl=600)
            assert 0 < rdb.client.ttl(owner_key(cid)) <= 600, n
            assert_row_matches(pg_conn, cid, user, conv)
    for user in users:
        assert rdb.client.scard(user_dirty_key(user)) == 0


def test_scripts_flushed_from_redis_are_loaded_again(make_redis_manager, rdb, pg_conn, user_id):
    # SCRIPT FLUSH (an operator, a failover to a replica without the scripts) on live connections:
    # each pipeline that meets NOSCRIPT loads its scripts and runs again, its staged fields too.
    manager = make_redis_manager(redis_ttl=600)
    first, second = make_conversation(2, title="first"), make_conversation(3, title="second")
    manager.save_conversation("5c000001", first, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1
    assert rdb.client.delete(conv_key(user_id, "5c000001")) == 1

    assert rdb.client.script_flush()
    manager.save_conversation("5c000002", second, user_id=user_id)  # the save script
    assert_cached(rdb.client, user_id, "5c000002", second, dirty=True)
    assert rdb.client.script_flush()
    assert manager.get_conversation("5c000001", user_id=user_id) == first  # a miss's backfill script,
    # sent without waiting: the connection's next call reads its NOSCRIPT, loads the scripts, sends it again
    assert manager.get_conversation("5c000002", user_id=user_id) == second
    assert_cached(rdb.client, user_id, "5c000001", first, dirty=False, ttl=600)
    assert rdb.client.script_flush()
    assert manager.flush_dirty_conversations() == 1  # the settle script
    assert_row_matches(pg_conn, "5c000002", user_id, second)
    assert_cached(rdb.client, user_id, "5c000002", second, dirty=False, ttl=600)
    assert rdb.client.keys("staged:*") == []


def test_flush_writes_rows_and_marks_clean(make_redis_manager, rdb, pg_conn, user_id, other_user_id, conv_id):
    manager = make_redis_manager(redis_ttl=600)
    first = make_conversation(3, title="Mine")
    second = make_conversation(2, title="Theirs", prefix="other ")
    other_conv = "f00dbabe"
    manager.save_conversation(conv_id, first, user_id=user_id)
    manager.save_conversation(other_conv, second, user_id=other_user_id)

    assert manager.flush_dirty_conversations() == 2

    assert_row_matches(pg_conn, conv_id, user_id, first)
    assert_row_matches(pg_conn, other_conv, other_user_id, second)
    assert pg_conversation_ids(pg_conn) == {conv_id, other_conv}
    assert_cached(rdb.client, user_id, conv_id, first, dirty=False, ttl=600)
    assert_cached(rdb.client, other_user_id, other_conv, second, dirty=False, ttl=600)
    assert dirty_set(rdb.client) == set()
    assert manager.stats()["dirty_count"] == 0


def test_second_flush_writes_nothing(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    conversation = make_conversation(3)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1
    rows = pg_snapshot(pg_conn)  # with xmin: an UPDATE to the same values would show
    redis_before = seed_view(rdb.client)

    assert manager.flush_dirty_conversations() == 0
    assert pg_snapshot(pg_conn) == rows
    assert seed_view(rdb.client) == redis_before


def test_flush_of_grown_conversation_writes_only_the_new_rows(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    conversation = make_conversation(4)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1
    old_rows = pg_message_identities(pg_conn, conv_id)
    assert [seq for seq, _, _ in old_rows] == [0, 1, 2, 3]

    longer = grown(conversation, 2)
    manager.save_conversation(conv_id, longer, user_id=user_id)
    assert_cached(rdb.client, user_id, conv_id, longer, dirty=True)
    assert manager.flush_dirty_conversations() == 1

    assert_row_matches(pg_conn, conv_id, user_id, longer)
    new_rows = pg_message_identities(pg_conn, conv_id)
    assert len(new_rows) == 6
    # docs/design.md, "Write-back" (only what changed is sent): two new messages cost two rows; the old rows keep
    # their message_id (not deleted and re-inserted) and their row version (not updated).
    kept_ids = [(seq, mid) for seq, mid, _ in new_rows[:4]]
    assert kept_ids == [(seq, mid) for seq, mid, _ in old_rows], "old message rows were deleted and re-inserted"
    assert new_rows[:4] == old_rows, "old message rows were rewritten (UPDATE)"


def test_flush_of_shrunk_conversation_removes_rows(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    # The app never shrinks a conversation, but save_conversation replaces the whole conversation.
    manager = make_redis_manager()
    conversation = make_conversation(5)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    manager.flush_dirty_conversations()
    shorter = {**conversation, "messages": conversation["messages"][:2], "last_modified": now_iso()}
    manager.save_conversation(conv_id, shorter, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, shorter)


def test_flush_batches_conversations_per_transaction(make_redis_manager, rdb, pg_conn, user_id):
    # docs/design.md, "Write-back": many conversations per transaction, each conversation whole in one. Rows
    # written by one transaction share its xmin, so the distinct xmins count the transactions.
    manager = make_redis_manager(flush_batch_size=25)
    conversations = {f"ba7c{n:04d}": make_conversation(1 + n % 3, prefix=f"{n} ") for n in range(100)}
    for cid, conv in conversations.items():
        manager.save_conversation(cid, conv, user_id=user_id)
    assert manager.flush_dirty_conversations() == 100
    for cid, conv in conversations.items():
        assert_row_matches(pg_conn, cid, user_id, conv)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT conversation_id, xmin::text FROM conversations")
        conversation_xmin = dict(cur.fetchall())
        cur.execute("SELECT conversation_id, xmin::text FROM messages")
        message_xmin = cur.fetchall()
    transactions = set(conversation_xmin.values())
    # flush_batch_size is an upper bound (batches follow SSCAN's uneven pages), so allow up to 10 transactions:
    # one transaction per conversation (100) is what this rules out.
    assert len(transactions) <= 10, f"100 conversations in {len(transactions)} transactions with flush_batch_size=25"
    torn = [(cid, x) for cid, x in message_xmin if x != conversation_xmin[cid]]
    assert torn == [], "message rows written in another transaction than their conversation"


# --------------------------------------------------------------------------------------------------
# Read path: cache miss, backfill
# --------------------------------------------------------------------------------------------------


def test_cache_miss_reads_postgres_and_backfills_clean(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager(redis_ttl=900)
    conversation = make_conversation(3)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    manager.flush_dirty_conversations()
    assert rdb.client.delete(conv_key(user_id, conv_id)) + rdb.client.delete(owner_key(conv_id)) == 2
    stats = manager.stats()

    assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    # PostgreSQL stays the record of who owns a clean conversation: a miss writes no owner key.
    assert not rdb.client.exists(owner_key(conv_id))
    after_miss = manager.stats()
    assert after_miss["cache_misses"] == stats["cache_misses"] + 1
    assert after_miss["cache_hits"] == stats["cache_hits"]
    assert_cached(rdb.client, user_id, conv_id, conversation, dirty=False, ttl=900)

    assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    assert manager.stats()["cache_hits"] == stats["cache_hits"] + 1


def test_phase1_rows_are_served_and_backfilled(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    create_phase1_schema(pg_conn)
    insert_phase1_conversation(
        pg_conn, conv_id, user_id, title="Phase 1 chat", model="gpt-35-turbo",
        created_at="2025-11-20 08:00:00.25+00", last_modified="2025-11-20 10:00:00+02",
        messages=[("user", "hello", "2025-11-20 08:00:01+00"), ("assistant", "hi", "2025-11-20 08:00:02.5+00")],
    )  # fmt: skip
    expected = {
        "title": "Phase 1 chat",
        "model": "gpt-35-turbo",
        "messages": [
            {"role": "user", "content": "hello", "time": "2025-11-20T08:00:01+00:00"},
            {"role": "assistant", "content": "hi", "time": "2025-11-20T08:00:02.500000+00:00"},
        ],
        "created_at": "2025-11-20T08:00:00.250000+00:00",
        "last_modified": "2025-11-20T08:00:00+00:00",
    }
    manager = make_redis_manager()
    assert manager.get_conversation(conv_id, user_id=user_id) == expected
    assert_cached(rdb.client, user_id, conv_id, expected, dirty=False)
    assert manager.get_conversation(conv_id, user_id=user_id) == expected


def test_get_unknown_conversation_is_none(make_redis_manager, rdb, user_id):
    manager = make_redis_manager()
    assert manager.get_conversation("0badf00d", user_id=user_id) is None
    assert not rdb.client.exists(conv_key(user_id, "0badf00d"))


def test_same_conversation_reads_back_identical_from_both_tiers(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    whole_second = datetime(2025, 11, 26, 0, 35, 21, tzinfo=UTC)  # isoformat without a fraction
    conversation = {
        "title": "Grüße — \"quotes\" 'single' %s $1 ; -- 🚀",
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "user", "content": "héllo 世界\nsecond line\ttab \\ backslash", "time": iso(whole_second)},
            {"role": "assistant", "content": "", "time": iso(whole_second + timedelta(microseconds=1))},
            {"role": "user", "content": '{"json": [1, 2]}', "time": iso(whole_second + timedelta(seconds=1))},
        ],
        "created_at": iso(whole_second),
        "last_modified": iso(whole_second + timedelta(seconds=2, microseconds=500000)),
    }
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    from_redis = manager.get_conversation(conv_id, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1
    rdb.client.delete(conv_key(user_id, conv_id))
    from_postgres = manager.get_conversation(conv_id, user_id=user_id)
    from_backfill = manager.get_conversation(conv_id, user_id=user_id)

    assert from_redis == conversation
    assert from_postgres == conversation
    assert from_backfill == conversation
    assert manager.postgres_backend.get_conversation(conv_id, user_id) == conversation
    assert manager.redis_backend.get_conversation(user_id, conv_id) == conversation
    assert_row_matches(pg_conn, conv_id, user_id, conversation)


def test_non_canonical_timestamps_read_back_canonical_from_both_tiers(make_redis_manager, rdb, user_id, conv_id):
    manager = make_redis_manager()
    conversation = {
        "title": "Offsets",
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "z", "time": "2025-11-26T00:35:21.123456Z"},
            {"role": "assistant", "content": "offset", "time": "2025-11-26T09:35:22+09:00"},
            {"role": "user", "content": "naive", "time": "2025-11-26T00:35:23.5"},
            {"role": "assistant", "content": "datetime", "time": datetime(2025, 11, 26, 0, 35, 24, tzinfo=UTC)},
        ],
        "created_at": "2025-11-25T19:35:21-05:00",
        "last_modified": datetime(2025, 11, 26, 0, 36),  # naive datetime = UTC
    }
    expected = {
        "title": "Offsets",
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "z", "time": "2025-11-26T00:35:21.123456+00:00"},
            {"role": "assistant", "content": "offset", "time": "2025-11-26T00:35:22+00:00"},
            {"role": "user", "content": "naive", "time": "2025-11-26T00:35:23.500000+00:00"},
            {"role": "assistant", "content": "datetime", "time": "2025-11-26T00:35:24+00:00"},
        ],
        "created_at": "2025-11-26T00:35:21+00:00",
        "last_modified": "2025-11-26T00:36:00+00:00",
    }
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    assert manager.get_conversation(conv_id, user_id=user_id) == expected
    assert_cached(rdb.client, user_id, conv_id, expected, dirty=True)
    manager.flush_dirty_conversations()
    rdb.client.delete(conv_key(user_id, conv_id))
    assert manager.get_conversation(conv_id, user_id=user_id) == expected


def test_seed_format_hash_is_read_and_flushed(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    # Rolling upgrade (docs/design.md, "Keys and rows"): a seed-design Python instance wrote this hash, with the seed's
    # json.dumps (ASCII escapes) and its 1800 s TTL even though it is dirty.
    conversation = make_conversation(3, title="Written by the seed", prefix="ünïcode ")
    write_seed_hash(rdb.client, user_id, conv_id, conversation, dirty=True)
    manager = make_redis_manager()
    assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    assert dirty_set(rdb.client) == set()
    assert seed_fields(rdb.client, user_id, conv_id)["dirty"] == "0"


# --------------------------------------------------------------------------------------------------
# Lists
# --------------------------------------------------------------------------------------------------


def test_list_merges_dirty_redis_and_postgres_newest_first(
    make_redis_manager, rdb, pg_conn, user_id, other_user_id
):  # fmt: skip
    now = datetime.now(UTC)
    create_phase1_schema(pg_conn)
    only_pg_old = make_conversation(2, title="PG old", created_at=iso(now - timedelta(days=1)),
                                    last_modified=iso(now - timedelta(hours=3)))  # fmt: skip
    only_pg_new = make_conversation(2, title="PG new", created_at=iso(now - timedelta(days=1)),
                                    last_modified=iso(now - timedelta(hours=1)))  # fmt: skip
    for cid, conv in (("aaaa0001", only_pg_old), ("aaaa0002", only_pg_new)):
        insert_phase1_conversation(
            pg_conn, cid, user_id, title=conv["title"], model=conv["model"], created_at=conv["created_at"],
            last_modified=conv["last_modified"],
            messages=[(m["role"], m["content"], m["time"]) for m in conv["messages"]],
        )  # fmt: skip
    insert_phase1_conversation(
        pg_conn, "bbbb0001", other_user_id, title="not mine", model="m", created_at=iso(now),
        last_modified=iso(now), messages=[],
    )  # fmt: skip

    manager = make_redis_manager()
    # Flushed once, then renamed: the dirty Redis version is the newest.
    renamed = make_conversation(3, title="Before rename", created_at=iso(now - timedelta(days=1)),
                                last_modified=iso(now - timedelta(hours=2)))  # fmt: skip
    manager.save_conversation("aaaa0003", renamed, user_id=user_id)
    manager.flush_dirty_conversations()
    renamed = {**renamed, "title": "After rename", "last_modified": iso(now + timedelta(minutes=30))}
    manager.save_conversation("aaaa0003", renamed, user_id=user_id)
    brand_new = make_conversation(
        1, title="Brand new", created_at=iso(now - timedelta(minutes=1)), last_modified=iso(now)
    )
    manager.save_conversation("aaaa0004", brand_new, user_id=user_id)
    manager.save_conversation("bbbb0002", make_conversation(1, title="also not mine"), user_id=other_user_id)
    assert "aaaa0004" not in pg_conversation_ids(pg_conn)

    expected = [
        ("aaaa0003", metadata(renamed)),
        ("aaaa0004", metadata(brand_new)),
        ("aaaa0002", metadata(only_pg_new)),
        ("aaaa0001", metadata(only_pg_old)),
    ]
    assert manager.list_conversations(user_id) == expected
    assert manager.list_conversations(user_id=user_id) == expected  # again: now maybe from a cached list
    _assert_convlist_consistent(rdb.client, user_id, dict(expected))

    # A save after the list was cached shows at once (docs/design.md, "The contract": reads see the newest save).
    newest = make_conversation(1, title="Newest", last_modified=iso(now + timedelta(hours=1)))
    manager.save_conversation("aaaa0005", newest, user_id=user_id)
    assert manager.list_conversations(user_id) == [("aaaa0005", metadata(newest))] + expected


def test_list_and_get_see_another_instances_writes_at_once(make_redis_manager, rdb, user_id):
    # Two app instances on one Redis (docs/design.md, "The contract"): a cached list in one never hides the other's
    # saves and deletes.
    app_a, app_b = make_redis_manager(), make_redis_manager()
    first = make_conversation(1, title="first")
    app_a.save_conversation("aaaa1001", first, user_id=user_id)
    app_a.flush_dirty_conversations()
    assert app_a.list_conversations(user_id) == [("aaaa1001", metadata(first))]

    second = make_conversation(2, title="second")
    app_b.save_conversation("aaaa1002", second, user_id=user_id)
    assert app_a.list_conversations(user_id) == [("aaaa1002", metadata(second)), ("aaaa1001", metadata(first))]
    assert app_a.get_conversation("aaaa1002", user_id=user_id) == second

    renamed = {**first, "title": "first, renamed by B", "last_modified": now_iso()}
    app_b.save_conversation("aaaa1001", renamed, user_id=user_id)
    assert app_a.get_conversation("aaaa1001", user_id=user_id) == renamed
    assert app_a.list_conversations(user_id) == [("aaaa1001", metadata(renamed)), ("aaaa1002", metadata(second))]

    app_b.delete_conversation("aaaa1002", user_id=user_id)
    assert app_a.list_conversations(user_id) == [("aaaa1001", metadata(renamed))]
    assert app_a.get_conversation("aaaa1002", user_id=user_id) is None


def _assert_convlist_consistent(client, user_id, conversations: dict) -> None:
    """When the product keeps the seed's convlist, its members are this user's ids scored by last_modified."""
    key = list_key(user_id)
    if not client.exists(key):
        return
    assert 0 < client.ttl(key) <= 300, f"{key} TTL {client.ttl(key)}"
    for member, score in client.zrange(key, 0, -1, withscores=True):
        assert member in conversations, f"{key} holds {member!r}, not one of the user's conversations"
        expected = datetime.fromisoformat(conversations[member]["last_modified"]).timestamp()
        assert abs(score - expected) < 1e-3, (member, score, expected)


def test_list_respects_history_days(make_redis_manager, rdb, pg_conn, user_id):
    now = datetime.now(UTC)
    create_phase1_schema(pg_conn)
    for cid, days in (("cccc0001", 2), ("cccc0002", 5)):
        insert_phase1_conversation(
            pg_conn, cid, user_id, title=f"pg {days}d", model="m", created_at=now - timedelta(days=days),
            last_modified=now - timedelta(days=days), messages=[("user", "x", now - timedelta(days=days))],
        )  # fmt: skip
    manager = make_redis_manager(history_days=3)
    recent = make_conversation(1, title="recent", created_at=iso(now - timedelta(days=2, hours=1)))
    old_but_active = make_conversation(1, title="old", created_at=iso(now - timedelta(days=4)))
    manager.save_conversation("cccc0003", recent, user_id=user_id)
    manager.save_conversation("cccc0004", old_but_active, user_id=user_id)  # created 4 days ago: outside

    listed = manager.list_conversations(user_id)
    assert [cid for cid, _ in listed] == ["cccc0003", "cccc0001"]
    assert listed[0][1] == metadata(recent)
    assert listed[1][1]["title"] == "pg 2d"

    manager.flush_dirty_conversations()
    assert [cid for cid, _ in manager.list_conversations(user_id)] == ["cccc0003", "cccc0001"]


def test_list_without_user_id_is_a_value_error(make_redis_manager):
    manager = make_redis_manager()
    with pytest.raises(ValueError):
        manager.list_conversations()


# --------------------------------------------------------------------------------------------------
# Delete
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["dirty-only", "flushed-then-dirty", "clean", "postgres-only"])
def test_delete_removes_every_trace(make_redis_manager, rdb, pg_conn, user_id, conv_id, state):
    manager = make_redis_manager()
    conversation = make_conversation(3)
    keep = make_conversation(2, title="keep me")
    manager.save_conversation("deadbeef", keep, user_id=user_id)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    if state != "dirty-only":
        manager.flush_dirty_conversations()
    if state == "flushed-then-dirty":
        conversation = grown(conversation, 1)
        manager.save_conversation(conv_id, conversation, user_id=user_id)
    if state == "postgres-only":
        rdb.client.delete(conv_key(user_id, conv_id))
    manager.list_conversations(user_id)  # so a cached convlist exists, if the product keeps one

    manager.delete_conversation(conv_id, user_id=user_id)

    assert not rdb.client.exists(conv_key(user_id, conv_id))
    assert dirty_member(user_id, conv_id) not in dirty_set(rdb.client)
    assert rdb.client.zscore(list_key(user_id), conv_id) is None
    assert conv_id not in pg_conversation_ids(pg_conn)
    assert pg_message_count(pg_conn, conv_id) == 0
    assert manager.get_conversation(conv_id, user_id=user_id) is None
    assert [cid for cid, _ in manager.list_conversations(user_id)] == ["deadbeef"]

    manager.flush_dirty_conversations()  # nothing brings it back
    assert conv_id not in pg_conversation_ids(pg_conn)
    assert not rdb.client.exists(conv_key(user_id, conv_id))
    assert manager.get_conversation(conv_id, user_id=user_id) is None
    assert manager.get_conversation("deadbeef", user_id=user_id) == keep
    assert_row_matches(pg_conn, "deadbeef", user_id, keep)


def test_delete_of_unknown_conversation_is_quiet(make_redis_manager, rdb, user_id):
    manager = make_redis_manager()
    manager.delete_conversation("12345678", user_id=user_id)
    assert dirty_set(rdb.client) == set()


def test_saving_again_after_delete_creates_a_new_conversation(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    manager.save_conversation(conv_id, make_conversation(3), user_id=user_id)
    manager.flush_dirty_conversations()
    manager.delete_conversation(conv_id, user_id=user_id)
    again = make_conversation(1, title="second life")
    manager.save_conversation(conv_id, again, user_id=user_id)
    assert manager.get_conversation(conv_id, user_id=user_id) == again
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, again)


# --------------------------------------------------------------------------------------------------
# Ownership (docs/design.md, "Ownership")
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["dirty-in-redis-only", "clean-in-both", "postgres-only", "owner-record-lapsed"])
def test_other_user_cannot_overwrite_read_or_delete(
    make_redis_manager, rdb, pg_conn, user_id, other_user_id, conv_id, state
):  # fmt: skip
    manager = make_redis_manager()
    mine = make_conversation(3, title="A's secret chat")
    manager.save_conversation(conv_id, mine, user_id=user_id)
    if state != "dirty-in-redis-only":
        assert manager.flush_dirty_conversations() == 1
    if state == "postgres-only":
        rdb.client.delete(conv_key(user_id, conv_id))
    if state == "owner-record-lapsed":
        # Hits give the conversation its TTL back but not its owner record, which may lapse first.
        assert rdb.client.delete(owner_key(conv_id)) == 1
    redis_before = seed_view(rdb.client)
    pg_before = pg_snapshot(pg_conn)

    intruder = make_conversation(1, title="B's attempt")
    with pytest.raises(PermissionError) as info:
        manager.save_conversation(conv_id, intruder, user_id=other_user_id)
    assert isinstance(info.value, OwnershipError)
    assert seed_view(rdb.client) == redis_before
    assert pg_snapshot(pg_conn) == pg_before

    assert manager.get_conversation(conv_id, user_id=other_user_id) is None
    manager.delete_conversation(conv_id, user_id=other_user_id)
    assert manager.list_conversations(other_user_id) == []
    assert seed_view(rdb.client) == redis_before
    assert pg_snapshot(pg_conn) == pg_before
    assert not rdb.client.exists(conv_key(other_user_id, conv_id))
    assert dirty_member(other_user_id, conv_id) not in dirty_set(rdb.client)

    assert manager.get_conversation(conv_id, user_id=user_id) == mine
    manager.flush_dirty_conversations()
    assert_row_matches(pg_conn, conv_id, user_id, mine)
    # The owner's own saves go on as before, whatever Redis remembers of the claim.
    mine = grown(mine, 2, "A again")
    manager.save_conversation(conv_id, mine, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, mine)


def test_other_user_blocked_across_two_managers(make_redis_manager, rdb, pg_conn, user_id, other_user_id, conv_id):
    # Two app instances sharing Redis: B's instance has never seen A's conversation, still dirty in Redis.
    app_a, app_b = make_redis_manager(), make_redis_manager()
    mine = make_conversation(2)
    app_a.save_conversation(conv_id, mine, user_id=user_id)
    with pytest.raises(PermissionError):
        app_b.save_conversation(conv_id, make_conversation(1, title="B"), user_id=other_user_id)
    assert dirty_set(rdb.client) == {dirty_member(user_id, conv_id)}
    assert app_b.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, mine)
    assert app_b.get_conversation(conv_id, user_id=other_user_id) is None


# --------------------------------------------------------------------------------------------------
# Bad input (README, "Errors"): refused before Redis, nothing changes
# --------------------------------------------------------------------------------------------------


def _bad_conversations():
    def edit(fn):
        def make(good):
            bad = json.loads(json.dumps(good))
            fn(bad)
            return bad

        return make

    def set_msg(i, key, value):
        return edit(lambda c: c["messages"][i].__setitem__(key, value))

    return [
        ("role-system", set_msg(0, "role", "system"), "role"),
        ("content-nul", set_msg(1, "content", "a\x00b"), "content"),
        ("content-int", set_msg(1, "content", 42), "content"),
        ("time-garbage", set_msg(0, "time", "yesterday"), "time"),
        ("title-missing", edit(lambda c: c.pop("title")), "title"),
        ("title-int", edit(lambda c: c.__setitem__("title", 7)), "title"),
        ("model-too-long", edit(lambda c: c.__setitem__("model", "m" * 101)), "model"),
        ("messages-not-list", edit(lambda c: c.__setitem__("messages", "hello")), "messages"),
        ("message-not-dict", edit(lambda c: c["messages"].__setitem__(0, "hi")), "messages"),
        ("created-garbage", edit(lambda c: c.__setitem__("created_at", "2025-13-45")), "created_at"),
    ]


@pytest.mark.parametrize(
    "make_bad,field", [case[1:] for case in _bad_conversations()], ids=[c[0] for c in _bad_conversations()]
)
def test_refused_save_changes_nothing(make_redis_manager, rdb, pg_conn, user_id, conv_id, make_bad, field):
    manager = make_redis_manager()
    flushed = make_conversation(3, title="v1")
    manager.save_conversation(conv_id, flushed, user_id=user_id)
    manager.flush_dirty_conversations()
    dirty = grown({**flushed, "title": "v2"}, 1)
    manager.save_conversation(conv_id, dirty, user_id=user_id)
    redis_before = seed_view(rdb.client)
    pg_before = pg_snapshot(pg_conn)

    for target in (conv_id, "a0a0a0a0"):  # an existing conversation and a new one
        # README, "Errors": ValidationError (a ValueError) or InvalidTypeError (a TypeError), naming the field;
        # which of the two is not pinned here.
        with pytest.raises((ValueError, TypeError)) as info:
            manager.save_conversation(target, make_bad(dirty), user_id=user_id)
        assert isinstance(info.value, (ValidationError, InvalidTypeError))
        assert field in str(info.value)
        assert seed_view(rdb.client) == redis_before
        assert pg_snapshot(pg_conn) == pg_before

    assert manager.get_conversation(conv_id, user_id=user_id) == dirty
    assert manager.get_conversation("a0a0a0a0", user_id=user_id) is None
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, dirty)
    assert pg_conversation_ids(pg_conn) == {conv_id}


@pytest.mark.parametrize(
    "conversation_id,user",
    [
        ("a" * 51, "u"),
        ("ab:cd", "u"),
        ("ab{cd}", "u"),
        ("ab\ncd", "u"),
        ("", "u"),
        ("abcd1234", "u" * 256),
        ("abcd1234", "user:1"),
        ("abcd1234", "user{1}"),
        ("abcd1234", ""),
    ],
    ids=[
        "conv-51",
        "conv-colon",
        "conv-braces",
        "conv-newline",
        "conv-empty",
        "user-256",
        "user-colon",
        "user-braces",
        "user-empty",
    ],  # fmt: skip
)
def test_bad_ids_are_refused_everywhere(make_redis_manager, rdb, pg_conn, conversation_id, user):
    manager = make_redis_manager()
    before = seed_view(rdb.client)
    with pytest.raises(ValueError):
        manager.save_conversation(conversation_id, make_conversation(1), user_id=user)
    assert seed_view(rdb.client) == before
    assert pg_conversation_ids(pg_conn) == set()
    assert manager.flush_dirty_conversations() == 0


# --------------------------------------------------------------------------------------------------
# Flush triggers: with, close(), background thread, atexit
# --------------------------------------------------------------------------------------------------


def test_with_block_flushes_at_exit(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    conversation = make_conversation(2)
    with manager as history:
        assert history is manager
        history.save_conversation(conv_id, conversation, user_id=user_id)
        assert conv_id not in pg_conversation_ids(pg_conn)
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    assert dirty_set(rdb.client) == set()


def test_with_block_flushes_when_the_body_raises(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    conversation = make_conversation(2)
    with pytest.raises(KeyError), manager as history:
        history.save_conversation(conv_id, conversation, user_id=user_id)
        raise KeyError("app bug")
    assert_row_matches(pg_conn, conv_id, user_id, conversation)


def test_close_flushes(make_redis_manager, rdb, pg_conn, user_id):
    manager = make_redis_manager()
    conversations = {f"c105e{i:03d}": make_conversation(i + 1, title=f"chat {i}") for i in range(3)}
    for cid, conv in conversations.items():
        manager.save_conversation(cid, conv, user_id=user_id)
    manager.close()
    for cid, conv in conversations.items():
        assert_row_matches(pg_conn, cid, user_id, conv)
    assert dirty_set(rdb.client) == set()
    manager.close()  # idempotent


@pytest.mark.parametrize("switch", ["explicit", "default"])
def test_background_flusher_writes_without_explicit_flush(make_redis_manager, rdb, pg_conn, user_id, conv_id, switch):
    # README, "Configuration": background_flush is on by default in redis mode.
    background_flush = True if switch == "explicit" else None  # None: leave the product's default
    manager = make_redis_manager(flush_interval=0.5, background_flush=background_flush)
    conversation = make_conversation(2)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    wait_until(lambda: conv_id in pg_conversation_ids(pg_conn), timeout=10, what="background flush")
    wait_until(lambda: not dirty_set(rdb.client), timeout=5, what="dirty set drained")
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    assert_cached(rdb.client, user_id, conv_id, conversation, dirty=False)

    longer = grown(conversation, 2)
    manager.save_conversation(conv_id, longer, user_id=user_id)
    wait_until(lambda: pg_message_count(pg_conn, conv_id) == 4, timeout=10, what="second background flush")
    wait_until(lambda: not dirty_set(rdb.client), timeout=5, what="dirty set drained")
    assert_row_matches(pg_conn, conv_id, user_id, longer)
    # The counter is bumped once the flush has settled Redis, a moment after the dirty set drained.
    wait_until(lambda: manager.stats()["flushes"] >= 2, timeout=5, what="the flush counted")


ATEXIT_SCRIPT = """
    import json, os, sys
    from chat_history_rs import ChatHistoryManager
    manager = ChatHistoryManager(
        mode="postgres", connection_string=os.environ["T_PG"], redis_enabled=True,
        redis_connection_string=os.environ["T_REDIS"], background_flush=False,
    )
    manager.save_conversation(os.environ["T_CONV"], json.loads(os.environ["T_BODY"]), user_id=os.environ["T_USER"])
    if os.environ["T_HOW"] == "deleted":
        del manager
    # exits without close()
"""


@pytest.mark.parametrize("how", ["referenced", "deleted"])
def test_atexit_flushes_when_the_app_never_closes(pg_url, rdb, pg_conn, user_id, conv_id, how):
    conversation = make_conversation(3, title="saved just before exit")
    proc = run_script(
        ATEXIT_SCRIPT,
        env=script_env(T_PG=pg_url, T_REDIS=rdb.url, T_CONV=conv_id, T_USER=user_id,
                       T_BODY=json.dumps(conversation), T_HOW=how),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    assert dirty_set(rdb.client) == set()


# --------------------------------------------------------------------------------------------------
# TTL and eviction (docs/design.md, "Write-back": dirty keys never expire)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_clean_keys_expire_and_dirty_keys_do_not(make_redis_manager, rdb, pg_conn, user_id):
    manager = make_redis_manager(redis_ttl=2)
    clean = make_conversation(2, title="clean")
    manager.save_conversation("c1ea0001", clean, user_id=user_id)
    manager.flush_dirty_conversations()
    assert 0 < rdb.client.ttl(conv_key(user_id, "c1ea0001")) <= 2
    dirty = make_conversation(2, title="dirty")
    manager.save_conversation("d1a70001", dirty, user_id=user_id)
    dirty_saved_at = time.monotonic()

    wait_until(lambda: not rdb.client.exists(conv_key(user_id, "c1ea0001")), timeout=6, what="clean key expiry")
    time.sleep(max(0.0, 3.0 - (time.monotonic() - dirty_saved_at)))
    assert_cached(rdb.client, user_id, "d1a70001", dirty, dirty=True)

    # The expired one comes back from PostgreSQL, cached with the short TTL again.
    assert manager.get_conversation("c1ea0001", user_id=user_id) == clean
    assert_cached(rdb.client, user_id, "c1ea0001", clean, dirty=False, ttl=2)
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, "d1a70001", user_id, dirty)
    assert_cached(rdb.client, user_id, "d1a70001", dirty, dirty=False, ttl=2)


@pytest.mark.slow
def test_dirty_keys_survive_eviction_pressure(make_redis_server, make_redis_manager, pg_conn, user_id):
    server = make_redis_server("--maxmemory", "2mb", "--maxmemory-policy", "volatile-lru")
    client = redis_client(server.url)
    manager = make_redis_manager(redis_url=server.url)
    conversations = {f"e0e0{i:04d}": make_conversation(4, prefix=f"c{i} ", content_size=1000) for i in range(20)}
    for cid, conv in conversations.items():
        manager.save_conversation(cid, conv, user_id=user_id)

    filler = "f" * 10_000
    for batch in range(60):  # 6 MB of volatile keys into a 2 MB Redis
        pipe = client.pipeline(transaction=False)
        for i in range(10):
            pipe.set(f"filler:{batch}:{i}", filler, ex=3600)
        pipe.execute()
    assert int(client.info("stats")["evicted_keys"]) > 0, "no eviction happened: the test proves nothing"

    for cid, conv in conversations.items():
        assert_cached(client, user_id, cid, conv, dirty=True)
    assert dirty_set(client) == {dirty_member(user_id, cid) for cid in conversations}
    stats = manager.stats()
    assert stats["redis_maxmemory"] == 2 * 1024 * 1024
    assert stats["redis_used_memory"] > 0

    assert manager.flush_dirty_conversations() == 20
    for cid, conv in conversations.items():
        assert_row_matches(pg_conn, cid, user_id, conv)
    assert dirty_set(client) == set()


# --------------------------------------------------------------------------------------------------
# stats() (docs/monitoring.md, "What `stats()` returns")
# --------------------------------------------------------------------------------------------------

STATS_KEYS = {
    "cache_hits", "cache_misses", "hit_rate", "dirty_count", "oldest_dirty_age_seconds", "flushes",
    "conversations_flushed", "flush_failures", "stuck_conversations", "postgres_fallbacks", "redis_used_memory",
    "redis_maxmemory", "redis_available",
}  # fmt: skip


def test_stats_counts(make_redis_manager, rdb, user_id):
    manager = make_redis_manager()
    stats = manager.stats()
    assert STATS_KEYS <= set(stats), STATS_KEYS - set(stats)
    assert stats["redis_available"] is True
    assert stats["dirty_count"] == 0
    assert stats["stuck_conversations"] == []
    assert isinstance(stats["redis_used_memory"], int) and stats["redis_used_memory"] > 0
    # The session's Redis has no limit: INFO says maxmemory 0; None is for a server that hides it.
    assert stats["redis_maxmemory"] in (0, None)

    for i in range(3):
        manager.save_conversation(f"57a70{i:03d}", make_conversation(1), user_id=user_id)
    time.sleep(0.3)
    stats = manager.stats()
    assert stats["dirty_count"] == 3
    assert 0.3 <= stats["oldest_dirty_age_seconds"] < 60

    base = manager.stats()
    for _ in range(3):
        manager.get_conversation("57a70000", user_id=user_id)  # hits
    manager.get_conversation("57a7ffff", user_id=user_id)  # a miss (nowhere at all)
    stats = manager.stats()
    hits = stats["cache_hits"] - base["cache_hits"]
    misses = stats["cache_misses"] - base["cache_misses"]
    assert (hits, misses) == (3, 1)
    total_hits, total_misses = stats["cache_hits"], stats["cache_misses"]
    ratio = total_hits / (total_hits + total_misses)
    # docs/monitoring.md, "What `stats()` returns", leaves the unit open: a fraction (0.75) or the seed's
    # percentage (75.0) are both accepted.
    assert stats["hit_rate"] == pytest.approx(ratio) or stats["hit_rate"] == pytest.approx(100 * ratio)

    flushes = stats["flushes"]
    assert manager.flush_dirty_conversations() == 3
    stats = manager.stats()
    assert stats["flushes"] == flushes + 1
    assert stats["conversations_flushed"] == 3
    assert stats["flush_failures"] == 0
    assert stats["dirty_count"] == 0
    assert stats["oldest_dirty_age_seconds"] in (0, 0.0, None)
    assert stats["postgres_fallbacks"] == 0
    assert stats["stuck_conversations"] == []
    json.dumps(stats)  # plain values, ready for a dashboard


# --------------------------------------------------------------------------------------------------
# Secrets (README, "Configuration": passwords never appear in exceptions, logs, repr() or stats())
# --------------------------------------------------------------------------------------------------

REDIS_PASSWORD = "Rdx-secret:key@42/pw+="  # Azure keys are base64: '+', '/', '=' are common
REDIS_PLAIN_PASSWORD = "RdxPlainSecretKey42"
WRONG_REDIS_PASSWORD = "Wrong-redis:key@99/pw+="


def test_wrong_redis_password_names_redis_and_hides_the_password(
    make_redis_server, make_manager, pg_url, caplog, capfd, user_id, conv_id
):  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    server = make_redis_server("--requirepass", REDIS_PASSWORD)
    url = f"redis://:{quote(WRONG_REDIS_PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
    texts = []
    try:
        manager = make_manager(
            mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=url,
            background_flush=False, redis_timeout=0.5,
        )  # fmt: skip
    except ChatHistoryError as exc:
        # Refusing to start with a wrong password is the clearest report.
        assert "Redis" in str(exc), str(exc)
        texts.append("\n".join(exception_texts(exc).values()))
    else:
        # Or it runs on PostgreSQL alone (Redis unavailable), and says so in the log and stats().
        texts += [repr(manager), str(manager)]
        conversation = make_conversation(1)
        try:
            manager.save_conversation(conv_id, conversation, user_id=user_id)
        except ChatHistoryError as exc:
            assert "Redis" in str(exc), str(exc)
            texts.append("\n".join(exception_texts(exc).values()))
        else:
            assert manager.get_conversation(conv_id, user_id=user_id) == conversation
            stats = manager.stats()
            texts.append(repr(stats))
            assert stats["redis_available"] is False
            assert any("redis" in r.getMessage().lower() for r in caplog.records), "the Redis failure is not logged"
        manager.close()
    out, err = capfd.readouterr()
    texts += [out, err, log_texts(caplog)]
    assert_no_secret("\n".join(texts), WRONG_REDIS_PASSWORD, "errors, repr, stats or logs")


@pytest.mark.parametrize("password", [REDIS_PLAIN_PASSWORD, REDIS_PASSWORD], ids=["plain", "percent-encoded"])
def test_correct_redis_password_works_and_never_shows(
    make_redis_server, make_redis_manager, pg_conn, caplog, capfd, user_id, conv_id, password
):  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    server = make_redis_server("--requirepass", password)
    # URL userinfo is percent-encoded (RFC 3986), as redis-py and redis-rs read it.
    url = f"redis://:{quote(password, safe='')}@127.0.0.1:{server.port}/0"
    manager = make_redis_manager(redis_url=url)
    conversation = make_conversation(2)
    manager.save_conversation(conv_id, conversation, user_id=user_id)

    client = redis_client(url)
    assert_cached(client, user_id, conv_id, conversation, dirty=True)  # really went to that Redis
    assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    stats = manager.stats()
    assert stats["redis_available"] is True
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, conversation)

    texts = [repr(manager), str(manager), repr(stats), repr(manager.stats()), repr(manager.redis_backend)]
    manager.close()
    out, err = capfd.readouterr()
    texts += [repr(manager), out, err, log_texts(caplog)]
    assert_no_secret("\n".join(texts), password, "repr, stats or logs")


# --------------------------------------------------------------------------------------------------
# Configuration (README, "Configuration"): the seed's URL form, the later by-parts form, env vs keywords
# --------------------------------------------------------------------------------------------------

REDIS_ENV = ("REDIS_ENABLED", "REDIS_CONNECTION_STRING", "REDIS_CACHE_TTL", "REDIS_TTL_SECONDS", "REDIS_HOST",
             "REDIS_PASSWORD", "REDIS_PORT", "REDIS_SSL", "REDIS_CA_FILE")  # fmt: skip


@pytest.fixture
def clean_redis_env(monkeypatch):
    for name in REDIS_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_seed_environment_turns_the_tier_on(clean_redis_env, make_manager, rdb, pg_url, pg_conn, user_id, conv_id):
    clean_redis_env.setenv("DATABASE_URL", pg_url)
    clean_redis_env.setenv("REDIS_ENABLED", "true")
    clean_redis_env.setenv("REDIS_CONNECTION_STRING", rdb.url)
    clean_redis_env.setenv("REDIS_CACHE_TTL", "120")
    manager = make_manager(mode="postgres", background_flush=False)
    assert manager.redis_enabled is True
    conversation = make_conversation(2)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    assert_cached(rdb.client, user_id, conv_id, conversation, dirty=True)
    assert manager.flush_dirty_conversations() == 1
    assert_cached(rdb.client, user_id, conv_id, conversation, dirty=False, ttl=120)
    assert_row_matches(pg_conn, conv_id, user_id, conversation)


def test_keywords_win_over_the_environment(clean_redis_env, make_manager, rdb, pg_url, pg_conn, user_id):
    clean_redis_env.setenv("REDIS_ENABLED", "true")
    clean_redis_env.setenv("REDIS_CONNECTION_STRING", "redis://127.0.0.1:1/0")  # nothing there
    clean_redis_env.setenv("REDIS_CACHE_TTL", "120")

    plain = make_manager(mode="postgres", connection_string=pg_url, redis_enabled=False)
    assert plain.redis_enabled is False
    conversation = make_conversation(1)
    plain.save_conversation("0e000001", conversation, user_id=user_id)
    assert_row_matches(pg_conn, "0e000001", user_id, conversation)  # straight to PostgreSQL
    assert seed_view(rdb.client) == {DIRTY_SET: set()}

    cached = make_manager(
        mode="postgres", connection_string=pg_url, redis_connection_string=rdb.url, redis_ttl=60,
        background_flush=False,
    )  # fmt: skip
    assert cached.redis_enabled is True
    cached.save_conversation("0e000002", conversation, user_id=user_id)
    assert_cached(rdb.client, user_id, "0e000002", conversation, dirty=True)
    cached.flush_dirty_conversations()
    assert_cached(rdb.client, user_id, "0e000002", conversation, dirty=False, ttl=60)


@pytest.mark.parametrize("how", ["keywords", "environment"])
def test_mode_redis_by_parts(clean_redis_env, make_redis_server, make_manager, pg_url, pg_conn, user_id, conv_id, how):
    import redis as redis_py

    password = "Azure+base64/key=="  # given as is: no URL, so no percent-encoding
    server = make_redis_server("--requirepass", password)
    if how == "keywords":
        manager = make_manager(
            mode="redis", connection_string=pg_url, redis_host="127.0.0.1", redis_port=server.port,
            redis_password=password, redis_ssl=False, redis_ttl=90, background_flush=False,
        )  # fmt: skip
    else:
        environment = {
            "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(server.port), "REDIS_PASSWORD": password,
            "REDIS_SSL": "false", "REDIS_TTL_SECONDS": "90", "DATABASE_URL": pg_url,
        }  # fmt: skip
        for name, value in environment.items():
            clean_redis_env.setenv(name, value)
        manager = make_manager(mode="redis", background_flush=False)
    client = redis_py.Redis(host="127.0.0.1", port=server.port, password=password, decode_responses=True)
    conversation = make_conversation(2)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    assert_cached(client, user_id, conv_id, conversation, dirty=True)
    assert manager.flush_dirty_conversations() == 1
    assert_cached(client, user_id, conv_id, conversation, dirty=False, ttl=90)
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    assert password not in repr(manager) and password not in repr(manager.stats())
    client.close()


# --------------------------------------------------------------------------------------------------
# Threads share one manager
# --------------------------------------------------------------------------------------------------


def test_threads_share_one_manager(make_redis_manager, rdb, pg_conn, user_id):
    manager = make_redis_manager()
    finals: dict[str, dict] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            cid = f"7b7b{n:04d}"
            conv = make_conversation(1, prefix=f"t{n} ")
            for _ in range(20):
                conv = grown(conv, 1, text=f"t{n}")
                manager.save_conversation(cid, conv, user_id=user_id)
                assert manager.get_conversation(cid, user_id=user_id) == conv
            finals[cid] = conv
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert manager.flush_dirty_conversations() == 8
    for cid, conv in finals.items():
        assert_row_matches(pg_conn, cid, user_id, conv)
    assert fetch_conversation_row(pg_conn, "7b7b0000")["user_client_id"] == user_id


# What a server without `EXPIRE ... GT` (Redis 6, still Azure Cache for Redis's default) answers to
# the probe every new connection sends; a proxy gives that answer and forwards everything else.
EXPIRE_GT_PROBE = b"*4\r\n$6\r\nEXPIRE\r\n$28\r\nchat-history:expire-gt-probe\r\n$1\r\n1\r\n$2\r\nGT\r\n"
REDIS6_ANSWER = b"-ERR wrong number of arguments for 'expire' command\r\n"


@pytest.mark.parametrize("near", ["near cache", "no near cache"])
@pytest.mark.parametrize("server", ["with EXPIRE GT", "without EXPIRE GT"])
def test_a_hit_gives_a_clean_conversation_its_ttl_back_and_a_dirty_one_none(
    server, near, failpoints, make_redis_manager, rdb, user_id
):
    with TcpProxy(rdb.server.port) as proxy:
        if server == "without EXPIRE GT":
            proxy.answer(EXPIRE_GT_PROBE, REDIS6_ANSWER)
        near_cache_bytes = None if near == "near cache" else 0
        manager = make_redis_manager(redis_url=proxy.url(), redis_ttl=600, near_cache_bytes=near_cache_bytes)
        clean, dirty = make_conversation(2, title="clean"), make_conversation(2, title="dirty")
        manager.save_conversation("c1ea0002", clean, user_id=user_id)
        assert manager.flush_dirty_conversations() == 1
        manager.save_conversation("d1a70002", dirty, user_id=user_id)
        clean_keys = (conv_key(user_id, "c1ea0002"), owner_key("c1ea0002"))
        dirty_keys = (conv_key(user_id, "d1a70002"), owner_key("d1a70002"))
        for key in clean_keys:
            assert rdb.client.expire(key, 5), key
        clean_key = clean_keys[0]

        # The change feed's follower runs scripts of its own every 200 ms: held between turns while scripts are
        # counted.
        failpoints.pause("feed.turn")
        failpoints.wait("feed.turn")
        scripts_before, expires_before = command_calls(rdb.client, "evalsha"), command_calls(rdb.client, "expire")
        assert manager.get_conversation("c1ea0002", user_id=user_id) == clean
        assert manager.get_conversation("d1a70002", user_id=user_id) == dirty
        scripts_run = command_calls(rdb.client, "evalsha") - scripts_before
        expires_sent = command_calls(rdb.client, "expire") - expires_before

        assert 500 < rdb.client.ttl(clean_key) <= 600, f"{clean_key} TTL {rdb.client.ttl(clean_key)}"
        # The owner record keeps the TTL it had (see test_other_user_cannot_overwrite_read_or_delete
        # for when it lapses first).
        assert 0 < rdb.client.ttl(owner_key("c1ea0002")) <= 5
        for key in dirty_keys:
            assert rdb.client.ttl(key) == -1, f"dirty {key} was given a TTL"
        assert manager.stats()["cache_hits"] == 2
        # Without EXPIRE GT (the probe answered as an older server answers it) a script refreshes
        # the TTL; with it, no script runs on a hit. With or without the near cache a read changes
        # nothing (an EXPIRE is a write, replicated, and an invalidation to every process's near
        # cache) unless a clean hash's TTL ran low: only that one is sent a refresh.
        assert (proxy.answered > 0) == (server == "without EXPIRE GT")
        assert scripts_run == (1 if server == "without EXPIRE GT" else 0)
        # One EXPIRE in all (the script's, without GT): a read writes nothing else, so a replica has nothing to
        # apply and no process's near cache is sent an invalidation for it.
        assert expires_sent == 1, f"{expires_sent} EXPIRE for two reads"


def command_calls(client, command: str) -> int:
    """How many times Redis ran `command` (lower case), from INFO commandstats."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_concurrent_reads_share_a_round_trip_and_each_thread_gets_its_own(make_redis_manager, rdb, user_id):
    with TcpProxy(rdb.server.port) as proxy:
        # One connection, so one round trip in flight at a time whatever the number of CPUs.
        manager = make_redis_manager(redis_url=proxy.url(), redis_timeout=10, redis_pool_size=1)
        conversations = {f"5a4e{n:04d}": make_conversation(3, prefix=f"thread {n} ") for n in range(8)}
        for cid, conv in conversations.items():
            manager.save_conversation(cid, conv, user_id=user_id)
        before = manager.stats()
        got: dict[str, dict] = {}
        errors: list[BaseException] = []

        def read(cid: str) -> None:
            try:
                got[cid] = manager.get_conversation(cid, user_id=user_id)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        proxy.stall()  # the first read's round trip hangs, so the other seven queue behind it
        threads = [threading.Thread(target=read, args=(cid,)) for cid in conversations]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        proxy.heal()
        for thread in threads:
            thread.join(timeout=30)

        assert errors == []
        assert got == conversations, "a reply went to the wrong thread"
        stats = manager.stats()
        assert stats["cache_hits"] - before["cache_hits"] == 8
        # The stalled read, then one round trip for the seven queued behind it.
        assert stats["redis_read_round_trips"] - before["redis_read_round_trips"] == 2
        assert stats["redis_reads_shared"] - before["redis_reads_shared"] == 7
