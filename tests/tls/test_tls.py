"""TLS (README, "Configuration", its TLS paragraph): libpq's sslmodes over rustls for PostgreSQL, and `rediss://`.

Against throwaway servers that present certificates of a throwaway CA (support/tls_support.py): a PostgreSQL that
accepts TLS only and names localhost and 127.0.0.1, a PostgreSQL whose certificate names only
wrong.example, and TLS-only redis-servers. Each check is made from outside the product: rows with
psycopg2, keys with a redis-py TLS client, and whether a session is encrypted from pg_stat_ssl.

Tests request the database and Redis fixtures before `make_manager`, so the managers are closed (and
flushed) before their database is dropped.
"""

from __future__ import annotations

import logging
import re

import pytest

from chat_history_rs import ChatHistoryError, ConfigurationError, UnavailableError
from support.leaks import assert_no_secret, deep_text, exception_texts, log_texts
from support.redis_support import DIRTY_SET, conv_key, dirty_member, make_conversation, seed_fields
from support.servers import assert_row_matches, fetch_conversation_row
from support.tls_support import REDIS_TLS_PASSWORD, pg_conninfo, product_sessions_ssl

HOSTS = ["localhost", "127.0.0.1"]
FORMS = ["url", "key-value"]

# In every connection string that is expected to fail, so each failure also checks it does not leak.
# The TLS servers trust every login, so the password is never asked for.
PG_PASSWORD = "pg-Secret:DO-NOT-LEAK"

# A certificate the client refused (rustls: UnknownIssuer, NotValidForName, ...).
CERTIFICATE_REFUSED = r"(?i)certificate|issuer"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _round_trip(manager, params, user_id, conv_id, conversation) -> None:
    """Saved through the manager, read back equal, and the rows are in the database as saved."""
    manager.save_conversation(conv_id, conversation, user_id)
    assert manager.get_conversation(conv_id, user_id) == conversation
    conn = params.connect()
    try:
        assert_row_matches(conn, conv_id, user_id, conversation)
    finally:
        conn.close()


def _assert_sessions_encrypted(server, params, encrypted: bool = True) -> None:
    """The server's view: every session the product holds on the test's database is (or is not) TLS."""
    states = product_sessions_ssl(server.params, params.dbname)
    assert states, "the manager holds no session on the database (application_name chat_history_rs)"
    assert states == [encrypted] * len(states), f"pg_stat_ssl.ssl of the product's sessions: {states}"


def _pg_unavailable(make_manager, connection_string, user_id, conv_id, **kwargs) -> UnavailableError:
    """Construction raises UnavailableError, or it succeeds and a save and a read both raise it.

    Returns the first UnavailableError; fails the test if PostgreSQL was reached after all.
    """
    try:
        manager = make_manager(
            mode="postgres", connection_string=connection_string, postgres_connect_timeout=2.0, **kwargs
        )
    except UnavailableError as exc:
        return exc
    with pytest.raises(UnavailableError) as saved:
        manager.save_conversation(conv_id, make_conversation(1), user_id)
    with pytest.raises(UnavailableError):
        manager.get_conversation(conv_id, user_id)
    return saved.value


def _check_pg_error(exc: BaseException, why: str) -> None:
    assert isinstance(exc, ConnectionError) and isinstance(exc, ChatHistoryError), repr(exc)
    assert re.search(r"(?i)postgres", str(exc)), f"the error does not name PostgreSQL: {exc}"
    assert re.search(why, str(exc)), f"the error does not say why ({why}): {exc}"
    for where, text in exception_texts(exc).items():
        assert_no_secret(text, PG_PASSWORD, where)


def _no_rows(params, conv_id) -> bool:
    conn = params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('conversations') IS NOT NULL")
            if not cur.fetchone()[0]:
                return True
        return fetch_conversation_row(conn, conv_id) is None
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# PostgreSQL: verify-full and verify-ca
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ca_via", ["sslrootcert", "postgres_ca_file"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("host", HOSTS)
def test_verify_full_with_the_ca_file_connects_encrypted(
    pki, tls_pg_server, tls_pg_db, make_manager, user_id, conv_id, host, form, ca_via
):
    # The certificate's SANs are DNS:localhost and IP:127.0.0.1, so both host forms pass the name check.
    kwargs = {"postgres_ca_file": str(pki.ca)} if ca_via == "postgres_ca_file" else {}
    cs = pg_conninfo(
        tls_pg_db, host=host, form=form, sslmode="verify-full", sslrootcert=pki.ca if ca_via == "sslrootcert" else None
    )
    manager = make_manager(mode="postgres", connection_string=cs, **kwargs)
    _round_trip(manager, tls_pg_db, user_id, conv_id, make_conversation(3))
    _assert_sessions_encrypted(tls_pg_server, tls_pg_db)


