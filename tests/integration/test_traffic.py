"""Traffic capture and replay end to end: a mixed workload captured through the proxy, replayed
against fresh copies of its database (no differences) and against a changed schema (the report
names the statements it changes); captures in TiProxy's format read and replayed both ways;
encrypted and compressed captures; a capture across worker processes."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mysql.connector
import pymysql
import pytest

from support.backends import APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory, connect
from support.proxy import ProxyFactory, ProxyProcess
from support.traffic import (
    capture,
    differing,
    form,
    replayer,
    report,
    stop_capture,
    tiproxy_read,
    tiproxy_write,
    wait_job,
)
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE DATABASE shop;
CREATE TABLE shop.items (id INT PRIMARY KEY, k INT, qty INT, price DECIMAL(10,2),
                         note VARCHAR(40), KEY k (k));
CREATE TABLE shop.orders (id INT PRIMARY KEY, item INT, n INT);
INSERT INTO shop.items SELECT seq, seq % 40, seq * 3, seq / 4, CONCAT('item ', seq)
  FROM test.seq_1_to_400;
"""
CHANGED = "ALTER TABLE shop.items DROP KEY k, MODIFY qty BIGINT;"
HOSTILE = "SELECT '<script>document.title=\"pwned\"</script></pre>' AS x FROM missing_t"


@pytest.fixture(scope="module")
def servers(mariadb_factory: MariaDBFactory) -> dict[str, MariaDBServer]:
    """prod (behind the proxy), two fresh copies of it, one copy with a changed schema."""
    out = {}
    for name in ("prod", "copy", "copy2", "changed"):
        server = mariadb_factory(BACKEND_ARGS, BACKEND_USERS)
        server.sql(SCHEMA + (CHANGED if name == "changed" else ""))
        out[name] = server
    return out


def connector(proxy: ProxyProcess, **kwargs: Any) -> Any:
    return mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, database="shop", use_pure=True,
                                   **kwargs)


def workload(proxy: ProxyProcess, output: Path) -> dict[str, Any]:
    """Several sessions, text and prepared statements, transactions; one session open before
    the capture with a database, variables and a prepared statement. What a session writes no
    other reads, and the phases are apart in time: a replay's order gives the same results."""
    old = connector(proxy, autocommit=True)  # else in a transaction: captured after it
    old_ps = old.cursor(prepared=True)
    old_ps.execute("SELECT note, price FROM items WHERE id = ?", (7,))
    old_ps.fetchall()
    plain = old.cursor()
    plain.execute("SET @bonus = 3, SESSION div_precision_increment = 7")
    capture(proxy, output)
    # 1. the session from before: its prepared statement, its variables
    old_ps.execute("SELECT note, price FROM items WHERE id = ?", (8,))
    assert old_ps.fetchall() == [("item 8", pytest.approx(2))]
    plain.execute("SELECT qty / 7 + @bonus FROM items WHERE id = 5")
    assert str(plain.fetchall()[0][0]) == "5.1428571"
    time.sleep(0.2)
    # 2. prepared statements of a new session (one by the index on k), closed at the end
    new = connector(proxy)
    ps = new.cursor(prepared=True)
    for k in (3, 17):
        ps.execute("SELECT id, note FROM items WHERE k = ? ORDER BY id", (k,))
        assert len(ps.fetchall()) == 10
    ps.execute("SELECT qty FROM items WHERE id = ?", (12,))
    assert ps.fetchall() == [(36,)]
    ps.close()
    new.close()
    time.sleep(0.2)
    # 3. transactions: one committed, one rolled back
    with proxy.connect(database="shop") as conn, conn.cursor() as cur:
        conn.begin()
        cur.execute("INSERT INTO orders VALUES (1, 9, 2)")
        cur.execute("UPDATE items SET qty = qty - 2 WHERE id = 9")
        conn.commit()
        conn.begin()
        cur.execute("INSERT INTO orders VALUES (2, 6, 1)")
        conn.rollback()
        cur.execute("SELECT COUNT(*), SUM(n) FROM orders")
        assert cur.fetchall() == ((1, 2),)
    time.sleep(0.2)
    # 4. another database, USE, a statement that fails, several statements in one query
    with proxy.connect(database="test",
                       client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS) as conn, \
            conn.cursor() as cur:
        cur.execute("USE shop")
        cur.execute("SELECT price FROM items WHERE id BETWEEN 10 AND 14 ORDER BY id")
        assert len(cur.fetchall()) == 5
        with pytest.raises(pymysql.err.ProgrammingError):
            cur.execute(HOSTILE)
        cur.execute("SELECT 1; SELECT note FROM items WHERE id = 3")
        while cur.nextset():
            pass
    old.close()
    proxy.wait_sessions(0)
    job = stop_capture(proxy)
    assert job["status"] == "canceled" and job["error"] == "manually stopped"
    return job


