"""Bad input (README, "Errors"): a clear error at the call that names the field, and nothing stored.

Every case runs in postgres mode and in local mode. Each saves a good version first, tries the bad
one, and checks the stored conversation (rows, or file bytes) is exactly the good one; then tries the
bad one under a fresh id and checks nothing appeared.

Rule for the exception type: a value of the wrong Python type -> InvalidTypeError (a TypeError);
a wrong value of the right type, or a missing key -> ValidationError (a ValueError).
"""

from __future__ import annotations

import copy
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import pytest

from chat_history_rs import ChatHistoryError, InvalidTypeError, ValidationError
from support.servers import assert_row_matches, fetch_conversation_row


@dataclass
class Store:
    """A manager plus a way to look at what it stored, without going through it."""

    mode: str
    manager: object
    user_id: str
    pg_conn: object = None
    base_dir: Optional[Path] = None

    def save(self, conversation_id, conversation, user_id="default"):
        user = self.user_id if user_id == "default" else user_id
        return self.manager.save_conversation(conversation_id, conversation, user)

    def get(self, conversation_id):
        return self.manager.get_conversation(conversation_id, self.user_id)

    def snapshot(self, conversation_id):
        if self.mode == "postgres":
            return None  # checked row by row in assert_stored
        return (self.base_dir / ".chat_history" / f"{conversation_id}.json").read_bytes()

    def assert_stored(self, conversation_id, conversation, snapshot):
        assert self.get(conversation_id) == conversation
        if self.mode == "postgres":
            assert_row_matches(self.pg_conn, conversation_id, self.user_id, conversation)
        else:
            assert (self.base_dir / ".chat_history" / f"{conversation_id}.json").read_bytes() == snapshot

    def assert_absent(self, conversation_id):
        assert self.get(conversation_id) is None
        if self.mode == "postgres":
            assert fetch_conversation_row(self.pg_conn, conversation_id) is None
        else:
            folder = self.base_dir / ".chat_history"
            names = os.listdir(folder) if folder.exists() else []
            assert all(not name.startswith(conversation_id) for name in names), names


@pytest.fixture(params=["postgres", "local"])
def store(request, make_manager, user_id, tmp_path):
    if request.param == "postgres":
        pg_url = request.getfixturevalue("pg_url")
        pg_conn = request.getfixturevalue("pg_conn")
        return Store("postgres", make_manager(mode="postgres", connection_string=pg_url), user_id, pg_conn=pg_conn)
    return Store("local", make_manager(mode="local", base_dir=str(tmp_path)), user_id, base_dir=tmp_path)


@pytest.fixture
def pg_store(request, make_manager, user_id, pg_url, pg_conn):
    return Store("postgres", make_manager(mode="postgres", connection_string=pg_url), user_id, pg_conn=pg_conn)


def fresh_id() -> str:
    return secrets.token_hex(4)


# --------------------------------------------------------------------------------------------------
# Bad conversations
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    mutate: Callable[[dict], object]  # gets a deep copy of a good 3-message conversation; returns the bad one
    error: type
    field: str  # must appear in str(exception)


def without(key):
    def mutate(conv):
        del conv[key]
        return conv

    return mutate


def with_top(key, value):
    def mutate(conv):
        conv[key] = value
        return conv

    return mutate


def with_message(index, key, value):
    def mutate(conv):
        conv["messages"][index][key] = value
        return conv

    return mutate


def without_message_key(index, key):
    def mutate(conv):
        del conv["messages"][index][key]
        return conv

    return mutate


def replace_message(index, value):
    def mutate(conv):
        conv["messages"][index] = value
        return conv

    return mutate


TYPE_ERRORS = [
    Case("title-int", with_top("title", 5), InvalidTypeError, "title"),
    Case("title-none", with_top("title", None), InvalidTypeError, "title"),
    Case("title-bytes", with_top("title", b"bytes"), InvalidTypeError, "title"),
    Case("model-int", with_top("model", 4), InvalidTypeError, "model"),
    Case("model-none", with_top("model", None), InvalidTypeError, "model"),
    Case("messages-str", with_top("messages", "x"), InvalidTypeError, "messages"),
    Case("messages-none", with_top("messages", None), InvalidTypeError, "messages"),
    Case("messages-dict", with_top("messages", {"role": "user", "content": "hi"}), InvalidTypeError, "messages"),
    Case("message-str", replace_message(1, "hello"), InvalidTypeError, "messages[1]"),
    Case("message-list", replace_message(1, ["user", "hello"]), InvalidTypeError, "messages[1]"),
    Case("message-none", replace_message(2, None), InvalidTypeError, "messages[2]"),
    Case("content-none", with_message(0, "content", None), InvalidTypeError, "messages[0].content"),
    Case("content-int", with_message(2, "content", 42), InvalidTypeError, "messages[2].content"),
    Case("role-int", with_message(1, "role", 1), InvalidTypeError, "messages[1].role"),
    Case("created-at-int", with_top("created_at", 12345), InvalidTypeError, "created_at"),
    Case("last-modified-float", with_top("last_modified", 1732581321.5), InvalidTypeError, "last_modified"),
    Case("time-int", with_message(1, "time", 12345), InvalidTypeError, "messages[1].time"),
]

