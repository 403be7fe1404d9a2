"""No secret leaves the process: a whole session of logins, failures, reloads and every API
route, then every log line, every API answer and the metrics are searched for the secrets."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pymysql
import pytest

from support.backends import ADMIN, APP, EDU
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

TOKEN = "tok-7b1f0c2e9a4d4c1fb0e5"
WRONG_PASSWORD = "wrong-pw-5c0ffee"
PUT_PASSWORD = "put-pw-d15ea5e"


def _secrets() -> list[str]:
    out = [APP.password, ADMIN.password, EDU.password, TOKEN, WRONG_PASSWORD, PUT_PASSWORD]
    for pw in (APP.password, ADMIN.password):
        stage1 = hashlib.sha1(pw.encode()).digest()
        stage2 = hashlib.sha1(stage1).digest()
        out += [stage1.hex(), stage1.hex().upper(), stage2.hex().upper(), stage2.hex()]
    return out


def _answers(proxy: ProxyProcess) -> list[bytes]:
    routes = ["/api/debug/health", "/api/admin/config", "/api/admin/config?format=json",
              "/api/admin/backends", "/api/admin/sessions", "/metrics", "/api/metrics"]
    return [proxy.api(route)[1] for route in routes]


def test_no_secret_in_logs_answers_or_metrics(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proxy = proxy_factory(
        [b.addr for b in backends],
        f'\n[security]\nauth-sync-user = "{ADMIN.name}"\n'
        f'auth-sync-password = "{ADMIN.password}"\n',
        api_token_file=token_file, api_token=TOKEN)  # every API call carries the token
    seen: list[bytes] = []
    with proxy.connect() as conn, conn.cursor() as cur:  # a login that can move
        cur.execute("SET @v = 1")
        with pytest.raises(pymysql.err.OperationalError):  # a wrong password
            pymysql.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                            password=WRONG_PASSWORD, database="test")
        with proxy.connect(EDU) as edu:  # ed25519: no reusable credential, a failed move
            proxy.redirect()
            deadline = time.monotonic() + 10
            while not proxy.session(conn.thread_id())["moves"]:
                assert time.monotonic() < deadline, proxy.sessions()
                time.sleep(0.05)
            edu.ping()
        cur.execute("SELECT @v")
        assert cur.fetchone() == (1,)
        # Bad config PUTs that carry a password: refused, and the refusal must not echo it.
        for body in (f'[security]\nauth-sync-password = "{PUT_PASSWORD}"\n'
                     "[proxy]\nmax-connections = -1\n",
                     f'[security]\nauth-sync-password = {{ x = "{PUT_PASSWORD}" }}\n',
                     f'[security]\nauth-sync-passwd = "{PUT_PASSWORD}"\n'):
            status, answer = proxy.api("/api/admin/config", method="PUT", body=body.encode())
            assert status == 400, answer
            seen.append(answer)
        seen += _answers(proxy)
        assert proxy.proc is not None
        os.kill(proxy.proc.pid, signal.SIGHUP)  # a reload of the same file
        deadline = time.monotonic() + 5
        while "reload" not in proxy.log():
            assert time.monotonic() < deadline, proxy.log()[-2000:]
            time.sleep(0.05)
        seen += _answers(proxy)
    proxy.stop()
    texts = [proxy.log().encode(), *seen]
    for secret in _secrets():
        for text in texts:
            assert secret.encode() not in text, f"a secret leaked: {text[:200]!r}"
    assert b"auth-sync-password" in b"".join(seen)  # the config was there, redacted
