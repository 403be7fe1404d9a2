"""TiProxy's tiproxyctl command lines, as its documentation and its cobra commands write them,
run unchanged (the API's address aside) with our `tiproxyctl` against a real proxy in front of
real MariaDB servers; each is checked by its effect on the proxy, not only by its output."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pymysql
import pytest

from support.backends import APP, EDU
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

TIPROXYCTL = Path(sys.executable).parent / "tiproxyctl"  # the installed command


def run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A shell command line, as an operator types it."""
    return subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=30, env={"PATH": f"{TIPROXYCTL.parent}:/usr/bin:/bin"})


def ok(command: str, cwd: Path) -> str:
    done = run(command, cwd)
    assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


def port_of(proxy: ProxyProcess, user: Any) -> int:
    with proxy.connect(user) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@port")
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def proxy(backends: list[MariaDBServer], proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory([backends[0].addr])


def test_documented_config_and_health_command_lines(proxy: ProxyProcess, tmp_path: Path) -> None:
    flags = f"--host 127.0.0.1 --port {proxy.api_port}"
    # tiproxyctl --host 127.0.0.1 --port 3080 config get
    running = tomllib.loads(ok(f"tiproxyctl {flags} config get", tmp_path))
    assert running["proxy"]["addr"] == f"127.0.0.1:{proxy.port}"
    # tiproxyctl health: the config's checksum, as TiProxy prints it
    health = json.loads(ok(f"tiproxyctl {flags} health", tmp_path))
    assert isinstance(health["config_checksum"], int)
    # cat test.toml | tiproxyctl config set; tiproxyctl config get | grep level
    (tmp_path / "test.toml").write_text("[log]\nlevel='warning'\n")
    ok(f"cat test.toml | tiproxyctl {flags} config set", tmp_path)
    assert ok(f"tiproxyctl {flags} config get | grep level", tmp_path).split() == [
        "level", "=", '"warning"']
    assert json.loads(ok(f"tiproxyctl {flags} health", tmp_path))["config_checksum"] != \
        health["config_checksum"]
    # tiproxyctl config set --input cfg.toml: the running proxy takes it
    (tmp_path / "cfg.toml").write_text("[proxy]\nmax-connections = 1\n")
    ok(f"tiproxyctl {flags} config set --input cfg.toml", tmp_path)
    with proxy.connect(APP):
        with pytest.raises(pymysql.err.OperationalError) as refused:
            proxy.connect(APP)
        assert refused.value.args[0] == 1040
    (tmp_path / "cfg.toml").write_text("[proxy]\nmax-connections = 0\n")
    ok(f"tiproxyctl config set --input cfg.toml {flags}", tmp_path)  # flags after the command
    with proxy.connect(APP), proxy.connect(APP):
        pass
    # A file the proxy refuses changes nothing and says why, on one line.
    (tmp_path / "bad.toml").write_text("[proxy]\nmax-connections = -1\n")
    bad = run(f"tiproxyctl {flags} config set --input bad.toml", tmp_path)
    assert bad.returncode == 1 and "proxy.max-connections" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_namespace_command_lines_route_a_users_new_sessions(
        proxy: ProxyProcess, backends: list[MariaDBServer], tmp_path: Path) -> None:
    flags = f"--host 127.0.0.1 --port {proxy.api_port}"
    default, other = backends[0], backends[1]
    listing = tomllib.loads(ok(f"tiproxyctl {flags} namespace list", tmp_path))
    assert listing == {"default": {"namespace": "default",
                                   "frontend": {"user": "", "security": {}},
                                   "backend": {"instances": [default.addr], "security": {}}}}
    assert port_of(proxy, EDU) == default.port
    # A namespace file shaped as TiProxy's conf/namespace/test.toml
    (tmp_path / "edu.toml").write_text(
        f'namespace = "edu"\n\n[frontend]\nuser = "{EDU.name}"\n\n'
        f'[backend]\ninstances = [ "{other.addr}" ]\n')
    ok(f"tiproxyctl {flags} namespace put --ns edu.toml", tmp_path)
    assert port_of(proxy, EDU) == default.port  # staged, not applied
    ok(f"tiproxyctl {flags} namespace commit", tmp_path)
    assert port_of(proxy, EDU) == other.port  # the user's new sessions go to its backends
    assert port_of(proxy, APP) == default.port  # everyone else's do not
    got = tomllib.loads(ok(f"tiproxyctl {flags} namespace get edu", tmp_path))
    assert got["frontend"]["user"] == EDU.name and got["backend"]["instances"] == [other.addr]
    running = tomllib.loads(ok(f"tiproxyctl {flags} config get", tmp_path))
    assert running["namespaces"] == {"edu": {"users": [EDU.name], "backend-addrs": [other.addr]}}
    listed = {b["addr"]: b["namespace"] for b in proxy.backends()}
    assert listed == {default.addr: "", other.addr: "edu"}
    # del, then commit only that name (TiProxy's tiproxyctl sends ?namespaces=edu)
    ok(f"tiproxyctl {flags} namespace del edu", tmp_path)
    ok(f"tiproxyctl {flags} namespace commit edu", tmp_path)
    assert port_of(proxy, EDU) == default.port
    # import: a directory of namespace files; the flags after the command, as cobra allows
    nsdir = tmp_path / "namespaces"
    nsdir.mkdir()
    (nsdir / "edu.toml").write_text((tmp_path / "edu.toml").read_text())
    (nsdir / "default.toml").write_text(
        f'namespace = "default"\n[frontend]\n[backend]\ninstances = [ "{default.addr}" ]\n')
    out = ok(f"tiproxyctl namespace import namespaces {flags}", tmp_path)
    assert out.count("- file: ") == 2
    ok(f"tiproxyctl namespace commit {flags}", tmp_path)
    assert port_of(proxy, EDU) == other.port


def test_what_cannot_be_honoured_is_refused_on_one_line(proxy: ProxyProcess,
                                                       tmp_path: Path) -> None:
    flags = f"--host 127.0.0.1 --port {proxy.api_port}"
    (tmp_path / "tls.toml").write_text(
        'namespace = "tls"\n[frontend]\nuser = "x"\n[frontend.security]\nca = "/etc/ca.pem"\n'
        '[backend]\ninstances = ["127.0.0.1:1"]\n')
    done = run(f"tiproxyctl {flags} namespace put --ns tls.toml", tmp_path)
    assert done.returncode == 1
    assert "frontend.security.ca: not supported" in done.stderr
    assert "tls" not in tomllib.loads(ok(f"tiproxyctl {flags} namespace list", tmp_path))


def test_tiproxys_traffic_command_lines(proxy: ProxyProcess, tmp_path: Path) -> None:
    """TiProxy's documented traffic commands, options after the command as its scripts write
    them: a capture starts, shows as running, and is cancelled."""
    where = shlex.join(["--host", "127.0.0.1", "--port", str(proxy.api_port)])
    out = tmp_path / "traffic"
    ok(f"tiproxyctl traffic capture {where} --output={out} --duration=1h", tmp_path)
    shown = ok(f"tiproxyctl traffic show {where}", tmp_path)
    assert "capture" in shown and str(out) in shown
    ok(f"tiproxyctl traffic cancel {where}", tmp_path)
    deadline = time.monotonic() + 10
    while (out / "meta").exists() is False:  # written when the capture ends
        assert time.monotonic() < deadline, ok(f"tiproxyctl traffic show {where}", tmp_path)
        time.sleep(0.1)


def test_tiproxys_server_flags(backends: list[MariaDBServer], proxy_factory: ProxyFactory,
                               tmp_path: Path) -> None:
    """`tiproxy --config F --advertise-addr H` (as TiUP starts it): the flag holds over every
    reload of the file; `--log_level`, deprecated in TiProxy, is accepted and ignored."""
    proxy = proxy_factory([backends[0].addr], args=[
        "--advertise-addr", "tiproxy-0.example", "--log_level", "debug"])
    flags = f"--host 127.0.0.1 --port {proxy.api_port}"
    running = tomllib.loads(ok(f"tiproxyctl {flags} config get", tmp_path))
    assert running["proxy"]["advertise-addr"] == "tiproxy-0.example"
    assert running["log"]["level"] == "info"
    proxy.wait_log("--log_level is deprecated and ignored")
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text.replace("[proxy]\n", "[proxy]\nmax-connections = 3\n"))
    proxy.wait_log("config reloaded", timeout=10)
    running = tomllib.loads(ok(f"tiproxyctl {flags} config get", tmp_path))
    assert running["proxy"]["max-connections"] == 3
    assert running["proxy"]["advertise-addr"] == "tiproxy-0.example"
    info = json.loads(ok("tiproxy --config-info json", tmp_path))
    assert {p["key"] for p in info["Parameters"]} >= {"proxy.advertise-addr", "log.level"}
