"""Start, stop, crash and freeze throwaway MariaDB servers on free local ports.

Theory of operation: `mariadb-install-db` runs once per mariadbd version and user, into a
template datadir cached in the temp directory (playground/install.py). Each server copies the
template (about 25 MB) into its own base directory and runs `mariadbd --no-defaults` with small
memory settings as a child process, so a server is up in well under a second and dozens fit in a
few GB. A server counts as started once its error log says it is ready for connections. An
atexit hook SIGKILLs every server still running, so a failed test run or a crashed playground
leaves none behind.

Standard library only: the installed package must not depend on test libraries.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tiproxy.playground.install import (
    TEMPLATE_ARGS,
    LauncherError,
    find_companion,
    find_mariadbd,
    template_datadir,
    user_args,
)
from tiproxy.playground.ports import HOST, free_port

_SERVER_ARGS = (
    *TEMPLATE_ARGS,
    "--innodb-buffer-pool-size=32M",
    # Commits reach the OS at once (they survive a SIGKILL of mariadbd) without an fsync each:
    # the disk is shared with everything else running on the machine.
    "--innodb-flush-log-at-trx-commit=2",
    "--skip-name-resolve",
    "--skip-log-bin",
    "--max-connections=1000",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
    "--plugin-load-add=auth_ed25519",
)
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin
_PORT_ATTEMPTS = 3  # another process may take a port between free_port() and mariadbd's bind
_PORT_IN_USE = "Address already in use"
# Logged once the listeners are open. Waiting for it instead of probing the port keeps the log
# free of "Aborted connection" warnings and the host's connect-error count at zero.
_READY = "ready for connections"
_POLL_INTERVAL = 0.05
_LOG_TAIL_BYTES = 64 * 1024


_running: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_running):
        if process.poll() is None:
            process.kill()
            process.wait()
    _running.clear()


@dataclass
class MariaDBServer:
    """One mariadbd child process on 127.0.0.1:port, with its files under basedir."""

    basedir: Path
    port: int = 0  # 0 = pick a free port at the first start(); restarts keep it
    extra_args: list[str] = field(default_factory=list)  # after the defaults, so they win
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def datadir(self) -> Path:
        return self.basedir / "data"

    @property
    def error_log(self) -> Path:
        return self.basedir / "error.log"

    @property
    def pid_file(self) -> Path:
        return self.basedir / "mariadbd.pid"

    @property
    def socket_path(self) -> Path:
        path = self.basedir.absolute() / "mariadbd.sock"
        if len(str(path)) <= _SOCKET_PATH_MAX:
            return path
        digest = hashlib.sha1(str(path).encode(), usedforsecurity=False).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"tiproxy-mariadb-{digest}.sock"

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    def start(self, timeout: float = 60.0) -> None:
        """Start mariadbd (a restart if the datadir exists) and wait until it accepts."""
        if self.running:
            return
        self._prepare_datadir()
        auto_port = self.port == 0
        failure = ""
        for _ in range(_PORT_ATTEMPTS if auto_port else 1):
            if auto_port:
                self.port = free_port()
            log_offset = self.error_log.stat().st_size if self.error_log.exists() else 0
            self._spawn()
            failure = self._wait_ready(log_offset, time.monotonic() + timeout)
            if not failure:
                return
            if _PORT_IN_USE not in self._error_log_since(log_offset):
                break
        raise LauncherError(
            f"mariadbd on {self.addr} did not start: {failure}\n"
            f"--- tail of {self.error_log} ---\n{self.error_log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down gracefully (SIGTERM), SIGKILL after timeout; the datadir stays."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._forget()

    def kill(self) -> None:
        """Crash the server (SIGKILL) and wait until it is gone."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._forget()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def sql(self, statements: str, database: str | None = None, timeout: float = 60.0) -> str:
        """Run statements as root over the unix socket; return the tab-separated rows."""
        if not self.running:
            raise LauncherError(f"cannot run SQL: mariadbd on {self.addr} is not running")
        cmd = [
            str(find_companion("mariadb")),
            "--no-defaults",
            "-uroot",
            f"--socket={self.socket_path}",
            "--batch",
            "--skip-column-names",
        ]
        if database is not None:
            cmd.append(f"--database={database}")
        try:
            result = subprocess.run(
                cmd, input=statements, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LauncherError(f"SQL on {self.addr} timed out after {timeout}s") from exc
        if result.returncode != 0:
            raise LauncherError(f"SQL on {self.addr} failed: {result.stderr.strip()}")
        return result.stdout

    def error_log_tail(self, lines: int = 40) -> str:
        """The last lines of the error log ("" if there is none yet)."""
        try:
            with self.error_log.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _prepare_datadir(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        if not self.datadir.exists():
            shutil.copytree(template_datadir(), self.datadir)

    def _spawn(self) -> None:
        cmd = [
            str(find_mariadbd()),
            "--no-defaults",  # must come first
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            f"--bind-address={HOST}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.pid_file}",
            f"--log-error={self.error_log}",
            *user_args(),
            *_SERVER_ARGS,
            *self.extra_args,
        ]
        # Messages printed before the error log opens (bad options) land in the log as well.
        with self.error_log.open("ab") as early_log:
            # A new session: Ctrl-C in the playground's terminal must not reach the servers
            # before the playground stops them.
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=early_log,
                stderr=early_log,
                start_new_session=True,
            )
        _running.add(self._process)

    def _wait_ready(self, log_offset: int, deadline: float) -> str:
        """Wait until the server logs that it accepts; return why it failed, or "" if it does."""
        assert self._process is not None
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._forget()
                return f"mariadbd exited with code {code}"
            if _READY in self._error_log_since(log_offset):
                return ""
            time.sleep(_POLL_INTERVAL)
        self.kill()
        return "it did not accept connections in time"

    def _error_log_since(self, offset: int) -> str:
        with self.error_log.open("rb") as log:
            log.seek(offset)
            return log.read(_LOG_TAIL_BYTES).decode(errors="replace")

    def _signal(self, signum: signal.Signals) -> None:
        if self._process is None or not self.running:
            raise LauncherError(f"mariadbd on {self.addr} is not running")
        self._process.send_signal(signum)

    def _forget(self) -> None:
        if self._process is not None:
            _running.discard(self._process)
        self._process = None


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _sql_identifier(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def create_app_user(
    server: MariaDBServer,
    user: str,
    password: str,
    plugin: str = "mysql_native_password",
    database: str = "test",
) -> None:
    """Create the database and 'user'@'%' with all privileges, authenticating with plugin.

    '%' covers TCP logins from 127.0.0.1 and socket logins alike: the template has no anonymous
    users that would shadow it. plugin is any MariaDB auth plugin taking a password, e.g.
    "mysql_native_password" or "ed25519".
    """
    if not re.fullmatch(r"\w+", plugin):
        raise LauncherError(f"not an authentication plugin name: {plugin!r}")
    account = f"{_sql_string(user)}@'%'"
    server.sql(
        f"CREATE DATABASE IF NOT EXISTS {_sql_identifier(database)};\n"
        f"CREATE OR REPLACE USER {account} "
        f"IDENTIFIED VIA {plugin} USING PASSWORD({_sql_string(password)});\n"
        f"GRANT ALL PRIVILEGES ON *.* TO {account};\n"
    )


@dataclass(frozen=True)
class AppUser:
    """An application account every server of a cluster gets (see create_app_user)."""

    name: str
    password: str
    plugin: str = "mysql_native_password"
    database: str = "test"


class MariaDBCluster:
    """Several servers under one base directory, each with the same databases and users.

    Without a basedir the cluster makes a temporary one and stop_all() removes it; a basedir
    given by the caller is left in place (only the servers stop).
    """

    def __init__(
        self,
        size: int,
        users: Sequence[AppUser] = (),
        extra_args: Sequence[str] = (),
        basedir: Path | None = None,
    ) -> None:
        self._owns_basedir = basedir is None
        self.basedir = basedir or Path(tempfile.mkdtemp(prefix="tiproxy-playground-"))
        self.users = tuple(users)
        self.servers = [
            MariaDBServer(self.basedir / f"mariadb{index}", extra_args=list(extra_args))
            for index in range(size)
        ]

    @property
    def addrs(self) -> list[str]:
        return [server.addr for server in self.servers]

    def start_all(self, timeout: float = 60.0) -> None:
        """Start every server and create the users; on failure stop whatever started."""
        try:
            for server in self.servers:
                server.start(timeout)
                for user in self.users:
                    create_app_user(server, user.name, user.password, user.plugin, user.database)
        except BaseException:
            self.stop_all()
            raise

    def stop_all(self) -> None:
        """Stop every server; remove the base directory if the cluster made it."""
        for server in self.servers:
            server.stop()
        if self._owns_basedir:
            shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> MariaDBCluster:
        self.start_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()
