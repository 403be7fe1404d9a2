"""KILL with the killer's own rights on either backend, and connection ids that SQL shows as the
proxy's: the greeting's id, CONNECTION_ID(), IS_USED_LOCK() and the processlist agree, work
with KILL, and stay the same when the session moves.

The proxy knows the users' hashes from a users file only (no `auth-sync-user`), so a KILL on
another backend can only work by logging in there as the killer. The suite runs these again
with `workers = 2`, where victim and killer often sit in different workers.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mariadb
import mysql.connector
import MySQLdb
import pymysql
import pytest

from support.backends import APP, BACKEND_ARGS, MariaDBFactory
from support.proxy import WORKERS, ProxyFactory, ProxyProcess
from support.sleeper import SleepingQuery
from tiproxy.playground.mariadb import AppUser, MariaDBServer

pytestmark = pytest.mark.integration

BOB = AppUser("bob", "bob-pass")  # may read, may not kill others' sessions
BOSS = AppUser("boss", "boss-pass")  # CONNECTION ADMIN: may kill anyone's
ER_QUERY_INTERRUPTED = 1317
ER_KILL_DENIED = 1095
ER_NO_SUCH_THREAD = 1094


@pytest.fixture(scope="module")
def pair(mariadb_factory: MariaDBFactory) -> list[MariaDBServer]:
    servers = [mariadb_factory(BACKEND_ARGS, (APP,)) for _ in range(2)]
    for server in servers:
        server.sql(
            "CREATE USER bob@'%' IDENTIFIED BY 'bob-pass';\n"
            "GRANT SELECT ON test.* TO bob@'%';\n"
            "CREATE USER boss@'%' IDENTIFIED BY 'boss-pass';\n"
            "GRANT SELECT ON test.* TO boss@'%';\n"
            "GRANT CONNECTION ADMIN ON *.* TO boss@'%';\n"
        )
        # Direct connections first: the backends' thread ids are then far from the proxy's,
        # so that an id the backend gave could not pass for the proxy's.
        for _ in range(100):
            pymysql.connect(host="127.0.0.1", port=server.port, user=APP.name,
                            password=APP.password).close()
    return servers


@pytest.fixture
def idproxy(pair: list[MariaDBServer], proxy_factory: ProxyFactory,
            tmp_path: Path) -> Iterator[ProxyProcess]:
    hashes = pair[0].sql("SELECT User, authentication_string FROM mysql.user "
                         "WHERE plugin = 'mysql_native_password' AND User IN "
                         "('app', 'bob', 'boss')")
    users = tmp_path / "users"
    users.write_text(hashes)
    yield proxy_factory([s.addr for s in pair], f'\n[security]\nusers-file = "{users}"')


def _port(conn: Any) -> int:
    cur = conn.cursor()
    cur.execute("SELECT @@port")
    port = int(cur.fetchone()[0])
    cur.close()
    return port


def _on(proxy: ProxyProcess, port: int, connect: Callable[[], Any], fillers: list[Any],
        accept: Callable[[Any], bool] = lambda conn: True) -> Any:
    """A new connection (made by `connect`) on the backend at `port` (and that `accept`s):
    connections that do not are kept open, in `fillers`, so that the next one lands there."""
    for _ in range(40):
        conn = connect()
        if _port(conn) == port and accept(conn):
            return conn
        fillers.append(conn)
    raise AssertionError(f"no connection landed on port {port}")


def _wait_credential(proxy: ProxyProcess, *conn_ids: int) -> None:
    """The proxy has each session's reusable credential (it may sync hashes after a login)."""
    deadline = time.monotonic() + 10
    for conn_id in conn_ids:
        while "no reusable credential" in proxy.session(conn_id)["waiting"]:
            assert time.monotonic() < deadline, proxy.session(conn_id)
            time.sleep(0.05)


def _mysqlclient(proxy: ProxyProcess, user: AppUser = APP) -> Any:
    return MySQLdb.connect(host="127.0.0.1", port=proxy.port, user=user.name,
                           password=user.password, database="test")


