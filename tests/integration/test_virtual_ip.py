"""TiProxy's virtual IP (`[ha]`) on a LAN of network namespaces: two proxies, each in its own
namespace, and a client in a third, on one bridge; etcd and MariaDB in this namespace at the
bridge's address. The client reaches the virtual IP through the first proxy; the first proxy is
killed with SIGKILL; the second takes the address over, its gratuitous ARP turns the client's
neighbour entry to its MAC, and the client reaches it within 5 s. A clean shutdown gives the
address up before the proxy goes, and a proxy that cannot carry the address refuses to start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.backends import APP, BACKEND_ARGS, MariaDBFactory
from support.netns import Member, bridged_namespaces
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.etcd import EtcdServer
from tiproxy.playground.mariadb import MariaDBServer
from tiproxy.playground.ports import free_port

pytestmark = pytest.mark.integration

BRIDGE, BRIDGE_IP = "tpxha-br", "10.199.40.1"
A = Member("tiproxy-ha-a", "tpxha-a0", "tpxha-a1", "10.199.40.11")
B = Member("tiproxy-ha-b", "tpxha-b0", "tpxha-b1", "10.199.40.12")
CLIENT = Member("tiproxy-ha-c", "tpxha-c0", "tpxha-c1", "10.199.40.20")
VIP = "10.199.40.100"
TAKEOVER = 5.0  # seconds: the bound from the owner's death to the client's answer

# In the client's namespace: connect to the virtual IP until it answers (each attempt with a
# short timeout), print when, then hold the session until stdin closes.
_CLIENT = """
import json, sys, time, pymysql
host, port, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while True:
    try:
        conn = pymysql.connect(host=host, port=port, user="app", password="app-pass",
                               database="test", connect_timeout=0.5, read_timeout=5)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        print(json.dumps({"ok": cur.fetchone()[0] == 1, "at": time.monotonic()}), flush=True)
        break
    except pymysql.MySQLError as e:
        if time.monotonic() > deadline:
            print(json.dumps({"ok": False, "error": str(e)}), flush=True)
            sys.exit(1)
        time.sleep(0.02)
sys.stdin.read()
"""

# In the client's namespace: every ARP frame on its interface, as JSON lines, until killed.
_SNIFFER = """
import json, socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((sys.argv[1], 0))
print("ready", flush=True)
while True:
    frame = s.recv(128)
    op, sha, spa, tha, tpa = struct.unpack_from("!6xH6s4s6s4s", frame, 14)
    print(json.dumps({"at": time.monotonic(), "op": op, "sha": sha.hex(":"),
                      "spa": socket.inet_ntoa(spa), "tpa": socket.inet_ntoa(tpa)}), flush=True)
"""


def ip_json(*args: str) -> Any:
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True,
                                     check=True, timeout=10).stdout or "[]")


def mac_of(member: Member) -> str:
    return str(ip_json("-n", member.name, "link", "show", "dev", member.ns_if)[0]["address"])


def has_vip(member: Member) -> bool:
    return any(a.get("local") == VIP for link in ip_json("-n", member.name, "addr", "show")
               for a in link.get("addr_info", []))


def client_neighbour() -> str:
    """The client's neighbour entry for the virtual IP: the MAC it sends to ("" if none)."""
    entries = ip_json("-n", CLIENT.name, "neigh", "show", VIP)
    return str(entries[0].get("lladdr", "")) if entries else ""