@pytest.fixture(scope="module")
def captured(servers: dict[str, MariaDBServer], tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[tuple[Path, dict[str, Any]]]:
    workdir = tmp_path_factory.mktemp("traffic")
    proxy = ProxyProcess(workdir, [servers["prod"].addr]).start()
    try:
        job = workload(proxy, workdir / "capture")
        yield workdir / "capture", job
    finally:
        proxy.stop()


def test_a_capture_replays_against_a_fresh_copy_without_differences(
        captured: tuple[Path, dict[str, Any]], servers: dict[str, MariaDBServer],
        tmp_path: Path) -> None:
    directory, job = captured
    assert job["captured_cmds"] > 30 and job["dropped_cmds"] == 0
    result = replayer("--addr", servers["copy"].addr, "--input", str(directory), "--username",
                      APP.name, "--password", APP.password, "--report-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rep = report(tmp_path)
    assert rep["summary"].get("differences", 0) == 0, rep["statements"]
    assert rep["summary"]["replayed"] >= job["captured_cmds"] - 10  # all but the quits
    assert rep["other_errors"] == []
    texts = [s["sample"] for s in rep["statements"]]
    assert "SELECT id, note FROM items WHERE k = ? ORDER BY id" in texts
    with connect(servers["copy"], database="shop") as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM orders")
        assert cur.fetchall() == ((1,),)  # the committed one; the rolled back one is not


def test_a_replay_through_the_api_goes_through_the_proxys_backends(
        captured: tuple[Path, dict[str, Any]], servers: dict[str, MariaDBServer],
        proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    directory, _job = captured
    proxy = proxy_factory([servers["copy2"].addr])
    status, text = form(proxy, "/api/traffic/replay", input=str(directory),
                        username=APP.name, password=APP.password, report_dir=str(tmp_path))
    assert (status, text) == (200, "replay started"), text
    done = wait_job(proxy)
    assert done["status"] == "done" and done["progress"] == "100%", done
    assert done["differences"] == 0 and done["replayed_cmds"] > 30
    assert APP.password not in str(done)
    assert sorted(Path(p).name for p in done["report"]) == ["report.html", "report.json"]
    status, body = proxy.api("/api/traffic/report")
    assert status == 200 and json.loads(body) == report(tmp_path)


def test_a_changed_schema_is_named_in_the_report(
        captured: tuple[Path, dict[str, Any]], servers: dict[str, MariaDBServer],
        tmp_path: Path) -> None:
    directory, _ = captured
    result = replayer("--addr", servers["changed"].addr, "--input", str(directory),
                      "--username", APP.name, "--password", APP.password, "--report-dir",
                      str(tmp_path), "--speed", "10")
    assert result.returncode == 0, result.stderr
    rep = report(tmp_path)
    # The dropped index: the statement that used it now scans without one.
    assert differing(rep, "index_lost") == ["SELECT id, note FROM items WHERE k = ? ORDER BY id"]
    # qty is BIGINT now: the statements that return it return another column type.
    assert differing(rep, "results_differ") == ["SELECT qty FROM items WHERE id = ?"]
    assert differing(rep, "fails_now") == []
    assert rep["summary"]["index_lost_statements"] == 1


def test_our_capture_reads_by_tiproxys_rules(captured: tuple[Path, dict[str, Any]]) -> None:
    directory, job = captured
    commands = tiproxy_read(directory)
    assert len(commands) == job["captured_cmds"]
    by_conn: dict[str, list[dict[str, Any]]] = {}
    for c in commands:
        by_conn.setdefault(c["Conn_ID"], []).append(c)
    old = next(cs for cs in by_conn.values() if b"div_precision_increment" in cs[1]["Payload"])
    # The session from before the capture starts with what rebuilds it.
    assert old[0]["Payload"] == b"shop"
    assert b"div_precision_increment = 7" in old[1]["Payload"] and b"@`bonus` = 3" in \
        old[1]["Payload"]
    prepare = old[2]
    assert (prepare["Cmd_type"], prepare["Payload"]) == (
        "StmtPrepare", b"SELECT note, price FROM items WHERE id = ?")
    execute = next(c for c in old[3:] if c["Cmd_type"] == "StmtExecute")
    assert execute["Captured_ps_id"] == prepare["Captured_ps_id"]
    assert execute["Prepared_stmt"] == '"SELECT note, price FROM items WHERE id = ?"'
    assert old[-1]["Cmd_type"] == "Quit"
    failed = [c for c in commands if c["Payload"] == HOSTILE.encode()]
    assert failed[0]["Success"] == "false" and failed[0]["Error_code"] == "1146"
    times = [c["Time"] for c in commands]
    assert times == sorted(times)


def test_a_capture_written_by_tiproxys_rules_replays(servers: dict[str, MariaDBServer],
                                                      tmp_path: Path) -> None:
    insert = b"INSERT INTO tp_t VALUES (?, ?)"
    execute = struct.pack("<IBI", 1, 0, 1) + b"\x00" + b"\x01" + b"\x03\x00\xfd\x00" \
        + struct.pack("<i", 42) + b"\x05fifty"
    tiproxy_write(tmp_path / "cap", [
        [(11, "InitDB", b"test", {}),
         (11, "Query", b"CREATE TABLE tp_t (id INT PRIMARY KEY, v VARCHAR(10))", {}),
         (12, "Query", b"SELECT * FROM no_such_t", {"Success": "false"}),
         (11, "StmtPrepare", insert, {"Captured_ps_id": "1"})],
        [(11, "StmtExecute", execute,
          {"Captured_ps_id": "1", "Prepared_stmt": '"INSERT INTO tp_t VALUES (?, ?)"'}),
         (11, "StmtClose", struct.pack("<I", 1), {"Captured_ps_id": "1"}),
         (12, "Quit", b"", {}), (11, "Quit", b"", {})],
    ])
    result = replayer("--addr", servers["copy"].addr, "--input", str(tmp_path / "cap"),
                      "--username", APP.name, "--password", APP.password, "--speed", "10")
    assert result.returncode == 0, result.stderr
    rep = report(tmp_path / "cap")
    assert rep["summary"]["replayed"] == 6 and rep["summary"].get("differences", 0) == 0
    with connect(servers["copy"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, v FROM tp_t")
        assert cur.fetchall() == ((42, "fifty"),)


def test_encrypted_and_compressed_captures_round_trip(
        servers: dict[str, MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(bytes(range(7, 39)))
    proxy = proxy_factory([servers["prod"].addr],
                          f'\n[security]\nencryption-key-path = "{key}"')
    for compress in ("true", "false"):
        out = tmp_path / f"enc-{compress}"
        capture(proxy, out, encrypt_method="aes256-ctr", compress=compress)
        with proxy.connect(database="shop") as conn, conn.cursor() as cur:
            for i in (1, 2, 3):
                cur.execute("SELECT note FROM items WHERE id = %s", (i,))
        proxy.wait_sessions(0)
        job = stop_capture(proxy)
        assert job["encryption-method"] == "aes256-ctr"
        names = job["files"]
        assert names and all(n.endswith(".log.gz" if compress == "true" else ".log")
                             for n in names)
        raw = b"".join((out / n).read_bytes() for n in names)
        assert b"item" not in raw and b"SELECT" not in raw
        assert [c["Payload"] for c in tiproxy_read(out, key.read_bytes()[:32])
                if c["Payload"].startswith(b"SELECT note")] == [
            b"SELECT note FROM items WHERE id = 1", b"SELECT note FROM items WHERE id = 2",
            b"SELECT note FROM items WHERE id = 3"]
        result = replayer("--addr", servers["prod"].addr, "--input", str(out), "--username",
                          APP.name, "--password", APP.password, "--read-only",
                          "--encryption-key-path", str(key), "--speed", "10")
        assert result.returncode == 0, result.stderr
        assert report(out)["summary"]["replayed"] >= 3
        assert report(out)["summary"].get("differences", 0) == 0
    no_key = replayer("--addr", servers["prod"].addr, "--input", str(tmp_path / "enc-true"),
                      "--username", APP.name, "--password", APP.password)
    assert no_key.returncode == 2
    assert "--encryption-key-path is not set" in no_key.stderr


def test_a_capture_gathers_every_workers_sessions(
        servers: dict[str, MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    proxy = proxy_factory([servers["prod"].addr], "workers = 2")
    out = tmp_path / "cap"
    conns = []
    while len({c.thread_id() % 2 for c in conns}) < 2:  # sessions on both workers
        conns.append(proxy.connect(database="shop"))
        assert len(conns) < 40
    capture(proxy, out)
    for conn in conns:
        with conn.cursor() as cur:
            cur.execute("SELECT note FROM items WHERE id = %s", (conn.thread_id() % 400 + 1,))
        conn.close()
    proxy.wait_sessions(0)
    job = stop_capture(proxy)
    commands = tiproxy_read(out)
    assert len(commands) == job["captured_cmds"]
    seen = {int(c["Conn_ID"]) for c in commands if c["Payload"].startswith(b"SELECT note")}
    assert seen == {c.thread_id() for c in conns}