@pytest.mark.parametrize("sslmode", ["verify-full", "verify-ca"])
@pytest.mark.parametrize("host", HOSTS)
def test_verifying_modes_without_a_ca_file_refuse_a_private_ca(
    tls_pg_db, make_manager, user_id, conv_id, host, sslmode
):
    # Without a CA file the roots are Mozilla's, which do not include the test CA.
    cs = pg_conninfo(tls_pg_db, host=host, form="url", sslmode=sslmode, password=PG_PASSWORD)
    exc = _pg_unavailable(make_manager, cs, user_id, conv_id)
    _check_pg_error(exc, CERTIFICATE_REFUSED)
    assert _no_rows(tls_pg_db, conv_id)


@pytest.mark.parametrize("ca_via", ["sslrootcert", "postgres_ca_file"])
@pytest.mark.parametrize("host", HOSTS)
def test_verify_full_refuses_a_certificate_for_another_name(
    pki, wrong_name_pg_db, make_manager, user_id, conv_id, host, ca_via
):
    kwargs = {"postgres_ca_file": str(pki.ca)} if ca_via == "postgres_ca_file" else {}
    cs = pg_conninfo(
        wrong_name_pg_db, host=host, form="key-value", sslmode="verify-full", password=PG_PASSWORD,
        sslrootcert=pki.ca if ca_via == "sslrootcert" else None,
    )  # fmt: skip
    exc = _pg_unavailable(make_manager, cs, user_id, conv_id, **kwargs)
    _check_pg_error(exc, CERTIFICATE_REFUSED)
    assert _no_rows(wrong_name_pg_db, conv_id)


@pytest.mark.parametrize("sslmode", ["verify-ca", "require"])
@pytest.mark.parametrize("host", HOSTS)
def test_chain_only_modes_accept_a_certificate_for_another_name(
    pki, wrong_name_pg_server, wrong_name_pg_db, make_manager, user_id, conv_id, host, sslmode
):
    # libpq: verify-ca (and require with a root CA file) check the chain, not the host name.
    cs = pg_conninfo(wrong_name_pg_db, host=host, form="url", sslmode=sslmode, sslrootcert=pki.ca)
    manager = make_manager(mode="postgres", connection_string=cs)
    _round_trip(manager, wrong_name_pg_db, user_id, conv_id, make_conversation(2))
    _assert_sessions_encrypted(wrong_name_pg_server, wrong_name_pg_db)


@pytest.mark.parametrize("ca_via", ["sslrootcert", "postgres_ca_file"])
@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
def test_a_ca_file_of_another_ca_is_refused(pki, tls_pg_db, make_manager, user_id, conv_id, sslmode, ca_via):
    # With a CA file, require checks the chain like verify-ca: the server's CA is not the one given.
    kwargs = {"postgres_ca_file": str(pki.other_ca)} if ca_via == "postgres_ca_file" else {}
    cs = pg_conninfo(
        tls_pg_db, host="localhost", form="url", sslmode=sslmode, password=PG_PASSWORD,
        sslrootcert=pki.other_ca if ca_via == "sslrootcert" else None,
    )  # fmt: skip
    exc = _pg_unavailable(make_manager, cs, user_id, conv_id, **kwargs)
    _check_pg_error(exc, CERTIFICATE_REFUSED)
    assert _no_rows(tls_pg_db, conv_id)


# --------------------------------------------------------------------------------------------------
# PostgreSQL: the unverified modes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("host", HOSTS)
def test_require_without_a_ca_file_accepts_a_self_signed_server(
    tls_pg_server, tls_pg_db, make_manager, user_id, conv_id, host, form
):
    cs = pg_conninfo(tls_pg_db, host=host, form=form, sslmode="require")
    manager = make_manager(mode="postgres", connection_string=cs)
    _round_trip(manager, tls_pg_db, user_id, conv_id, make_conversation(2))
    _assert_sessions_encrypted(tls_pg_server, tls_pg_db)


