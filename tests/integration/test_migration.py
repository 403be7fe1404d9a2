"""Connection migration between real MariaDB servers: state survives, pins hold, failures heal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mysql.connector
import pymysql
import pytest

from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, EDU, MariaDBFactory
from support.faults import CuttingRelay
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import AppUser, MariaDBServer
from tiproxy.protocol.packets import frame

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def pair(backends: list[MariaDBServer]) -> list[MariaDBServer]:
    for b in backends:
        b.sql("CREATE DATABASE IF NOT EXISTS mig_db; "
              "CREATE TABLE IF NOT EXISTS mig_db.ai (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
    return backends


@pytest.fixture
def mproxy(pair: list[MariaDBServer], proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory([b.addr for b in pair], ADMIN_TOML)


SNAPSHOT = (
    "SELECT DATABASE(), @@sql_mode, @@time_zone, @@collation_connection, @@character_set_client,"
    " @@autocommit, @@tx_isolation, @@tx_read_only, @@max_join_size, @@div_precision_increment,"
    " LAST_INSERT_ID(), @i, @u, @d, @f, HEX(@s), COLLATION(@s), HEX(@b), COLLATION(@b), @n,"
    " @big, @@port"
)
USER_TYPES = ("SELECT VARIABLE_NAME, VARIABLE_TYPE, CHARACTER_SET_NAME "
              "FROM information_schema.USER_VARIABLES ORDER BY 1")


def snapshot(cur: Any) -> tuple[tuple[Any, ...], list[Any], int]:
    cur.execute(SNAPSHOT)
    row = cur.fetchall()[0]
    cur.execute(USER_TYPES)
    types = cur.fetchall()
    return tuple(row[:-1]), types, int(row[-1])


def stmt_id(cursor: Any) -> int:
    """The server-side statement id a prepared cursor of mysql-connector executes."""
    return int(cursor._prepared["statement_id"])


def test_state_survives_100_moves(mproxy: ProxyProcess) -> None:
    conn = mysql.connector.connect(host="127.0.0.1", port=mproxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True,
                                   autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute("USE mig_db")
        cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES,NO_ZERO_DATE', time_zone = '+05:30',"
                    " collation_connection = 'utf8mb4_bin', max_join_size = 1000000,"
                    " div_precision_increment = 7")
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        cur.execute("SET @i = -42, @u = CAST(18446744073709551615 AS UNSIGNED), @d = 12.50,"
                    " @f = 0.1e0 + 0.2e0, @s = _latin1 X'636166E9' COLLATE latin1_german1_ci,"
                    " @b = X'00FF7F', @n = NULL, @big = 9007199254740993, @x = 21")
        cur.execute("INSERT INTO ai (v) VALUES (1)")
        cur.execute("PREPARE sql_stmt FROM 'SELECT ? * 2'")
        stmts = [conn.cursor(prepared=True) for _ in range(5)]
        ops = [f"SELECT ? + {k}, 'p{k}'" for k in range(5)]  # the same objects: the cursor
        for k, pc in enumerate(stmts):  # prepares again for an operation that is not the same
            pc.execute(ops[k], (0,))
            assert pc.fetchall() == [(k, f"p{k}")]
        ids = [stmt_id(pc) for pc in stmts]
        assert len(set(ids)) == 5
        cur.execute("SET autocommit = 0")
        cur.execute("COMMIT")
        before, before_types, port = snapshot(cur)
        cur.execute("COMMIT")
        assert before[0] == "mig_db" and before[10] > 0
        seen_ports = {port}
        for i in range(100):
            old = mproxy.session(conn.connection_id)["backend"]
            mproxy.redirect()
            mproxy.wait_moved(conn.connection_id, old)
            after, after_types, new_port = snapshot(cur)
            assert new_port != port, f"move {i} left the session on the same server"
            assert after == before, f"move {i} changed state"
            assert after_types == before_types, f"move {i} changed user variable types"
            port = new_port
            seen_ports.add(port)
            for k, pc in enumerate(stmts):
                pc.execute(ops[k], (i,))
                assert pc.fetchall() == [(i + k, f"p{k}")]
                assert stmt_id(pc) == ids[k]  # the client's id never changes
            cur.execute("EXECUTE sql_stmt USING @x")
            assert cur.fetchall() == [(42,)]
            cur.execute("COMMIT")
        assert len(seen_ports) == 2
        # a statement prepared after the moves gets an id of its own and works
        late = conn.cursor(prepared=True)
        late.execute("SELECT ? + 100, 'late'", (5,))
        assert late.fetchall() == [(105, "late")]
        assert stmt_id(late) not in ids
        for pc in [*stmts, late]:
            pc.close()
    finally:
        conn.close()


def test_cursor_opened_before_a_move_is_fetched_after(mproxy: ProxyProcess) -> None:
    conn = mysql.connector.connect(host="127.0.0.1", port=mproxy.port, user=APP.name,
                                   password=APP.password, database="test", use_pure=True,
                                   autocommit=True)
    try:
        stmt = conn.cmd_stmt_prepare(b"SELECT seq FROM seq_1_to_20 WHERE seq > ?")
        result = conn.cmd_stmt_execute(stmt["statement_id"], data=(0,),
                                       parameters=stmt["parameters"], flags=1)
        columns = result["columns"] if isinstance(result, dict) else result[1]
        conn.cmd_stmt_fetch(stmt["statement_id"], 5)
        rows, _ = conn.get_rows(binary=True, columns=columns)
        got = [int(r[0]) for r in rows]
        old = mproxy.session(conn.connection_id)["backend"]
        mproxy.redirect()
        time.sleep(0.3)
        s = mproxy.session(conn.connection_id)
        assert s["backend"] == old and "open cursor" in s["waiting"]
        while True:
            conn.cmd_stmt_fetch(stmt["statement_id"], 5)
            rows, eof = conn.get_rows(binary=True, columns=columns)
            got.extend(int(r[0]) for r in rows)
            if eof is None or eof.get("status_flag", 0) & 0x80:
                break
        assert got == list(range(1, 21))
        conn.cmd_stmt_reset(stmt["statement_id"])
        mproxy.wait_moved(conn.connection_id, old)
        # a new cursor on the new backend, through the same statement id
        result = conn.cmd_stmt_execute(stmt["statement_id"], data=(15,),
                                       parameters=stmt["parameters"], flags=1)
        conn.cmd_stmt_fetch(stmt["statement_id"], 100)
        rows, _ = conn.get_rows(binary=True, columns=columns)
        assert [int(r[0]) for r in rows] == [16, 17, 18, 19, 20]
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("pin", "release", "why"),
    [
        ("BEGIN", "COMMIT", "in a transaction"),
        ("CREATE TEMPORARY TABLE tmp_pin (a INT)", "DROP TEMPORARY TABLE tmp_pin", "temporary"),
        ("SELECT GET_LOCK('pin_lock', 1)", "SELECT RELEASE_LOCK('pin_lock')", "GET_LOCK"),
        ("LOCK TABLES mig_db.ai READ", "UNLOCK TABLES", "LOCK TABLES"),
    ],
)
def test_pinned_session_moves_once_released(mproxy: ProxyProcess, pin: str, release: str,
                                             why: str) -> None:
    with mproxy.connect() as conn, conn.cursor() as cur:
        cur.execute(pin)
        cur.fetchall()
        cur.execute("SELECT @@port")
        port = cur.fetchone()[0]
        old = mproxy.session(conn.thread_id())["backend"]
        mproxy.redirect()
        time.sleep(0.5)
        s = mproxy.session(conn.thread_id())
        assert s["backend"] == old and s["moving"] and why in s["waiting"]
        cur.execute("SELECT @@port")
        assert cur.fetchone()[0] == port
        cur.execute(release)
        cur.fetchall()
        mproxy.wait_moved(conn.thread_id(), old)
        cur.execute("SELECT @@port")
        assert cur.fetchone()[0] != port


def test_begin_inside_a_transaction_moves_by_the_shortcut(mproxy: ProxyProcess) -> None:
    with mproxy.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS mig_db.shortcut (id INT PRIMARY KEY) ENGINE=InnoDB")
        cur.execute("DELETE FROM mig_db.shortcut")
        cur.execute("BEGIN")
        cur.execute("INSERT INTO mig_db.shortcut VALUES (1)")
        cur.execute("SELECT @@port")
        port = cur.fetchone()[0]
        old = mproxy.session(conn.thread_id())["backend"]
        mproxy.redirect()
        time.sleep(0.3)
        assert mproxy.session(conn.thread_id())["backend"] == old
        cur.execute("BEGIN")  # commits the open transaction, as it would anyway
        cur.execute("SELECT @@port, @@in_transaction")
        new_port, in_trans = cur.fetchone()
        assert new_port != port and in_trans == 1
        cur.execute("COMMIT")
    with mproxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM mig_db.shortcut")
        assert cur.fetchall() == ((1,),)


@pytest.mark.parametrize("completion", ["CHAIN", "RELEASE"])
def test_the_shortcuts_commit_neither_chains_nor_releases(mproxy: ProxyProcess,
                                                          completion: str) -> None:
    """The BEGIN shortcut commits on the old backend as the client's BEGIN would have: the
    session's completion_type does not make that COMMIT open another transaction there (CHAIN)
    or end the connection (RELEASE: mysqltest's sys_vars.completion_type_func)."""
    with mproxy.connect() as conn, conn.cursor() as cur:
        cur.execute(f"SET SESSION completion_type = '{completion}'")
        cur.execute("START TRANSACTION")
        cur.execute("SELECT @@port")
        port = cur.fetchone()[0]
        old = mproxy.session(conn.thread_id())["backend"]
        mproxy.redirect()
        time.sleep(0.3)
        assert mproxy.session(conn.thread_id())["backend"] == old  # in a transaction: waits
        cur.execute("START TRANSACTION")  # commits the open one, whatever completion_type says
        cur.execute("SELECT @@port, @@in_transaction, @@completion_type")
        new_port, in_trans, kept = cur.fetchone()
        assert (new_port != port, in_trans, kept) == (True, 1, completion)
        cur.execute("ROLLBACK AND NO CHAIN NO RELEASE")


def test_user_without_reusable_credential_stays_and_says_why(mproxy: ProxyProcess) -> None:
    with mproxy.connect(EDU) as conn, conn.cursor() as cur:
        old = mproxy.session(conn.thread_id())["backend"]
        mproxy.redirect()
        time.sleep(0.3)
        s = mproxy.session(conn.thread_id())
        assert s["backend"] == old and "no reusable credential" in s["waiting"]
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchall() == (("edu@%",),)


def test_a_session_whose_password_changed_stays_and_says_why(
        mproxy: ProxyProcess, pair: list[MariaDBServer]) -> None:
    """Its password rotated under it (on every backend, as a cluster shares accounts): a move
    would log in with the old one. The refused move reads the stored hashes again, which tell
    the session's password is gone: it stays where it is, says why, and no backend is blamed."""
    for b in pair:
        b.sql("CREATE OR REPLACE USER rot@'%' IDENTIFIED BY 'first-pass'; "
              "GRANT ALL ON mig_db.* TO rot@'%';")
    rot = AppUser("rot", "first-pass", database="mig_db")
    with mproxy.connect(rot) as conn, conn.cursor() as cur:
        cur.execute("SET @kept = 1")
        deadline = time.monotonic() + 10  # a new account: its hash is read once it logs in
        while "no reusable credential" in mproxy.session(conn.thread_id())["waiting"]:
            assert time.monotonic() < deadline, mproxy.session(conn.thread_id())
            time.sleep(0.1)
        for b in pair:
            b.sql("ALTER USER rot@'%' IDENTIFIED BY 'second-pass'")
        old = mproxy.session(conn.thread_id())["backend"]
        mproxy.redirect()
        cur.execute("SELECT @kept")  # the move is tried (and refused) as this arrives
        assert cur.fetchall() == ((1,),)
        deadline = time.monotonic() + 10
        while "password changed" not in mproxy.session(conn.thread_id())["waiting"]:
            assert time.monotonic() < deadline, mproxy.session(conn.thread_id())
            time.sleep(0.1)
        assert mproxy.session(conn.thread_id())["backend"] == old
        assert all(not b["move_problem"] for b in mproxy.backends())
        mproxy.redirect()  # asked again: it does not try
        cur.execute("SELECT @kept, CURRENT_USER()")
        assert cur.fetchall() == ((1, "rot@%"),)
    assert "the target refused its login" in mproxy.log()
    with mproxy.connect(AppUser("rot", "second-pass", database="mig_db")) as conn:
        old = mproxy.session(conn.thread_id())["backend"]
        mproxy.redirect()
        assert mproxy.wait_moved(conn.thread_id(), old)  # a new login of it moves again


@pytest.mark.parametrize("change", [
    "SET PASSWORD = PASSWORD('{0}')",
    "set password for current_user() = password(\"{0}\");",
])
def test_a_session_that_sets_its_own_password_moves_with_it(
        mproxy: ProxyProcess, pair: list[MariaDBServer], change: str) -> None:
    """The new password is in the statement: a move's login answers with it (the other
    backend gets it too, as a cluster's would)."""
    for b in pair:
        b.sql("CREATE OR REPLACE USER own@'%' IDENTIFIED BY 'own-first'; "
              "GRANT ALL ON mig_db.* TO own@'%';")
    with mproxy.connect(AppUser("own", "own-first", database="mig_db")) as conn, \
            conn.cursor() as cur:
        deadline = time.monotonic() + 10  # a new account: its hash is read once it logs in
        while "no reusable credential" in mproxy.session(conn.thread_id())["waiting"]:
            assert time.monotonic() < deadline, mproxy.session(conn.thread_id())
            time.sleep(0.1)
        cur.execute("SET @kept = 'still'")
        cur.execute(change.format("own-second"))
        cur.execute("SELECT @@port")
        here = cur.fetchone()[0]
        for b in pair:
            if b.port != here:
                b.sql("ALTER USER own@'%' IDENTIFIED BY 'own-second'")
        for _ in range(2):
            old = mproxy.session(conn.thread_id())["backend"]
            mproxy.redirect()
            cur.execute("SELECT @kept, CURRENT_USER()")
            assert cur.fetchall() == (("still", "own@%"),)
            assert mproxy.wait_moved(conn.thread_id(), old)
    assert "own-second" not in mproxy.log()


def test_drain_and_undrain_through_the_api(mproxy: ProxyProcess, pair: list[MariaDBServer]) -> None:
    conns = [mproxy.connect() for _ in range(4)]
    try:
        target = pair[0].addr
        status, _ = mproxy.api(f"/api/admin/backends/{target}/drain", method="POST", body=b"")
        assert status == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counts = {b["addr"]: b["connections"] for b in mproxy.backends()}
            if counts[target] == 0:
                break
            time.sleep(0.05)
        assert counts[target] == 0
        assert {b["addr"]: b["status"] for b in mproxy.backends()}[target] == "draining"
        for c in conns:
            with c.cursor() as cur:
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == pair[1].port
        with mproxy.connect() as c, c.cursor() as cur:  # new sessions avoid it too
            cur.execute("SELECT @@port")
            assert cur.fetchone()[0] == pair[1].port
        status, _ = mproxy.api(f"/api/admin/backends/{target}/undrain", method="POST", body=b"")
        assert status == 200
        assert {b["addr"]: b["status"] for b in mproxy.backends()}[target] == "healthy"
        status, _ = mproxy.api("/api/admin/backends/127.0.0.1:1/drain", method="POST", body=b"")
        assert status == 404
    finally:
        for c in conns:
            c.close()
    _, body = mproxy.api("/metrics")
    assert b'tiproxy_balance_migrate_total{from="' + target.encode() in body
    assert b'migrate_res="succeed"' in body


def test_fail_backend_list_online(mproxy: ProxyProcess, pair: list[MariaDBServer]) -> None:
    conns = [mproxy.connect() for _ in range(4)]
    try:
        victim = pair[1].addr
        status, body = mproxy.api("/api/admin/config", method="PUT",
                                  body=f'[proxy]\nfail-backend-list = ["{victim}"]\n'.encode())
        assert status == 200, body
        for c in conns:
            deadline = time.monotonic() + 10
            while True:
                with c.cursor() as cur:
                    cur.execute("SELECT @@port")
                    if cur.fetchone()[0] == pair[0].port:
                        break
                assert time.monotonic() < deadline
                time.sleep(0.05)
        status, body = mproxy.api("/api/admin/config", method="PUT",
                                  body=b"[proxy]\nfail-backend-list = []\n")
        assert status == 200, body
        status, body = mproxy.api("/api/admin/config", method="PUT",
                                  body=b"[proxy]\nno-such-key = 1\n")
        assert status == 400 and b"no-such-key" in body
    finally:
        for c in conns:
            c.close()


def test_failed_move_leaves_the_session_working(
    pair: list[MariaDBServer], mariadb_factory: MariaDBFactory, proxy_factory: ProxyFactory
) -> None:
    """The target refuses the login (the user has another password there): no harm done."""
    other = mariadb_factory(BACKEND_ARGS, BACKEND_USERS)
    other.sql("ALTER USER 'app'@'%' IDENTIFIED BY 'another-password'")
    proxy = proxy_factory([pair[0].addr, other.addr], ADMIN_TOML)
    proxy.api(f"/api/admin/backends/{other.addr}/drain", method="POST", body=b"")
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SET @keep = 'me'")
        proxy.api(f"/api/admin/backends/{other.addr}/undrain", method="POST", body=b"")
        proxy.api(f"/api/admin/backends/{pair[0].addr}/drain", method="POST", body=b"")
        time.sleep(1.0)
        cur.execute("SELECT @keep, @@port")
        assert cur.fetchone() == ("me", pair[0].port)
        s = proxy.session(conn.thread_id())
        assert "failed" in s["waiting"]
        # The stored hashes, read again from its backend, still match its password: the
        # target's account differs, and the target is named for it.
        deadline = time.monotonic() + 10
        while not next(b for b in proxy.backends() if b["addr"] == other.addr)["move_problem"]:
            assert time.monotonic() < deadline, proxy.backends()
            time.sleep(0.1)
        assert "password changed" not in proxy.session(conn.thread_id())["waiting"]
    _, body = proxy.api("/metrics")
    assert b'migrate_res="fail"' in body
    assert "move" in proxy.log() and "failed" in proxy.log()
    assert "another-password" not in proxy.log() and "app-pass" not in proxy.log()


def test_target_dying_during_restore_leaves_the_session_working(
    pair: list[MariaDBServer], proxy_factory: ProxyFactory
) -> None:
    relay = CuttingRelay(pair[1].port, trigger=b"SET SESSION")
    try:
        proxy = proxy_factory([pair[0].addr, relay.addr], ADMIN_TOML)
        proxy.api(f"/api/admin/backends/{relay.addr}/drain", method="POST", body=b"")
        with proxy.connect() as conn, conn.cursor() as cur:
            cur.execute("SET SESSION time_zone = '+01:00', @keep = 7")
            cur.execute("SELECT @@port")
            assert cur.fetchone()[0] == pair[0].port
            proxy.api(f"/api/admin/backends/{relay.addr}/undrain", method="POST", body=b"")
            proxy.redirect()
            deadline = time.monotonic() + 10
            while relay.cuts == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert relay.cuts >= 1, "the move never reached the restore"
            time.sleep(0.2)
            cur.execute("SELECT @keep, @@time_zone, @@port")
            assert cur.fetchone() == (7, "+01:00", pair[0].port)
            assert "failed (restore:" in proxy.session(conn.thread_id())["waiting"]
    finally:
        relay.stop()


def test_failover_timeout_closes_pinned_sessions(
    pair: list[MariaDBServer], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory([b.addr for b in pair], "failover-timeout = 1" + ADMIN_TOML)
    pinned = proxy.connect()
    free = proxy.connect()
    with pinned.cursor() as cur:
        cur.execute("SELECT @@port")
        port = cur.fetchone()[0]
        cur.execute("CREATE TEMPORARY TABLE keep_me (a INT)")
    with free.cursor() as cur:
        cur.execute("SELECT @@port")
        if cur.fetchone()[0] != port:  # put both on the pinned one's backend
            free.close()
            free = proxy.connect()
    addr = f"127.0.0.1:{port}"
    proxy.api(f"/api/admin/backends/{addr}/drain", method="POST", body=b"")
    time.sleep(2.5)
    with pytest.raises(pymysql.err.OperationalError), pinned.cursor() as cur:
        cur.execute("SELECT 1")
    with free.cursor() as cur:
        cur.execute("SELECT @@port")
        assert cur.fetchone()[0] != port
    assert "failover-timeout" in proxy.log() and "temporary tables: keep_me" in proxy.log()
    free.close()


def _wait_only_on(proxy: ProxyProcess, addr: str) -> None:
    """Until `addr` is the only backend, and the data plane knows it: with workers, the control
    process's list changes first and each worker's table up to 100 ms later, so the sessions
    (reported by the workers themselves) are what says the drain reached them."""
    deadline = time.monotonic() + 10
    while {b["addr"] for b in proxy.backends()} != {addr} or \
            any(s["backend"] != addr for s in proxy.sessions()):
        assert time.monotonic() < deadline, (proxy.backends(), proxy.sessions())
        time.sleep(0.05)


def test_backend_removed_from_the_config_is_drained(
    pair: list[MariaDBServer], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory([b.addr for b in pair], ADMIN_TOML)
    conns = [proxy.connect() for _ in range(4)]
    try:
        status, body = proxy.api("/api/admin/config", method="PUT",
                                 body=f'[proxy]\nbackend-addrs = ["{pair[0].addr}"]\n'.encode())
        assert status == 200, body
        _wait_only_on(proxy, pair[0].addr)
        for c in conns:
            with c.cursor() as cur:
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == pair[0].port
        # and back through the config file and SIGHUP, as an operator would reload it
        text = proxy.config_path.read_text()
        proxy.config_path.write_text(text.replace(
            f'backend-addrs = ["{pair[0].addr}", "{pair[1].addr}"]',
            f'backend-addrs = ["{pair[1].addr}"]'))
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        _wait_only_on(proxy, pair[1].addr)
        for c in conns:
            with c.cursor() as cur:
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == pair[1].port
    finally:
        for c in conns:
            c.close()


def test_tiproxyctl_drain_sessions_redirect(mproxy: ProxyProcess, pair: list[MariaDBServer]) -> None:
    ctl = [sys.executable, "-m", "tiproxy.cli.ctl", "--addr", f"127.0.0.1:{mproxy.api_port}"]
    with mproxy.connect() as conn:
        out = subprocess.run([*ctl, "sessions"], capture_output=True, text=True, check=True)
        assert str(conn.thread_id()) in out.stdout and "app" in out.stdout
        out = subprocess.run([*ctl, "backend", "drain", pair[0].addr], capture_output=True,
                             text=True, check=True)
        assert "draining" in out.stdout
        out = subprocess.run([*ctl, "backends"], capture_output=True, text=True, check=True)
        assert "draining" in out.stdout
        subprocess.run([*ctl, "backend", "undrain", pair[0].addr], check=True,
                       capture_output=True)
        out = subprocess.run([*ctl, "redirect"], capture_output=True, text=True, check=True)
        assert "1 sessions asked to move" in out.stdout
        out = subprocess.run([*ctl, "backend", "drain", "127.0.0.1:1"], capture_output=True,
                             text=True, check=False)
        assert out.returncode == 1 and "unknown backend" in out.stderr


def test_a_server_that_pads_char_columns_gives_its_hashes_all_the_same(
    mariadb_factory: MariaDBFactory, proxy_factory: ProxyFactory,
) -> None:
    """With PAD_CHAR_TO_FULL_LENGTH in the server's sql_mode, mysql.user's names and plugins
    come back padded with spaces: the credential sync reads them as the names they are, and
    the session moves."""
    servers = [mariadb_factory((*BACKEND_ARGS, "--sql-mode=PAD_CHAR_TO_FULL_LENGTH"),
                               BACKEND_USERS) for _ in range(2)]
    proxy = proxy_factory([s.addr for s in servers], ADMIN_TOML)
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SET @kept = 'yes'")
        proxy.move(conn.thread_id())
        cur.execute("SELECT @kept, @@sql_mode")
        assert cur.fetchone() == ("yes", "PAD_CHAR_TO_FULL_LENGTH")


def test_users_file_is_enough_to_move(pair: list[MariaDBServer], proxy_factory: ProxyFactory,
                                      tmp_path: Path) -> None:
    """No auth-sync-user: the stored hash comes from a file written by the operator."""
    stored = pair[0].sql("SELECT authentication_string FROM mysql.user WHERE User = 'app'").split()
    users = tmp_path / "users"
    users.write_text(f"# user  SHA1(SHA1(password))\napp {stored[0]}\nother *{'0' * 40}\n")
    proxy = proxy_factory([b.addr for b in pair], f'\n[security]\nusers-file = "{users}"')
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SET @kept = 'yes'")
        old = proxy.session(conn.thread_id())["backend"]
        proxy.redirect()
        proxy.wait_moved(conn.thread_id(), old)
        cur.execute("SELECT @kept")
        assert cur.fetchone() == ("yes",)
    with proxy.connect(EDU) as conn:  # not in the file: it stays, and says why
        old = proxy.session(conn.thread_id())["backend"]
        proxy.redirect()
        time.sleep(0.3)
        s = proxy.session(conn.thread_id())
        assert s["backend"] == old and "no reusable credential" in s["waiting"]


def test_a_redirect_that_cannot_happen_is_given_up(pair: list[MariaDBServer],
                                                   proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory([b.addr for b in pair], "failover-timeout = 1" + ADMIN_TOML)
    with proxy.connect(EDU) as conn, conn.cursor() as cur:
        proxy.redirect()
        assert proxy.session(conn.thread_id())["moving"]
        deadline = time.monotonic() + 5
        while proxy.session(conn.thread_id())["moving"]:
            assert time.monotonic() < deadline, proxy.session(conn.thread_id())
            time.sleep(0.1)
        cur.execute("SELECT 1")  # the session lives on where it was
        assert cur.fetchone() == (1,)
    assert "given up" in proxy.log()


class _Raw:
    """Binary-protocol commands written by hand on a PyMySQL connection that has logged in."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def command(self, payload: bytes, answered: bool = True) -> bytes:
        self.conn._write_bytes(frame(payload, 0))
        if not answered:
            return b""
        self.conn._next_seq_id = 1
        return bytes(self.conn._read_packet().get_all_data())  # raises on an ERR packet

    def prepare(self, sql: bytes) -> tuple[int, int]:
        """COM_STMT_PREPARE: (statement id, parameters)."""
        ok = self.command(b"\x16" + sql)
        stmt, columns, params = (int.from_bytes(ok[1:5], "little"), ok[5], ok[7])
        for _ in range(params + bool(params) + columns + bool(columns)):  # definitions, EOFs
            self.conn._read_packet()
        return stmt, params

    def execute(self, stmt: int, parameters: bytes = b"") -> bytes:
        """COM_STMT_EXECUTE of a statement with one column: its one row."""
        body = b"\x17" + stmt.to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little")
        assert self.command(body + parameters) == b"\x01"  # one column
        for _ in range(2):  # its definition, EOF
            self.conn._read_packet()
        row = bytes(self.conn._read_packet().get_all_data())
        self.conn._read_packet()  # EOF
        return row


def test_an_execute_without_its_types_works_after_a_move(mproxy: ProxyProcess) -> None:
    """Clients send a statement's parameter types with its first execute only (libmariadb, PHP's
    mysqlnd: new_params_bound_flag = 0 after). After a move the proxy puts them back, also when
    the new backend gave the statement the client's own id (the ids two connections give their
    first statements often match)."""
    conn = pymysql.connect(host="127.0.0.1", port=mproxy.port, user=APP.name,
                           password=APP.password, database="test")
    raw = _Raw(conn)
    try:
        stmt, params = raw.prepare(b"SELECT CAST(? AS SIGNED) + 1")
        assert params == 1

        def execute(value: int, with_types: bool) -> int:
            row = raw.execute(stmt, b"\x00"  # NULL bitmap: one parameter, not NULL
                              + (b"\x01\x08\x00" if with_types else b"\x00")  # LONGLONG
                              + value.to_bytes(8, "little", signed=True))
            return int.from_bytes(row[2:10], "little", signed=True)  # header, NULL bitmap

        assert execute(41, with_types=True) == 42
        assert execute(1, with_types=False) == 2
        backends = set()
        for n in range(3):
            backends.add(mproxy.move(conn.thread_id()))
            assert execute(n * 10, with_types=False) == n * 10 + 1
        assert len(backends) == 2
    finally:
        conn.close()


def test_the_types_an_execute_direct_sent_serve_its_statement_after_a_move(
        mproxy: ProxyProcess) -> None:
    """Connector/C's execute_direct sends COM_STMT_PREPARE and, before its answer, the first
    COM_STMT_EXECUTE with id 0xFFFFFFFF and the parameter types; later executes of the
    statement by its id carry none. After a move the new backend needs them: the proxy keeps
    the direct execute's types for the statement its prepare made."""
    conn = pymysql.connect(host="127.0.0.1", port=mproxy.port, user=APP.name,
                           password=APP.password, database="test")
    raw = _Raw(conn)

    def parameters(value: int, with_types: bool) -> bytes:
        return (b"\x00"  # NULL bitmap: one parameter, not NULL
                + (b"\x01\x08\x00" if with_types else b"\x00")  # LONGLONG
                + value.to_bytes(8, "little", signed=True))

    try:
        direct = (b"\x17" + (0xFFFFFFFF).to_bytes(4, "little") + b"\x00"
                  + (1).to_bytes(4, "little") + parameters(41, with_types=True))
        conn._write_bytes(frame(b"\x16SELECT CAST(? AS SIGNED) + 1", 0) + frame(direct, 0))
        conn._next_seq_id = 1
        ok = bytes(conn._read_packet().get_all_data())
        stmt, columns, params = int.from_bytes(ok[1:5], "little"), ok[5], ok[7]
        for _ in range(params + 1 + columns + 1):  # definitions, EOFs
            conn._read_packet()
        conn._next_seq_id = 1
        assert bytes(conn._read_packet().get_all_data()) == b"\x01"  # one column
        for _ in range(2):
            conn._read_packet()
        assert int.from_bytes(bytes(conn._read_packet().get_all_data())[2:10], "little") == 42
        conn._read_packet()  # EOF
        for n in range(3):
            mproxy.move(conn.thread_id())
            row = raw.execute(stmt, parameters(n, with_types=False))
            assert int.from_bytes(row[2:10], "little", signed=True) == n + 1
    finally:
        conn.close()


def test_the_statement_prepared_last_stays_the_last_across_moves(mproxy: ProxyProcess) -> None:
    """Statement id 0xFFFFFFFF names the one prepared last (Connector/C's execute_direct sends
    it right behind its COM_STMT_PREPARE). After moves, the last one the client prepared is the
    last one the new backend prepared, even when its id is not the highest (as when the new
    backend's ids start lower than the old one's)."""
    conn = pymysql.connect(host="127.0.0.1", port=mproxy.port, user=APP.name,
                           password=APP.password, database="test")
    raw = _Raw(conn)
    last = (0xFFFFFFFF).to_bytes(4, "little")
    try:
        ids = [raw.prepare(f"SELECT '{name}'".encode())[0] for name in "abc"]
        for stmt in ids[:2]:
            raw.command(b"\x19" + stmt.to_bytes(4, "little"), answered=False)  # COM_STMT_CLOSE
        mproxy.move(conn.thread_id())  # c alone, as the new backend's statement 1
        d, _ = raw.prepare(b"SELECT 'd'")
        assert raw.execute(int.from_bytes(last, "little")).endswith(b"\x01d")
        for _ in range(2):
            mproxy.move(conn.thread_id())
            assert raw.execute(int.from_bytes(last, "little")).endswith(b"\x01d")
            assert raw.execute(ids[2]).endswith(b"\x01c")
            assert raw.execute(d).endswith(b"\x01d")
    finally:
        conn.close()
