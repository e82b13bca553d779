"""Compressed transcripts in Redis (`redis_compression`, README "Configuration"; docs/design.md,
"Compressed transcripts").

A save stores the hash's `messages` field as the JSON text ("off", the default), as the seed plan's
base64 of zlib ("zlib"), or as a zstd frame ("on"); every reader takes all three whatever its own
setting, a seed-design writer's zlib hash included, and PostgreSQL always gets plain rows. Each test
checks the stored bytes with redis-py and the rows with psycopg2.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import zlib

import pytest
import redis

from chat_history_rs import AsyncChatHistoryManager, ConfigurationError, InvalidTypeError, resolve_settings
from support.redis_support import (
    CLUSTER,
    conv_key,
    dirty_set,
    grown,
    now_iso,
    write_seed_hash,
)
from support.near_support import conversation_read, read_until_near_hit, wait_tracking
from support.servers import assert_row_matches

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Each setting as a caller may spell it, and the form a save stores.
SETTINGS = [("off", "plain"), (False, "plain"), ("zlib", "zlib"), ("on", "zstd"), (True, "zstd")]
FORMS = ["plain", "zlib", "zstd"]
SETTING_OF = {"plain": "off", "zlib": "zlib", "zstd": "on"}


def chat(n_messages: int, seed: int = 1, title: str = "Compressed") -> dict:
    """An app-shaped conversation of varied random words (as benches/common.py's Corpus), with some
    non-ASCII and escapes, long enough for every codec to compress."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))) for _ in range(500)]
    words += ["Grüße", "日本語", "🎉", 'say "hi"', "line\nbreak", "back\\slash"]
    messages = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": " ".join(rng.choices(words, k=40)).capitalize() + ".",
            "time": now_iso(),
        }
        for i in range(n_messages)
    ]
    now = now_iso()
    return {"title": title, "model": "gpt-4o", "messages": messages, "created_at": now, "last_modified": now}


def raw_client(rdb) -> redis.Redis:
    """A redis-py client that returns bytes (a zstd frame is not text)."""
    if CLUSTER:
        return redis.RedisCluster.from_url(rdb.url, decode_responses=False)
    return redis.Redis.from_url(rdb.url, decode_responses=False)


def stored_messages(rdb, user_id: str, conversation_id: str) -> bytes:
    client = raw_client(rdb)
    try:
        value = client.hget(conv_key(user_id, conversation_id), "messages")
    finally:
        client.close()
    assert value is not None, "the hash has no messages field"
    return value


def plain_size(conversation: dict) -> int:
    """The bytes of the JSON text a save stores with compression off (serde_json's compact form)."""
    return len(json.dumps(conversation["messages"], separators=(",", ":"), ensure_ascii=False).encode())


def assert_stored_form(stored: bytes, form: str, conversation: dict) -> None:
    """`stored` is `conversation`'s messages in `form`, and compressed forms are smaller than the JSON."""
    if form == "plain":
        assert stored.startswith(b"[")
        text = stored
    elif form == "zlib":
        assert stored.startswith(b"eJ"), stored[:8]
        text = zlib.decompress(base64.b64decode(stored))
    else:
        assert stored.startswith(ZSTD_MAGIC), stored[:8]
        text = None
    if text is not None:
        assert json.loads(text) == conversation["messages"]
    if form != "plain":
        assert len(stored) < plain_size(conversation) * 0.75, (form, len(stored), plain_size(conversation))


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["redis", "postgres_redis_enabled"])
@pytest.mark.parametrize(("setting", "form"), SETTINGS, ids=[repr(s) for s, _ in SETTINGS])
def test_round_trip_in_each_setting(
    make_manager, pg_url, rdb, pg_conn, user_id, conv_id, how, setting, form
):  # fmt: skip
    mode = {"mode": "redis"} if how == "redis" else {"mode": "postgres", "redis_enabled": True}
    manager = make_manager(
        **mode,
        connection_string=pg_url,
        redis_connection_string=rdb.url,
        background_flush=False,
        near_cache_bytes=0,
        redis_compression=setting,
    )
    conversation = chat(20)
    manager.save_conversation(conv_id, conversation, user_id=user_id)
    assert_stored_form(stored_messages(rdb, user_id, conv_id), form, conversation)
    # Dirty and not yet written back: only Redis holds it, and the near cache is off.
    assert manager.get_conversation(conv_id, user_id=user_id) == conversation

    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, conversation)  # plain rows, whatever Redis holds
    assert dirty_set(rdb.client) == set()
    assert_stored_form(stored_messages(rdb, user_id, conv_id), form, conversation)

    # A miss reads PostgreSQL and caches the copy in the setting's form too.
    rdb.client.delete(conv_key(user_id, conv_id))
    assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    assert_stored_form(stored_messages(rdb, user_id, conv_id), form, conversation)
    assert manager.get_conversation(conv_id, user_id=user_id) == conversation


