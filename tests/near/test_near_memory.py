"""The near cache's bound and its setting (docs/design.md, section 10; README, "Configuration"):
near_cache_bytes (keyword, env NEAR_CACHE_BYTES, default 64 MiB) bounds the bytes held, the least
recently used copies going first; 0 turns it off; a value that is not a whole number is refused
naming the variable, as for every other setting (tests/cli/test_config.py)."""

from __future__ import annotations

import pytest

from chat_history_rs import ChatHistoryManager, ConfigurationError, resolve_settings
from support.near_support import near_stats, read_until_near_hit
from support.redis_support import make_conversation

LIMIT = 200_000
CONVERSATIONS = 200


def test_the_byte_bound_holds_and_evicts_the_least_recently_used(make_redis_manager, user_id):
    manager = make_redis_manager(near_cache_bytes=LIMIT)
    assert near_stats(manager)["limit_bytes"] == LIMIT
    saved = {}
    for i in range(CONVERSATIONS):  # 50 messages of 1 KB each: about 50 KB a copy, 4 fit
        cid = f"b0b0{i:04x}"
        saved[cid] = make_conversation(50, prefix=f"{i} ", content_size=1000)
        manager.save_conversation(cid, saved[cid], user_id=user_id)
    read_until_near_hit(manager, lambda: manager.get_conversation("b0b00000", user_id=user_id))
    peak = 0
    for cid, conversation in saved.items():
        for _ in range(2):  # the second read is served by the copy the first one kept
            assert manager.get_conversation(cid, user_id=user_id) == conversation
        stats = near_stats(manager)
        assert stats["bytes"] <= LIMIT, f"after {cid}: {stats}"
        peak = max(peak, stats["bytes"])
    stats = near_stats(manager)
    assert stats["evictions"] > 0 and stats["entries"] > 0, stats
    assert stats["hits"] >= CONVERSATIONS, f"the second reads were not served by the near cache: {stats}"
    assert peak > LIMIT // 2, f"the bound was never approached (peak {peak}): the copies are not weighed"

    # The least recently used went first: the last conversation read is still held, the first is not.
    hits = near_stats(manager)["hits"]
    manager.get_conversation(f"b0b0{CONVERSATIONS - 1:04x}", user_id=user_id)
    assert near_stats(manager)["hits"] == hits + 1
    manager.get_conversation("b0b00000", user_id=user_id)
    assert near_stats(manager)["hits"] == hits + 1, "the least recently used copy was kept"


def test_zero_turns_the_near_cache_off(make_redis_manager, user_id):
    manager = make_redis_manager(near_cache_bytes=0)
    conversation = make_conversation(2)
    manager.save_conversation("0ff00001", conversation, user_id=user_id)
    for _ in range(50):
        assert manager.get_conversation("0ff00001", user_id=user_id) == conversation
        manager.list_conversations(user_id)
    stats = manager.stats()
    assert stats["near_cache_enabled"] is False and stats["near_cache_tracking"] is False, stats
    assert stats["near_cache_hits"] == 0 and stats["near_cache_entries"] == 0, stats
    assert stats["cache_hits"] >= 50, "the reads were not served by Redis"


@pytest.fixture
def no_near_env(monkeypatch):
    monkeypatch.delenv("NEAR_CACHE_BYTES", raising=False)
    return monkeypatch


def test_the_setting_default_environment_and_keyword(no_near_env, make_redis_manager, user_id):
    assert (resolve_settings({}).value("near_cache_bytes"), resolve_settings({}).source("near_cache_bytes")) == (
        64 << 20,
        "default",
    )
    by_env = resolve_settings({"NEAR_CACHE_BYTES": "123456"})
    assert (by_env.value("near_cache_bytes"), by_env.source("near_cache_bytes")) == (123456, "env NEAR_CACHE_BYTES")
    by_keyword = resolve_settings({"NEAR_CACHE_BYTES": "123456"}, near_cache_bytes=1000)
    assert (by_keyword.value("near_cache_bytes"), by_keyword.source("near_cache_bytes")) == (1000, "keyword")

    assert near_stats(make_redis_manager())["limit_bytes"] == 64 << 20
    no_near_env.setenv("NEAR_CACHE_BYTES", "123456")
    from_env = make_redis_manager()
    assert near_stats(from_env)["limit_bytes"] == 123456 and near_stats(from_env)["enabled"] is True
    assert near_stats(make_redis_manager(near_cache_bytes=5000))["limit_bytes"] == 5000

    no_near_env.setenv("NEAR_CACHE_BYTES", "0")
    off = make_redis_manager()
    conversation = make_conversation(1)
    off.save_conversation("0ff00002", conversation, user_id=user_id)
    for _ in range(20):
        assert off.get_conversation("0ff00002", user_id=user_id) == conversation
    assert near_stats(off)["enabled"] is False and near_stats(off)["hits"] == 0
    on = make_redis_manager(near_cache_bytes=1 << 20)  # the keyword beats the variable
    read_until_near_hit(on, lambda: on.get_conversation("0ff00002", user_id=user_id))


@pytest.mark.parametrize("value", ["lots", "-5", "1.5", "64MiB"])
def test_a_bad_value_names_near_cache_bytes(no_near_env, tmp_path, value):
    with pytest.raises(ConfigurationError, match=f"^NEAR_CACHE_BYTES must be .*, got '{value}'$"):
        resolve_settings({"NEAR_CACHE_BYTES": value})
    no_near_env.setenv("NEAR_CACHE_BYTES", value)
    with pytest.raises(ConfigurationError, match="NEAR_CACHE_BYTES"):
        ChatHistoryManager(base_dir=str(tmp_path))
