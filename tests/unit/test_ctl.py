"""tiproxyctl against a real API server on a free port, as an operator would run it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tiproxy.api import APIServer, BackendView, start_api
from tiproxy.cli.ctl import main
from tiproxy.config import Config, config_to_dict, parse_config

CONFIG = parse_config('[proxy]\nbackend-addrs = ["127.0.0.1:3306"]\nmax-connections = 9\n')


@dataclass
class FakeView:
    shutting_down: bool = False
    backend_list: list[BackendView] = field(default_factory=list)

    def connection_count(self) -> int:
        return sum(b.connections for b in self.backend_list)

    def backends(self) -> list[BackendView]:
        return self.backend_list

    def config(self) -> Config:
        return CONFIG

    def discovery_status(self) -> dict[str, str]:
        return {}


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


def test_health(api: RunningAPI, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--addr", api.addr, "health"]) == 0
    assert capsys.readouterr().out.startswith("healthy")


def test_health_fails_while_shutting_down(
    api: RunningAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    api.view.shutting_down = True
    assert main(["--addr", api.addr, "health"]) == 1
    assert capsys.readouterr().out.startswith("shutting down")


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
    assert err.startswith(f"tiproxyctl: cannot reach the proxy API at 127.0.0.1:{port}")


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
