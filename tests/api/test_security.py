"""Security (docs/design.md, "Ownership"; README, "Configuration"): users are isolated, SQL is parameterised,
passwords never leak."""

from __future__ import annotations

import logging
import re
import time
from urllib.parse import quote

import pytest

from chat_history_rs import ChatHistoryError, OwnershipError, UnavailableError
from support.leaks import assert_no_secret, deep_text, exception_texts, log_texts
from support.servers import assert_row_matches, closed_port, fetch_conversation_row, fetch_message_rows

WRONG_PASSWORD = "s3cr3t-DO-NOT-LEAK"
# Needs percent-encoding in a URL; neither the raw nor the encoded form may leak.
WRONG_PASSWORD_SPECIAL = "p@ss:w0rd/DO-NOT-LEAK%20?#"


# --------------------------------------------------------------------------------------------------
# One user cannot touch another's conversation
# --------------------------------------------------------------------------------------------------


def test_other_user_cannot_overwrite(pg_manager, pg_conn, user_id, other_user_id, conv_id, sample_conversation):
    mine = sample_conversation(3, title="A's chat")
    pg_manager.save_conversation(conv_id, mine, user_id)

    theirs = sample_conversation(1, title="B's attempt")
    with pytest.raises(OwnershipError) as info:
        pg_manager.save_conversation(conv_id, theirs, other_user_id)
    assert isinstance(info.value, PermissionError)
    assert isinstance(info.value, ChatHistoryError)

    assert_row_matches(pg_conn, conv_id, user_id, mine)
    assert pg_manager.get_conversation(conv_id, user_id) == mine
    assert pg_manager.get_conversation(conv_id, other_user_id) is None
    assert pg_manager.list_conversations(other_user_id) == []


def test_other_user_cannot_overwrite_through_seed_backend(
    pg_manager, pg_conn, user_id, other_user_id, conv_id, sample_conversation
):
    mine = sample_conversation(2)
    pg_manager.save_conversation(conv_id, mine, user_id)
    with pytest.raises(PermissionError):
        pg_manager.postgres_backend.save_conversation(conv_id, other_user_id, sample_conversation(4))
    assert_row_matches(pg_conn, conv_id, user_id, mine)


def test_other_user_cannot_read(pg_manager, user_id, other_user_id, conv_id, sample_conversation):
    pg_manager.save_conversation(conv_id, sample_conversation(2), user_id)
    assert pg_manager.get_conversation(conv_id, other_user_id) is None
    assert pg_manager.postgres_backend.get_conversation(conv_id, other_user_id) is None


def test_other_user_cannot_delete(pg_manager, pg_conn, user_id, other_user_id, conv_id, sample_conversation):
    mine = sample_conversation(3)
    pg_manager.save_conversation(conv_id, mine, user_id)

    pg_manager.delete_conversation(conv_id, other_user_id)  # silently nothing, or an error: both keep the data
    assert_row_matches(pg_conn, conv_id, user_id, mine)
    assert pg_manager.get_conversation(conv_id, user_id) == mine


def test_other_user_list_excludes_it(pg_manager, user_id, other_user_id, conv_id, sample_conversation):
    mine = sample_conversation(2)
    pg_manager.save_conversation(conv_id, mine, user_id)
    theirs = sample_conversation(1, title="B's own")
    pg_manager.save_conversation("b0b0b0b0", theirs, other_user_id)

    assert pg_manager.list_conversations(other_user_id) == [("b0b0b0b0", dict(theirs, messages=[]))]
    assert pg_manager.list_conversations(user_id) == [(conv_id, dict(mine, messages=[]))]


@pytest.mark.parametrize("pattern", ["%", "_", "%%", "*", ".*"])
def test_pattern_like_user_ids_match_only_themselves(pg_manager, user_id, conv_id, sample_conversation, pattern):
    pg_manager.save_conversation(conv_id, sample_conversation(1), user_id)
    assert pg_manager.list_conversations(pattern) == []
    assert pg_manager.get_conversation(conv_id, pattern) is None


# --------------------------------------------------------------------------------------------------
# SQL-looking text is data
# --------------------------------------------------------------------------------------------------

NASTY = [
    "'); DROP TABLE conversations; --",
    "x' OR '1'='1",
    "%s",
    "$1",
    "%(name)s",
    'a"b',
    "back\\slash",
    "semi;colon -- comment",
    "/* comment */",
    "E'\\x41'",
]


@pytest.mark.parametrize("text", NASTY)
def test_sql_looking_ids_title_and_content_are_stored_verbatim(pg_manager, pg_conn, sample_conversation, text):
    conversation_id = text[:50]
    user = "user " + text
    conv = sample_conversation(2, title=text, model=text[:100], contents=[text, f"answer: {text}"])
    pg_manager.save_conversation(conversation_id, conv, user)

    assert pg_manager.get_conversation(conversation_id, user) == conv
    assert_row_matches(pg_conn, conversation_id, user, conv)
    assert [r[2] for r in fetch_message_rows(pg_conn, conversation_id)] == [text, f"answer: {text}"]
    assert pg_manager.list_conversations(user) == [(conversation_id, dict(conv, messages=[]))]
    with pg_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM conversations")
        assert cur.fetchone()[0] == 1

    pg_manager.delete_conversation(conversation_id, user)
    assert fetch_conversation_row(pg_conn, conversation_id) is None


