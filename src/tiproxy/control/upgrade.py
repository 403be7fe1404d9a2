"""The proxy restarts without dropping anyone: `tiproxyctl upgrade` (POST /api/admin/upgrade) or
SIGUSR2 starts a new proxy process, which takes over the listening sockets and, one by one, the
live sessions.

Theory of operation
-------------------
The old process starts the new one as `python -m tiproxy` with its own arguments (so whatever
version is installed now runs), handing down its listening sockets (the SQL port's, per
data-plane process, and the API's) and a pipe, described in the TIPROXY_TAKEOVER environment
variable (`Takeover`). The new process serves on those sockets instead of binding (the kernel's
queue of new connections is the same socket's: none is lost), opens one handover receiver per
data-plane process (net/handover.py), and writes on the pipe that it is ready, with the
receivers' names. The old process then closes its API and its copies of the listening sockets
(new clients reach only the new process from then on), and each data-plane process hands its
sessions over at their next safe point (with workers, worker i's go to the new worker that the
session's id belongs to). Sessions that cannot travel (a TLS leg) stay until they end or
graceful-close-conn-timeout passes; then the old process exits. If the new process does not
say it is ready within READY_TIMEOUT, or dies first, the upgrade is abandoned and the old
process goes on as before.

Session ids stay unique: the new process starts its ids above every id the old one gave out
(`first_id`). The new process is started in a session of its own, so that a signal meant for
the old process's group does not reach it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

from tiproxy import __version__
from tiproxy.views.interface import UpgradeError

if TYPE_CHECKING:
    from tiproxy.api.server import APIServer

log = logging.getLogger("tiproxy.upgrade")

TAKEOVER_ENV = "TIPROXY_TAKEOVER"
READY_TIMEOUT = 60.0
ID_MARGIN = 1_000_000  # ids the old process may still give out while the new one starts


@dataclass(frozen=True)
class Takeover:
    """What a new process is handed by the one it replaces."""

    sql: list[list[int]]  # listening sockets' descriptors, per data-plane process
    api: int
    ready: int  # the pipe to say it is ready on
    first_id: int  # the first session id it may give out

    @classmethod
    def from_environment(cls) -> Takeover | None:
        raw = os.environ.pop(TAKEOVER_ENV, None)
        if raw is None:
            return None
        doc = json.loads(raw)
        return cls([list(map(int, group)) for group in doc["sql"]], int(doc["api"]),
                   int(doc["ready"]), int(doc["first_id"]))

    def sockets(self) -> list[list[socket.socket]]:
        return [[socket.socket(fileno=fd) for fd in group] for group in self.sql]

    def api_socket(self) -> socket.socket:
        return socket.socket(fileno=self.api)

    def say_ready(self, receivers: list[str]) -> None:
        """Tell the old process the new one serves, and where sessions go."""
        line = json.dumps({"pid": os.getpid(), "version": __version__,
                           "receivers": receivers}) + "\n"
        try:
            os.write(self.ready, line.encode())
        finally:
            os.close(self.ready)


class DataPlane(Protocol):
    """What an upgrade needs of whoever holds the sessions (a ProxyServer, or Workers)."""

    def listening(self) -> list[list[socket.socket]]: ...
    async def max_session_id(self) -> int: ...
    def hand_over(self, receivers: list[str]) -> None: ...
    async def handed_over(self) -> None: ...  # until no session that can travel is left


class Upgrader:
    """The old process's side (see the module docstring)."""

    def __init__(self, holder: DataPlane, api: Callable[[], APIServer | None],
                 done: Callable[[], None]) -> None:
        self._holder = holder
        self._api = api
        self._done = done
        self.new_pid = 0  # once an upgrade is under way
        self._task: asyncio.Task[None] | None = None

    async def upgrade(self) -> int:
        """Start the new process; once it says it is ready, everything is handed over to it
        (in the background: a failure is logged, and this process goes on). Its pid."""
        if self.new_pid:
            raise UpgradeError(f"an upgrade is already under way (new process {self.new_pid})")
        api = self._api()
        if api is None:
            raise UpgradeError("the API is not serving yet")
        groups = self._holder.listening()
        first_id = await self._holder.max_session_id() + ID_MARGIN
        read_end, write_end = os.pipe()
        api_fd = api.listening_socket.fileno()
        fds = [write_end, api_fd, *(s.fileno() for g in groups for s in g)]
        takeover = Takeover([[s.fileno() for s in g] for g in groups], api_fd, write_end,
                            first_id)
        env = {**os.environ, TAKEOVER_ENV: json.dumps(asdict(takeover))}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tiproxy", *sys.argv[1:], pass_fds=fds, env=env,
                start_new_session=True)
        except OSError as e:
            os.close(read_end)
            raise UpgradeError(f"cannot start the new process: {e}") from e
        finally:
            os.close(write_end)
        self.new_pid = proc.pid
        log.info("upgrade: started the new process (pid %d)", proc.pid)
        self._task = asyncio.get_running_loop().create_task(self._take_over(proc, read_end, api))
        return proc.pid

    async def _take_over(self, proc: asyncio.subprocess.Process, read_end: int,
                         api: APIServer) -> None:
        try:
            ready = await asyncio.to_thread(_read_ready, read_end, READY_TIMEOUT)
        except (OSError, ValueError, TypeError, TimeoutError) as e:
            self.new_pid = 0
            if proc.returncode is None:
                proc.kill()
            log.error("upgrade abandoned: the new process (pid %d) did not take over: %s; "  # noqa: TRY400
                      "this process goes on", proc.pid, e)
            return
        finally:
            os.close(read_end)
        log.info("upgrade: the new process (pid %d, tiproxy %s) serves; sessions follow at "
                 "their next safe point", proc.pid, ready.get("version", "?"))
        receivers = [str(name) for name in ready["receivers"]]  # type: ignore[attr-defined]
        await self._hand_over(api, receivers)

    async def _hand_over(self, api: APIServer, receivers: list[str]) -> None:
        await api.close()  # the new process answers the API now
        self._holder.hand_over(receivers)
        await self._holder.handed_over()
        log.info("upgrade: every session that could travel is with the new process (pid %d); "
                 "this process ends", self.new_pid)
        self._done()


def _read_ready(fd: int, timeout: float) -> dict[str, object]:
    """The new process's line on the pipe (blocking: run in a thread)."""
    buf = b""
    while not buf.endswith(b"\n"):
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            raise TimeoutError(f"not ready within {timeout:.0f}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise OSError("it exited before it was ready")
        buf += chunk
    doc = json.loads(buf)
    if not isinstance(doc, dict) or not isinstance(doc.get("receivers"), list):
        raise TypeError("an answer without its receivers")
    return doc