def _connector(proxy: ProxyProcess, user: AppUser = APP) -> Any:
    return mysql.connector.connect(host="127.0.0.1", port=proxy.port, user=user.name,
                                   password=user.password, database="test")


@pytest.mark.parametrize("where", ["same", "other"])
@pytest.mark.parametrize("driver", ["mysqlclient", "connector"])
def test_driver_cancels_reach_either_backend(idproxy: ProxyProcess, pair: list[MariaDBServer],
                                             driver: str, where: str) -> None:
    """mysqlclient's kill(thread_id()) and mysql-connector-python's cmd_process_kill, with the
    id each driver read from its victim's greeting."""
    fillers: list[Any] = []
    victim = idproxy.connect()
    sleeping = SleepingQuery(victim)
    victim_port = _port_of_session(idproxy, victim.thread_id(), pair)
    wanted = victim_port if where == "same" else next(s.port for s in pair
                                                      if s.port != victim_port)
    if driver == "mysqlclient":
        killer = _on(idproxy, wanted, lambda: _mysqlclient(idproxy), fillers)
        _wait_credential(idproxy, killer.thread_id())
        killer.kill(victim.thread_id())
    else:
        killer = _on(idproxy, wanted, lambda: _connector(idproxy), fillers)
        _wait_credential(idproxy, killer.connection_id)
        killer.cmd_process_kill(victim.thread_id())
    assert sleeping.wait(), f"the kill ({where} backend) did not end the victim's statement"
    assert sleeping.codes and sleeping.codes[0] in (2013, 1927, ER_QUERY_INTERRUPTED), \
        sleeping.codes  # the connection was killed
    if where == "other":
        idproxy.wait_log("as its own user")
    for conn in [killer, *fillers]:
        conn.close()


def _port_of_session(proxy: ProxyProcess, conn_id: int, pair: list[MariaDBServer]) -> int:
    backend = proxy.session(conn_id)["backend"]
    return int(next(s.port for s in pair if s.addr == backend))


def _land_next_on(proxy: ProxyProcess, port: int, pair: list[MariaDBServer],
                  fillers: list[Any]) -> None:
    """Make the next new session land on the backend at `port` (fewest sessions wins)."""
    addr = next(s.addr for s in pair if s.port == port)

    def lighter() -> bool:
        counts = {b["addr"]: b["connections"] for b in proxy.backends()}
        return all(counts[addr] < n for a, n in counts.items() if a != addr)

    extra: list[Any] = []
    deadline = time.monotonic() + 10
    while not lighter():
        assert time.monotonic() < deadline, proxy.backends()
        conn = proxy.connect()
        (extra if _port(conn) == port else fillers).append(conn)
        if extra and len(fillers) > len(extra):
            for conn in extra:
                conn.close()
            extra.clear()
            time.sleep(0.3)  # the counts the API shows follow
    for conn in extra:
        conn.close()