def until(what: str, check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lan() -> Iterator[None]:
    with bridged_namespaces(BRIDGE, BRIDGE_IP, (A, B, CLIENT)):
        yield


@pytest.fixture(scope="module")
def lan_etcd(lan: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"), more_hosts=(BRIDGE_IP,)).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def lan_backend(lan: None, mariadb_factory: MariaDBFactory) -> MariaDBServer:
    return mariadb_factory([*BACKEND_ARGS, f"--bind-address=127.0.0.1,{BRIDGE_IP}"], (APP,))


class Client:
    """The client process in its namespace, holding its session once it got an answer."""

    def __init__(self, port: int, deadline: float) -> None:
        self.proc = subprocess.Popen(
            CLIENT.exec_argv(sys.executable, "-c", _CLIENT, VIP, str(port), str(deadline)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "no output"
        result: dict[str, Any] = json.loads(line)
        assert result["ok"], result
        return result

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_proxy(proxy_factory: ProxyFactory, member: Member, port: int, etcd: EtcdServer,
                backend: MariaDBServer) -> ProxyProcess:
    """A proxy in `member`'s namespace on `port` of every address there, the virtual IP too."""
    ha = f'[ha]\nvirtual-ip = "{VIP}/32"\ninterface = "{member.ns_if}"'
    return proxy_factory(
        [f"{BRIDGE_IP}:{backend.port}"],
        f'pd-addrs = ["{BRIDGE_IP}:{etcd.client_port}"]\ngraceful-wait-before-shutdown = 3\n'
        f"{ha}",
        sql_host="0.0.0.0", reach_host=member.ip, api_host=member.ip, port=port,
        command_prefix=member.exec_argv())


def vip_status(proxy: ProxyProcess) -> str:
    return str(json.loads(proxy.api("/api/debug/health")[1])["discovery"].get("virtual-ip"))


def test_the_address_moves_to_the_second_proxy_when_the_first_dies(
        lan_etcd: EtcdServer, lan_backend: MariaDBServer, proxy_factory: ProxyFactory,
        tmp_path: Path) -> None:
    port = free_port()
    a = start_proxy(proxy_factory, A, port, lan_etcd, lan_backend)
    until("a carries the address", lambda: has_vip(A) and vip_status(a) == "owner")
    b = start_proxy(proxy_factory, B, port, lan_etcd, lan_backend)
    until("b campaigns", lambda: vip_status(b) == "standby")
    assert not has_vip(B)

    first = Client(port, time.monotonic() + 10)
    try:
        first.answer()
        assert [s["client"].partition(":")[0] for s in a.sessions()] == [CLIENT.ip]
        assert b.sessions() == []
    finally:
        first.close()
    assert client_neighbour() == mac_of(A)

    sniffer = subprocess.Popen(CLIENT.exec_argv(sys.executable, "-c", _SNIFFER, CLIENT.ns_if),
                               stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout is not None and sniffer.stdout.readline() == "ready\n"
        assert a.proc is not None
        killed_at = time.monotonic()
        a.proc.kill()
        a.proc.wait()
        second = Client(port, killed_at + TAKEOVER)
        try:
            answered_at = second.answer()["at"]
            print(f"\ntakeover after SIGKILL: {answered_at - killed_at:.2f} s "
                  f"(etcd session of 3 s, as TiProxy's)")
            assert [s["client"].partition(":")[0] for s in b.sessions()] == [CLIENT.ip]
        finally:
            second.close()
    finally:
        sniffer.kill()
        arp_lines, _ = sniffer.communicate()
    assert has_vip(B) and vip_status(b) == "owner"
    # What made the client send to b: b's gratuitous ARP, before the answer.
    assert client_neighbour() == mac_of(B)
    frames = [json.loads(line) for line in arp_lines.splitlines()]
    garps = [f for f in frames if f["spa"] == f["tpa"] == VIP and f["sha"] == mac_of(B)]
    assert garps, frames
    assert garps[0]["at"] < answered_at
    assert has_vip(A)  # the dead proxy's namespace still has it: a crash removes nothing

    # a comes back: it removes what its crash left and waits its turn.
    a.start()
    until("a is a candidate again", lambda: vip_status(a) == "standby")
    assert not has_vip(A) and has_vip(B)

    # b shuts down cleanly: the address leaves b first, while b still runs, and a takes it.
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    until("b gave the address up", lambda: not has_vip(B), timeout=5)
    assert b.proc.poll() is None  # still in its graceful wait
    third = Client(port, time.monotonic() + TAKEOVER)
    try:
        third.answer()
        assert [s["client"].partition(":")[0] for s in a.sessions()] == [CLIENT.ip]
    finally:
        third.close()
    assert has_vip(A) and client_neighbour() == mac_of(A)
    assert b.proc.wait(30) == 0
    assert "resigned from the election" in b.log()


def run_refused(tmp_path: Path, toml: str, prefix: list[str] | None = None) -> str:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[proxy]\naddr = "127.0.0.1:{free_port()}"\n'
                      f'pd-addrs = ["127.0.0.1:{free_port()}"]\n'
                      f'[api]\naddr = "127.0.0.1:{free_port()}"\n{toml}')
    done = subprocess.run([*(prefix or []), sys.executable, "-m", "tiproxy", "--config",
                           str(config)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2, done
    return done.stderr


def test_a_missing_interface_is_refused_by_key(tmp_path: Path) -> None:
    err = run_refused(tmp_path, '[ha]\nvirtual-ip = "10.199.40.100"\ninterface = "tpxha-none0"')
    assert "ha.interface: no network interface 'tpxha-none0' on this machine" in err


def test_a_proxy_without_the_privileges_refuses_the_address(tmp_path: Path) -> None:
    no_caps = ["setpriv", "--inh-caps=-net_admin,-net_raw",
               "--bounding-set=-net_admin,-net_raw"]
    err = run_refused(tmp_path, '[ha]\nvirtual-ip = "10.199.40.100"\ninterface = "lo"',
                      no_caps)
    assert "ha.virtual-ip: the proxy needs CAP_NET_ADMIN and CAP_NET_RAW" in err