@pytest.mark.parametrize("form", FORMS)
def test_round_trip_with_the_asyncio_manager(pg_url, rdb, pg_conn, user_id, conv_id, form):
    conversation = chat(20)

    async def run():
        manager = AsyncChatHistoryManager(
            mode="redis",
            connection_string=pg_url,
            redis_connection_string=rdb.url,
            background_flush=False,
            near_cache_bytes=0,
            redis_compression=SETTING_OF[form],
        )
        try:
            await manager.save_conversation(conv_id, conversation, user_id=user_id)
            assert_stored_form(stored_messages(rdb, user_id, conv_id), form, conversation)
            assert await manager.get_conversation(conv_id, user_id=user_id) == conversation
            assert await manager.flush_dirty_conversations() == 1
        finally:
            await manager.close()

    asyncio.run(run())
    assert_row_matches(pg_conn, conv_id, user_id, conversation)


@pytest.mark.parametrize("reader", FORMS)
@pytest.mark.parametrize("writer", FORMS)
def test_each_setting_reads_and_flushes_what_every_other_wrote(
    make_redis_manager, rdb, pg_conn, user_id, conv_id, writer, reader
):  # fmt: skip
    writing = make_redis_manager(near_cache_bytes=0, redis_compression=SETTING_OF[writer])
    reading = make_redis_manager(near_cache_bytes=0, redis_compression=SETTING_OF[reader])
    conversation = chat(20, seed=7)
    writing.save_conversation(conv_id, conversation, user_id=user_id)
    assert_stored_form(stored_messages(rdb, user_id, conv_id), writer, conversation)
    assert reading.get_conversation(conv_id, user_id=user_id) == conversation
    assert reading.list_conversations(user_id=user_id) == [(conv_id, {**conversation, "messages": []})]
    assert reading.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    assert dirty_set(rdb.client) == set()


def test_a_compressed_hash_keeps_its_fingerprints_as_bytes_and_no_hash_repeats_the_list_entry(
    make_redis_manager, rdb, user_id
):  # fmt: skip
    """Memory: with "on" the prefix fingerprints are 8 bytes per message (field `fpb`; no seed-design
    reader decodes such a hash anyway), elsewhere 16 hex digits (`fps`, text for the seed's reader), the
    same fingerprints in both forms; and no hash keeps a copy of its list entry, whose fields it holds."""
    conversation = chat(20, seed=11)
    prints = {}
    client = raw_client(rdb)
    try:
        for form in FORMS:
            conv_id = f"fp{form}"
            make_redis_manager(near_cache_bytes=0, redis_compression=SETTING_OF[form]).save_conversation(
                conv_id, conversation, user_id=user_id
            )
            fields = client.hgetall(conv_key(user_id, conv_id))
            assert b"meta" not in fields
            if form == "zstd":
                assert b"fps" not in fields and len(fields[b"fpb"]) == 8 * 20
                prints[form] = fields[b"fpb"]
            else:
                assert b"fpb" not in fields and len(fields[b"fps"]) == 16 * 20
                prints[form] = bytes.fromhex(fields[b"fps"].decode())
    finally:
        client.close()
    assert prints["zstd"] == prints["plain"] == prints["zlib"]


def test_short_transcripts_stay_json_with_on_and_zlib_compresses_every_one(
    make_redis_manager, rdb, user_id, conv_id
):  # fmt: skip
    """With "on", a transcript too short to gain from a frame (and an empty one) is stored as JSON; with
    "zlib", every transcript is compressed, since the seed's reader with that option decodes every one."""
    short = chat(1)
    short["messages"][0]["content"] = "Hi"
    empty = {**short, "messages": []}
    on = make_redis_manager(near_cache_bytes=0, redis_compression="on")
    for conversation in (short, empty):
        on.save_conversation(conv_id, conversation, user_id=user_id)
        assert json.loads(stored_messages(rdb, user_id, conv_id)) == conversation["messages"]
        assert on.get_conversation(conv_id, user_id=user_id) == conversation
    other = conv_id[::-1]
    seedlike = make_redis_manager(near_cache_bytes=0, redis_compression="zlib")
    seedlike.save_conversation(other, empty, user_id=user_id)
    stored = stored_messages(rdb, user_id, other)
    assert stored.startswith(b"eJ") and json.loads(zlib.decompress(base64.b64decode(stored))) == []
    assert seedlike.get_conversation(other, user_id=user_id) == empty


# --------------------------------------------------------------------------------------------------
# A seed-design writer's compressed hash
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", FORMS)
def test_a_seed_hash_with_zlib_messages_is_read_and_flushed(
    make_redis_manager, rdb, pg_conn, user_id, conv_id, reader
):  # fmt: skip
    conversation = chat(12, seed=3, title="Written by a seed instance with compression")
    write_seed_hash(rdb.client, user_id, conv_id, conversation, compressed=True)
    manager = make_redis_manager(near_cache_bytes=0, redis_compression=SETTING_OF[reader])
    assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    assert dirty_set(rdb.client) == set()
    # The flush adopted the foreign write and settled it; the seed's bytes are left as they were.
    assert rdb.client.hget(conv_key(user_id, conv_id), "dirty") == "0"
    stored = stored_messages(rdb, user_id, conv_id)
    assert json.loads(zlib.decompress(base64.b64decode(stored))) == conversation["messages"]