@pytest.mark.parametrize("sslmode", [None, "allow", "prefer"])
@pytest.mark.parametrize("form", FORMS)
def test_opportunistic_modes_use_tls_when_the_server_offers_it(
    tls_pg_server, tls_pg_db, make_manager, user_id, conv_id, form, sslmode
):
    # No sslmode means prefer, as in libpq. The server refuses plain connections (hostnossl reject), so
    # success alone shows TLS was used; pg_stat_ssl shows it from the server's side.
    cs = pg_conninfo(tls_pg_db, host="localhost", form=form, sslmode=sslmode)
    manager = make_manager(mode="postgres", connection_string=cs)
    _round_trip(manager, tls_pg_db, user_id, conv_id, make_conversation(2))
    _assert_sessions_encrypted(tls_pg_server, tls_pg_db)


@pytest.mark.parametrize("sslmode, encrypted", [("disable", False), ("prefer", True)])
def test_disable_is_plain_and_prefer_is_tls_on_a_server_allowing_both(
    wrong_name_pg_server, wrong_name_pg_db, make_manager, user_id, conv_id, sslmode, encrypted
):
    # The server accepts both; what pg_stat_ssl reports is the client's choice. (Also shows the check
    # used by the other tests does tell plain sessions from encrypted ones.)
    cs = pg_conninfo(wrong_name_pg_db, host="127.0.0.1", form="url", sslmode=sslmode)
    manager = make_manager(mode="postgres", connection_string=cs)
    _round_trip(manager, wrong_name_pg_db, user_id, conv_id, make_conversation(1))
    _assert_sessions_encrypted(wrong_name_pg_server, wrong_name_pg_db, encrypted=encrypted)


@pytest.mark.parametrize("form", FORMS)
def test_disable_against_a_server_that_demands_tls_fails(tls_pg_db, make_manager, user_id, conv_id, form):
    cs = pg_conninfo(tls_pg_db, host="localhost", form=form, sslmode="disable", password=PG_PASSWORD)
    exc = _pg_unavailable(make_manager, cs, user_id, conv_id)
    # The server's own refusal: "pg_hba.conf rejects connection ... no encryption".
    _check_pg_error(exc, r"(?i)pg_hba|encrypt|ssl|tls")
    assert _no_rows(tls_pg_db, conv_id)


# --------------------------------------------------------------------------------------------------
# CA files that cannot be used
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["missing", "empty", "not-pem"])
def unusable_ca_file(request, tmp_path):
    path = tmp_path / "ca.pem"
    if request.param == "empty":
        path.write_text("")
    elif request.param == "not-pem":
        path.write_text("this is not a certificate\n")
    return path


def test_unusable_postgres_ca_file_is_a_configuration_error(tls_pg_db, unusable_ca_file, make_manager):
    cs = pg_conninfo(tls_pg_db, host="localhost", form="url", sslmode="verify-full", password=PG_PASSWORD)
    with pytest.raises(ConfigurationError) as info:
        make_manager(mode="postgres", connection_string=cs, postgres_ca_file=str(unusable_ca_file))
    assert isinstance(info.value, ValueError)
    assert str(unusable_ca_file) in str(info.value), str(info.value)
    for where, text in exception_texts(info.value).items():
        assert_no_secret(text, PG_PASSWORD, where)


def test_unusable_redis_ca_file_is_a_configuration_error(tls_pg_db, tls_redis_auth_server, tmp_path, make_manager):
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ConfigurationError) as info:
        make_manager(
            mode="postgres", connection_string=pg_conninfo(tls_pg_db, host="localhost", form="url"),
            redis_enabled=True, redis_connection_string=_azure_url(tls_redis_auth_server), redis_ca_file=str(missing),
            background_flush=False,
        )  # fmt: skip
    assert isinstance(info.value, ValueError)
    assert str(missing) in str(info.value), str(info.value)
    for where, text in exception_texts(info.value).items():
        assert_no_secret(text, REDIS_TLS_PASSWORD, where)


# --------------------------------------------------------------------------------------------------
# Redis: rediss://
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(tls_redis_server):
    """redis-py over TLS to tls_redis_server, emptied before the test (dirty:convs is shared)."""
    client = tls_redis_server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def tls_redis_auth(tls_redis_auth_server):
    client = tls_redis_auth_server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def wrong_name_redis(wrong_name_redis_server):
    client = wrong_name_redis_server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def verified_pg_url(pki, tls_pg_db) -> str:
    """The test's database over verify-full, as an Azure deployment would connect."""
    return pg_conninfo(tls_pg_db, host="localhost", form="url", sslmode="verify-full", sslrootcert=pki.ca)