VALUE_ERRORS = [
    Case("title-missing", without("title"), ValidationError, "title"),
    Case("model-missing", without("model"), ValidationError, "model"),
    Case("model-101", with_top("model", "m" * 101), ValidationError, "model"),
    Case("model-101-non-ascii", with_top("model", "é" * 101), ValidationError, "model"),
    Case("title-nul", with_top("title", "a\x00b"), ValidationError, "title"),
    Case("role-system", with_message(1, "role", "system"), ValidationError, "messages[1].role"),
    Case("role-capitalised", with_message(0, "role", "User"), ValidationError, "messages[0].role"),
    Case("role-empty", with_message(2, "role", ""), ValidationError, "messages[2].role"),
    Case("role-missing", without_message_key(1, "role"), ValidationError, "messages[1].role"),
    Case("content-missing", without_message_key(0, "content"), ValidationError, "messages[0].content"),
    Case("content-nul", with_message(0, "content", "before\x00after"), ValidationError, "messages[0].content"),
    Case("created-at-words", with_top("created_at", "yesterday"), ValidationError, "created_at"),
    Case("created-at-empty", with_top("created_at", ""), ValidationError, "created_at"),
    Case("last-modified-bad-date", with_top("last_modified", "2025-13-45T99:00:00"), ValidationError, "last_modified"),
    Case("time-words", with_message(1, "time", "yesterday"), ValidationError, "messages[1].time"),
]


def _ids(cases):
    return [c.id for c in cases]


def _check_refused(store, conv_id, sample_conversation, case):
    good = sample_conversation(3)
    store.save(conv_id, good)
    snapshot = store.snapshot(conv_id)

    bad = case.mutate(copy.deepcopy(good))
    with pytest.raises(case.error) as info:
        store.save(conv_id, bad)
    exc = info.value
    assert isinstance(exc, ChatHistoryError)
    if case.error is InvalidTypeError:
        assert isinstance(exc, TypeError) and not isinstance(exc, ValueError)
    else:
        assert isinstance(exc, ValueError) and not isinstance(exc, TypeError)
    assert case.field in str(exc), f"{case.field!r} not named in {str(exc)!r}"
    store.assert_stored(conv_id, good, snapshot)

    new_id = fresh_id()
    with pytest.raises(case.error):
        store.save(new_id, case.mutate(copy.deepcopy(good)))
    store.assert_absent(new_id)


@pytest.mark.parametrize("case", TYPE_ERRORS, ids=_ids(TYPE_ERRORS))
def test_wrong_type_is_a_type_error_and_nothing_changes(store, conv_id, sample_conversation, case):
    _check_refused(store, conv_id, sample_conversation, case)


@pytest.mark.parametrize("case", VALUE_ERRORS, ids=_ids(VALUE_ERRORS))
def test_wrong_value_is_a_value_error_and_nothing_changes(store, conv_id, sample_conversation, case):
    _check_refused(store, conv_id, sample_conversation, case)


@pytest.mark.parametrize("bad", [None, "a conversation", ["title", "model"], 42], ids=repr)
def test_conversation_not_a_dict_is_a_type_error(store, conv_id, sample_conversation, bad):
    good = sample_conversation(1)
    store.save(conv_id, good)
    snapshot = store.snapshot(conv_id)
    with pytest.raises(InvalidTypeError):
        store.save(conv_id, bad)
    store.assert_stored(conv_id, good, snapshot)


# --------------------------------------------------------------------------------------------------
# Accepted edge values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["m" * 100, "é" * 100, "模" * 100], ids=["ascii", "latin1", "cjk"])
def test_model_of_100_characters_is_accepted(store, conv_id, sample_conversation, model):
    # VARCHAR(100) counts characters, not bytes: 100 multi-byte characters fit.
    conv = sample_conversation(1, model=model)
    store.save(conv_id, conv)
    store.assert_stored(conv_id, conv, store.snapshot(conv_id))


@pytest.mark.parametrize("conversation_id", ["c" * 50, "ü" * 50, "🚀" * 50], ids=["ascii", "latin1", "emoji"])
def test_conversation_id_of_50_characters_is_accepted(store, sample_conversation, conversation_id):
    conv = sample_conversation(2)
    store.save(conversation_id, conv)
    store.assert_stored(conversation_id, conv, store.snapshot(conversation_id))


