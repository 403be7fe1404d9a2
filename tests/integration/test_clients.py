"""Real clients through the proxy against real MariaDB servers: every command a client sends."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import mysql.connector
import MySQLdb
import pymysql
import pytest

from support.backends import APP, EDU
from support.proxy import ProxyProcess

pytestmark = pytest.mark.integration


def mysqlclient(proxy: ProxyProcess, **kwargs: Any) -> Any:
    kwargs.setdefault("database", "test")
    return MySQLdb.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                           password=APP.password, **kwargs)


def connector(proxy: ProxyProcess, **kwargs: Any) -> Any:
    kwargs.setdefault("database", "test")
    return mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                                   password=APP.password, use_pure=True, **kwargs)


def test_plain_queries_pymysql(proxy: ProxyProcess) -> None:
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 + 1, 'héllo', NULL")
        assert cur.fetchall() == ((2, "héllo", None),)
        cur.execute("CREATE TABLE IF NOT EXISTS plain_t (id INT PRIMARY KEY, v VARCHAR(20))")
        cur.execute("REPLACE INTO plain_t VALUES (1, 'a'), (2, 'b')")
        assert cur.rowcount in (2, 4)
        cur.execute("SELECT v FROM plain_t ORDER BY id")
        assert cur.fetchall() == (("a",), ("b",))
        conn.ping()
        conn.select_db("mysql")
        cur.execute("SELECT DATABASE()")
        assert cur.fetchall() == (("mysql",),)


def test_proxy_connection_id_is_what_the_client_sees(proxy: ProxyProcess) -> None:
    with proxy.connect() as a, proxy.connect() as b:
        assert a.thread_id() != b.thread_id()
        # Fewest connections first: the two sessions sit on different backends.
        assert sorted(s["connections"] for s in proxy.backends()) == [1, 1]


def test_large_result_set(proxy: ProxyProcess) -> None:
    with proxy.connect() as conn, conn.cursor(pymysql.cursors.SSCursor) as cur:
        cur.execute("SELECT seq, REPEAT('x', 50) FROM seq_1_to_100000")
        count = 0
        total = 0
        for seq, pad in cur:
            count += 1
            total += seq
            assert len(pad) == 50
        assert count == 100_000
        assert total == 100_000 * 100_001 // 2
        cur.execute("SELECT 42")
        assert list(cur.fetchall()) == [(42,)]


@pytest.mark.parametrize("size", [16 * 1024 * 1024 - 5, 16 * 1024 * 1024 + 100, 20 * 1024 * 1024])
def test_row_larger_than_one_packet(proxy: ProxyProcess, size: int) -> None:
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS big_t (id INT PRIMARY KEY, b LONGBLOB)")
        blob = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        cur.execute("REPLACE INTO big_t VALUES (%s, %s)", (size, blob))
        cur.execute("SELECT b, LENGTH(b) FROM big_t WHERE id = %s", (size,))
        got, length = cur.fetchone()
        assert length == size
        assert got == blob
        cur.execute("SELECT 7")
        assert cur.fetchall() == ((7,),)


def test_multi_statements_and_procedure_results(proxy: ProxyProcess) -> None:
    flags = pymysql.constants.CLIENT.MULTI_STATEMENTS
    with proxy.connect(client_flag=flags) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1; SELECT 2, 3; DO 1")
        assert cur.fetchall() == ((1,),)
        assert cur.nextset()
        assert cur.fetchall() == ((2, 3),)
        assert cur.nextset()
        assert not cur.nextset()
        cur.execute("DROP PROCEDURE IF EXISTS two_sets")
        cur.execute("CREATE PROCEDURE two_sets() BEGIN SELECT 'a'; SELECT seq FROM seq_1_to_3; END")
        cur.execute("CALL two_sets()")
        assert cur.fetchall() == (("a",),)
        assert cur.nextset()
        assert cur.fetchall() == ((1,), (2,), (3,))
        while cur.nextset():
            pass
        cur.execute("SELECT 'after'")
        assert cur.fetchall() == (("after",),)


def test_load_data_local_infile(proxy: ProxyProcess, tmp_path: Path) -> None:
    data = tmp_path / "rows.csv"
    data.write_text("".join(f"{i},row{i}\n" for i in range(5000)))
    with proxy.connect(local_infile=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE OR REPLACE TABLE infile_t (id INT, v VARCHAR(20))")
        cur.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE infile_t "
                    "FIELDS TERMINATED BY ','")
        assert cur.rowcount == 5000
        cur.execute("SELECT COUNT(*), MAX(v) FROM infile_t")
        assert cur.fetchall() == ((5000, "row999"),)


def test_transactions(proxy: ProxyProcess) -> None:
    with proxy.connect(autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("CREATE OR REPLACE TABLE trx_t (id INT PRIMARY KEY) ENGINE=InnoDB")
        conn.begin()
        cur.execute("INSERT INTO trx_t VALUES (1)")
        conn.rollback()
        cur.execute("SELECT COUNT(*) FROM trx_t")
        assert cur.fetchall() == ((0,),)
        conn.begin()
        cur.execute("INSERT INTO trx_t VALUES (2)")
        conn.commit()
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM trx_t")
        assert cur.fetchall() == ((2,),)


def test_ed25519_user(proxy: ProxyProcess) -> None:
    with proxy.connect(EDU) as conn, conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchall() == (("edu@%",),)


def test_wrong_password_gets_the_servers_error(proxy: ProxyProcess) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host="127.0.0.1", port=proxy.port, user="app", password="nope")
    assert info.value.args[0] == 1045
    assert "Access denied for user 'app'" in info.value.args[1]


def test_unknown_database(proxy: ProxyProcess) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        proxy.connect(database="no_such_db")
    assert info.value.args[0] == 1049
    with proxy.connect() as conn, pytest.raises(pymysql.err.OperationalError) as info2:
        conn.select_db("no_such_db")
    assert info2.value.args[0] == 1049


def test_mysqlclient_queries_and_compression(proxy: ProxyProcess) -> None:
    for compress in (False, True):
        conn = mysqlclient(proxy, compress=compress)
        try:
            cur = conn.cursor()
            cur.execute("SELECT seq, REPEAT('abc', 100) FROM seq_1_to_20000")
            rows = cur.fetchall()
            assert len(rows) == 20000
            assert rows[-1] == (20000, "abc" * 100)
            cur.execute("SELECT 'x'")
            assert cur.fetchall() == (("x",),)
            cur.close()
        finally:
            conn.close()


def test_mysqlclient_change_user_and_reset(proxy: ProxyProcess) -> None:
    conn = mysqlclient(proxy)
    try:
        cur = conn.cursor()
        cur.execute("SET @v = 5")
        conn.change_user(EDU.name, EDU.password, "test")
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER(), @v")
        assert cur.fetchall() == (("edu@%", None),)
        conn.change_user(APP.name, APP.password, "test")
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchall() == (("app@%",),)
        with pytest.raises(MySQLdb.OperationalError) as info:
            conn.change_user(APP.name, "wrong", "test")
        assert info.value.args[0] == 1045
    finally:
        conn.close()


def test_connector_prepared_statements_and_reset(proxy: ProxyProcess) -> None:
    conn = connector(proxy)
    try:
        cur = conn.cursor(prepared=True)
        cur.execute("SELECT ?, ? + 1, CONCAT('v', ?)", (1, 41, "x"))
        assert cur.fetchall() == [(1, 42, "vx")]
        cur.execute("SELECT seq FROM seq_1_to_1000 WHERE seq > ?", (990,))
        assert [r[0] for r in cur.fetchall()] == list(range(991, 1001))
        cur.close()
        plain = conn.cursor()
        plain.execute("SET @r = 1")
        conn.cmd_reset_connection()
        plain.execute("SELECT @r")
        assert plain.fetchall() == [(None,)]
        plain.close()
        conn.cmd_change_user(username=APP.name, password=APP.password, database="mysql")
        plain = conn.cursor()
        plain.execute("SELECT CURRENT_USER(), DATABASE()")
        assert plain.fetchall() == [("app@%", "mysql")]
    finally:
        conn.close()


def test_connector_compression(proxy: ProxyProcess) -> None:
    conn = connector(proxy, compress=True)
    try:
        cur = conn.cursor()
        cur.execute("SELECT seq, REPEAT('z', 1000) FROM seq_1_to_3000")
        rows = cur.fetchall()
        assert len(rows) == 3000
        assert rows[0] == (1, "z" * 1000)
    finally:
        conn.close()


def test_cursor_fetched_in_pieces(proxy: ProxyProcess) -> None:
    """COM_STMT_EXECUTE with a read-only cursor, then COM_STMT_FETCH of 7 rows at a time."""
    conn = connector(proxy)
    try:
        stmt = conn.cmd_stmt_prepare(b"SELECT seq, seq * 2 FROM seq_1_to_30 WHERE seq > ?")
        result = conn.cmd_stmt_execute(stmt["statement_id"], data=(5,),
                                       parameters=stmt["parameters"], flags=1)
        columns = result["columns"] if isinstance(result, dict) else result[1]
        seen: list[int] = []
        while True:
            conn.cmd_stmt_fetch(stmt["statement_id"], 7)
            rows, eof = conn.get_rows(binary=True, columns=columns)
            seen.extend(int(r[0]) for r in rows)
            if eof is None or eof.get("status_flag", 0) & 0x80:
                break
        assert seen == list(range(6, 31))
        conn.cmd_stmt_close(stmt["statement_id"])
        cur = conn.cursor()
        cur.execute("SELECT 'still in step'")
        assert cur.fetchall() == [("still in step",)]
    finally:
        conn.close()


def test_mariadb_cli(proxy: ProxyProcess) -> None:
    out = subprocess.run(
        ["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{proxy.port}", f"-u{APP.name}",
         f"-p{APP.password}", "--batch", "--skip-column-names", "test", "-e",
         "SELECT 'cli', 1+1; SELECT COUNT(*) FROM seq_1_to_5000; SHOW WARNINGS"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cli", "2", "5000"]
    out = subprocess.run(
        ["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{proxy.port}", f"-u{APP.name}",
         f"-p{APP.password}", "--compress", "--batch", "test", "-e", "STATUS"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "Protocol:\t\tCompressed" in out.stdout or "Compressed" in out.stdout
