"""MariaDB's extended capabilities through the proxy: extended type info (a JSON column's
format), bulk execution (MariaDB Connector/J's batch insert), and sessions that negotiated them
moving between backends. Compared with the same client directly against the server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import MySQLdb
import pytest

from support.backends import ADMIN_TOML, APP
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

CONNECTOR_J = Path("/usr/share/java/mariadb-java-client.jar")  # Debian's libmariadb-java


def _cli(port: int, sql: str) -> str:
    out = subprocess.run(
        ["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{port}", f"-u{APP.name}",
         f"-p{APP.password}", "--column-type-info", "-t", "test", "-e", sql],
        capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode("latin1")


def test_extended_type_info_comes_through(backends: list[MariaDBServer],
                                          proxy_factory: ProxyFactory) -> None:
    for b in backends:
        b.sql("CREATE OR REPLACE TABLE test.ext_meta (id INT PRIMARY KEY, j JSON, p POINT);"
              "INSERT INTO test.ext_meta VALUES (1, '{\"a\": 1}', POINT(1, 2));")
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    sql = "SELECT id, j, p FROM ext_meta"
    direct, through = _cli(backends[0].port, sql), _cli(proxy.port, sql)
    assert "BLOB (format=json)" in direct and "GEOMETRY (type=point)" in direct
    assert "BLOB (format=json)" in through and "GEOMETRY (type=point)" in through
    strip = [line for line in direct.splitlines() if not line.startswith("Max_length")]
    assert [line for line in through.splitlines() if not line.startswith("Max_length")] == strip


def _java(tmp_path: Path) -> Path:
    """BulkInsert.java compiled into tmp_path (the JDK and Connector/J are Debian's)."""
    javac = shutil.which("javac")
    assert javac is not None, "the JDK is missing (scripts/setup.sh installs it)"
    assert CONNECTOR_J.exists(), "MariaDB Connector/J is missing (scripts/setup.sh installs it)"
    source = Path(__file__).parent.parent / "support" / "java" / "BulkInsert.java"
    subprocess.run([javac, "-cp", str(CONNECTOR_J), "-d", str(tmp_path), str(source)],
                   check=True, timeout=120)
    return tmp_path


def _bulk(classes: Path, port: int, table: str) -> str:
    out = subprocess.run(
        ["java", "-cp", f"{CONNECTOR_J}:{classes}", "BulkInsert", "127.0.0.1", str(port),
         APP.name, APP.password, table, "2000"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_connector_j_batch_insert_uses_bulk_execution(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path,
) -> None:
    classes = _java(tmp_path)
    proxy = proxy_factory([backends[0].addr], ADMIN_TOML)
    direct = _bulk(classes, backends[0].port, "bulk_direct")
    through = _bulk(classes, proxy.port, "bulk_proxy")
    assert direct == through
    assert "rows 2000 1999000 row-999" in through
    metrics = proxy.api("/metrics")[1].decode()
    assert 'cmd_type="StmtBulkExecute"' in metrics  # it really was sent as one bulk command


def test_a_session_with_mariadb_extensions_moves(backends: list[MariaDBServer],
                                                proxy_factory: ProxyFactory) -> None:
    """mysqlclient (MariaDB Connector/C) negotiates extended type info; after moves its
    prepared and text queries still parse."""
    proxy: ProxyProcess = proxy_factory([b.addr for b in backends], ADMIN_TOML)
    conn = MySQLdb.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                           password=APP.password, database="test")
    try:
        cur = conn.cursor()
        cur.execute("SET @m = 'moved'")
        for _ in range(3):
            old = proxy.session(conn.thread_id())["backend"]
            proxy.redirect()
            proxy.wait_moved(conn.thread_id(), old)
            cur.execute("SELECT @m, JSON_OBJECT('k', 1), %s", ("param",))
            assert cur.fetchall() == (("moved", '{"k": 1}', "param"),)
    finally:
        conn.close()


def _c_client(tmp_path: Path, name: str = "ps_progress") -> Path:
    """tests/support/c/<name>.c built against Debian's MariaDB Connector/C (libmariadb-dev)."""
    source = Path(__file__).parent.parent / "support" / "c" / f"{name}.c"
    flags = subprocess.run(["mariadb_config", "--cflags", "--libs"], capture_output=True,
                           text=True, check=True).stdout.split()
    binary = tmp_path / name
    subprocess.run(["cc", "-Wall", "-o", str(binary), str(source), *flags], check=True,
                   timeout=120)
    return binary


def _run_c_client(binary: Path, port: int, between: Callable[[], None] = lambda: None) -> str:
    proc = subprocess.Popen([str(binary), "127.0.0.1", str(port), APP.name, APP.password, "test"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        lines = []
        while (line := proc.stdout.readline()) and line != "pause\n":
            lines.append(line)
        assert line == "pause\n", "".join(lines)
        between()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    return "".join(lines) + "pause\n" + rest


def test_cached_metadata_and_progress_reports_come_through(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path,
) -> None:
    """Connector/C negotiates CACHE_METADATA (executes of a prepared statement come without
    column definitions) and PROGRESS (a long ALTER TABLE reports as it goes). Through the proxy
    the client reads the same rows and gets progress reports, also after its session moved to
    another backend between two executes of the same prepared statements."""
    for b in backends:
        b.sql("CREATE OR REPLACE TABLE ps_progress_big (a INT PRIMARY KEY, b VARCHAR(40));"
              "INSERT INTO ps_progress_big SELECT seq, REPEAT('x', 40) FROM seq_1_to_400000;",
              database="test")
    binary = _c_client(tmp_path)
    direct = _run_c_client(binary, backends[0].port)
    assert "n=5: n(8)=5 s(253)=x5 d(246)=12.5" in direct
    assert "progress reports: yes" in direct
    proxy = proxy_factory([b.addr for b in backends], ADMIN_TOML)

    def move() -> None:
        [session] = proxy.sessions()
        proxy.redirect()
        proxy.wait_moved(session["id"], session["backend"])

    assert _run_c_client(binary, proxy.port, move) == direct


CORNERS = """
CREATE OR REPLACE TABLE corners_load (a INT, b VARCHAR(10));
DELIMITER //
CREATE OR REPLACE PROCEDURE corners_open_cursor() BEGIN
  DECLARE c1 CURSOR FOR SELECT 1;
  OPEN c1;
  SELECT seq, seq * 10 FROM seq_1_to_3;
END//
CREATE OR REPLACE FUNCTION corners_out_of_range() RETURNS TINYINT RETURN 1000//
DELIMITER ;
"""


def test_binary_protocol_corners_found_by_mariadbs_own_test_suite(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path,
) -> None:
    """A prepared CALL whose procedure holds a cursor open, a prepared LOAD DATA LOCAL INFILE,
    and a cursor that fails to open: each used to end the session through the proxy (MariaDB's
    test suite with --ps-protocol and --cursor-protocol found them). Connector/C gets the same
    through the proxy as directly, and stays connected."""
    backends[0].sql(CORNERS, database="test")
    data = tmp_path / "corners.txt"
    data.write_text("1\tone\n2\ttwo\n")
    binary = _c_client(tmp_path, "ps_corners")
    proxy = proxy_factory([backends[0].addr], ADMIN_TOML)
    outputs = []
    for port in (backends[0].port, proxy.port):
        backends[0].sql("TRUNCATE TABLE corners_load", database="test")
        out = subprocess.run([str(binary), "127.0.0.1", str(port), APP.name, APP.password,
                              "test", str(data)], capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        outputs.append(out.stdout)
    direct, through = outputs
    assert "  1 10\n  2 20\n  3 30\n" in direct and "  affected 2\n" in direct
    assert "  error 1264\n" in direct and direct.endswith("still connected\n")
    assert through == direct
    assert "protocol error" not in proxy.log()
