"""A flush sends only the messages added since PostgreSQL last took the conversation, and falls back
to a full write whenever that shortcut would not leave exactly the saved conversation."""

from __future__ import annotations

import json

from support.redis_support import conv_key, grown, make_conversation, pg_message_identities
from support.servers import assert_row_matches


def _flushed(manager, conversation_id, user_id, conversation):
    manager.save_conversation(conversation_id, conversation, user_id=user_id)
    assert manager.flush_dirty_conversations() == 1


def test_new_messages_only_are_written(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    first = make_conversation(18, prefix="a ")
    _flushed(manager, conv_id, user_id, first)
    before = pg_message_identities(pg_conn, conv_id)
    stored = rdb.client.hmget(conv_key(user_id, conv_id), "pgn", "pgv", "pgh")
    assert stored[0] == "18" and stored[1] and stored[2], "what PostgreSQL holds is recorded"

    second = grown(first, 2)
    _flushed(manager, conv_id, user_id, second)
    after = pg_message_identities(pg_conn, conv_id)
    assert after[:18] == before, "the 18 stored rows were not rewritten"
    assert len(after) == 20
    assert_row_matches(pg_conn, conv_id, user_id, second)


def test_an_edited_earlier_message_forces_a_full_write(make_redis_manager, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    first = make_conversation(6, prefix="b ")
    _flushed(manager, conv_id, user_id, first)
    edited = grown(first, 1)
    edited["messages"][2]["content"] = "rewritten by the user"
    _flushed(manager, conv_id, user_id, edited)
    assert_row_matches(pg_conn, conv_id, user_id, edited)


def test_a_shortened_conversation_is_written_whole(make_redis_manager, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    first = make_conversation(6, prefix="c ")
    _flushed(manager, conv_id, user_id, first)
    shorter = json.loads(json.dumps(first))
    shorter["messages"] = shorter["messages"][:3]
    _flushed(manager, conv_id, user_id, shorter)
    assert_row_matches(pg_conn, conv_id, user_id, shorter)


def test_postgres_moved_on_since_the_record_means_a_full_write(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    # PostgreSQL no longer holds the version the cache recorded (here: its messages were changed
    # and the version moved, below the cache's next one): only-new-messages would leave the changed
    # prefix, so the flush must send everything.
    manager = make_redis_manager()
    first = make_conversation(5, prefix="d ")
    _flushed(manager, conv_id, user_id, first)
    with pg_conn.cursor() as cur:
        cur.execute("UPDATE messages SET content = 'changed behind the cache' WHERE conversation_id = %s", (conv_id,))
        cur.execute("UPDATE conversations SET cache_version = cache_version - 1 WHERE conversation_id = %s", (conv_id,))
    second = grown(first, 1)
    _flushed(manager, conv_id, user_id, second)
    assert_row_matches(pg_conn, conv_id, user_id, second)


def test_a_backfilled_conversation_flushes_only_what_was_added(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    manager = make_redis_manager()
    first = make_conversation(10, prefix="e ")
    _flushed(manager, conv_id, user_id, first)
    rdb.client.delete(conv_key(user_id, conv_id))
    assert manager.get_conversation(conv_id, user_id=user_id) == first  # miss, backfilled with the record
    before = pg_message_identities(pg_conn, conv_id)
    second = grown(first, 2)
    _flushed(manager, conv_id, user_id, second)
    assert pg_message_identities(pg_conn, conv_id)[:10] == before
    assert_row_matches(pg_conn, conv_id, user_id, second)
