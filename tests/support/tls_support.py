"""TLS fixtures for tests/tls/: a throwaway PKI, PostgreSQL with `ssl=on`, Redis with TLS only, and
TlsRedisClusterServers, a Redis Cluster with TLS only (test_tls_cluster.py starts one per module).

A plugin listed in conftest.py's `pytest_plugins`: tests request its fixtures by name, without importing
them. Builds on servers.py (PostgresServer, RedisServer, create_database) and conftest.py. Certificates are
made with the `openssl` command line (no Python crypto package needed in the venv), with EC P-256
keys because they are fast to generate.

Session fixtures (started on first use, deleted at the end):
    pki                    Pki: `ca` signed the server and node certificates; `other_ca` is unrelated
    tls_pg_server          PostgreSQL with the `localhost` / 127.0.0.1 certificate that accepts TLS only
                           (pg_hba: `hostssl ... trust`, `hostnossl ... reject`)
    wrong_name_pg_server   PostgreSQL with the `wrong.example` certificate, accepting TLS and plain
    tls_redis_server       redis-server with TLS only (`--port 0 --tls-port P`), `localhost` certificate
    tls_redis_auth_server  the same with `--requirepass REDIS_TLS_PASSWORD`
    wrong_name_redis_server   TLS only, `wrong.example` certificate
Per test:
    tls_pg_db / wrong_name_pg_db   a fresh database (PgParams) on that server, dropped after the test
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from support.cluster_support import RedisClusterServers
from support.servers import (
    POSTGRES_OS_USER,
    PgParams,
    PostgresServer,
    RedisServer,
    ServerError,
    create_database,
    drop_database,
    find_pg_bindir,
)

# An Azure-like access key: base64, with the '/', '+' and '=' a URL parser may trip on. Tests check it
# never leaks (exceptions, logs, repr(), stats()).
REDIS_TLS_PASSWORD = "Tls+Az/ureKey0123456789abcdefGHIJKLmnop+qrs/tu=="

# pg_hba.conf of the server that demands TLS: a plain connection is refused by the server itself.
HBA_TLS_ONLY = """\
local     all all              trust
hostssl   all all 127.0.0.1/32 trust
hostnossl all all 127.0.0.1/32 reject
"""
HBA_TLS_OR_PLAIN = """\
local all all              trust
host  all all 127.0.0.1/32 trust
"""


# --------------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A throwaway PKI: `ca` signed `server` (SAN DNS:localhost, IP:127.0.0.1), `wrong_name`
    (SAN DNS:wrong.example only) and `node` (the names of `server`, for both server and client
    authentication: the nodes of a TLS cluster are TLS clients of each other on the cluster bus and for
    replication); `other_ca` is a second CA that signed nothing the servers use."""

    root: Path
    ca: Path
    other_ca: Path
    server: CertPair
    wrong_name: CertPair
    node: CertPair


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {eku}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
"""


def find_openssl() -> str | None:
    return shutil.which("openssl")


def _openssl(workdir: Path, *args: str) -> None:
    openssl = find_openssl()
    if openssl is None:
        raise ServerError("the openssl command is not installed: cannot make test certificates")
    proc = subprocess.run([openssl, *args], check=False, cwd=workdir, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ServerError(f"openssl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")


def _new_key_args(key: Path) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key)]


def make_ca(workdir: Path, name: str, common_name: str) -> CertPair:
    """A self-signed CA certificate (PEM) and its key, valid for 3 days."""
    config = workdir / f"{name}.cnf"
    config.write_text(_OPENSSL_CONFIG.format(san="DNS:unused.invalid", eku="serverAuth"))
    pair = CertPair(workdir / f"{name}.crt", workdir / f"{name}.key")
    _openssl(
        workdir, "req", "-x509", "-new", "-config", str(config), "-extensions", "ca_ext",
        *_new_key_args(pair.key), "-subj", f"/CN={common_name}", "-days", "3", "-out", str(pair.cert),
    )  # fmt: skip
    return pair


def make_server_cert(
    workdir: Path, name: str, ca: CertPair, common_name: str, san: str, *, eku: str = "serverAuth"
) -> CertPair:
    """A server certificate signed by `ca` for `san` (e.g. "DNS:localhost,IP:127.0.0.1"), with the
    extended key usages `eku` ("serverAuth,clientAuth" for a certificate that is also a client's)."""
    config = workdir / f"{name}.cnf"
    config.write_text(_OPENSSL_CONFIG.format(san=san, eku=eku))
    csr = workdir / f"{name}.csr"
    pair = CertPair(workdir / f"{name}.crt", workdir / f"{name}.key")
    _openssl(
        workdir, "req", "-new", "-config", str(config), *_new_key_args(pair.key),
        "-subj", f"/CN={common_name}", "-out", str(csr),
    )  # fmt: skip
    _openssl(
        workdir, "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-set_serial", str(secrets.randbits(63)), "-days", "3",
        "-extfile", str(config), "-extensions", "server_ext", "-out", str(pair.cert),
    )  # fmt: skip
    return pair


def make_pki() -> Pki:
    root = Path(tempfile.mkdtemp(prefix="chr-tls-"))
    ca = make_ca(root, "ca", "chat-history-rs test CA")
    other_ca = make_ca(root, "other-ca", "chat-history-rs unrelated CA")
    server = make_server_cert(root, "server", ca, "localhost", "DNS:localhost,IP:127.0.0.1")
    wrong_name = make_server_cert(root, "wrong-name", ca, "wrong.example", "DNS:wrong.example")
    node = make_server_cert(root, "node", ca, "localhost", "DNS:localhost,IP:127.0.0.1", eku="serverAuth,clientAuth")
    return Pki(root=root, ca=ca.cert, other_ca=other_ca.cert, server=server, wrong_name=wrong_name, node=node)


# --------------------------------------------------------------------------------------------------
# PostgreSQL with TLS
# --------------------------------------------------------------------------------------------------


class TlsPostgresServer(PostgresServer):
    """servers.PostgresServer with `ssl=on`, the given certificate, and the given pg_hba.conf.

    The certificate and key are copied into the cluster's directory, owned by postgres, the key mode
    0600 (PostgreSQL refuses a key others can read). Listens on 127.0.0.1 only, like its parent.
    """

    def __init__(self, cert: CertPair, *, hba: str) -> None:
        super().__init__()
        self.cert = cert
        self.hba = hba
        self.cert_file = self.root / "server.crt"
        self.key_file = self.root / "server.key"
        self.settings.update(ssl="on", ssl_cert_file=str(self.cert_file), ssl_key_file=str(self.key_file))

    def _initdb(self) -> None:
        super()._initdb()
        shutil.copyfile(self.cert.cert, self.cert_file)
        shutil.copyfile(self.cert.key, self.key_file)
        self.key_file.chmod(0o600)
        (self.datadir / "pg_hba.conf").write_text(self.hba)
        if os.geteuid() == 0:
            for path in (self.cert_file, self.key_file, self.datadir / "pg_hba.conf"):
                shutil.chown(path, user=POSTGRES_OS_USER)

    def __repr__(self) -> str:
        return f"<TlsPostgresServer 127.0.0.1:{self.port} cert={self.cert.cert.name}>"


def pg_conninfo(
    params: PgParams,
    *,
    host: str,
    form: str,
    sslmode: str | None = None,
    sslrootcert: Path | None = None,
    password: str | None = None,
) -> str:
    """A connection string to `params`' database through `host`, in "url" or "key-value" form."""
    options = []
    if sslmode is not None:
        options.append(("sslmode", sslmode))
    if sslrootcert is not None:
        options.append(("sslrootcert", str(sslrootcert)))
    if form == "url":
        auth = quote(params.user, safe="") + (":" + quote(password, safe="") if password is not None else "")
        query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in options)
        return f"postgresql://{auth}@{host}:{params.port}/{quote(params.dbname, safe='')}" + (
            f"?{query}" if query else ""
        )
    if form == "key-value":
        parts = [("host", host), ("port", str(params.port)), ("user", params.user), ("dbname", params.dbname)]
        if password is not None:
            parts.append(("password", password))
        return " ".join(f"{k}='{v}'" for k, v in parts + options)
    raise ValueError(f"form must be 'url' or 'key-value', got {form!r}")


