"""Start and stop a throwaway single-member etcd, and play TiDB in it for discovery tests.

Theory of operation: `etcd` runs as a child process on two free ports of 127.0.0.1 (client and
peer), with its data directory under the base directory; it counts as started once `/health`
says so. The ports are chosen at the first start and kept, so `stop()` then `start()` brings the
same cluster back at the same endpoint with its keys and leases, as a restarted PD would.

`register_tidb` writes what a TiDB writes (pkg/domain/infosync in TiDB): `<prefix><addr>/info`,
its topology JSON, without a lease, and `<prefix><addr>/ttl`, a timestamp, with a lease that a
daemon thread keeps alive, re-registering like TiDB does if the lease was lost. `expire` stops
the keep-alive (the ttl key vanishes when the lease runs out, the info key stays, as after a
crash); `deregister` deletes both keys, as a clean shutdown does. All requests go through etcd's
v3 JSON gateway. An atexit hook kills every etcd still running.

Standard library only: the installed package must not depend on test libraries.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tiproxy.playground.ports import free_port

HOST = "127.0.0.1"
TIDB_TOPOLOGY_PREFIX = "/topology/tidb/"
_PORT_ATTEMPTS = 3  # another process may take a port between free_port() and etcd's bind
_PORT_IN_USE = "address already in use"
_POLL_INTERVAL = 0.05
_REQUEST_TIMEOUT = 5.0
_LOG_TAIL_BYTES = 16 * 1024


class EtcdLauncherError(Exception):
    """etcd could not be found, started or stopped, or refused a request."""


def find_etcd() -> Path:
    """Return the etcd binary ($TIPROXY_ETCD overrides the search; Debian: etcd-server)."""
    override = os.environ.get("TIPROXY_ETCD")
    if override:
        return Path(override)
    found = shutil.which("etcd") or shutil.which("etcd", path="/usr/bin:/usr/local/bin")
    if found is None:
        raise EtcdLauncherError("etcd not found: apt-get install -y etcd-server etcd-client")
    return Path(found)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


_RUNNING: set[EtcdServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    # The keep-alive threads are daemons: they end with the interpreter.
    for server in list(_RUNNING):
        server.kill()


class EtcdServer:
    """One etcd member on 127.0.0.1 under `basedir` (see the module docstring)."""

    def __init__(self, basedir: Path, name: str = "playground",
                 tls: tuple[Path, Path, Path] | None = None,
                 more_hosts: tuple[str, ...] = ()) -> None:
        """`tls`: (cert, key, ca) to serve the client URL over HTTPS; `more_hosts`: other
        local addresses the client port listens on too (network namespaces reach it there)."""
        self.basedir = basedir
        self.name = name
        self.tls = tls
        self.more_hosts = more_hosts
        self._ctx = ssl.create_default_context(cafile=str(tls[2])) if tls else None
        self.client_port = 0
        self.peer_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._keepers: dict[str, _TiDBRegistration] = {}

    @property
    def datadir(self) -> Path:
        return self.basedir / "data"

    @property
    def log_path(self) -> Path:
        return self.basedir / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> EtcdServer:
        """Start etcd (again) and wait until it is healthy."""
        if self.running:
            return self
        # Ports are chosen once: the member's peer URL is recorded in its data directory.
        attempts = 1 if self._started_once else _PORT_ATTEMPTS
        tail = ""
        for _ in range(attempts):
            if not self._started_once:
                self.client_port, self.peer_port = free_port(), free_port()
                shutil.rmtree(self.datadir, ignore_errors=True)
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            try:
                self._wait_healthy(time.monotonic() + timeout)
            except EtcdLauncherError as exc:
                self.kill()
                tail = f"{exc}: {self._log_since(offset)[-2000:]}"
                if _PORT_IN_USE not in tail.lower():
                    raise EtcdLauncherError(f"etcd did not start: {tail}") from None
                continue
            self._started_once = True
            return self
        raise EtcdLauncherError(f"etcd found no free ports in {attempts} attempts: {tail}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd, keeping its data and the keep-alives for a later start()."""
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL etcd, as a crash; its data stays for a later start()."""
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): its connections stay open but nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signum: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise EtcdLauncherError("etcd is not running")
        self._proc.send_signal(signum)

    def close(self) -> None:
        """Stop the keep-alives and etcd, and remove the data directory."""
        for keeper in list(self._keepers.values()):
            keeper.stop()
        self._keepers.clear()
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)

    def _spawn(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        client_url, peer_url = self.url, f"http://{HOST}:{self.peer_port}"
        scheme = "https" if self.tls else "http"
        more_urls = [f"{scheme}://{host}:{self.client_port}" for host in self.more_hosts]
        args = [
            str(find_etcd()),
            f"--name={self.name}",
            f"--data-dir={self.datadir}",
            "--listen-client-urls=" + ",".join([client_url, *more_urls]),
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.name}={peer_url}",
            "--logger=zap",
            "--log-level=warn",
        ]
        if self.tls is not None:
            args += [f"--cert-file={self.tls[0]}", f"--key-file={self.tls[1]}"]
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        _RUNNING.add(self)

    def _wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise EtcdLauncherError("etcd exited")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1.0,  # noqa: S310 (our own URL)
                                            context=self._ctx) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(_POLL_INTERVAL)
        raise EtcdLauncherError("etcd not healthy in time")

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(max(offset, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")

    # The v3 JSON gateway: keys and values base64, 64-bit integers as decimal strings.

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to the gateway's `/v3/<path>`; raises EtcdLauncherError on any failure."""
        request = urllib.request.Request(  # noqa: S310 (our own http URL)
            f"{self.url}/v3/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT,  # noqa: S310 (our own URL)
                                        context=self._ctx) as resp:
                answer = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            raise EtcdLauncherError(f"etcd {path}: {exc}") from exc
        if not isinstance(answer, dict):
            raise EtcdLauncherError(f"etcd {path}: unexpected answer {answer!r}")
        return answer

    def put(self, key: str, value: str, lease: int = 0) -> int:
        """Put a key; returns the revision it was written at."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("kv/deleterange", {"key": _b64(key)})

    def grant(self, ttl_seconds: int) -> int:
        return int(self.call("lease/grant", {"TTL": str(ttl_seconds)})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh a lease; returns its TTL, 0 when etcd no longer knows it."""
        result = self.call("lease/keepalive", {"ID": str(lease)}).get("result", {})
        return int(result.get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    def compact(self) -> int:
        """Compact away every revision before the current one; returns that revision."""
        revision = int(self.call("kv/range", {"key": _b64("\0")})["header"]["revision"])
        self.call("kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    # Playing TiDB.

    def register_tidb(
        self,
        addr: str,
        info: dict[str, Any],
        ttl_seconds: int,
        prefix: str = TIDB_TOPOLOGY_PREFIX,
    ) -> int:
        """Write a TiDB's topology keys and keep its lease alive; returns the lease id."""
        key = prefix + addr
        if key in self._keepers:
            self._keepers.pop(key).stop()
        keeper = _TiDBRegistration(self, key, json.dumps(info), ttl_seconds)
        keeper.register()
        keeper.start()
        self._keepers[key] = keeper
        return keeper.lease

    def expire(self, addr: str, prefix: str = TIDB_TOPOLOGY_PREFIX) -> None:
        """Stop keeping the lease alive: the ttl key vanishes within its TTL, info stays."""
        keeper = self._keepers.pop(prefix + addr, None)
        if keeper is None:
            raise EtcdLauncherError(f"{prefix}{addr} is not registered here")
        keeper.stop()

    def deregister(self, addr: str, prefix: str = TIDB_TOPOLOGY_PREFIX) -> None:
        """Remove both keys and revoke the lease, as a TiDB that shuts down cleanly."""
        keeper = self._keepers.pop(prefix + addr, None)
        if keeper is not None:
            keeper.stop()
        self.delete(f"{prefix}{addr}/ttl")
        self.delete(f"{prefix}{addr}/info")
        if keeper is not None:
            self.revoke(keeper.lease)


class _TiDBRegistration(threading.Thread):
    """Keeps one TiDB's ttl lease alive, re-registering when etcd has lost the lease."""

    def __init__(self, server: EtcdServer, key: str, info: str, ttl_seconds: int) -> None:
        super().__init__(name=f"etcd-lease {key}", daemon=True)
        self._server = server
        self._key = key
        self._info = info
        self._ttl = ttl_seconds
        self._stopped = threading.Event()
        self.lease = 0

    def register(self) -> None:
        self._server.put(f"{self._key}/info", self._info)
        self.lease = self._server.grant(self._ttl)
        self._server.put(f"{self._key}/ttl", str(time.time_ns()), lease=self.lease)

    def run(self) -> None:
        while not self._stopped.wait(self._ttl / 3):
            try:
                if self._server.keepalive(self.lease) <= 0:
                    self.register()
            except EtcdLauncherError:
                continue  # etcd is down or restarting: try again next round

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=_REQUEST_TIMEOUT * 3)