@pytest.mark.parametrize("long_user", ["u" * 255, "ü" * 255], ids=["ascii", "latin1"])
def test_user_id_of_255_characters_is_accepted(make_manager, pg_url, pg_conn, conv_id, sample_conversation, long_user):
    manager = make_manager(mode="postgres", connection_string=pg_url)
    conv = sample_conversation(2)
    manager.save_conversation(conv_id, conv, long_user)
    assert manager.get_conversation(conv_id, long_user) == conv
    assert manager.list_conversations(long_user) == [(conv_id, dict(conv, messages=[]))]
    assert_row_matches(pg_conn, conv_id, long_user, conv)


def test_messages_without_time_and_empty_content_are_accepted(store, conv_id, sample_conversation):
    conv = sample_conversation(2)
    conv["messages"][0]["content"] = ""
    del conv["messages"][1]["time"]
    store.save(conv_id, conv)
    got = store.get(conv_id)
    assert got["messages"][0] == conv["messages"][0]
    assert [(m["role"], m["content"]) for m in got["messages"]] == [(m["role"], m["content"]) for m in conv["messages"]]
    if store.mode == "postgres":
        assert datetime.fromisoformat(got["messages"][1]["time"]).tzinfo is not None


def test_aware_datetime_objects_are_accepted(store, conv_id, sample_conversation):
    when = datetime(2025, 11, 26, 0, 35, 21, 123456, tzinfo=timezone.utc)
    conv = sample_conversation(1, created_at=when, last_modified=when)
    conv["messages"][0]["time"] = when
    store.save(conv_id, conv)
    got = store.get(conv_id)
    assert got["created_at"] == got["last_modified"] == got["messages"][0]["time"] == "2025-11-26T00:35:21.123456+00:00"


# --------------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------------

BAD_ID_VALUES = ["", "a:b", "a{b", "a}b", "a\nb", "a\x07b", "a\tb", "a\x00b", "a\rb", "a\x7fb", "a\x85b"]


def _bad_id_param(value):
    return pytest.param(value, id=repr(value))


@pytest.mark.parametrize("bad_id", [_bad_id_param(v) for v in BAD_ID_VALUES])
def test_bad_conversation_ids_are_refused(store, sample_conversation, bad_id):
    good_id = fresh_id()
    good = sample_conversation(1)
    store.save(good_id, good)
    snapshot = store.snapshot(good_id)

    with pytest.raises(ValidationError) as info:
        store.save(bad_id, sample_conversation(1))
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValidationError):
        store.get(bad_id)
    with pytest.raises(ValidationError):
        store.manager.delete_conversation(bad_id, store.user_id)

    store.assert_stored(good_id, good, snapshot)
    assert [cid for cid, _ in store.manager.list_conversations(store.user_id)] == [good_id]


def test_conversation_id_of_51_characters_is_refused(store, sample_conversation):
    with pytest.raises(ValidationError, match=r"(?i)conversation[ _]?id") as info:
        store.save("c" * 51, sample_conversation(1))
    assert "50" in str(info.value)
    with pytest.raises(ValidationError):
        store.save("ü" * 51, sample_conversation(1))
    assert store.manager.list_conversations(store.user_id) == []


@pytest.mark.parametrize("bad_id", [123, None, b"abcd1234", 1.5], ids=repr)
def test_conversation_id_of_wrong_type_is_a_type_error(store, sample_conversation, bad_id):
    with pytest.raises(InvalidTypeError):
        store.save(bad_id, sample_conversation(1))
    assert store.manager.list_conversations(store.user_id) == []


@pytest.mark.parametrize("bad_user", [_bad_id_param(v) for v in BAD_ID_VALUES] + [pytest.param("u" * 256, id="256")])
def test_bad_user_ids_are_refused_in_postgres_mode(pg_store, pg_conn, conv_id, sample_conversation, bad_user):
    good = sample_conversation(1)
    pg_store.save(conv_id, good)

    with pytest.raises(ValidationError, match=r"(?i)user") as info:
        pg_store.save(fresh_id(), sample_conversation(1), user_id=bad_user)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValidationError):
        pg_store.save(conv_id, sample_conversation(2), user_id=bad_user)
    with pytest.raises(ValidationError):
        pg_store.manager.get_conversation(conv_id, bad_user)
    with pytest.raises(ValidationError):
        pg_store.manager.list_conversations(bad_user)
    with pytest.raises(ValidationError):
        pg_store.manager.delete_conversation(conv_id, bad_user)

    assert_row_matches(pg_conn, conv_id, pg_store.user_id, good)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM conversations")
        assert cur.fetchone()[0] == 1


@pytest.mark.parametrize("bad_user", [123, b"user", ["u"]], ids=repr)
def test_user_id_of_wrong_type_is_a_type_error_in_postgres_mode(pg_store, conv_id, sample_conversation, bad_user):
    with pytest.raises(InvalidTypeError):
        pg_store.save(conv_id, sample_conversation(1), user_id=bad_user)
    assert pg_store.get(conv_id) is None
