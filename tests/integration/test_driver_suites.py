"""A driver's own test suite through the proxy while its sessions keep moving.

mysqlclient's tests (from its source distribution at the installed version, which
scripts/setup.sh unpacks into .venv/driver-suites) run twice: directly against a MariaDB server
(the usual one, and one with Oracle-mode, latin1 and statement limits as its defaults),
then through the proxy whose two backends are two addresses of that server, with every session
asked to move every 10 ms (a test takes a few). Each test must end the same way both times: the
suite's authors' assertions, not ours, say whether the proxy changed anything a client can see.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support.backends import ADMIN_TOML, APP, BACKEND_ARGS, BACKEND_USERS, MariaDBFactory
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
MYSQLCLIENT = ROOT / ".venv" / "driver-suites" / \
    f"mysqlclient-{importlib.metadata.version('mysqlclient')}" / "tests"


def run_suite(tests: Path, port: int, work: Path) -> dict[str, str]:
    """Each test's outcome (passed, failed, error, skipped) by its name."""
    (work / "db.cnf").write_text(
        f"[MySQLdb-tests]\nhost = 127.0.0.1\nport = {port}\nuser = {APP.name}\n"
        f"password = {APP.password}\ndatabase = test\ndefault-character-set = utf8mb4\n")
    report = work / f"report-{port}.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--junitxml={report}", f"--rootdir={tests}", str(tests)],
        cwd=tests, env={"TESTDB": str(work / "db.cnf"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=600, check=False)
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}.{case.get('name')}"] = kinds[0] if kinds else "passed"
    return outcomes


def moving(proxy: ProxyProcess, stop: threading.Event) -> None:
    while not stop.wait(0.01):
        proxy.redirect()


# The tests' usual server, and one whose defaults differ from it in what the proxy's own
# statements must not depend on: Oracle-mode parsing, latin1, limits on every statement.
SERVERS = {
    "default": BACKEND_ARGS,
    "oracle_latin1_limits": (*BACKEND_ARGS, "--sql-mode=ORACLE", "--character-set-server=latin1",
                             "--collation-server=latin1_swedish_ci", "--max-statement-time=5",
                             "--max-join-size=1000000", "--wait-timeout=60"),
}


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest, mariadb_factory: MariaDBFactory) -> MariaDBServer:
    return mariadb_factory(SERVERS[request.param], BACKEND_USERS)


def test_mysqlclients_own_suite_ends_the_same_through_moves(
    server: MariaDBServer, proxy_factory: ProxyFactory, tmp_path: Path,
) -> None:
    assert MYSQLCLIENT.is_dir(), "scripts/setup.sh unpacks mysqlclient's source distribution"
    direct = run_suite(MYSQLCLIENT, server.port, tmp_path)
    assert len(direct) > 50 and list(direct.values()).count("passed") > 50, direct
    proxy = proxy_factory([server.addr, f"localhost:{server.port}"], ADMIN_TOML)
    stop = threading.Event()
    mover = threading.Thread(target=moving, args=(proxy, stop), daemon=True)
    mover.start()
    try:
        through = run_suite(MYSQLCLIENT, proxy.port, tmp_path)
    finally:
        stop.set()
        mover.join()
    changed = {name: (want, through.get(name)) for name, want in direct.items()
               if through.get(name) != want}
    assert not changed, changed
    moves = proxy.log().count(" moved ")
    assert moves >= 10, moves  # it really moved them, over and over