@pytest.mark.parametrize("where", ["same", "other"])
def test_mariadb_cli_ctrl_c_kills_its_query(idproxy: ProxyProcess, pair: list[MariaDBServer],
                                            where: str) -> None:
    """The CLI's Ctrl-C opens a second connection and sends KILL QUERY with the greeting's id."""
    before = {s["id"] for s in idproxy.sessions()}
    cli = subprocess.Popen(
        ["mariadb", "-h127.0.0.1", f"-P{idproxy.port}", f"-u{APP.name}", f"-p{APP.password}",
         "--skip-ssl", "test", "-e", "SELECT SLEEP(20)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fillers: list[Any] = []
    try:
        deadline = time.monotonic() + 10
        addrs = {s.addr for s in pair}
        # a session is listed from its greeting on; its backend is named once it has logged in
        while not (new := [s for s in idproxy.sessions()
                           if s["id"] not in before and s.get("backend") in addrs]):
            assert time.monotonic() < deadline, "the CLI's session did not reach a backend"
            time.sleep(0.05)
        victim_port = _port_of_session(idproxy, new[0]["id"], pair)
        wanted = victim_port if where == "same" else next(s.port for s in pair
                                                          if s.port != victim_port)
        _land_next_on(idproxy, wanted, pair, fillers)
        time.sleep(0.5)
        started = time.monotonic()
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=15)
        assert time.monotonic() - started < 10
        assert b"query killed" in out, (out, err)
        assert b"1317" in err and b"interrupted" in err, err
        if where == "other":
            idproxy.wait_log("as its own user")
            assert "KILL QUERY" in idproxy.log()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
        for conn in fillers:
            conn.close()


def test_the_server_decides_with_the_killers_rights(idproxy: ProxyProcess,
                                                    pair: list[MariaDBServer]) -> None:
    """bob may not kill app's session (the server's 1095, naming the id bob named), boss may,
    on the same backend and on the other one."""
    fillers: list[Any] = []
    for where in ("same", "other"):
        victim = idproxy.connect()
        victim_port = _port_of_session(idproxy, victim.thread_id(), pair)
        wanted = victim_port if where == "same" else next(s.port for s in pair
                                                          if s.port != victim_port)
        bob = _on(idproxy, wanted, lambda: idproxy.connect(BOB), fillers)
        boss = _on(idproxy, wanted, lambda: idproxy.connect(BOSS), fillers)
        _wait_credential(idproxy, bob.thread_id(), boss.thread_id())
        with bob.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as denied:
            cur.execute(f"KILL QUERY {victim.thread_id()}")
        assert denied.value.args[0] == ER_KILL_DENIED, (where, denied.value.args)
        assert denied.value.args[1] == f"You are not owner of thread {victim.thread_id()}"
        sleeping = SleepingQuery(victim)
        with boss.cursor() as cur:
            cur.execute(f"KILL QUERY {victim.thread_id()}")
        assert sleeping.wait(), where
        assert sleeping.codes == [ER_QUERY_INTERRUPTED], (where, sleeping.codes)
        with victim.cursor() as cur:  # KILL QUERY: the session itself goes on
            cur.execute("SELECT 'alive'")
            assert cur.fetchall() == (("alive",),)
        with boss.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as unknown:
            cur.execute("KILL 987654")
        assert unknown.value.args[0] == ER_NO_SUCH_THREAD
        for conn in (victim, bob, boss):
            conn.close()
    for conn in fillers:
        conn.close()


def test_connection_id_is_the_greetings_and_kill_takes_it(idproxy: ProxyProcess) -> None:
    """The script pattern: a session reads CONNECTION_ID(), another connection kills that id."""
    victim = idproxy.connect()
    with victim.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("SELECT CONNECTION_ID()")
        row = cur.fetchone()
    assert row == {"CONNECTION_ID()": victim.thread_id()}  # the name is the server's text too
    with victim.cursor() as cur:
        cur.execute("SELECT connection_id( ) + 0, 'CONNECTION_ID()', @@port")
        value, text, _ = cur.fetchone()
        assert [d[0] for d in cur.description][:2] == ["connection_id( ) + 0", "CONNECTION_ID()"]
    assert (value, text) == (victim.thread_id(), "CONNECTION_ID()")
    killer = idproxy.connect()
    _wait_credential(idproxy, killer.thread_id())
    with killer.cursor() as cur:
        cur.execute(f"KILL {value}")
    time.sleep(0.3)
    with pytest.raises(pymysql.err.OperationalError), victim.cursor() as cur:
        cur.execute("SELECT 1")
    killer.close()




def test_a_prepared_kill_names_the_proxy_id(idproxy: ProxyProcess) -> None:
    """A KILL sent as a prepared statement (mysqltest's --ps-protocol, PDO's native prepares)
    names a session by the proxy's id, as the same KILL sent as a query does: each execute is
    carried out as that KILL, an expression evaluated at each execute. One whose target is a
    parameter, which the backend would read as one of its own thread ids, is refused when it
    is prepared."""
    victim, second = idproxy.connect(), idproxy.connect()
    killer = mysql.connector.connect(host="127.0.0.1", port=idproxy.port, user=APP.name,
                                     password=APP.password, database="test", use_pure=True)
    _wait_credential(idproxy, victim.thread_id(), killer.connection_id)
    try:
        cur = killer.cursor(prepared=True)
        cur.execute(f"KILL QUERY {victim.thread_id()}")  # nothing running: nothing to stop
        with victim.cursor() as vcur:
            vcur.execute("SELECT 1")
            assert vcur.fetchall() == ((1,),)
        cur.execute(f"KILL CONNECTION {victim.thread_id()}")
        time.sleep(0.3)
        with pytest.raises(pymysql.err.OperationalError), victim.cursor() as vcur:
            vcur.execute("SELECT 1")
        # An expression, as mysqltest --ps-protocol prepares it: the server's refusal of a
        # table in it (at the execute, as directly), and the session it names killed.
        with pytest.raises(mysql.connector.Error) as refused:
            cur.execute("KILL (SELECT 1 FROM mysql.user LIMIT 1)")
        assert refused.value.errno == 1970, refused.value
        assert "KILL does not support subqueries" in str(refused.value)
        cur.execute(f"KILL CONNECTION {second.thread_id()} + 0")
        time.sleep(0.3)
        with pytest.raises(pymysql.err.OperationalError), second.cursor() as scur:
            scur.execute("SELECT 1")
        with pytest.raises(mysql.connector.Error, match="cannot be prepared"):
            cur.execute("KILL ?", (killer.connection_id,))
        cur.execute("SELECT 2")  # the killer's session goes on
        assert cur.fetchall() == [(2,)]
        # Connector/C sends the prepare and the execute of "the one prepared last" (id -1)
        # together (mariadb_stmt_execute_direct, Connector/Python's binary cursor).
        other = idproxy.connect()
        with mariadb.connect(host="127.0.0.1", port=idproxy.port, user=APP.name,
                             password=APP.password, database="test") as direct:
            _wait_credential(idproxy, direct.connection_id)
            dcur = direct.cursor(binary=True)
            dcur.execute(f"KILL CONNECTION {other.thread_id()}")
            time.sleep(0.3)
            with pytest.raises(pymysql.err.OperationalError), other.cursor() as ocur:
                ocur.execute("SELECT 1")
            dcur.execute("SELECT 3")
            assert dcur.fetchall() == [(3,)]
    finally:
        killer.close()

def test_a_kill_follows_a_session_that_moves_under_it(idproxy: ProxyProcess) -> None:
    """KILL QUERY, over and over, of a session that runs short statements and moves between
    them, asked to every 20 ms (MariaDB's main.myisam_icp_notembedded through moving
    sessions): each KILL finds the session where it is at that moment, never "Unknown thread
    id", even when it moved after the proxy looked it up. With workers, the killer is in
    another worker than its target: the KILL looks the target up there again."""
    victim, killer = idproxy.connect(), idproxy.connect()
    others = []
    while WORKERS > 1 and (killer.thread_id() - victim.thread_id()) % WORKERS == 0:
        others.append(killer)  # (a proxy id names its worker: id - 1 modulo workers)
        assert len(others) < 40
        killer = idproxy.connect()
    for conn in others:
        conn.close()
    _wait_credential(idproxy, victim.thread_id(), killer.thread_id())
    stop = threading.Event()
    problems: list[BaseException] = []

    def busy() -> None:
        try:
            with victim.cursor() as cur:
                while not stop.is_set():
                    try:
                        cur.execute("SELECT SLEEP(0.002)")  # killed in its sleep: answers 1
                    except pymysql.err.OperationalError as e:
                        if e.args[0] != 1317:  # killed before it slept: "interrupted"
                            raise
        except BaseException as e:
            problems.append(e)

    def moving() -> None:
        try:
            while not stop.wait(0.02):
                idproxy.redirect()
        except BaseException as e:
            problems.append(e)

    threads = [threading.Thread(target=busy), threading.Thread(target=moving)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    kills = 0
    try:
        with killer.cursor() as cur:  # 300 KILLs at least, over 20 moves at least
            while kills < 300 or idproxy.log().count(" moved ") < 20:
                for _ in range(50):
                    cur.execute(f"KILL QUERY {victim.thread_id()}")
                kills += 50
                assert time.monotonic() < deadline, "the sessions did not move"
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not problems, problems
    victim.close()
    killer.close()

def test_ids_stay_the_same_when_the_session_moves(idproxy: ProxyProcess) -> None:
    session = idproxy.connect()
    proxy_id = session.thread_id()

    def seen() -> tuple[int, int, int, int]:
        with session.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID(), @@port")
            cid, port = cur.fetchone()
            cur.execute("SHOW PROCESSLIST")
            shown = [r[0] for r in cur.fetchall() if r[7] == "SHOW PROCESSLIST"]
            cur.execute("SELECT ID, CONNECTION_ID() FROM information_schema.PROCESSLIST "
                        "WHERE ID = CONNECTION_ID()")
            own = cur.fetchall()
        assert len(shown) == 1 and len(own) == 1 and own[0][0] == own[0][1], own
        return cid, shown[0], own[0][0], port

    cid, shown, own, port = seen()
    assert cid == shown == own == proxy_id
    with session.cursor() as cur:
        cur.execute("PREPARE p FROM 'SELECT 1'")  # state that moves along
    idproxy.move(proxy_id)
    cid, shown, own, new_port = seen()
    assert new_port != port
    assert cid == shown == own == proxy_id
    with session.cursor() as cur:
        cur.execute("EXECUTE p")
        assert cur.fetchall() == ((1,),)
    # A prepared statement's CONNECTION_ID(), in the binary protocol, after the move too.
    conn = _connector(idproxy)
    cur = conn.cursor(prepared=True)
    cur.execute("SELECT CONNECTION_ID(), ?", (7,))
    assert cur.fetchall() == [(conn.connection_id, 7)]
    assert cur.column_names[0] == "CONNECTION_ID()"
    idproxy.move(conn.connection_id)
    cur.execute("SELECT CONNECTION_ID(), ?", (8,))
    assert cur.fetchall() == [(conn.connection_id, 8)]
    # Another connection kills the session by the id it shows, after the move.
    killer = idproxy.connect()
    _wait_credential(idproxy, killer.thread_id())
    sleeping = SleepingQuery(session)
    with killer.cursor() as kcur:
        kcur.execute(f"KILL QUERY {cid}")
    assert sleeping.wait()
    assert sleeping.codes == [ER_QUERY_INTERRUPTED]
    for c in (conn, killer, session):
        c.close()


def test_is_used_lock_compares_with_connection_id(idproxy: ProxyProcess,
                                                  pair: list[MariaDBServer]) -> None:
    """As directly: the holder's CONNECTION_ID() is what IS_USED_LOCK() answers, for the holder
    itself and for another session on its backend (in whichever worker)."""
    holder = idproxy.connect()
    fillers: list[Any] = []

    def other_worker(conn: Any) -> bool:  # with workers, the other session in another one
        return WORKERS < 2 or (conn.thread_id() - holder.thread_id()) % WORKERS != 0

    other = _on(idproxy, _port_of_session(idproxy, holder.thread_id(), pair),
                idproxy.connect, fillers, other_worker)
    with holder.cursor() as cur:
        cur.execute("SELECT GET_LOCK('tiproxy_ids', 0), CONNECTION_ID()")
        got, holder_id = cur.fetchone()
        assert got == 1
        cur.execute("SELECT IS_USED_LOCK('tiproxy_ids') = CONNECTION_ID(), "
                    "IS_USED_LOCK('tiproxy_ids')")
        assert cur.fetchone() == (1, holder_id)
    with other.cursor() as cur:
        cur.execute("SELECT IS_USED_LOCK('tiproxy_ids'), IS_USED_LOCK('tiproxy_ids') = "
                    "CONNECTION_ID(), IS_USED_LOCK('nobody_holds_this')")
        assert cur.fetchone() == (holder_id, 0, None)
        assert cur.description[0][0] == "IS_USED_LOCK('tiproxy_ids')"
    with holder.cursor() as cur:
        cur.execute("DO RELEASE_LOCK('tiproxy_ids')")
    with other.cursor() as cur:
        cur.execute("SELECT IS_USED_LOCK('tiproxy_ids')")
        assert cur.fetchone() == (None,)
    for conn in (holder, other, *fillers):
        conn.close()