def product_sessions_ssl(server_params: PgParams, dbname: str) -> list[bool]:
    """pg_stat_ssl.ssl of every session the product (application_name chat_history_rs) holds on `dbname`.

    Read through a separate psycopg2 connection, so it is the server's view, not the product's.
    """
    conn = server_params.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid"
                " WHERE a.application_name = 'chat_history_rs' AND a.datname = %s",
                (dbname,),
            )
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def _start_pg(cert: CertPair, hba: str):
    if find_pg_bindir() is None:
        pytest.skip("PostgreSQL binaries not found: cannot start a TLS cluster")
    server = TlsPostgresServer(cert, hba=hba)
    try:
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


# --------------------------------------------------------------------------------------------------
# Redis with TLS
# --------------------------------------------------------------------------------------------------


class TlsRedisServer(RedisServer):
    """servers.RedisServer listening with TLS only: `--port 0 --tls-port P` (later arguments win over the
    parent's `--port P`), no client certificates, optionally `--requirepass`."""

    def __init__(self, cert: CertPair, ca_file: Path, *, password: str | None = None) -> None:
        super().__init__()
        self.ca_file = ca_file
        self.password = password
        self.extra_args = [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(cert.cert),
            "--tls-key-file", str(cert.key),
            "--tls-ca-cert-file", str(ca_file),
            "--tls-auth-clients", "no",
        ]  # fmt: skip
        if password is not None:
            self.extra_args += ["--requirepass", password]

    @property
    def url(self) -> str:
        """`rediss://localhost:P/0`, without the password."""
        return f"rediss://localhost:{self.port}/0"

    def wait_ready(self, timeout: float = 15) -> None:
        # The parent PINGs in plain text; this server only speaks TLS. The certificate may not name
        # localhost (wrong_name_redis_server), so readiness does not check the name.
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                # Nested: parenthesised context managers need Python 3.10, and the tests run on 3.9.
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:  # noqa: SIM117
                    with context.wrap_socket(raw, server_hostname="localhost") as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                            return
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.05)
        raise ServerError(f"TLS redis-server on port {self.port} not ready after {timeout}s:\n{self.log_tail()}")

    def client(self) -> redis.Redis:
        """A redis-py client over TLS that verifies the chain against the CA, not the host name (so it
        also reaches the server whose certificate names only wrong.example)."""
        return redis.Redis(
            host="localhost",
            port=self.port,
            password=self.password,
            ssl=True,
            ssl_ca_certs=str(self.ca_file),
            ssl_check_hostname=False,
            decode_responses=True,
            socket_timeout=10,
        )

    def __repr__(self) -> str:
        return f"<TlsRedisServer localhost:{self.port} tls-only>"


