"""The API's write routes seen from another host: a network namespace joined to this one by a
veth pair (support/netns.py, 10.199.37.0/30), so that requests come from a real non-loopback
peer. Also: SIGHUP and start refuse a config that changes an offline key or names a file the
proxy cannot read.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.netns import VethNamespace, veth_namespace
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.api.auth import NEED_CREDENTIAL, WRONG_TOKEN
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

NETNS = "tiproxy-apitest"
VETH_ROOT, VETH_NS = "tpxapi0", "tpxapi1"  # interface names: at most 15 characters
ROOT_IP, NS_IP = "10.199.37.1", "10.199.37.2"

# Run inside the namespace: one HTTP request, its status and body printed as JSON.
_CLIENT = """
import json, sys, urllib.error, urllib.request
method, url, token, body = sys.argv[1:5]
headers = {"Authorization": "Bearer " + token} if token else {}
req = urllib.request.Request(url, data=body.encode() if method != "GET" else None,
                             method=method, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        status, data = r.status, r.read()
except urllib.error.HTTPError as e:
    status, data = e.code, e.read()
print(json.dumps({"status": status, "body": data.decode("utf-8", "replace")}))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace NETNS whose VETH_NS (NS_IP) faces VETH_ROOT (ROOT_IP) in this one."""
    with veth_namespace(VethNamespace(NETNS, VETH_ROOT, VETH_NS, ROOT_IP, NS_IP)) as ns:
        yield ns.name


def _from_netns(method: str, url: str, token: str = "", body: str = "") -> tuple[int, str]:
    out = subprocess.run(
        ["ip", "netns", "exec", NETNS, sys.executable, "-c", _CLIENT, method, url, token, body],
        capture_output=True, text=True, timeout=60, check=True)
    reply = json.loads(out.stdout)
    return int(reply["status"]), str(reply["body"])


def _ctl_from_netns(proxy: ProxyProcess, *argv: str,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", NETNS, sys.executable, "-m", "tiproxy.cli.ctl",
         "--host", proxy.api_host, "--port", str(proxy.api_port), *argv],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **(env or {})})


def _error(body: str) -> str:
    return str(json.loads(body)["error"])


def test_write_routes_from_another_host_need_the_token(
    netns: str, backends: list[MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "api-token"
    token_file.write_text(token + "\n")
    proxy = proxy_factory([b.addr for b in backends], api_host=ROOT_IP, api_token_file=token_file)
    base = f"http://{ROOT_IP}:{proxy.api_port}"
    for path in ("/api/debug/health", "/api/admin/config", "/api/admin/backends",
                 "/api/admin/sessions", "/metrics"):
        status, _ = _from_netns("GET", base + path)
        assert status == 200, path

    change = "[proxy]\nmax-connections = 50\n"
    assert _from_netns("PUT", base + "/api/admin/config", body=change) == \
        (403, json.dumps({"error": NEED_CREDENTIAL}))
    status, body = _from_netns("PUT", base + "/api/admin/config", "wrong-" + token, change)
    assert (status, _error(body)) == (403, WRONG_TOKEN)
    status, body = _from_netns("POST", base + "/api/debug/redirect")
    assert (status, _error(body)) == (403, NEED_CREDENTIAL)
    status, body = proxy.api("/api/debug/redirect", method="POST", body=b"")
    assert status == 403, "the host's own veth address is not loopback either"
    assert tomllib.loads(proxy.api("/api/admin/config")[1].decode())["proxy"][
        "max-connections"] == 0

    status, body = _from_netns("PUT", base + "/api/admin/config", token, change)
    assert status == 200, body
    assert tomllib.loads(proxy.api("/api/admin/config")[1].decode())["proxy"][
        "max-connections"] == 50
    status, body = _from_netns("POST", base + "/api/debug/redirect", token)
    assert status == 200, body
    status, body = _from_netns("PUT", base + "/api/admin/config", token,
                               '[security]\nusers-file = "/dev/zero"\n')
    assert (status, _error(body)) == (400, "security.users-file: not a regular file")
    assert _from_netns("GET", base + "/api/debug/health")[0] == 200

    refused = _ctl_from_netns(proxy, "redirect")
    assert refused.returncode == 1 and "HTTP 403" in refused.stderr, refused
    done = _ctl_from_netns(proxy, "--token-file", str(token_file), "redirect")
    assert done.returncode == 0 and "sessions asked to move" in done.stdout, done
    done = _ctl_from_netns(proxy, "redirect", env={"TIPROXYCTL_TOKEN": token})
    assert done.returncode == 0, done
    wrong = _ctl_from_netns(proxy, "redirect", env={"TIPROXYCTL_TOKEN": "x" + token})
    assert wrong.returncode == 1 and token not in wrong.stderr
    assert token not in proxy.log()
    assert "refused" in proxy.log()


def _wait_for_log(proxy: ProxyProcess, found: Callable[[str], bool], what: str) -> str:
    deadline = time.monotonic() + 30
    while not found(log := proxy.log()):
        assert time.monotonic() < deadline, f"no {what} in the log:\n{log}"
        time.sleep(0.05)
    return log


def _sighup(proxy: ProxyProcess, text: str, expect: str) -> None:
    """Write the config file, send SIGHUP, and wait for the log line that says `expect`."""
    before = proxy.log().count(expect)
    proxy.config_path.write_text(text)
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    _wait_for_log(proxy, lambda log: log.count(expect) > before, repr(expect))


def test_sighup_refuses_offline_keys_and_unreadable_files(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = proxy_factory([b.addr for b in backends])
    original = proxy.config_path.read_text()
    listen = f'addr = "127.0.0.1:{proxy.port}"'
    assert listen in original
    _sighup(proxy, original.replace(listen, 'addr = "127.0.0.1:1"'),
            "proxy.addr: cannot change while the proxy runs (restart it)")
    fifo = tmp_path / "users-fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        _sighup(proxy, original + f'\n[security]\nusers-file = "{path}"\n',
                "security.users-file: not a regular file")
        assert proxy.api("/api/debug/health")[0] == 200
    assert "config reload refused, keeping the running config" in proxy.log()
    _sighup(proxy, original.replace("[proxy]\n", "[proxy]\nmax-connections = 7\n", 1),
            "config reloaded from")
    config = tomllib.loads(proxy.api("/api/admin/config")[1].decode())
    assert config["proxy"]["max-connections"] == 7
    assert config["proxy"]["addr"] == f"127.0.0.1:{proxy.port}"
    assert config["security"]["users-file"] == ""
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


def test_start_refuses_a_users_file_that_is_a_fifo(
    backends: list[MariaDBServer], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    fifo = tmp_path / "users-fifo"
    os.mkfifo(fifo)
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        proxy_factory([backends[0].addr], f'\n[security]\nusers-file = "{fifo}"')
    assert "security.users-file: not a regular file" in str(info.value)


# Run inside the namespace: one raw HTTP request that starts with a PROXY header naming
# 127.0.0.1, as a remote attacker would send it; prints the status line.
_SPOOF = """
import socket, sys
sys.path.insert(0, sys.argv[3])
from tiproxy.protocol.proxyproto import build
host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), timeout=20)
sock.sendall(build(("127.0.0.1", 40000), (host, port)) + b"POST /api/debug/redirect HTTP/1.1"
             b"\\r\\nHost: x\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n")
reply = b""
while chunk := sock.recv(4096):
    reply += chunk
print(reply.split(b"\\r\\n", 1)[0].decode())
"""


def test_a_proxy_header_cannot_make_a_remote_peer_loopback(
    netns: str, backends: list[MariaDBServer], proxy_factory: ProxyFactory
) -> None:
    """With `[api] proxy-protocol`, a header may take loopback trust away, never grant it."""
    proxy = proxy_factory([b.addr for b in backends], api_host=ROOT_IP,
                          api_toml='proxy-protocol = "v2"')
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, "-c", _SPOOF, ROOT_IP,
                          str(proxy.api_port), src],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "HTTP/1.1 403 Forbidden", out
    assert "refused" in proxy.log()
