"""The traffic routes and tools as their users meet them: bad requests refused with the reason,
tiproxyctl's traffic commands, no secret in a capture, a writer that falls behind, the metrics,
and the HTML report in a real browser."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from support.backends import ADMIN, ADMIN_TOML, APP
from support.proxy import ProxyFactory, ProxyProcess
from support.tidb_backend import PASSWORD as TIDB_PASSWORD
from support.tidb_backend import USER as TIDB_USER
from support.tidb_backend import ScriptedTiDB, SigningKey
from support.traffic import capture, form, jobs, stop_capture, tiproxy_read, wait_job
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.traffic.store import PARTIAL

pytestmark = pytest.mark.integration

SECRET = "S3cr3t-pw-8c1d"


@pytest.fixture
def proxy(backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory([backends[0].addr])


def test_bad_requests_are_refused_with_the_reason_and_harm_nothing(
        proxy: ProxyProcess, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "meta").write_text("{}")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / PARTIAL)
    refused = [
        ({"duration": "1m"}, "output is required"),
        ({"output": str(tmp_path / "a")}, "duration is required"),
        ({"output": str(tmp_path / "a"), "duration": "soon"}, "duration:"),
        ({"output": str(tmp_path / "file"), "duration": "1m"}, "not a directory"),
        ({"output": str(tmp_path / "done"), "duration": "1m"}, "meta already exists"),
        ({"output": str(tmp_path / "a"), "duration": "1m", "encrypt-method": "aes256-ctr"},
         "encryption-key-path is not set"),
        ({"output": str(tmp_path / "a"), "duration": "1m", "encrypt-method": "rot13"},
         "unsupported encrypt method"),
        ({"output": str(tmp_path / "a"), "duration": "1m", "start-time": "2999-01-01T00:00:00Z"},
         "start time should not be in the future"),
        ({"output": "s3://bucket/dir", "duration": "1m"}, "only a local directory"),
        ({"output": str(tmp_path / "fifo"), "duration": "1m"}, "not a regular file"),
    ]
    for fields, reason in refused:
        status, text = form(proxy, "/api/traffic/capture", **fields)
        assert status == 400 and reason in text, (fields, text)
    for fields, reason in [
        ({"input": str(tmp_path), "password": "x"}, "username is required"),
        ({"input": str(tmp_path), "username": "u", "speed": "20"}, "speed should be between"),
        ({"input": str(tmp_path / "none"), "username": "u"}, "input"),
        ({"input": str(tmp_path), "username": "u", "addr": "10.0.0.1:4000"}, "not allowed"),
        ({"input": str(tmp_path), "username": "u", "cmdstarttime": "noon"}, "RFC 3339"),
    ]:
        status, text = form(proxy, "/api/traffic/replay", **fields)
        assert status == 400 and reason in text, (fields, text)
    assert form(proxy, "/api/traffic/cancel") == (200, "no job running")
    capture(proxy, tmp_path / "cap")
    status, text = form(proxy, "/api/traffic/capture", output=str(tmp_path / "b"), duration="1m")
    assert status == 409 and text.startswith("a job is running: ")
    assert form(proxy, "/api/traffic/cancel", type="replay") == (
        200, "no privilege to stop the job")
    with proxy.connect() as conn, conn.cursor() as cur:  # the data path never noticed
        cur.execute("SELECT 1")
        assert cur.fetchall() == ((1,),)
    assert stop_capture(proxy)["status"] == "canceled"
    assert [j["type"] for j in jobs(proxy)] == ["capture"]


def test_a_capture_ends_by_itself_when_its_duration_is_over(proxy: ProxyProcess,
                                                             tmp_path: Path) -> None:
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")  # the proxy serves (its workers have started)
        capture(proxy, tmp_path / "cap", duration="1s", compress="false")
        cur.execute("SELECT 2")
    job = wait_job(proxy)
    assert (job["status"], job["progress"], job.get("error")) == ("done", "100%", None)
    meta = json.loads((tmp_path / "cap" / "meta").read_text())
    assert meta["Version"] == "v1" and meta["Cmds"] == job["captured_cmds"] >= 1
    assert 0.9e9 < meta["Duration"] < 60e9


def test_traffic_routes_can_be_turned_off(proxy: ProxyProcess, tmp_path: Path) -> None:
    status, body = proxy.api("/api/admin/config", "PUT", b"enable-traffic-replay = false\n")
    assert status == 200, body
    assert form(proxy, "/api/traffic/capture", output=str(tmp_path), duration="1m") == (
        400, "traffic capture is disabled")
    assert proxy.api("/api/traffic/show") == (400, b"traffic show is disabled")
    assert proxy.api("/api/admin/config", "PUT", b"enable-traffic-replay = true\n")[0] == 200
    assert proxy.api("/api/traffic/show") == (200, b"[]")


def _ctl(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tiproxy.cli.ctl", "--addr",
                           f"127.0.0.1:{proxy.api_port}", "traffic", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_tiproxyctl_traffic_commands(proxy: ProxyProcess, tmp_path: Path) -> None:
    started = _ctl(proxy, "capture", "--output", str(tmp_path / "cap"), "--duration", "10m",
                   "--compress", "false")
    assert (started.returncode, started.stdout.strip()) == (0, "capture started"), started.stderr
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 'via ctl'")
    proxy.wait_sessions(0)
    shown = _ctl(proxy, "show")
    assert json.loads(shown.stdout)[0]["status"] == "running"
    assert _ctl(proxy, "cancel").stdout.startswith("stopped: ")
    assert wait_job(proxy)["captured_cmds"] >= 4
    again = _ctl(proxy, "capture", "--output", str(tmp_path / "cap"), "--duration", "1m")
    assert again.returncode == 1 and "meta already exists" in again.stderr
    replayed = _ctl(proxy, "replay", "--input", str(tmp_path / "cap"), "--username", APP.name,
                    "--password", APP.password, "--speed", "10", "--read-only")
    assert replayed.stdout.strip() == "replay started", replayed.stderr
    job = wait_job(proxy)
    assert (job["type"], job["status"], job["readonly"], job["differences"]) == (
        "replay", "done", True, 0)
    assert APP.password not in _ctl(proxy, "show").stdout


def test_no_secret_reaches_a_capture(backends: list[MariaDBServer],
                                     proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    proxy = proxy_factory([backends[0].addr], ADMIN_TOML)
    out = tmp_path / "cap"
    capture(proxy, out)
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True,
                                   autocommit=True)
    cur = conn.cursor()
    for statement in (f"CREATE USER traffic_u IDENTIFIED BY '{SECRET}'",
                      f"ALTER USER traffic_u IDENTIFIED BY '{SECRET}x'",
                      f"SET PASSWORD FOR traffic_u = PASSWORD('{SECRET}y')",
                      f"GRANT SELECT ON test.* TO traffic_u IDENTIFIED BY '{SECRET}z'",
                      "DROP USER traffic_u"):
        with contextlib.suppress(mysql.connector.Error):  # GRANT: app has no GRANT OPTION
            cur.execute(statement)
    ps = conn.cursor(prepared=True)
    ps.execute(f"CREATE USER IF NOT EXISTS traffic_p IDENTIFIED BY '{SECRET}'")
    ps.execute("DROP USER traffic_p")
    conn.cmd_change_user(username=APP.name, password=APP.password, database="mysql")
    cur = conn.cursor()
    cur.execute("SELECT DATABASE()")
    assert cur.fetchall() == [("mysql",)]
    conn.close()
    proxy.wait_sessions(0)
    job = stop_capture(proxy)
    assert job["filtered_cmds"] >= 5
    data = b"".join(gzip.decompress((out / n).read_bytes()) for n in job["files"])
    for secret in (SECRET, APP.password, ADMIN.password):
        assert secret.encode() not in data
        assert secret not in proxy.log()
    types = [c["Cmd_type"] for c in tiproxy_read(out)]
    assert "ChangeUser" not in types
    i = types.index("ResetConnect")
    assert types[i + 1] == "InitDB"
    assert [c["Payload"] for c in tiproxy_read(out)][i + 1] == b"mysql"


def test_a_writer_that_falls_behind_drops_commands_and_never_blocks_the_clients(
        proxy: ProxyProcess, tmp_path: Path) -> None:
    out = tmp_path / "cap"
    capture(proxy, out, compress="false")
    # A disk that does not answer: the writer's first file (opened once its reorder window has
    # passed) is a FIFO, so opening it blocks until someone reads it. (One that is there when
    # the capture starts is refused.)
    os.mkfifo(out / PARTIAL)
    sent = 0
    big = "x" * 900_000
    with proxy.connect() as conn, conn.cursor() as cur:
        # 900 KB statements, until the writer's queue is full (the writer blocks once it first
        # writes, after its reorder window) and the capture drops what has no room
        while _dropped(proxy) == 0:
            for _ in range(10):
                cur.execute("SELECT LENGTH(%s), %s", (big, sent))
                assert cur.fetchall()[0] == (900_000, sent)
                sent += 1
            assert sent < 2000
    drained: list[bytes] = []
    reader = threading.Thread(target=lambda: drained.append((out / PARTIAL).read_bytes()))
    reader.start()
    job = stop_capture(proxy)
    reader.join(60)
    assert job["dropped_cmds"] > 0 and job["captured_cmds"] > 0
    assert job["captured_cmds"] + job["dropped_cmds"] >= sent
    assert json.loads((out / "meta").read_text())["DroppedCmds"] == job["dropped_cmds"]


def _dropped(proxy: ProxyProcess) -> int:
    _, body = proxy.api("/metrics")
    found = re.search(rb'tiproxy_traffic_capture_cmds_total\{type="dropped"\} (\d+)', body)
    assert found is not None, body
    return int(found.group(1))


def test_the_html_report_shows_statements_as_text_in_a_browser(
        proxy: ProxyProcess, backends: list[MariaDBServer], tmp_path: Path) -> None:
    hostile = "SELECT '<script>document.title=\"pwned\"</script><img src=x onerror=alert(1)>' AS x"
    capture(proxy, tmp_path / "cap")
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute(hostile)
    proxy.wait_sessions(0)
    stop_capture(proxy)
    assert form(proxy, "/api/traffic/replay", input=str(tmp_path / "cap"),
                username=APP.name, password=APP.password)[0] == 200
    assert wait_job(proxy)["status"] == "done"
    page = tmp_path / "cap" / "report.html"
    dom = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "<title>Traffic replay report</title>" in dom  # no script ran
    assert "<script" not in dom and "<img" not in dom
    assert "&lt;script&gt;document.title=\"pwned\"&lt;/script&gt;&lt;img" in dom
    assert re.search(r"<h2 id=\"fails_now\">Fails now</h2><p class=\"none\">None.</p>", dom)
    status, body = proxy.api("/api/traffic/report?format=html")
    assert status == 200 and body.decode() == page.read_text()


def test_a_tidb_session_is_rebuilt_with_session_states_as_tiproxy_writes_them(
        proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    key = SigningKey()
    with ScriptedTiDB("tidb-0", key) as source, ScriptedTiDB("tidb-1", key) as target:
        proxy = proxy_factory([source.addr])
        conn = pymysql.connect(host="127.0.0.1", port=proxy.port, user=TIDB_USER,
                               password=TIDB_PASSWORD, database="test", autocommit=True)
        with conn.cursor() as cur:
            cur.execute("SET @greeting = 'it''s'")  # made before the capture
            capture(proxy, tmp_path / "cap")
            cur.execute("SELECT @greeting")
            assert cur.fetchall() == (("it's",),)
        conn.close()
        proxy.wait_sessions(0)
        stop_capture(proxy)
        commands = tiproxy_read(tmp_path / "cap")
        assert commands[0]["Payload"].startswith(b"SET SESSION_STATES '")
        assert b'greeting' in commands[0]["Payload"]
        assert commands[1]["Payload"] == b"SELECT @greeting"
        result = subprocess.run(
            [sys.executable, "-m", "tiproxy.cli.replayer", "--addr", target.addr, "--input",
             str(tmp_path / "cap"), "--username", TIDB_USER, "--password", TIDB_PASSWORD],
            capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        rep = json.loads((tmp_path / "cap" / "report.json").read_text())
        assert rep["summary"]["replayed"] == 2 and rep["summary"].get("differences", 0) == 0
    assert not source.errors + target.errors, source.errors + target.errors