def _start_redis(cert: CertPair, ca_file: Path, password: str | None = None):
    try:
        server = TlsRedisServer(cert, ca_file, password=password)
    except ServerError as exc:
        pytest.skip(str(exc))
    try:
        server.start()
    except ServerError:
        server.remove()
        if not _redis_knows_tls(server.executable):
            pytest.skip("redis-server was built without TLS support (no tls-port directive)")
        raise
    return server


def _redis_knows_tls(executable: str) -> bool:
    # A build without TLS refuses the tls-* directives with "Bad directive" on stderr (servers.py sends
    # the server's stderr to /dev/null); with them and nowhere to listen, any build exits at once.
    proc = subprocess.run(
        [executable, "--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no"],
        check=False, capture_output=True, text=True, timeout=10, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    return "Bad directive" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# A Redis Cluster with TLS
# --------------------------------------------------------------------------------------------------


class TlsRedisClusterServers(RedisClusterServers):
    """cluster_support.RedisClusterServers speaking TLS only: each node has `port 0` and `tls-port P`
    (its cluster bus on P + 10000), `tls-cluster yes` and `tls-replication yes` (the nodes are TLS
    clients of each other, so `cert` must allow client authentication too: Pki.node), and announces
    127.0.0.1, a name the certificate covers. Clients need no certificate (`tls-auth-clients optional`):
    a node still presents `cert` to another. `.certs[port]`, `cert` unless changed before start(), is what
    the node on `port` presents to its clients. redis-cli and redis-py verify the chain against `ca_file`
    but not the host name (so they also reach a node whose certificate names another host); `.url` is
    `rediss://127.0.0.1:P/0` of one node.
    """

    scheme = "rediss"

    def __init__(self, cert: CertPair, ca_file: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cert = cert
        self.ca_file = ca_file
        self.certs = {port: cert for port in self.ports}
        self.cli_connection_args = ["--tls", "--cacert", str(ca_file)]
        self.client_kwargs = {"ssl": True, "ssl_ca_certs": str(ca_file), "ssl_check_hostname": False}

    def _listen_args(self, port: int) -> list[str]:
        return [
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(self.certs[port].cert),
            "--tls-key-file", str(self.certs[port].key),
            "--tls-client-cert-file", str(self.cert.cert),
            "--tls-client-key-file", str(self.cert.key),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "optional",
            "--tls-cluster", "yes",
            "--tls-replication", "yes",
            "--cluster-announce-ip", "127.0.0.1",
        ]  # fmt: skip

    def start(self) -> None:
        if not _redis_knows_tls(self.executable):
            raise TlsUnsupported("redis-server was built without TLS support (no tls-port directive)")
        super().start()


class TlsUnsupported(ServerError):
    """This redis-server cannot speak TLS."""


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki():
    if find_openssl() is None:
        pytest.skip("the openssl command is not installed: cannot make test certificates")
    made = make_pki()
    yield made
    shutil.rmtree(made.root, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_pg_server(pki):
    server = _start_pg(pki.server, HBA_TLS_ONLY)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def wrong_name_pg_server(pki):
    server = _start_pg(pki.wrong_name, HBA_TLS_OR_PLAIN)
    yield server
    server.remove()


@pytest.fixture
def tls_pg_db(tls_pg_server):
    """A fresh database on tls_pg_server (PgParams; host 127.0.0.1)."""
    params = create_database(tls_pg_server.params)
    yield params
    drop_database(tls_pg_server.params, params.dbname)


@pytest.fixture
def wrong_name_pg_db(wrong_name_pg_server):
    params = create_database(wrong_name_pg_server.params)
    yield params
    drop_database(wrong_name_pg_server.params, params.dbname)


@pytest.fixture(scope="session")
def tls_redis_server(pki):
    server = _start_redis(pki.server, pki.ca)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def tls_redis_auth_server(pki):
    server = _start_redis(pki.server, pki.ca, password=REDIS_TLS_PASSWORD)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def wrong_name_redis_server(pki):
    server = _start_redis(pki.wrong_name, pki.ca)
    yield server
    server.remove()