def _azure_url(server, password: str = REDIS_TLS_PASSWORD) -> str:
    # As Azure's portal shows it: the key not percent-encoded, `?ssl=true`.
    return f"rediss://:{password}@localhost:{server.port}/0?ssl=true"


def _redis_manager(make_manager, pg_url, redis_url, **kwargs):
    return make_manager(
        mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=redis_url,
        background_flush=False, **kwargs,
    )  # fmt: skip


def _assert_cached_then_flushed(manager, client, params, user_id, conv_id, conversation) -> None:
    """Write-back over TLS: the save is dirty in Redis and not in PostgreSQL; a flush writes the rows."""
    manager.save_conversation(conv_id, conversation, user_id)
    assert seed_fields(client, user_id, conv_id) == {**conversation, "dirty": "1"}
    assert client.sismember(DIRTY_SET, dirty_member(user_id, conv_id))
    assert _no_rows(params, conv_id), "the save went to PostgreSQL, not to Redis"
    assert manager.get_conversation(conv_id, user_id) == conversation
    assert manager.stats()["redis_available"] is True

    assert manager.flush_dirty_conversations() == 1
    conn = params.connect()
    try:
        assert_row_matches(conn, conv_id, user_id, conversation)
    finally:
        conn.close()
    assert client.hget(conv_key(user_id, conv_id), "dirty") == "0"
    assert not client.sismember(DIRTY_SET, dirty_member(user_id, conv_id))


@pytest.mark.parametrize("host", HOSTS)
def test_rediss_with_the_ca_file_caches_and_writes_back(
    pki, verified_pg_url, tls_pg_db, tls_redis_server, tls_redis, make_manager, user_id, conv_id, host
):
    url = f"rediss://{host}:{tls_redis_server.port}/0"
    manager = _redis_manager(make_manager, verified_pg_url, url, redis_ca_file=str(pki.ca))
    _assert_cached_then_flushed(manager, tls_redis, tls_pg_db, user_id, conv_id, make_conversation(3))


def test_redis_ca_file_from_the_environment(
    pki, verified_pg_url, tls_pg_db, tls_redis_server, tls_redis, make_manager, user_id, conv_id, monkeypatch
):
    monkeypatch.setenv("REDIS_CA_FILE", str(pki.ca))
    manager = _redis_manager(make_manager, verified_pg_url, tls_redis_server.url)
    _assert_cached_then_flushed(manager, tls_redis, tls_pg_db, user_id, conv_id, make_conversation(2))


@pytest.mark.parametrize("case", ["no-ca-file", "another-ca", "wrong-host-name"])
def test_rediss_that_fails_verification_is_a_configuration_error(
    pki, verified_pg_url, tls_redis_server, tls_redis, wrong_name_redis_server,
    wrong_name_redis, make_manager, monkeypatch, case,
):  # fmt: skip
    """A certificate that does not verify will not fix itself: the constructor refuses it, naming the
    cause (README, "Misconfiguration or outage"), and nothing reaches that Redis."""
    monkeypatch.delenv("REDIS_CA_FILE", raising=False)
    server, client, detail, kwargs = tls_redis_server, tls_redis, "UnknownIssuer", {}
    if case == "another-ca":
        kwargs = {"redis_ca_file": str(pki.other_ca)}
    elif case == "wrong-host-name":  # the right CA, but the certificate names only wrong.example
        server, client, detail = wrong_name_redis_server, wrong_name_redis, "not valid for name"
        kwargs = {"redis_ca_file": str(pki.ca)}
    url = server.url  # no-ca-file: Mozilla's roots do not include the test CA
    with pytest.raises(ConfigurationError) as info:
        _redis_manager(make_manager, verified_pg_url, url, **kwargs)
    message = str(info.value)
    assert "TLS failed: the server's certificate does not verify" in message and detail in message, message
    assert client.dbsize() == 0, "the manager wrote to a Redis it could not verify"


@pytest.mark.parametrize("opt_out", ["#insecure", "?ssl_cert_reqs=none"])
def test_rediss_opt_out_skips_verification(
    verified_pg_url, tls_pg_db, tls_redis_server, tls_redis, make_manager, user_id, conv_id, monkeypatch, opt_out
):
    monkeypatch.delenv("REDIS_CA_FILE", raising=False)
    url = f"rediss://127.0.0.1:{tls_redis_server.port}/0{opt_out}"
    manager = _redis_manager(make_manager, verified_pg_url, url)
    _assert_cached_then_flushed(manager, tls_redis, tls_pg_db, user_id, conv_id, make_conversation(2))


