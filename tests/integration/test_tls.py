"""TLS on both legs, by TiProxy's rules, against real MariaDB servers started with TLS.

Certificates come from tests/support/certs.py (a CA, server and client certificates). Every
connector verifies the proxy's certificate against the CA; `SHOW SESSION STATUS LIKE
'Ssl_cipher'` runs on the backend, so it tells whether the backend leg is TLS.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import MySQLdb
import pymysql
import pytest

from support.backends import ADMIN, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.certs import PKI, make_pki, mariadb_tls_args
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.etcd import EtcdServer
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.playground.ports import free_port
from tiproxy.protocol.auth import native_password_scramble
from tiproxy.protocol.codec import U32
from tiproxy.protocol.constants import Capability
from tiproxy.protocol.packets import (
    HandshakeResponse,
    build_handshake_response,
    frame,
    parse_auth_switch,
    parse_greeting,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_backends(mariadb_factory: MariaDBFactory, pki: PKI) -> list[MariaDBServer]:
    """Two MariaDB servers with TLS (the CA's server certificate)."""
    return [mariadb_factory((*BACKEND_ARGS, *mariadb_tls_args(pki)), BACKEND_USERS)
            for _ in range(2)]


def tls_toml(pki: PKI, *, server: bool = True, sql: bool = True, require: bool = False,
             **server_extra: str) -> str:
    """[security] with the proxy's account (KILL across backends), TLS objects as asked."""
    out = (f'\n[security]\nauth-sync-user = "{ADMIN.name}"\n'
           f'auth-sync-password = "{ADMIN.password}"\n')
    if require:
        out += "require-backend-tls = true\n"
    if server:
        out += (f'[security.server-tls]\ncert = "{pki.server.cert}"\n'
                f'key = "{pki.server.key}"\n')
        out += "".join(f"{k} = {v}\n" for k, v in server_extra.items())
    if sql:
        out += f'[security.sql-tls]\nca = "{pki.ca}"\n'
    return out


def verified(proxy: ProxyProcess, pki: PKI, **kwargs: Any) -> pymysql.Connection[Any]:
    """PyMySQL over TLS, checking the proxy's certificate and its name."""
    return proxy.connect(ssl_ca=str(pki.ca), ssl_verify_cert=True, ssl_verify_identity=True,
                         **kwargs)


def backend_cipher(cur: Any) -> str:
    cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    value = cur.fetchall()[0][1]
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def tls_proxy(tls_backends: list[MariaDBServer], pki: PKI,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(tmp_path_factory.mktemp("tls-proxy"), [b.addr for b in tls_backends],
                     tls_toml(pki)).start()
    yield p
    p.stop()


# -- connectors ---------------------------------------------------------------------------------


def test_pymysql_verifies_the_proxy_and_both_legs_are_tls(tls_proxy: ProxyProcess,
                                                          pki: PKI) -> None:
    with verified(tls_proxy, pki) as conn, conn.cursor() as cur:
        assert isinstance(conn._sock, ssl.SSLSocket)
        assert conn._sock.version() in ("TLSv1.2", "TLSv1.3")
        assert backend_cipher(cur)
        session = tls_proxy.session(conn.thread_id())
        assert (session["client_tls"], session["backend_tls"]) == (True, True)


def test_mysqlclient_verifies_the_proxy(tls_proxy: ProxyProcess, pki: PKI) -> None:
    conn = MySQLdb.connect(host="127.0.0.1", port=tls_proxy.port, user=APP.name,
                           password=APP.password, database="test",
                           ssl_mode="VERIFY_IDENTITY", ssl={"ca": str(pki.ca)})
    try:
        cur = conn.cursor()
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        assert cur.fetchall()[0][1]
        assert tls_proxy.session(conn.thread_id())["client_tls"] is True
    finally:
        conn.close()


def test_connector_python_verifies_the_proxy(tls_proxy: ProxyProcess, pki: PKI) -> None:
    conn = mysql.connector.connect(host="127.0.0.1", port=tls_proxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True,
                                   ssl_ca=str(pki.ca), ssl_verify_cert=True,
                                   ssl_verify_identity=True)
    try:
        cur = conn.cursor()
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        assert cur.fetchall()[0][1]
        assert tls_proxy.session(conn.connection_id)["client_tls"] is True
    finally:
        conn.close()


def test_mariadb_cli_verifies_the_proxy(tls_proxy: ProxyProcess, pki: PKI) -> None:
    def cli(statement: str) -> str:
        out = subprocess.run(
            ["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{tls_proxy.port}", f"-u{APP.name}",
             f"-p{APP.password}", "--ssl", f"--ssl-ca={pki.ca}", "--ssl-verify-server-cert",
             "--batch", "test", "-e", statement],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "Ssl_cipher\tTLS" in cli("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    assert "Cipher in use is" in cli("STATUS")  # the CLI's own leg, to the proxy


def test_wrong_ca_is_refused_by_the_client(tls_proxy: ProxyProcess, pki: PKI) -> None:
    with pytest.raises(pymysql.err.OperationalError, match="CERTIFICATE_VERIFY_FAILED"):
        tls_proxy.connect(ssl_ca=str(pki.other_ca), ssl_verify_cert=True)
    with verified(tls_proxy, pki) as conn:  # and the proxy goes on
        conn.ping()


# -- what runs over TLS ------------------------------------------------------------------------


def test_tls_with_compression_big_rows_local_infile_prepared_and_kill(
    tls_proxy: ProxyProcess, pki: PKI, tmp_path: Path,
) -> None:
    compressed = MySQLdb.connect(host="127.0.0.1", port=tls_proxy.port, user=APP.name,
                                 password=APP.password, database="test", compress=True,
                                 ssl_mode="VERIFY_IDENTITY", ssl={"ca": str(pki.ca)})
    try:
        cur = compressed.cursor()
        cur.execute("SELECT REPEAT('y', 17 * 1024 * 1024), %s + 1", (41,))
        big, answer = cur.fetchall()[0]
        assert (len(big), answer) == (17 * 1024 * 1024, 42)
        cur.execute("SHOW SESSION STATUS LIKE 'Compression'")
        assert cur.fetchall()[0][1] == "OFF"  # compression is the client leg's, TLS is both
        assert tls_proxy.session(compressed.thread_id())["client_tls"] is True
    finally:
        compressed.close()
    with verified(tls_proxy, pki, local_infile=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMPORARY TABLE tls_load (id INT, v VARCHAR(10))")
        data = tmp_path / "rows.tsv"
        data.write_text("".join(f"{i}\tv{i}\n" for i in range(5000)))
        cur.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE tls_load")
        cur.execute("SELECT COUNT(*), MAX(id) FROM tls_load")
        assert cur.fetchall() == ((5000, 4999),)
        assert backend_cipher(cur)
    conn2 = mysql.connector.connect(host="127.0.0.1", port=tls_proxy.port, user=APP.name,
                                    password=APP.password, database="test", use_pure=True,
                                    ssl_ca=str(pki.ca))
    try:
        cur2 = conn2.cursor(prepared=True)
        cur2.execute("SELECT ? * 2, ?", (21, "tls"))
        assert cur2.fetchall() == [(42, "tls")]
    finally:
        conn2.close()
    with verified(tls_proxy, pki) as victim, verified(tls_proxy, pki) as killer, \
            killer.cursor() as kcur:
        kcur.execute(f"KILL {victim.thread_id()}")
        with pytest.raises(pymysql.err.OperationalError):
            victim.ping(reconnect=False)


# -- TLS legs read directly (net/_direct.c drives their TLS connections) --------------------------

STEADY = 20  # plain queries in a row: more than the compiled path needs before it reads directly


def _steady(conn: Any, proxy: ProxyProcess) -> None:
    with conn.cursor() as cur:
        for i in range(STEADY):
            cur.execute("SELECT %s + 1", (i,))
            assert cur.fetchall() == ((i + 1,),)
    session = proxy.session(conn.thread_id())
    assert session["direct"] is True, session


@pytest.mark.parametrize("legs", ["both", "client", "backend"])
def test_a_steady_tls_session_is_read_directly_and_answers_right(
    legs: str, tls_backends: list[MariaDBServer], pki: PKI, proxy_factory: ProxyFactory,
) -> None:
    """Whichever legs are TLS, a steady session is read straight from its sockets, and
    everything else (a result over many reads, a statement bigger than a TLS record, an
    error, a change of state) comes back to the transports and is answered right."""
    toml = {"both": tls_toml(pki), "client": tls_toml(pki, sql=False),
            "backend": tls_toml(pki, server=False, require=True)}[legs]
    proxy = proxy_factory([tls_backends[0].addr], toml)
    conn = proxy.connect(ssl_disabled=True) if legs == "backend" else verified(proxy, pki)
    with conn:
        session = proxy.session(conn.thread_id())
        assert (session["client_tls"], session["backend_tls"]) == \
            (legs != "backend", legs != "client")
        _steady(conn, proxy)
        with conn.cursor() as cur:
            text = "".join(chr(97 + i % 26) for i in range(100_000))
            cur.execute("SELECT LENGTH(%s), RIGHT(%s, 3)", (text, text))  # many TLS records
            assert cur.fetchall() == ((100_000, text[-3:]),)
            cur.execute("SELECT seq, REPEAT('x', 100) FROM seq_1_to_20000")  # many reads
            rows = cur.fetchall()
            assert len(rows) == 20000 and rows[-1] == (20000, "x" * 100)
            with pytest.raises(pymysql.err.ProgrammingError):
                cur.execute("SELECT * FROM test.no_such_table")
            cur.execute("SET @kept = 'kept'")
        _steady(conn, proxy)
        with conn.cursor() as cur:
            cur.execute("SELECT @kept, LENGTH(%s)", (text,))
            assert cur.fetchall() == (("kept", 100_000),)
            assert bool(backend_cipher(cur)) is (legs != "client")
    proxy.wait_sessions(0)
    assert "Traceback" not in proxy.log()


def test_bytes_that_are_not_tls_end_only_that_session(tls_proxy: ProxyProcess, pki: PKI) -> None:
    """Garbage on a TLS client's socket, while its TLS is driven from the compiled side, ends
    that session with the reason logged; the others go on."""
    other = verified(tls_proxy, pki)
    victim = verified(tls_proxy, pki)
    _steady(other, tls_proxy)
    _steady(victim, tls_proxy)
    victim_id = victim.thread_id()
    raw = socket.socket(fileno=os.dup(victim._sock.fileno()))  # under the client's TLS
    try:
        raw.sendall(b"\x00" * 64)  # no TLS record starts so
        deadline = time.monotonic() + 10
        while any(s["id"] == victim_id for s in tls_proxy.sessions()):
            assert time.monotonic() < deadline, tls_proxy.session(victim_id)
            time.sleep(0.05)
    finally:
        raw.close()
    tls_proxy.wait_log(f"session {victim_id} closed: client disconnected: TLS failed on its "
                       "connection: ")
    with other.cursor() as cur:
        cur.execute("SELECT 'still here'")
        assert cur.fetchall() == (("still here",),)
    other.close()
    victim._sock.close()
    assert "Traceback" not in tls_proxy.log()


# -- TiProxy's three rules for the backend leg ---------------------------------------------------


def test_plain_client_gets_a_plain_backend_leg_unless_required(
    tls_backends: list[MariaDBServer], pki: PKI, proxy_factory: ProxyFactory,
) -> None:
    addrs = [b.addr for b in tls_backends]
    optional = proxy_factory(addrs, tls_toml(pki))
    with optional.connect(ssl_disabled=True) as conn, conn.cursor() as cur:
        assert not isinstance(conn._sock, ssl.SSLSocket)
        assert backend_cipher(cur) == ""  # the client did not use TLS: neither does the leg
    with verified(optional, pki) as conn, conn.cursor() as cur:
        assert backend_cipher(cur)
    required = proxy_factory(addrs, tls_toml(pki, server=False, require=True))
    with required.connect(ssl_disabled=True) as conn, conn.cursor() as cur:
        assert backend_cipher(cur)  # required: TLS whatever the client did
        session = required.session(conn.thread_id())
        assert (session["client_tls"], session["backend_tls"]) == (False, True)
    no_client_tls = proxy_factory(addrs, tls_toml(pki, sql=False))  # no sql-tls: plain leg
    with verified(no_client_tls, pki) as conn, conn.cursor() as cur:
        assert backend_cipher(cur) == ""


def test_require_backend_tls_refuses_clearly(
    backends: list[MariaDBServer], tls_backends: list[MariaDBServer], pki: PKI,
    proxy_factory: ProxyFactory,
) -> None:
    plain = proxy_factory([backends[0].addr], tls_toml(pki, server=False, require=True))
    with pytest.raises(pymysql.err.OperationalError) as err:
        plain.connect(ssl_disabled=True)
    assert "require-backend-tls is set, but the backend does not offer TLS" in str(err.value)
    no_sql_tls = proxy_factory([tls_backends[0].addr],
                               tls_toml(pki, server=False, sql=False, require=True))
    with pytest.raises(pymysql.err.OperationalError) as err:
        no_sql_tls.connect(ssl_disabled=True)
    assert "require-backend-tls is set, but sql-tls is not configured" in str(err.value)
    assert plain.alive and no_sql_tls.alive


def test_secure_transport_server_and_require_ssl_user(
    mariadb_factory: MariaDBFactory, pki: PKI, proxy_factory: ProxyFactory,
) -> None:
    server = mariadb_factory((*BACKEND_ARGS, *mariadb_tls_args(pki),
                              "--require-secure-transport=ON"), BACKEND_USERS)
    server.sql("CREATE USER 'sslonly'@'%' IDENTIFIED BY 'ssl-pass' REQUIRE SSL;\n"
               "GRANT ALL ON test.* TO 'sslonly'@'%';")
    proxy = proxy_factory([server.addr], tls_toml(pki, server=False, require=True))
    with proxy.connect(ssl_disabled=True) as conn, conn.cursor() as cur:
        assert backend_cipher(cur)
    conn = pymysql.connect(host="127.0.0.1", port=proxy.port, user="sslonly",
                           password="ssl-pass", database="test", ssl_disabled=True)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchall() == (("sslonly@%",),)


# -- client certificates -----------------------------------------------------------------------


def test_client_certificates_are_verified_and_cn_checked(
    tls_backends: list[MariaDBServer], pki: PKI, proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([tls_backends[0].addr], tls_toml(
        pki, sql=False, ca=f'"{pki.ca}"', **{"cert-allowed-cn": '["app-client"]'}))
    with pytest.raises(pymysql.err.OperationalError):  # no client certificate
        verified(proxy, pki)
    with pytest.raises(pymysql.err.OperationalError) as plain:  # no TLS at all: no certificate
        proxy.connect(ssl_disabled=True)
    assert plain.value.args[0] == 1045 and "requires TLS" in plain.value.args[1]
    with pytest.raises(pymysql.err.OperationalError):  # signed by a CA the proxy does not trust
        verified(proxy, pki, ssl_cert=str(pki.untrusted_client.cert),
                 ssl_key=str(pki.untrusted_client.key))
    with pytest.raises(pymysql.err.OperationalError) as err:  # trusted, but not allowed
        verified(proxy, pki, ssl_cert=str(pki.other_client.cert),
                 ssl_key=str(pki.other_client.key))
    assert err.value.args[0] == 1045
    assert "'intruder' is not in cert-allowed-cn" in err.value.args[1]
    with verified(proxy, pki, ssl_cert=str(pki.client.cert), ssl_key=str(pki.client.key)) as c:
        c.ping()
    assert "refused: client certificate CN 'intruder' is not in cert-allowed-cn" in proxy.log()


def test_auto_certs(tls_backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([tls_backends[0].addr],
                          "\n[security.server-tls]\nauto-certs = true\nrsa-key-size = 2048\n")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    with proxy.connect(ssl=ctx) as conn:
        assert isinstance(conn._sock, ssl.SSLSocket)
        cert = x509.load_der_x509_certificate(conn._sock.getpeercert(binary_form=True))
        conn.ping()
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "tiproxy" and cert.issuer == cert.subject  # generated, self-signed
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048  # rsa-key-size
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 89 <= lifetime.days <= 91  # TiProxy's 90 days, with the hour of clock skew


# -- migration -----------------------------------------------------------------------------------


def test_tls_session_moves_to_another_tls_backend(tls_backends: list[MariaDBServer],
                                                  pki: PKI,
                                                  proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in tls_backends], tls_toml(pki))
    with verified(proxy, pki) as conn, conn.cursor() as cur:
        cur.execute("SET @tls_var = 'kept', SESSION sql_mode = 'ANSI_QUOTES'")
        cur.execute("SELECT @@port")
        port_before = cur.fetchone()[0]
        _steady(conn, proxy)  # read directly as the move begins
        old = proxy.session(conn.thread_id())["backend"]
        status, body = proxy.api(f"/api/admin/backends/{old}/drain", method="POST", body=b"")
        assert status == 200, body
        proxy.wait_moved(conn.thread_id(), old)
        cur.execute("SELECT @tls_var, @@sql_mode, @@port")
        var, mode, port_after = cur.fetchone()
        assert (var, mode) == ("kept", "ANSI_QUOTES")
        assert port_after != port_before
        assert backend_cipher(cur)
        assert proxy.session(conn.thread_id())["backend_tls"] is True
        _steady(conn, proxy)  # and again on the new backend's TLS connection


def test_tls_session_never_moves_to_a_backend_without_tls(
    tls_backends: list[MariaDBServer], backends: list[MariaDBServer], pki: PKI,
    proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([tls_backends[0].addr], tls_toml(pki))
    with verified(proxy, pki) as conn, conn.cursor() as cur:
        status, _ = proxy.api("/api/admin/config", method="PUT", body=(
            f'[proxy]\nbackend-addrs = ["{tls_backends[0].addr}", "{backends[0].addr}"]\n'
        ).encode())
        assert status == 200
        proxy.redirect()  # the first try may find out that the plain backend offers no TLS
        deadline = time.monotonic() + 15
        while "no backend to move to" not in proxy.session(conn.thread_id())["waiting"]:
            assert time.monotonic() < deadline, proxy.session(conn.thread_id())
            time.sleep(0.05)
        assert proxy.session(conn.thread_id())["backend"] == tls_backends[0].addr
        assert backend_cipher(cur)


# -- bytes of the TLS handshake in the same read as the SSLRequest -------------------------------


def test_client_hello_in_the_same_segment_as_the_ssl_request(tls_proxy: ProxyProcess,
                                                             pki: PKI) -> None:
    """The TLS handshake's first bytes may arrive with the SSLRequest; they must go to TLS.
    The second login follows the first at once, so the proxy greets it with its backend's salt:
    it needs no auth switch."""
    _raw_tls_login(tls_proxy.port, pki)
    assert _raw_tls_login(tls_proxy.port, pki) == [3]


def _raw_tls_login(port: int, pki: PKI) -> list[int]:
    """Log in with a hand-made client whose ClientHello shares a segment with its SSLRequest;
    the sequence ids of the backend's answers."""
    seqs = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        greeting = _read_packet(sock)[1]
        assert greeting[0] == 10
        caps = (Capability.PROTOCOL_41 | Capability.SSL | Capability.SECURE_CONNECTION
                | Capability.PLUGIN_AUTH | Capability.LONG_PASSWORD)
        request = HandshakeResponse(capabilities=caps, max_packet=1 << 24, charset=45,
                                    user=b"", auth_data=b"", ssl_request_only=True)
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(frame(build_handshake_response(request), 1) + outgoing.read())
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                chunk = sock.recv(65536)
                assert chunk, "the proxy closed the connection during the handshake"
                incoming.write(chunk)
        if outgoing.pending:
            sock.sendall(outgoing.read())
        salt = parse_greeting(greeting).salt
        response = HandshakeResponse(
            capabilities=caps, max_packet=1 << 24, charset=45, user=APP.name.encode(),
            auth_data=native_password_scramble(APP.password.encode(), salt),
            auth_plugin="mysql_native_password", database=b"test")
        seq, answer = _tls_exchange(sock, tls, incoming, outgoing,
                                    frame(build_handshake_response(response), 2))
        # Over TLS, numbered 3: OK where the proxy greeted with the backend's own salt, else the
        # backend's auth switch, answered in turn.
        seqs.append(seq)
        if answer[:1] == b"\xfe":
            switch = parse_auth_switch(answer)
            scramble = native_password_scramble(APP.password.encode(), switch.data[:20])
            seq, answer = _tls_exchange(sock, tls, incoming, outgoing, frame(scramble, 4))
            seqs.append(seq)
        assert answer[:1] == b"\x00", answer[:40]
    assert seqs in ([3], [3, 5])
    return seqs


def _tls_exchange(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                  outgoing: ssl.MemoryBIO, packet: bytes) -> tuple[int, bytes]:
    """Send one packet over the TLS object, read one back: (sequence id, payload)."""
    tls.write(packet)
    sock.sendall(outgoing.read())
    data = b""
    while len(data) < 4 or len(data) < 4 + (U32.unpack_from(data, 0)[0] & 0xFFFFFF):
        try:
            data += tls.read(65536)
        except ssl.SSLWantReadError:
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed the connection after the handshake"
            incoming.write(chunk)
    return data[3], data[4 : 4 + (U32.unpack_from(data, 0)[0] & 0xFFFFFF)]


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    header = _recv_exactly(sock, 4)
    length = U32.unpack_from(header, 0)[0] & 0xFFFFFF
    return header[3], _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk
        data += chunk
    return data


# -- certificate files ---------------------------------------------------------------------------


def test_corrupt_certificate_refuses_the_start(tls_backends: list[MariaDBServer], pki: PKI,
                                                tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[proxy]\naddr = "127.0.0.1:{free_port()}"\nbackend-addrs = ["{tls_backends[0].addr}"]\n'
        f'[api]\naddr = "127.0.0.1:{free_port()}"\n'
        f'[security.server-tls]\ncert = "{bad}"\nkey = "{pki.server.key}"\n')
    out = subprocess.run([sys.executable, "-m", "tiproxy", "--config", str(config)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2, out.stderr
    assert "security.server-tls" in out.stderr
    assert str(bad) in out.stderr


def _served_serial(proxy: ProxyProcess, pki: PKI) -> int:
    from cryptography import x509  # noqa: PLC0415

    with verified(proxy, pki) as conn:
        der = conn._sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_rotated_certificate_is_served_and_a_bad_one_is_not(
    tls_backends: list[MariaDBServer], pki: PKI, proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    first = pki.issue_server(tmp_path, "first")
    proxy = proxy_factory([tls_backends[0].addr], (
        f'\n[security.server-tls]\ncert = "{first.cert}"\nkey = "{first.key}"\n'))
    from cryptography import x509  # noqa: PLC0415

    serial = x509.load_pem_x509_certificate(first.cert.read_bytes()).serial_number
    assert _served_serial(proxy, pki) == serial
    live = verified(proxy, pki)
    second = pki.issue_server(tmp_path, "second")
    # Key first, then certificate, each by rename, as certificate managers do.
    (tmp_path / "first-key.new").write_bytes(second.key.read_bytes())
    (tmp_path / "first.new").write_bytes(second.cert.read_bytes())
    (tmp_path / "first-key.new").rename(first.key)
    (tmp_path / "first.new").rename(first.cert)
    new_serial = x509.load_pem_x509_certificate(first.cert.read_bytes()).serial_number
    deadline = time.monotonic() + 2.5
    while _served_serial(proxy, pki) != new_serial:
        assert time.monotonic() < deadline, proxy.log()[-2000:]
        time.sleep(0.1)
    live.ping()  # the session from before goes on
    first.cert.write_text("garbage\n")
    deadline = time.monotonic() + 5
    while "not reloaded" not in proxy.log():
        assert time.monotonic() < deadline, proxy.log()[-2000:]
        time.sleep(0.1)
    assert _served_serial(proxy, pki) == new_serial  # the last good one stays
    status, metrics = proxy.api("/metrics")
    assert status == 200
    assert 'tiproxy_server_err{type="load_cert"} 1.0' in metrics.decode()
    live.close()


# -- cluster-tls: etcd over HTTPS ---------------------------------------------------------------


def test_cluster_tls_discovers_backends_from_etcd_over_https(
    tls_backends: list[MariaDBServer], pki: PKI, proxy_factory: ProxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd-tls"),
                      tls=(pki.server.cert, pki.server.key, pki.ca)).start()
    try:
        assert etcd.url.startswith("https://")
        backend = tls_backends[0]
        etcd.register_tidb(backend.addr, {"ip": "127.0.0.1", "status_port": 0}, ttl_seconds=10)
        proxy = proxy_factory([], f'pd-addrs = ["{etcd.endpoint}"]\n'
                              f'\n[security.cluster-tls]\nca = "{pki.ca}"\n')
        deadline = time.monotonic() + 10
        while not any(b["addr"] == backend.addr and "etcd" in b["sources"]
                      for b in proxy.backends()):
            assert time.monotonic() < deadline, (proxy.backends(), proxy.log()[-2000:])
            time.sleep(0.1)
        with proxy.connect(ssl_disabled=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT @@port")
            assert cur.fetchone()[0] == backend.port
        # The proxy registers itself in that etcd over HTTPS too.
        info = f"/topology/tiproxy/127.0.0.1:{proxy.port}/info"
        while "kvs" not in etcd.call("kv/range", {"key": base64.b64encode(info.encode()).decode()}):
            assert time.monotonic() < deadline + 10, proxy.log()[-2000:]
            time.sleep(0.1)
    finally:
        etcd.close()


# -- server-http-tls: the API over HTTPS, health also in plain HTTP -----------------------------


def _https(url: str, ctx: ssl.SSLContext | None, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=b"" if method != "GET" else None, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_api_over_https_with_client_certificates(tls_backends: list[MariaDBServer], pki: PKI,
                                                 proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([tls_backends[0].addr], (
        f'\n[security.server-http-tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\n'
        f'ca = "{pki.ca}"\ncert-allowed-cn = ["app-client"]\n'))
    plain = f"http://127.0.0.1:{proxy.api_port}"
    secure = f"https://127.0.0.1:{proxy.api_port}"
    assert _https(f"{plain}/api/debug/health", None)[0] == 200  # load balancers' probe
    status, body = _https(f"{plain}/api/admin/backends", None)
    assert status == 400 and b"HTTPS" in body
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no client certificate
        _https(f"{secure}/api/admin/backends", ctx)
    intruder = ssl.create_default_context(cafile=str(pki.ca))
    intruder.load_cert_chain(pki.other_client.cert, pki.other_client.key)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # CN not allowed
        _https(f"{secure}/api/admin/backends", intruder)
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    status, body = _https(f"{secure}/api/admin/backends", ctx)
    assert status == 200 and tls_backends[0].addr.encode() in body
    assert _https(f"{secure}/api/debug/redirect", ctx, method="POST")[0] == 200
    out = subprocess.run(
        [sys.executable, "-m", "tiproxy.cli.ctl", "--addr", f"127.0.0.1:{proxy.api_port}",
         "--ca", str(pki.ca), "--cert", str(pki.client.cert), "--key", str(pki.client.key),
         "backends"], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert tls_backends[0].addr in out.stdout
    assert "refused: client certificate CN 'intruder'" in proxy.log()
