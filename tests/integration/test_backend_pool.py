"""Backend connections kept for the next login (`[proxy] backend-pool-size`, net/pool.py).

What a user checks: a client that connects, works and disconnects leaves the server one idle
connection instead of none, the next client of the same user and database is served on it
without the server seeing a new connection, and that client finds the session as a new login
would (nothing of the first client's variables, temporary tables, transaction or character
set). Logins the proxy cannot vouch for, and sessions whose connection no longer matches their
login, never share. Each test has a server of its own, so its thread counts are its own.

A kept connection belongs to the data-plane process that kept it, and the kernel picks the
process that accepts a client: the tests that follow one connection from client to client run
the proxy as one process (`workers = 1`); the last test shows reuse with the suite's workers.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import mariadb
import mysql.connector
import MySQLdb
import pymysql
import pytest

from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, EDU, MariaDBFactory
from support.metrics import scrape
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import AppUser, MariaDBServer
from tiproxy.playground.ports import HOST
from tiproxy.protocol.auth import native_password_scramble
from tiproxy.protocol.packets import frame, parse_auth_switch

pytestmark = pytest.mark.integration

ONE_PROCESS = "workers = 1\n"


def pool_toml(size: int = 4, idle: str = "30s", more: str = ONE_PROCESS) -> str:
    return f'backend-pool-size = {size}\nbackend-pool-idle = "{idle}"\n{more}' + ADMIN_TOML


class Watch:
    """The server seen from one root connection of its own (so watching opens none)."""

    def __init__(self, server: MariaDBServer) -> None:
        self.conn = MySQLdb.connect(unix_socket=str(server.socket_path), user="root")

    def _rows(self, sql: str) -> list[tuple[object, ...]]:
        cur = self.conn.cursor()
        cur.execute(sql)
        return list(cur.fetchall())

    def threads(self, user: str = APP.name) -> set[int]:
        """The server's connections of `user`, by thread id."""
        return {int(row[0]) for row in self._rows(  # type: ignore[call-overload]
            f"SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '{user}'")}

    def connections(self) -> int:
        """How many connections the server has accepted since it started."""
        return int(self._rows("SHOW GLOBAL STATUS LIKE 'Connections'")[0][1])  # type: ignore[call-overload]


def settled(watch: Watch) -> int:
    """The server's accepted connections once the proxy's own have stopped coming (the
    credential sync a refused password starts)."""
    last = watch.connections()
    for _ in range(50):
        time.sleep(0.3)
        now = watch.connections()
        if now == last:
            return now
        last = now
    raise AssertionError("the server kept accepting connections")


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def pool_events(proxy: ProxyProcess) -> dict[str, float]:
    """tiproxy_session_backend_pool_total by event (kept, reused), summed over the workers."""
    metrics = scrape(proxy)
    return {event: metrics.value("tiproxy_session_backend_pool_total", event=event)
            for event in ("kept", "reused")}


def kept_after_close(proxy: ProxyProcess, before: float) -> None:
    """Until the proxy has kept one more connection (reset and answered) than `before`."""
    wait_until(lambda: pool_events(proxy).get("kept", 0) > before, "no connection was kept")


def first_kept(proxy: ProxyProcess, user: AppUser = APP, **kwargs: Any) -> None:
    """Log in and out until a connection is kept: the proxy keeps none before a health check
    has read the backend's init_connect (right after it starts)."""
    def kept() -> bool:
        proxy.connect(user, **kwargs).close()
        time.sleep(0.1)
        return pool_events(proxy)["kept"] > 0
    wait_until(kept, "no connection was ever kept", timeout=20)


@pytest.fixture
def server(mariadb_factory: MariaDBFactory) -> MariaDBServer:
    srv = mariadb_factory(BACKEND_ARGS, BACKEND_USERS)
    srv.sql("CREATE TABLE IF NOT EXISTS test.pool_rows (a INT)")
    return srv


@pytest.fixture
def watch(server: MariaDBServer) -> Iterator[Watch]:
    w = Watch(server)
    yield w
    w.conn.close()