def test_rediss_insecure_also_skips_the_host_name(
    verified_pg_url, tls_pg_db, wrong_name_redis_server, wrong_name_redis, make_manager, user_id, conv_id, monkeypatch
):
    monkeypatch.delenv("REDIS_CA_FILE", raising=False)
    manager = _redis_manager(make_manager, verified_pg_url, wrong_name_redis_server.url + "#insecure")
    _assert_cached_then_flushed(manager, wrong_name_redis, tls_pg_db, user_id, conv_id, make_conversation(1))


# --------------------------------------------------------------------------------------------------
# Redis: Azure's form, and the password
# --------------------------------------------------------------------------------------------------


def _assert_password_hidden(manager, caplog, secret: str) -> None:
    assert_no_secret(repr(manager), secret, "repr(manager)")
    assert_no_secret(str(manager), secret, "str(manager)")
    assert_no_secret(repr(manager.redis_backend), secret, "repr(redis_backend)")
    assert_no_secret(deep_text(manager.stats()), secret, "stats()")
    assert_no_secret(log_texts(caplog), secret, "logs")


def test_azure_form_over_tls_works_and_hides_the_password(
    pki, verified_pg_url, tls_pg_db, tls_redis_auth_server, tls_redis_auth, caplog, make_manager, user_id, conv_id
):
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    manager = _redis_manager(
        make_manager, verified_pg_url, _azure_url(tls_redis_auth_server), redis_ca_file=str(pki.ca)
    )
    _assert_cached_then_flushed(manager, tls_redis_auth, tls_pg_db, user_id, conv_id, make_conversation(2))
    _assert_password_hidden(manager, caplog, REDIS_TLS_PASSWORD)
    manager.close()
    assert_no_secret(repr(manager), REDIS_TLS_PASSWORD, "repr(closed manager)")
    assert_no_secret(log_texts(caplog), REDIS_TLS_PASSWORD, "logs after close")


def test_redis_by_parts_defaults_to_tls(
    pki, verified_pg_url, tls_pg_db, tls_redis_auth_server, tls_redis_auth, caplog, make_manager, user_id, conv_id,
    monkeypatch,
):  # fmt: skip
    # README: redis_ssl defaults to True, so host, port and password alone reach a TLS-only server.
    for name in ("REDIS_CONNECTION_STRING", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_SSL", "REDIS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    manager = make_manager(
        mode="postgres", connection_string=verified_pg_url, redis_enabled=True, redis_host="localhost",
        redis_port=tls_redis_auth_server.port, redis_password=REDIS_TLS_PASSWORD, redis_ca_file=str(pki.ca),
        background_flush=False,
    )  # fmt: skip
    _assert_cached_then_flushed(manager, tls_redis_auth, tls_pg_db, user_id, conv_id, make_conversation(2))
    _assert_password_hidden(manager, caplog, REDIS_TLS_PASSWORD)


@pytest.mark.parametrize("case", ["no-ca-file", "wrong-password"])
def test_azure_password_hidden_when_redis_is_refused(
    pki, verified_pg_url, tls_redis_auth_server, tls_redis_auth, caplog, make_manager, monkeypatch, case,
):  # fmt: skip
    """Refused at construction (README, "Misconfiguration or outage"): the error and the log name the
    cause, never the key."""
    monkeypatch.delenv("REDIS_CA_FILE", raising=False)
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    if case == "no-ca-file":
        secret, kwargs, cause = REDIS_TLS_PASSWORD, {}, "certificate does not verify"
        url = _azure_url(tls_redis_auth_server)
    else:
        secret, kwargs, cause = "Wr0ng+Key/DO-NOT-LEAK==", {"redis_ca_file": str(pki.ca)}, "refused the login"
        url = _azure_url(tls_redis_auth_server, secret)
    with pytest.raises(ConfigurationError) as info:
        _redis_manager(make_manager, verified_pg_url, url, **kwargs)
    assert cause in str(info.value), str(info.value)
    for where, text in exception_texts(info.value).items():
        assert_no_secret(text, secret, where)
    assert_no_secret(log_texts(caplog), secret, "logs")
    assert tls_redis_auth.dbsize() == 0
