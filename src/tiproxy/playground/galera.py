"""Start, stop and rejoin a throwaway MariaDB Galera cluster on free local ports.

Theory of operation: every node is a `MariaDBServer` (see mariadb.py) whose extra arguments turn
wsrep on and give it three more ports of its own on 127.0.0.1: group communication (gmcast), IST
and SST. Node 0 bootstraps a new cluster (`--wsrep-new-cluster`); the others then join one at a
time, each receiving a full copy of the data by rsync SST from a donor, and a node counts as up
once it reports Synced (wsrep_local_state 4) and ready. A node's ports are chosen just before its
first start, so no port sits reserved and unbound while other nodes start; the gcomm:// address
of a node lists every node given ports so far, itself included (Galera skips its own address).
A node started again later never bootstraps, not even node 0: it rejoins the running nodes and
catches up by IST from their gcache, or by SST when the gcache no longer holds what it missed.
As root, the SST's rsync daemon runs as `nobody`: a joiner's datadir is handed to that user
before every start (see _prepare_joiner_datadir), so a basedir must be reachable by others.

Processes are mariadb.py's: its atexit hook SIGKILLs every node still running. The atexit hook
here runs before it and also kills what a node may have spawned (the SST script and its rsync
daemon share the node's process group) and removes the base directories the clusters made.

Standard library only: the installed package must not depend on test libraries.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tiproxy.playground.install import LauncherError
from tiproxy.playground.mariadb import AppUser, MariaDBServer, create_app_user
from tiproxy.playground.ports import HOST, free_port

_PROVIDER_SEARCH = (
    "/usr/lib/galera/libgalera_smm.so",  # Debian and Ubuntu (galera-4)
    "/usr/lib/galera-4/libgalera_smm.so",
    "/usr/lib64/galera-4/libgalera_smm.so",  # RHEL and Fedora
    "/usr/lib64/galera/libgalera_smm.so",
    "/usr/lib/libgalera_smm.so",
)
SYNCED = 4  # wsrep_local_state: 1 joining, 2 donor/desynced, 3 joined, 4 synced
_PORT_ATTEMPTS = 3  # another process may take a port between free_port() and its bind
_PORT_TAKEN = (  # what a node's error log says when one of its ports was not free after all
    "Address already in use",
    "rsync or stunnel daemon",  # "(PID: n) terminated unexpectedly" or "port ... has been taken"
)
_POLL_INTERVAL = 0.2  # each poll runs the mariadb client once
_NODE_ARGS = (
    "--wsrep-on=ON",
    "--wsrep-node-address=127.0.0.1",
    "--wsrep-sst-method=rsync",
    "--wsrep-slave-threads=1",
    "--binlog-format=ROW",
    "--default-storage-engine=InnoDB",
    "--innodb-autoinc-lock-mode=2",  # interleaved: required for parallel applying
)


def find_galera_provider() -> Path:
    """Return the Galera library ($TIPROXY_GALERA_PROVIDER overrides the search)."""
    override = os.environ.get("TIPROXY_GALERA_PROVIDER")
    candidates = (override,) if override else _PROVIDER_SEARCH
    for candidate in candidates:
        if os.path.isfile(candidate):
            return Path(candidate)
    if override:
        raise LauncherError(f"TIPROXY_GALERA_PROVIDER={override} is not a file")
    raise LauncherError(
        "libgalera_smm.so not found in " + ", ".join(_PROVIDER_SEARCH) + ": install Galera "
        "(Debian: apt-get install galera-4 rsync) or set TIPROXY_GALERA_PROVIDER to the library"
    )


@dataclass(frozen=True)
class GaleraPorts:
    """The ports a node listens on besides its SQL port."""

    gcomm: int  # group communication (gmcast.listen_addr), what gcomm:// addresses name
    ist: int  # incremental state transfer receiver (ist.recv_addr)
    sst: int  # the rsync daemon of a joining node (wsrep_sst_receive_address)

    @classmethod
    def pick(cls, taken: set[int]) -> GaleraPorts:
        """Three distinct free ports, none of them in taken."""
        ports: list[int] = []
        while len(ports) < 3:
            port = free_port()
            if port not in taken and port not in ports:
                ports.append(port)
        return cls(*ports)


_live: set[GaleraCluster] = set()


@atexit.register
def _remove_leftovers() -> None:
    for cluster in list(_live):
        cluster.kill_all()


class GaleraCluster:
    """A MariaDB Galera cluster of `size` nodes on 127.0.0.1, files under basedir.

    Without a basedir the cluster makes a temporary one and stop_all() removes it; a basedir
    given by the caller is left in place (only the nodes stop). start_all() starts a fresh
    cluster once; afterwards stop_node() and start_node() take single nodes out and back in.
    """

    def __init__(
        self,
        size: int = 3,
        basedir: Path | None = None,
        users: Sequence[AppUser] = (),
        extra_args: Sequence[str] = (),
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        self.provider = find_galera_provider()
        self._owns_basedir = basedir is None
        self.basedir = basedir or Path(tempfile.mkdtemp(prefix="tiproxy-galera-"))
        if self._owns_basedir:
            self.basedir.chmod(0o755)  # mkdtemp's 0700 would keep the rsync daemon out
        self.name = "tiproxy-" + self.basedir.name.removeprefix("tiproxy-")
        self.users = tuple(users)
        self.extra_args = tuple(extra_args)
        self.nodes = [MariaDBServer(self.basedir / f"node{i}") for i in range(size)]
        self._ports: list[GaleraPorts | None] = [None] * size
        _live.add(self)  # from here on, exit removes the base directory even if never started

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def addrs(self) -> list[str]:
        """The SQL addresses of the nodes (port 0 until a node first starts)."""
        return [node.addr for node in self.nodes]

    def start_all(self, timeout: float = 120.0) -> None:
        """Bootstrap node 0, join the others one by one, create the users on all of them.

        Returns once every node is Synced in a cluster of `size` and sees every user and its
        database; on failure stops whatever started.
        """
        deadline = time.monotonic() + timeout
        _live.add(self)
        try:
            self._start(0, deadline, bootstrap=True)
            for i in range(1, self.size):
                self._start(i, deadline, bootstrap=False)
            for i in range(self.size):
                self._wait_status(i, deadline, self._is_member)
            self._create_users(deadline)
        except BaseException:
            self.stop_all()
            raise

    def stop_node(self, i: int) -> None:
        """Shut node i down gracefully; the others carry on as a smaller cluster."""
        self.nodes[i].stop()

    def kill_node(self, i: int) -> None:
        """Crash node i (SIGKILL, with whatever it spawned); the others carry on without it."""
        _kill_process_group(self.nodes[i])

    def start_node(self, i: int, timeout: float = 120.0) -> None:
        """Start node i again: it rejoins the running nodes (IST or SST) and becomes Synced.

        At least one other node must be running: a node started again never bootstraps.
        """
        if self._ports[i] is None:
            raise LauncherError(f"node {i} never started: start the cluster with start_all()")
        if self.nodes[i].running:
            self.wait_synced(i, timeout)
        else:
            self._start(i, time.monotonic() + timeout, bootstrap=False)

    def node_state(self, i: int) -> tuple[str, int]:
        """(wsrep_ready, wsrep_local_state) of node i, e.g. ("ON", 4) when Synced."""
        status = self._status(i)
        return status.get("wsrep_ready", ""), int(status.get("wsrep_local_state", "0"))

    def wait_synced(self, i: int, timeout: float) -> None:
        """Wait until node i is ready and Synced."""
        self._wait_status(i, time.monotonic() + timeout, self._is_synced)

    def stop_all(self) -> None:
        """Stop every node; remove the base directory if the cluster made it."""
        try:
            for node in reversed(self.nodes):
                node.stop()
        finally:
            self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL every node and whatever it spawned; remove the base directory if ours."""
        for node in self.nodes:
            _kill_process_group(node)
        _live.discard(self)
        if self._owns_basedir:
            shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> GaleraCluster:
        self.start_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()

    def _start(self, i: int, deadline: float, *, bootstrap: bool) -> None:
        """Start node i and wait until it is Synced.

        The Galera ports are picked anew when they turn out to be taken; the SQL port only at
        the first start (MariaDBServer picks it), so a node keeps its address across restarts.
        """
        node = self.nodes[i]
        first_start = self._ports[i] is None
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if first_start:
                node.port = 0
            if first_start or attempt > 1:
                self._ports[i] = GaleraPorts.pick(self._taken_ports())
            node.extra_args = self._node_args(i, bootstrap=bootstrap)
            if not bootstrap:
                _prepare_joiner_datadir(node)
            try:
                node.start(max(deadline - time.monotonic(), 1.0))
                break
            except LauncherError as exc:
                if attempt == _PORT_ATTEMPTS or not any(m in str(exc) for m in _PORT_TAKEN):
                    raise
        self._wait_status(i, deadline, self._is_synced)

    def _taken_ports(self) -> set[int]:
        taken = {node.port for node in self.nodes if node.port}
        for ports in self._ports:
            if ports is not None:
                taken.update((ports.gcomm, ports.ist, ports.sst))
        return taken

    def _node_args(self, i: int, *, bootstrap: bool) -> list[str]:
        ports = self._ports[i]
        assert ports is not None
        members = ",".join(f"{HOST}:{p.gcomm}" for p in self._ports if p is not None)
        provider_options = ";".join(
            (
                f"gmcast.listen_addr=tcp://{HOST}:{ports.gcomm}",
                f"base_port={ports.gcomm}",
                f"ist.recv_addr={HOST}:{ports.ist}",
                "gcache.size=32M",
                "evs.join_retrans_period=PT0.1S",
            )
        )
        return [
            *_NODE_ARGS,
            f"--wsrep-provider={self.provider}",
            f"--wsrep-cluster-name={self.name}",
            f"--wsrep-cluster-address=gcomm://{members}",
            f"--wsrep-provider-options={provider_options}",
            f"--wsrep-sst-receive-address={HOST}:{ports.sst}",
            *(["--wsrep-new-cluster"] if bootstrap else []),
            *self.extra_args,
        ]

    def _create_users(self, deadline: float) -> None:
        """Create the users on node 0 (Galera replicates them) and wait until all nodes see them."""
        if not self.users:
            return
        for user in self.users:
            create_app_user(self.nodes[0], user.name, user.password, user.plugin, user.database)
        wanted = {f"user:{u.name}" for u in self.users} | {f"db:{u.database}" for u in self.users}
        query = (
            "SELECT CONCAT('user:', User) FROM mysql.global_priv WHERE Host = '%' UNION ALL "
            "SELECT CONCAT('db:', SCHEMA_NAME) FROM information_schema.SCHEMATA"
        )
        for i, node in enumerate(self.nodes):
            while missing := wanted - set(node.sql(query).splitlines()):
                if time.monotonic() >= deadline:
                    raise LauncherError(f"node {i} ({node.addr}) lacks {sorted(missing)}")
                time.sleep(_POLL_INTERVAL)

    def _status(self, i: int) -> dict[str, str]:
        rows = self.nodes[i].sql("SHOW GLOBAL STATUS LIKE 'wsrep%'")
        return dict(row.split("\t", 1) for row in rows.splitlines() if "\t" in row)

    @staticmethod
    def _is_synced(status: dict[str, str]) -> bool:
        return status.get("wsrep_ready") == "ON" and status.get("wsrep_local_state") == str(SYNCED)

    def _is_member(self, status: dict[str, str]) -> bool:
        return self._is_synced(status) and status.get("wsrep_cluster_size") == str(self.size)

    def _wait_status(self, i: int, deadline: float, done: Callable[[dict[str, str]], bool]) -> None:
        node = self.nodes[i]
        status: dict[str, str] = {}
        failed = ""  # the last status query that failed, while the node was coming up
        while True:
            if not node.running:
                raise LauncherError(
                    f"galera node {i} ({node.addr}) exited\n"
                    f"--- tail of {node.error_log} ---\n{node.error_log_tail()}"
                )
            try:
                status = self._status(i)
            except LauncherError as e:  # a joining node may drop a connection as it starts
                status, failed = {}, str(e)
            if done(status):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_INTERVAL)
        names = ("wsrep_ready", "wsrep_local_state_comment", "wsrep_cluster_size")
        shown = {name: status.get(name) for name in names}
        raise LauncherError(
            f"galera node {i} ({node.addr}) not synced in a cluster of {self.size} in time: "
            f"{shown}{f' (last: {failed})' if failed else ''}\n"
            f"--- tail of {node.error_log} ---\n{node.error_log_tail()}"
        )