def test_injection_in_delete_and_get_touches_nothing_else(pg_manager, pg_conn, user_id, conv_id, sample_conversation):
    kept = sample_conversation(2)
    pg_manager.save_conversation(conv_id, kept, user_id)

    for evil in ["x' OR '1'='1", f"{conv_id}' --", "' OR 1=1 --"]:
        assert pg_manager.get_conversation(evil, user_id) is None
        pg_manager.delete_conversation(evil, user_id)
        pg_manager.delete_conversation(conv_id, f"{user_id}' OR '1'='1")
    assert_row_matches(pg_conn, conv_id, user_id, kept)


def test_sql_looking_text_in_local_mode(local_manager, sample_conversation):
    text = "'); DROP TABLE conversations; --"
    conv = sample_conversation(1, title=text, contents=[text])
    local_manager.save_conversation("abc%s$1", conv)
    assert local_manager.get_conversation("abc%s$1") == conv


# --------------------------------------------------------------------------------------------------
# Passwords never leak
# --------------------------------------------------------------------------------------------------


def _fail_with_bad_login(make_manager, connection_string, user_id, conv_id):
    """Construction raises, or construction succeeds and the first call raises. Returns the exception."""
    try:
        manager = make_manager(mode="postgres", connection_string=connection_string, postgres_connect_timeout=2.0)
    except ChatHistoryError as exc:
        return exc
    with pytest.raises(ChatHistoryError) as info:
        manager.get_conversation(conv_id, user_id)
    return info.value


@pytest.mark.parametrize("secret", [WRONG_PASSWORD, WRONG_PASSWORD_SPECIAL], ids=["plain", "special-chars"])
@pytest.mark.parametrize("form", ["url", "key-value"])
def test_wrong_password_is_not_in_errors_or_logs(make_manager, pg_scram_params, caplog, user_id, conv_id, secret, form):
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    params = pg_scram_params.with_login("postgres", secret)
    connection_string = params.url if form == "url" else params.dsn

    started = time.monotonic()
    exc = _fail_with_bad_login(make_manager, connection_string, user_id, conv_id)
    assert time.monotonic() - started < 30
    assert isinstance(exc, ChatHistoryError)
    for where, text in exception_texts(exc).items():
        assert_no_secret(text, secret, where)
    assert_no_secret(log_texts(caplog), secret, "logs")


def test_wrong_password_error_says_authentication_failed(make_manager, pg_scram_params, user_id, conv_id):
    # STYLE "Errors": the message says what was wrong. A bad password is not an outage to wait out.
    params = pg_scram_params.with_login("postgres", WRONG_PASSWORD)
    exc = _fail_with_bad_login(make_manager, params.url, user_id, conv_id)
    assert re.search(r"(?i)authenticat", str(exc)), str(exc)
    assert_no_secret(str(exc), WRONG_PASSWORD, "str")


def test_password_not_in_unavailable_error(make_manager, caplog, user_id, conv_id, sample_conversation):
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    url = f"postgresql://postgres:{quote(WRONG_PASSWORD_SPECIAL, safe='')}@127.0.0.1:{closed_port()}/postgres"
    try:
        manager = make_manager(mode="postgres", connection_string=url, postgres_connect_timeout=2.0)
        with pytest.raises(UnavailableError) as info:
            manager.save_conversation(conv_id, sample_conversation(1), user_id)
        exc = info.value
    except UnavailableError as construction_error:
        exc = construction_error
    for where, text in exception_texts(exc).items():
        assert_no_secret(text, WRONG_PASSWORD_SPECIAL, where)
    assert_no_secret(log_texts(caplog), WRONG_PASSWORD_SPECIAL, "logs")


@pytest.mark.parametrize("form", ["url", "key-value", "DATABASE_URL"])
def test_correct_password_not_in_repr_stats_or_logs(
    make_manager, pg_scram_params, caplog, monkeypatch, user_id, conv_id, sample_conversation, form
):
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    password = pg_scram_params.password
    assert password
    if form == "DATABASE_URL":
        monkeypatch.setenv("DATABASE_URL", pg_scram_params.url)
        manager = make_manager(mode="postgres")
    else:
        cs = pg_scram_params.url if form == "url" else pg_scram_params.dsn
        manager = make_manager(mode="postgres", connection_string=cs)

    conv = sample_conversation(2)
    manager.save_conversation(conv_id, conv, user_id)  # the password really works
    assert manager.get_conversation(conv_id, user_id) == conv

    stats = manager.stats()
    assert isinstance(stats, dict)
    assert_no_secret(deep_text(stats), password, "stats()")
    assert_no_secret(repr(manager), password, "repr(manager)")
    assert_no_secret(str(manager), password, "str(manager)")
    assert_no_secret(repr(manager.postgres_backend), password, "repr(postgres_backend)")
    assert_no_secret(log_texts(caplog), password, "logs")
    manager.close()
    assert_no_secret(repr(manager), password, "repr(closed manager)")
    assert_no_secret(log_texts(caplog), password, "logs after close")


def test_scram_fixture_rejects_wrong_password(pg_scram_params):
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pg_scram_params.with_login("postgres", WRONG_PASSWORD).connect()
    pg_scram_params.connect().close()