# --------------------------------------------------------------------------------------------------
# The near cache keeps the decoded copy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["zlib", "zstd"])
def test_the_near_cache_holds_the_decoded_copy(make_redis_manager, rdb, user_id, conv_id, form):
    writer = make_redis_manager(near_cache_bytes=0, redis_compression=SETTING_OF[form])
    conversation = chat(40, seed=11)
    writer.save_conversation(conv_id, conversation, user_id=user_id)
    near = make_redis_manager(redis_compression=SETTING_OF[form])
    wait_tracking(near)
    assert read_until_near_hit(near, conversation_read(near, conv_id, user_id)) == conversation
    stats = near.stats()
    # What it holds is the JSON text (and the index into it), not the stored bytes.
    assert stats["near_cache_bytes"] >= plain_size(conversation) > len(stored_messages(rdb, user_id, conv_id))


# --------------------------------------------------------------------------------------------------
# The setting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "value"),
    [
        (False, "off"),
        ("off", "off"),
        ("None", "off"),
        (" OFF ", "off"),
        ("zlib", "zlib"),
        ("ZLIB", "zlib"),
        (True, "zstd"),
        ("on", "zstd"),
        ("zstd", "zstd"),
    ],
)
def test_the_accepted_spellings(given, value):
    resolved = resolve_settings({}, redis_compression=given)
    assert (resolved.value("redis_compression"), resolved.source("redis_compression")) == (value, "keyword")
    if not isinstance(given, bool):
        by_env = resolve_settings({"REDIS_COMPRESSION": given})
        assert (by_env.value("redis_compression"), by_env.source("redis_compression")) == (
            value,
            "env REDIS_COMPRESSION",
        )
    # None counts as not given, as for every keyword argument: the variable, else off.
    assert resolve_settings({}, redis_compression=None).value("redis_compression") == "off"
    assert resolve_settings({"REDIS_COMPRESSION": "zlib"}, redis_compression=None).value("redis_compression") == "zlib"


def test_a_bad_setting_is_a_clear_error_at_construction(make_manager, pg_url, rdb, tmp_path, monkeypatch):
    accepted = r"must be 'off' \(or False, 'none'\), 'zlib' \(.*\) or 'on' \(or True, 'zstd'.*\), got 'gzip'$"
    with pytest.raises(ConfigurationError, match="^redis_compression " + accepted):
        make_manager(mode="redis", connection_string=pg_url, redis_connection_string=rdb.url, redis_compression="gzip")
    # Checked whatever the mode, as every setting is.
    with pytest.raises(ConfigurationError, match="^redis_compression "):
        make_manager(mode="local", base_dir=str(tmp_path), redis_compression="gzip")
    with pytest.raises(InvalidTypeError, match="^redis_compression must be True, False or a str, got int$"):
        make_manager(mode="local", base_dir=str(tmp_path), redis_compression=1)
    monkeypatch.setenv("REDIS_COMPRESSION", "gzip")
    with pytest.raises(ConfigurationError, match="^REDIS_COMPRESSION " + accepted):
        make_manager(mode="redis", connection_string=pg_url, redis_connection_string=rdb.url)


def test_appending_to_a_compressed_copy(make_redis_manager, rdb, pg_conn, user_id, conv_id):
    """The app's everyday save: the conversation again with a message more, over a compressed copy, by
    a manager of each setting in turn, each save landing in Redis."""
    managers = {form: make_redis_manager(near_cache_bytes=0, redis_compression=SETTING_OF[form]) for form in FORMS}
    conversation = chat(10, seed=5)
    managers["zstd"].save_conversation(conv_id, conversation, user_id=user_id)
    for form in ["zlib", "zstd", "plain", "zstd"]:
        manager = managers[form]
        assert manager.get_conversation(conv_id, user_id=user_id) == conversation
        conversation = grown(conversation, 2, text=f"more from {form}")
        manager.save_conversation(conv_id, conversation, user_id=user_id)
        assert rdb.client.hget(conv_key(user_id, conv_id), "dirty") == "1", "the save landed in Redis"
        assert manager.get_conversation(conv_id, user_id=user_id) == conversation
    assert managers["plain"].flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, conv_id, user_id, conversation)
    for manager in managers.values():  # every save extended the copy it replaced: nothing kept aside, none fell back
        assert manager.stats()["conflicts_kept"] == 0
        assert manager.stats()["postgres_fallbacks"] == 0
    assert not pg_conn.closed