def _kill_process_group(node: MariaDBServer) -> None:
    """SIGKILL the node and its children (SST script, rsync daemon): its own session's group."""
    pid = node.pid
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):  # it exited on its own meanwhile
            os.killpg(pid, signal.SIGKILL)
    node.kill()


def _prepare_joiner_datadir(node: MariaDBServer) -> None:
    """Make sure the rsync daemon of a joining node can write its datadir.

    A first join starts from an empty datadir, which the SST fills (no template copy needed).
    The SST script starts `rsync --daemon`, which, started by root, drops to user `nobody` (the
    config the script writes sets no uid) while mariadbd runs as root and makes root-only files:
    the daemon then fails with "cannot stat destination" or, as it writes --inplace, on the first
    existing file. So when we are root the datadir and everything in it belong to nobody
    (mariadbd, as root, uses them all the same; ownership is reset before every start because
    mariadbd adds root-owned files) and every directory above it must be searchable by others.
    Not running as root, the daemon runs as us and needs none of this.
    """
    node.datadir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError as exc:
        raise LauncherError("no user 'nobody' for the SST's rsync daemon to run as") from exc
    node.basedir.chmod(node.basedir.stat().st_mode | 0o055)
    for parent in node.datadir.absolute().parents:
        if not parent.stat().st_mode & 0o001:
            raise LauncherError(
                f"{parent} is not searchable by others, so the SST's rsync daemon (user nobody) "
                f"cannot reach {node.datadir}: chmod o+x it or use another basedir"
            )
    for path in (node.datadir, *node.datadir.rglob("*")):
        os.chown(path, uid, -1, follow_symlinks=False)
