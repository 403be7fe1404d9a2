"""`[proxy] high-memory-usage-reject-threshold`, under a real memory cgroup: the test starts the
proxy inside a cgroup of its own, then lowers the cgroup's limit so that the proxy's resident
memory (its processes', workers too) is over the threshold of it, and raises it again. New
clients are refused with a clear error while the use is over it (counted, and health says
why); sessions already there go on. Needs root.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pymysql
import pytest

from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryCgroup:
    path: Path
    limit_file: str

    def set_limit(self, limit: int) -> None:
        (self.path / self.limit_file).write_text(str(limit))


@pytest.fixture
def cgroup() -> Iterator[MemoryCgroup]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it creates a memory cgroup", pytrace=False)
    v1 = Path("/sys/fs/cgroup/memory")
    name = f"tiproxy-memtest-{os.getpid()}"
    if (v1 / "memory.limit_in_bytes").exists():
        group = MemoryCgroup(v1 / name, "memory.limit_in_bytes")
    else:
        group = MemoryCgroup(Path("/sys/fs/cgroup") / name, "memory.max")
    group.path.mkdir()
    try:
        group.set_limit(2 * GIB)
        yield group
    finally:
        for _ in range(100):  # the proxy's processes must have left it
            try:
                group.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _wait(check: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _resident(proxy: ProxyProcess) -> int:
    """Bytes of resident memory (PSS) of the proxy's processes (the control process and its
    workers), as /proc tells it."""
    assert proxy.proc is not None
    pid = proxy.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for p in [pid, *map(int, children)]:
        found = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{p}/smaps_rollup").read_text(),
                          re.MULTILINE)
        assert found is not None
        total += int(found.group(1)) * 1024
    return total


def _refused(proxy: ProxyProcess) -> str | None:
    """The error a new client gets, or None when it gets in."""
    try:
        proxy.connect().close()
    except pymysql.err.OperationalError as e:
        assert e.args[0] == 1040, e.args
        return str(e.args[1])
    return None


def test_new_clients_are_refused_over_the_threshold(cgroup: MemoryCgroup,
                                                    backends: list[MariaDBServer],
                                                    proxy_factory: ProxyFactory) -> None:
    join = f'echo $$ > {cgroup.path / "cgroup.procs"} && exec "$@"'
    proxy = proxy_factory([b.addr for b in backends],
                          "\nhigh-memory-usage-reject-threshold = 0.6",
                          command_prefix=["sh", "-c", join, "sh"])
    old = proxy.connect()
    assert _refused(proxy) is None
    # 70% of the limit is the proxy's: over 0.6, and the rest is room for the page cache the
    # kernel gives back, so nothing is killed.
    cgroup.set_limit(int(_resident(proxy) / 0.7))
    _wait(lambda: _refused(proxy) is not None, "new clients still admitted")
    message = _refused(proxy)
    assert message is not None and "high-memory-usage-reject-threshold (60%)" in message
    with old.cursor() as cur:  # the session that was there goes on
        cur.execute("SELECT 'still here'")
        assert cur.fetchone() == ("still here",)
    status, body = proxy.api("/api/debug/health")
    assert status == 502 and "memory use" in json.loads(body)["unhealthy_reason"]
    _, metrics = proxy.api("/metrics")
    refused = re.search(rb'^tiproxy_server_reject_connection_total\{type="memory"\} (\S+)$',
                        metrics, re.MULTILINE)
    assert refused is not None and float(refused.group(1)) >= 2, metrics[-2000:]
    cgroup.set_limit(4 * GIB)
    _wait(lambda: _refused(proxy) is None, "new clients still refused after the limit rose")
    assert proxy.api("/api/debug/health")[0] == 200
    assert "new clients refused: memory use" in proxy.log()
    old.close()
    proxy.stop()