def test_the_next_login_is_served_on_the_kept_connection_as_a_new_one(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    """The second client gets a session as a new login would make it: its login's database and
    character set (latin1 here, not the server's utf8mb4), and nothing of the first client's
    variables, temporary table, lock or transaction."""
    proxy = proxy_factory([server.addr], pool_toml())
    latin1 = {"autocommit": True, "charset": "latin1"}
    looks = ("SELECT @secret, DATABASE(), @@character_set_client, @@collation_connection, "
             "@@sql_mode, @@autocommit, @@time_zone, @@max_statement_time")
    first_kept(proxy, **latin1)
    with proxy.connect(**latin1) as fresh, fresh.cursor() as cur:
        cur.execute(looks)
        new_login = cur.fetchone()
    assert new_login[1:4] == ("test", "latin1", "latin1_swedish_ci")
    first = watch.threads()
    assert len(first) == 1  # the clients left; one connection stayed, idle
    first_client = proxy.connect(**latin1)
    assert watch.threads() == first  # that connection serves it
    with first_client.cursor() as cur:
        cur.execute("SET @secret = 'first client'")
        cur.execute("SET NAMES utf8mb4")
        cur.execute("SET SESSION sql_mode = 'ANSI', time_zone = '+05:00', "
                    "max_statement_time = 5")
        cur.execute("CREATE TEMPORARY TABLE mine (a INT)")
        cur.execute("SELECT GET_LOCK('pool-test', 0)")
        cur.execute("START TRANSACTION")
        cur.execute("INSERT INTO pool_rows VALUES (1)")
        cur.execute("USE mysql")
    before = pool_events(proxy)["kept"]
    first_client.close()  # COM_QUIT inside the transaction
    kept_after_close(proxy, before)
    accepted = watch.connections()
    with proxy.connect(**latin1) as second, second.cursor() as cur:
        assert watch.threads() == first
        cur.execute(looks)
        assert cur.fetchone() == new_login
        cur.execute("SELECT IS_FREE_LOCK('pool-test'), COUNT(*) FROM pool_rows")
        assert cur.fetchone() == (1, 0)  # the lock freed, the insert rolled back
        with pytest.raises(pymysql.err.ProgrammingError) as info:
            cur.execute("SELECT * FROM mine")
        assert info.value.args[0] == 1146  # the temporary table is gone
    assert watch.connections() == accepted  # the server saw no new connection
    assert pool_events(proxy)["reused"] >= 2


def test_what_a_reset_would_not_give_back_keeps_no_connection(
    server: MariaDBServer, proxy_factory: ProxyFactory,
) -> None:
    """An account's own MAX_STATEMENT_TIME and the server's init_connect are a new login's, not
    a reset connection's: the proxy keeps no connection of such an account, and none at all on
    a server with an init_connect, once a health check has read it (every second here)."""
    ordinary = AppUser("ordinary", "ordinary-pass")  # no SUPER: init_connect runs for it
    limited = AppUser("limited", "limited-pass")
    server.sql(f"CREATE USER {ordinary.name}@'%' IDENTIFIED BY '{ordinary.password}'; "
               f"GRANT SELECT ON test.* TO {ordinary.name}@'%'; "
               f"CREATE USER {limited.name}@'%' IDENTIFIED BY '{limited.password}' "
               f"WITH MAX_STATEMENT_TIME 7; GRANT SELECT ON test.* TO {limited.name}@'%'")
    proxy = proxy_factory([server.addr], pool_toml() + '\n[health]\ninterval = "1s"')
    first_kept(proxy, ordinary)

    def logins(user: AppUser, looks: tuple[Any, ...]) -> None:
        before = pool_events(proxy)["kept"]
        for _ in range(5):
            with proxy.connect(user) as conn, conn.cursor() as cur:
                cur.execute("SELECT @greeting, @@max_statement_time")
                assert cur.fetchone() == looks
        time.sleep(0.3)
        assert pool_events(proxy)["kept"] == before

    logins(limited, (None, 7.0))
    server.sql("SET GLOBAL init_connect = \"SET @greeting = 'hello'\"")
    try:
        time.sleep(2.5)  # a health check has read it
        logins(ordinary, ("hello", 0.0))
    finally:
        server.sql("SET GLOBAL init_connect = ''")


def created(server: MariaDBServer, user: AppUser, limits: str = "") -> AppUser:
    """An account of `user` that may read `test` (and nothing more: no CONNECTION ADMIN)."""
    server.sql(f"CREATE USER {user.name}@'%' IDENTIFIED BY '{user.password}' {limits}; "
               f"GRANT SELECT ON test.* TO {user.name}@'%'")
    return user


def one_then_another(proxy: ProxyProcess, watch: Watch, user: AppUser) -> None:
    """A login, then one with another character set (which a kept connection would not serve):
    the first one's connection is gone, and the second gets one of its own."""
    proxy.connect(user, charset="latin1").close()
    wait_until(lambda: not watch.threads(user.name), f"a connection of {user.name} was kept")
    with proxy.connect(user, charset="utf8mb4") as conn, conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone() == (f"{user.name}@%",)


def test_an_accounts_connection_limits_count_every_login_and_connection_as_without_the_pool(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    """An account's MAX_CONNECTIONS_PER_HOUR counts its logins and its MAX_USER_CONNECTIONS
    the connections it holds: the proxy keeps no connection of such an account, so a login is
    refused when it would be without the proxy, and never because a connection kept idle holds
    the place it needs."""
    hourly = created(server, AppUser("hourly", "hourly-pass"), "WITH MAX_CONNECTIONS_PER_HOUR 3")
    single = created(server, AppUser("single", "single-pass"), "WITH MAX_USER_CONNECTIONS 1")
    proxy = proxy_factory([server.addr], pool_toml())
    first_kept(proxy)
    before = pool_events(proxy)["kept"]
    for _ in range(3):
        proxy.connect(hourly).close()
    with pytest.raises(pymysql.err.OperationalError) as info:
        proxy.connect(hourly)
    assert info.value.args[0] == 1226  # ER_USER_LIMIT_REACHED: the server counted 3 logins
    one_then_another(proxy, watch, single)
    assert pool_events(proxy)["kept"] == before


def test_a_server_with_max_user_connections_keeps_no_connection(
    mariadb_factory: MariaDBFactory, proxy_factory: ProxyFactory,
) -> None:
    """The server's max_user_connections limits every account: once a health check has read
    it (every second here), the proxy closes what it keeps there and keeps nothing more. (A
    MariaDB started with 0 cannot set it later: this one starts with 1, set to 0 at first.)"""
    server = mariadb_factory((*BACKEND_ARGS, "--max-user-connections=1"), BACKEND_USERS)
    server.sql("SET GLOBAL max_user_connections = 0")
    user = created(server, AppUser("plain", "plain-pass"))
    watch = Watch(server)
    try:
        proxy = proxy_factory([server.addr], pool_toml() + '\n[health]\ninterval = "1s"')
        first_kept(proxy, user)
        assert watch.threads(user.name)
        server.sql("SET GLOBAL max_user_connections = 1")
        wait_until(lambda: not watch.threads(user.name), "a kept connection stayed")
        before = pool_events(proxy)["kept"]
        one_then_another(proxy, watch, user)
        assert pool_events(proxy)["kept"] == before
    finally:
        watch.conn.close()


def test_a_login_the_server_finds_one_too_many_gets_the_place_of_a_kept_connection(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    """Kept connections count toward the server's max_connections. MariaDB greets one connection
    beyond it and refuses it after the password, for want of CONNECTION ADMIN, and refuses the
    one after that at once: either way the proxy closes the longest idle connection it keeps
    there and tries again, and the login goes through."""
    user = created(server, AppUser("plain", "plain-pass"))
    proxy = proxy_factory([server.addr], pool_toml() + '\n[health]\ninterval = "60s"')
    first_kept(proxy, user, charset="latin1")
    clients = [proxy.connect(user, charset="latin1") for _ in range(4)]
    before = pool_events(proxy)["kept"]
    for conn in clients:
        conn.close()
    wait_until(lambda: pool_events(proxy)["kept"] >= before + 4, "the connections were not kept")
    kept = watch.threads(user.name)
    assert len(kept) == 4

    def direct(who: AppUser) -> MySQLdb.Connection:
        return MySQLdb.connect(host=HOST, port=server.port, user=who.name, password=who.password)

    def fill(who: AppUser) -> None:
        """Connect as `who` until the server refuses a connection as one too many."""
        while True:
            try:
                others.append(direct(who))
            except MySQLdb.OperationalError as e:
                assert e.args[0] == 1040, e
                return
            assert len(others) < 20, "the server never said it had too many connections"

    watch.conn.query("SET GLOBAL max_connections = 10")  # MariaDB's least
    others: list[MySQLdb.Connection] = []
    try:
        fill(user)  # full for an account without CONNECTION ADMIN: refused after the password
        with proxy.connect(user, charset="utf8mb4") as conn, conn.cursor() as cur:  # not kept's
            cur.execute("SELECT CURRENT_USER(), @@character_set_client")
            assert cur.fetchone() == ("plain@%", "utf8mb4")
            left = watch.threads(user.name) & kept
            assert len(left) < len(kept)  # a kept connection made room
            fill(APP)  # and the place beyond, for CONNECTION ADMIN: now refused at once
            with proxy.connect(APP, charset="utf8mb4") as again, again.cursor() as cur2:
                cur2.execute("SELECT CURRENT_USER()")
                assert cur2.fetchone() == ("app@%",)
            assert len(watch.threads(user.name) & kept) < len(left)  # another one did
        proxy.wait_log("the server has too many connections")
    finally:
        for other in others:
            other.close()
        watch.conn.query("SET GLOBAL max_connections = 151")


def test_a_session_a_kill_named_leaves_no_connection_behind(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    """A KILL runs against its target's backend thread a moment after naming the target (one
    in another worker is looked up there first), when the target may have ended: a session a
    KILL named is not kept, so that thread never serves another client."""
    proxy = proxy_factory([server.addr], pool_toml())
    first_kept(proxy)
    (kept_thread,) = watch.threads()
    target = proxy.connect()
    assert watch.threads() == {kept_thread}  # the target is served on it
    with target.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        (target_id,) = cur.fetchone()
    before = pool_events(proxy)["kept"]
    with proxy.connect() as killer, killer.cursor() as cur:
        cur.execute(f"KILL QUERY {target_id}")  # it runs nothing: the session lives on
    kept_after_close(proxy, before)  # the killer's connection
    with target.cursor() as cur:
        cur.execute("SELECT 1")
    target.close()
    wait_until(lambda: kept_thread not in watch.threads(), "the KILL's target was kept")
    assert pool_events(proxy)["kept"] == before + 1


def test_only_the_same_login_verified_by_the_proxy_shares_a_connection(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    """The proxy's connections reach the server from 127.0.0.1, where an account of the same
    name with another password wins: a client who knows only the other account's password is
    refused by the server, kept connection or not. Another database, no database, or a user
    whose plugin the proxy cannot verify (ed25519) get connections of their own."""
    server.sql(f"CREATE USER {APP.name}@'127.0.0.1' IDENTIFIED BY 'local-pass'; "
               f"GRANT ALL ON *.* TO {APP.name}@'127.0.0.1'")
    # (no health check between the counts below: each is a connection of the proxy's own)
    proxy = proxy_factory([server.addr], pool_toml() + '\n[health]\ninterval = "60s"')
    local = AppUser(APP.name, "local-pass")
    first_kept(proxy, local)
    kept = watch.threads()
    accepted = watch.connections()
    for password in ("wrong", APP.password):  # the stored hash of app@'%' verifies the second
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                            password=password, database="test")
        assert info.value.args[0] == 1045
    for conn in (proxy.connect(local, database="mysql"), proxy.connect(local, database=None),
                 proxy.connect(EDU)):
        with conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    assert watch.connections() >= accepted + 5  # each of them a connection of its own
    assert kept <= watch.threads()  # and the kept one is still there
    before, accepted = watch.threads(), settled(watch)
    with proxy.connect(local) as conn, conn.cursor() as cur:
        assert watch.threads() == before  # served on a kept connection
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone() == (f"{APP.name}@127.0.0.1",)
    assert watch.connections() == accepted
    assert pool_events(proxy)["reused"] == 1


def set_option(conn: pymysql.connections.Connection[Any], on: bool) -> None:
    """COM_SET_OPTION: multi-statements on or off (mysqli's multi_query sends it)."""
    conn._write_bytes(frame(b"\x1b" + (b"\x00\x00" if on else b"\x01\x00"), 0))
    conn._next_seq_id = 1
    conn._read_packet()  # EOF (or OK): it took


def change_user(conn: pymysql.connections.Connection[Any], user: AppUser) -> None:
    """COM_CHANGE_USER by hand (PyMySQL has none), answering the auth switch it gets."""
    payload = (b"\x11" + user.name.encode() + b"\0" + b"\x00" + b"test\0"
               + (45).to_bytes(2, "little") + b"mysql_native_password\0" + b"\x00")
    conn._write_bytes(frame(payload, 0))
    conn._next_seq_id = 1
    answer = conn._read_packet()
    data = bytes(answer.get_all_data())
    if data[:1] == b"\xfe":
        switch = parse_auth_switch(data)
        scramble = native_password_scramble(user.password.encode(), switch.data[:20])
        conn._write_bytes(frame(scramble, conn._next_seq_id))
        conn._next_seq_id += 1
        data = bytes(conn._read_packet().get_all_data())
    assert data[:1] == b"\x00", data


@pytest.mark.parametrize("change", ["SET ROLE", "compound SET ROLE", "COM_SET_OPTION",
                                    "COM_CHANGE_USER", "busy", "profiling"])
def test_a_session_that_changed_what_a_new_login_would_not_give_back_is_not_kept(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory, change: str,
) -> None:
    """The server keeps the current role through COM_CHANGE_USER, the multi-statements
    option COM_SET_OPTION set, and the profiles SHOW PROFILES lists through a reset (the next
    session would see what this one ran); COM_CHANGE_USER makes another login; and a
    connection whose command is still running is of no use: none of them is kept."""
    server.sql(f"CREATE ROLE IF NOT EXISTS pool_role; GRANT pool_role TO {APP.name}@'%'")
    proxy = proxy_factory([server.addr], pool_toml())
    first_kept(proxy)
    before = pool_events(proxy)["kept"]
    conn = proxy.connect()
    mine = watch.threads()
    with conn.cursor() as cur:
        if change == "SET ROLE":
            cur.execute("SET ROLE pool_role")
        elif change == "compound SET ROLE":
            cur.execute("BEGIN NOT ATOMIC SET ROLE pool_role; END")
        elif change == "COM_SET_OPTION":
            set_option(conn, on=True)
        elif change == "COM_CHANGE_USER":
            change_user(conn, APP)
        elif change == "profiling":
            cur.execute("SET profiling = 1")
            cur.execute("SELECT 'mine alone'")
    if change == "busy":
        query = b"\x03SELECT SLEEP(2)"
        conn._sock.sendall(len(query).to_bytes(3, "little") + b"\x00" + query)  # then gone
        conn._sock.shutdown(socket.SHUT_RDWR)
        conn._sock.close()
    else:
        conn.close()
    wait_until(lambda: not watch.threads() & mine, f"the connection was kept after {change}",
               timeout=15)
    assert pool_events(proxy)["kept"] == before


def test_a_dropped_database_is_not_served_from_a_kept_connection(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    """The pool gives a kept connection its login's database again (COM_INIT_DB): a database
    dropped meanwhile fails that, and the next login naming it gets the server's own error."""
    server.sql(f"CREATE DATABASE scratch; GRANT ALL ON scratch.* TO {APP.name}@'%'")
    proxy = proxy_factory([server.addr], pool_toml())
    first_kept(proxy)
    before = pool_events(proxy)["kept"]
    conn = proxy.connect(database="scratch")
    with conn.cursor() as cur:
        cur.execute("DROP DATABASE scratch")
    conn.close()
    proxy.wait_log("the server refused the reset: 1049")
    assert pool_events(proxy)["kept"] == before
    with pytest.raises(pymysql.err.OperationalError) as info:
        proxy.connect(database="scratch")
    assert info.value.args[0] == 1049


def test_a_locked_account_is_not_served_from_kept_connections(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    """The stored hashes leave out locked accounts, so once the proxy has synced them (here
    every second) the server judges the next login, and refuses it."""
    proxy = proxy_factory([server.addr], pool_toml() + '\nauth-sync-interval = "1s"')
    first_kept(proxy)
    proxy.connect().close()
    assert pool_events(proxy)["reused"] >= 1  # served from the pool before the lock
    assert watch.threads()
    server.sql(f"ALTER USER {APP.name}@'%' ACCOUNT LOCK")
    try:
        refused: list[int] = []

        def login_refused() -> bool:
            try:
                proxy.connect().close()
            except pymysql.err.OperationalError as e:
                refused.append(e.args[0])
                return True
            return False

        wait_until(login_refused, "a locked account still logged in on kept connections")
        assert refused == [4151]  # ER_ACCOUNT_HAS_BEEN_LOCKED, from the server
    finally:
        server.sql(f"ALTER USER {APP.name}@'%' ACCOUNT UNLOCK")


def test_kept_connections_expire_and_leave_a_drained_backend(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory([server.addr], pool_toml(idle="1s"))
    first_kept(proxy)
    assert watch.threads()
    wait_until(lambda: not watch.threads(), "the kept connection outlived backend-pool-idle")
    proxy = proxy_factory([server.addr], pool_toml(idle="1h"))
    first_kept(proxy)
    assert len(watch.threads()) == 1
    # A reload that makes the pool smaller closes the oldest beyond the new size.
    conns = [proxy.connect() for _ in range(3)]
    for conn in conns:
        conn.close()
    wait_until(lambda: len(watch.threads()) == 3, "three sessions left three connections")
    status, body = proxy.api("/api/admin/config", method="PUT",
                             body=b"[proxy]\nbackend-pool-size = 1\n")
    assert status == 200, body
    wait_until(lambda: len(watch.threads()) == 1, "the pool did not shrink to its new size")
    status, body = proxy.api(f"/api/admin/backends/{server.addr}/drain", method="POST")
    assert status == 200, body
    wait_until(lambda: not watch.threads(), "a drained backend kept a pooled connection")


def test_churn_reuses_connections_with_the_suites_workers(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory,
) -> None:
    """mysqlclient (Connector/C) logins one after another, then from 4 threads at once: every
    one succeeds and sees a clean session, and the server sees few connections."""
    proxy = proxy_factory([server.addr], pool_toml(size=8, more=""))
    first_kept(proxy)
    accepted = watch.connections()

    def login_and_check() -> None:
        conn = MySQLdb.connect(host="127.0.0.1", port=proxy.port, user=APP.name,
                               password=APP.password, database="test")
        cur = conn.cursor()
        cur.execute("SELECT @mark")
        assert cur.fetchone() == (None,)
        cur.execute("SET @mark = 1")
        conn.close()

    for _ in range(40):
        login_and_check()
    # A new connection only until each worker has kept one (one process: none).
    assert watch.connections() - accepted < 10
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            for _ in range(50):
                login_and_check()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # 240 logins: new connections only while 4 at once outnumber what is kept
    assert watch.connections() - accepted < 30
    assert pool_events(proxy)["reused"] >= 200


def _python_connector(name: str, port: int) -> Any:
    account = {"host": "127.0.0.1", "port": port, "user": APP.name, "password": APP.password,
               "database": "test"}
    if name == "mysql-connector-python":
        return mysql.connector.connect(use_pure=True, **account)
    if name == "mariadb":
        return mariadb.connect(**account)
    if name == "mysqlclient":
        return MySQLdb.connect(**{k: v for k, v in account.items() if k != "database"},
                               db="test")
    return pymysql.connect(**account)


@pytest.mark.parametrize("connector", ["mysql-connector-python", "mariadb", "mysqlclient",
                                       "pymysql"])
def test_each_python_connector_logs_in_on_kept_connections(
    server: MariaDBServer, watch: Watch, proxy_factory: ProxyFactory, connector: str,
) -> None:
    """Each connector negotiates its own capabilities and reads the login's OK its own way:
    a login served on a kept connection must look to it like the new one it asked for (same
    database, character set and autocommit, none of the last client's variables), and the
    server must see no new connection for it."""
    proxy = proxy_factory([server.addr], pool_toml())
    first_kept(proxy)
    looks = ("SELECT DATABASE(), @@character_set_client, @@collation_connection, "
             "@@autocommit, @last_client")
    seen = []
    accepted = None
    for i in range(6):
        conn = _python_connector(connector, proxy.port)
        cur = conn.cursor()
        cur.execute(looks)
        seen.append(tuple(cur.fetchall()[0]))
        cur.execute(f"SET @last_client = {i}")
        cur.execute(f"SELECT {i} + 1")
        assert cur.fetchall()[0][0] == i + 1
        cur.close()
        before = pool_events(proxy)["kept"]
        conn.close()
        kept_after_close(proxy, before)
        if accepted is None:
            accepted = watch.connections()
    assert len(set(seen)) == 1, seen
    assert seen[0][0] == "test" and seen[0][4] is None
    assert watch.connections() == accepted  # logins 2 to 6 opened nothing on the server
    assert pool_events(proxy)["reused"] >= 5
