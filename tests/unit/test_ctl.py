"""tiproxyctl against a real API server on a free port, as an operator would run it."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from support.views import QuietProxy
from tiproxy.api import APIServer, BackendView, start_api
from tiproxy.cli.ctl import CtlError, Target, _parser, api_target, main
from tiproxy.config import Config, config_checksum, config_to_dict, parse_config

CONFIG = parse_config('[proxy]\nbackend-addrs = ["127.0.0.1:3306"]\nmax-connections = 9\n')


@dataclass
class FakeView(QuietProxy):
    cfg: Config = CONFIG
    backend_list: list[BackendView] = field(default_factory=list)
    redirects: int = 0
    upgrades: int = 0

    def connection_count(self) -> int:
        return sum(b.connections for b in self.backend_list)

    def backends(self) -> list[BackendView]:
        return self.backend_list

    async def redirect_all(self) -> int:
        self.redirects += 1
        return 3

    async def upgrade(self) -> int:
        self.upgrades += 1
        return 4242


@dataclass
class RunningAPI:
    view: FakeView
    addr: str


@pytest.fixture
def api() -> Iterator[RunningAPI]:
    """The API served from an event loop in a background thread (the CLI blocks)."""
    view = FakeView(
        backend_list=[
            BackendView("127.0.0.1:3306", "healthy", 12, {"Query": 5}),
            BackendView("10.0.0.2:4000", "draining", 1, {}),
        ]
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server: APIServer = asyncio.run_coroutine_threadsafe(
        start_api(view, "127.0.0.1:0"), loop
    ).result(timeout=30)
    try:
        yield RunningAPI(view, f"127.0.0.1:{server.port}")
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_health_prints_the_answer_as_tiproxyctl_does(
    api: RunningAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--addr", api.addr, "health"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config_checksum"] == config_checksum(CONFIG)
    assert out["status"] == "healthy"


def test_health_fails_while_shutting_down(
    api: RunningAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    api.view.shutting_down = True
    assert main(["--addr", api.addr, "health"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unhealthy_reason"] == "server is closing"
    assert captured.err == "tiproxyctl: unhealthy: server is closing\n"


def test_config_get_prints_toml_of_the_running_config(
    api: RunningAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--addr", api.addr, "config", "get"]) == 0
    assert parse_config(capsys.readouterr().out) == CONFIG


def test_config_get_json(api: RunningAPI, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--addr", api.addr, "config", "get", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == config_to_dict(CONFIG, redact=True)
    assert out["proxy"]["max-connections"] == 9


def test_backends_prints_a_table(api: RunningAPI, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--addr", api.addr, "backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ADDR", "STATUS", "CONNECTIONS"]
    assert lines[1].split() == ["127.0.0.1:3306", "healthy", "12"]
    assert lines[2].split() == ["10.0.0.2:4000", "draining", "1"]
    assert lines[1].index("healthy") == lines[2].index("draining")  # columns line up


def test_unreachable_proxy_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--addr", f"127.0.0.1:{port}", "health"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"tiproxyctl: cannot reach the proxy API at http://127.0.0.1:{port}")


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# -- the global options: where the API is, TLS, the bearer token ----------------------------------

TOKEN = "ctl-test-token-0123"


def _target(*argv: str, env: dict[str, str] | None = None) -> Target:
    args: argparse.Namespace = _parser().parse_args([*argv, "health"])
    return api_target(args, env or {})


def test_the_default_is_plain_http_to_loopback() -> None:
    target = _target()
    assert target == Target("http://127.0.0.1:3080")
    assert target.headers() == {}


def test_host_and_port_override_addr() -> None:
    assert _target("--addr", "10.0.0.1:4000", "--host", "10.0.0.2").base_url == \
        "http://10.0.0.2:4000"
    assert _target("--addr", "10.0.0.1:4000", "--port", "5000").base_url == \
        "http://10.0.0.1:5000"
    assert _target("--host", "::1", "--port", "3081").base_url == "http://[::1]:3081"
    assert _target("--addr", "[::1]:3082").base_url == "http://[::1]:3082"


def test_host_and_port_reach_the_api(api: RunningAPI, capsys: pytest.CaptureFixture[str]) -> None:
    port = api.addr.rpartition(":")[2]
    assert main(["--addr", "192.0.2.1:1", "--host", "127.0.0.1", "--port", port, "health"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "healthy"


@pytest.mark.parametrize("argv", [("--addr", "localhost"), ("--addr", "ftp://h:1"),
                                  ("--port", "0"), ("--port", "70000")])
def test_bad_addresses_are_one_line(argv: tuple[str, ...]) -> None:
    with pytest.raises(CtlError):
        _target(*argv)


def test_an_https_address_verifies_the_server() -> None:
    target = _target("--addr", "https://proxy.example:3080")
    assert target.base_url == "https://proxy.example:3080"
    assert target.ssl_context is not None
    assert target.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert target.ssl_context.check_hostname


def test_insecure_means_https_without_checks() -> None:
    for flag in ("-k", "--insecure"):
        target = _target("--addr", "10.0.0.1:3080", flag)
        assert target.base_url == "https://10.0.0.1:3080"
        assert target.ssl_context is not None
        assert target.ssl_context.verify_mode == ssl.CERT_NONE
        assert not target.ssl_context.check_hostname


def test_ca_cert_and_key_mean_https_with_them(tmp_path: Path) -> None:
    from support.certs import make_pki  # noqa: PLC0415 - needs the TLS test helpers

    pki = make_pki(tmp_path)
    target = _target("--ca", str(pki.ca), "--cert", str(pki.client.cert),
                     "--key", str(pki.client.key))
    assert target.base_url == "https://127.0.0.1:3080"
    assert target.ssl_context is not None
    subjects = [dict(item[0] for item in ca["subject"]) for ca in
                target.ssl_context.get_ca_certs()]
    assert subjects == [{"commonName": "tiproxy test CA"}]
    with pytest.raises(CtlError, match="--key needs --cert"):
        _target("--key", str(pki.client.key))
    with pytest.raises(CtlError, match="cannot load the TLS files"):
        _target("--ca", str(tmp_path / "nope.pem"))
    with pytest.raises(CtlError, match="for HTTPS"):
        _target("--addr", "http://127.0.0.1:3080", "--ca", str(pki.ca))


def test_the_token_comes_from_the_file_then_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert _target("--token-file", str(token_file)).headers() == {
        "Authorization": b"Bearer " + TOKEN.encode()}
    assert _target(env={"TIPROXYCTL_TOKEN": "from-env"}).headers() == {
        "Authorization": b"Bearer from-env"}
    assert _target("--token-file", str(token_file), env={"TIPROXYCTL_TOKEN": "x"}).token == \
        TOKEN.encode()
    assert _target(env={"TIPROXYCTL_TOKEN": ""}).token is None


def test_a_bad_token_file_is_one_line_without_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    for path, reason in ((empty, "is empty"), (spaced, "white space"),
                         (Path("/dev/zero"), "not a regular file")):
        assert main(["--token-file", str(path), "health"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err and "words" not in err


@pytest.fixture
def guarded_api(tmp_path: Path) -> Iterator[tuple[RunningAPI, Path]]:
    """An API whose view can be changed and which has an auth-token-file."""
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN)
    view = FakeView(cfg=replace(CONFIG, api=replace(CONFIG.api,
                                                    auth_token_file=str(token_file))))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server: APIServer = asyncio.run_coroutine_threadsafe(
        start_api(view, "127.0.0.1:0"), loop
    ).result(timeout=30)
    try:
        yield RunningAPI(view, f"127.0.0.1:{server.port}"), token_file
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_the_token_reaches_the_api(
    guarded_api: tuple[RunningAPI, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    api, token_file = guarded_api
    assert main(["--addr", api.addr, "--token-file", str(token_file), "redirect"]) == 0
    assert capsys.readouterr().out == "3 sessions asked to move\n"
    wrong = tmp_path / "wrong"
    wrong.write_text("not-" + TOKEN)
    assert main(["--addr", api.addr, "--token-file", str(wrong), "redirect"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 403" in err and "wrong bearer token" in err and TOKEN not in err
    monkeypatch.setenv("TIPROXYCTL_TOKEN", TOKEN)
    assert main(["--addr", api.addr, "redirect"]) == 0
    assert api.view.redirects == 2


def test_config_set_sends_a_file_or_standard_input(
    api: RunningAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    change = tmp_path / "change.toml"
    change.write_text("[proxy]\nmax-connections = 21\n")
    assert main(["--addr", api.addr, "config", "set", "--input", str(change)]) == 0
    assert api.view.cfg.proxy.max_connections == 21
    assert api.view.cfg.proxy.backend_addrs == CONFIG.proxy.backend_addrs  # merged, not replaced
    stdin = tmp_path / "stdin.toml"
    stdin.write_text("[proxy]\nmax-connections = 22\n")
    with stdin.open("rb") as f:
        monkeypatch.setattr("sys.stdin", type("In", (), {"buffer": f})())
        assert main(["--addr", api.addr, "config", "set"]) == 0
    assert api.view.cfg.proxy.max_connections == 22
    assert capsys.readouterr().out == "config changed\nconfig changed\n"
    change.write_text("[proxy]\nmax-connections = -1\n")
    assert main(["--addr", api.addr, "config", "set", "--input", str(change)]) == 1
    assert "proxy.max-connections" in capsys.readouterr().err
    assert api.view.cfg.proxy.max_connections == 22


def test_upgrade_starts_the_new_process(api: RunningAPI,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--addr", api.addr, "upgrade"]) == 0
    assert api.view.upgrades == 1
    assert "new proxy process 4242 started" in capsys.readouterr().out
