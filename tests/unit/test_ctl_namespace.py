"""`tiproxyctl namespace ...` and TiProxy's namespace routes, against a real API server on a free
port in front of a small fake of the proxy that applies the configs it is given."""

from __future__ import annotations

import asyncio
import json
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.views import QuietProxy
from tiproxy.api import APIServer, start_api
from tiproxy.cli.ctl import main
from tiproxy.config import Config, parse_config

CONFIG = parse_config(
    '[proxy]\nbackend-addrs = ["10.0.0.1:3306"]\n'
    '[namespaces.analytics]\nusers = ["report"]\nbackend-addrs = ["10.0.1.1:3306"]\n')


@dataclass
class ConfigHolder(QuietProxy):
    """The proxy as the API sees it: only its config matters here."""

    cfg: Config = CONFIG


@dataclass
class API:
    view: ConfigHolder
    port: int

    def ctl(self, *argv: str) -> int:
        return main(["--host", "127.0.0.1", "--port", str(self.port), *argv])

    def http(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture
def api() -> Iterator[API]:
    view = ConfigHolder()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server: APIServer = asyncio.run_coroutine_threadsafe(
        start_api(view, "127.0.0.1:0"), loop).result(timeout=30)
    try:
        yield API(view, server.port)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def listed(api: API, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    capsys.readouterr()  # what came before
    assert api.ctl("namespace", "list") == 0
    return tomllib.loads(capsys.readouterr().out)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_list_and_get_show_the_config_as_tiproxy_documents(
        api: API, capsys: pytest.CaptureFixture[str]) -> None:
    assert listed(api, capsys) == {
        "default": {"namespace": "default", "frontend": {"user": "", "security": {}},
                    "backend": {"instances": ["10.0.0.1:3306"], "security": {}}},
        "analytics": {"namespace": "analytics", "frontend": {"user": "report", "security": {}},
                      "backend": {"instances": ["10.0.1.1:3306"], "security": {}}},
    }
    assert api.ctl("namespace", "get", "analytics") == 0
    assert tomllib.loads(capsys.readouterr().out)["frontend"]["user"] == "report"
    assert api.ctl("namespace", "get", "nope") == 1
    assert capsys.readouterr().err == \
        "tiproxyctl: /api/admin/namespace/nope failed with HTTP 404: namespace 'nope' not found\n"


def test_put_stages_and_commit_applies_as_a_config_change(
        api: API, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = write(tmp_path / "bi.toml", 'namespace = "bi"\n[frontend]\nuser = "dash"\n'
                '[backend]\ninstances = ["10.0.3.1:3306"]\n')
    assert api.ctl("namespace", "put", "--ns", str(doc)) == 0
    assert "namespace bi: staged" in capsys.readouterr().out
    assert "bi" in listed(api, capsys)  # listed as staged, as TiProxy lists its store
    assert api.view.applied == []  # not applied yet
    assert api.ctl("namespace", "commit") == 0
    assert capsys.readouterr().out.startswith("committed bi (config checksum ")
    assert [(n.name, n.users, n.backend_addrs) for n in api.view.cfg.namespaces] == [
        ("analytics", ("report",), ("10.0.1.1:3306",)), ("bi", ("dash",), ("10.0.3.1:3306",))]
    assert api.ctl("namespace", "commit") == 0
    assert capsys.readouterr().out == "nothing staged to commit\n"
    assert len(api.view.applied) == 1  # the empty commit changed nothing


def test_a_get_can_be_edited_and_put_back(api: API, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert api.ctl("namespace", "get", "analytics") == 0
    doc = tomllib.loads(capsys.readouterr().out)
    doc["backend"]["instances"].append("10.0.1.2:3306")
    import tomli_w  # noqa: PLC0415

    path = write(tmp_path / "analytics.toml", tomli_w.dumps(doc))
    assert api.ctl("namespace", "put", "--ns", str(path)) == 0
    assert api.ctl("namespace", "commit", "analytics") == 0
    assert api.view.cfg.namespaces[0].backend_addrs == ("10.0.1.1:3306", "10.0.1.2:3306")


def test_put_reads_standard_input(api: API, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    doc = write(tmp_path / "in.toml", 'namespace = "x"\n[backend]\ninstances = ["h:1"]\n')
    with doc.open("rb") as f:
        monkeypatch.setattr("sys.stdin", type("In", (), {"buffer": f})())
        assert api.ctl("namespace", "put") == 0
    assert listed(api, capsys)["x"]["backend"] == {"instances": ["h:1"], "security": {}}


def test_del_and_default(api: API, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert api.ctl("namespace", "del", "analytics") == 0
    assert "analytics" not in listed(api, capsys)
    assert api.view.cfg.namespaces  # still running
    assert api.ctl("namespace", "del", "default") == 1
    assert "the default namespace cannot be removed" in capsys.readouterr().err
    default = write(tmp_path / "d.toml", 'namespace = "default"\n'
                    '[backend]\ninstances = ["10.0.0.1:3306", "10.0.0.7:3306"]\n')
    assert api.ctl("namespace", "put", "--ns", str(default)) == 0
    assert api.ctl("namespace", "commit") == 0
    assert api.view.cfg.namespaces == ()
    assert api.view.cfg.proxy.backend_addrs == ("10.0.0.1:3306", "10.0.0.7:3306")


def test_commit_of_named_namespaces_leaves_the_others_staged(
        api: API, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b", "c"):
        path = write(tmp_path / f"{name}.toml",
                     f'namespace = "{name}"\n[backend]\ninstances = ["{name}:1"]\n')
        assert api.ctl("namespace", "put", "--ns", str(path)) == 0
    assert api.ctl("namespace", "commit", "a", "c") == 0  # ?namespaces=a,c as TiProxy's
    assert [n.name for n in api.view.cfg.namespaces] == ["analytics", "a", "c"]
    status, body = api.http("POST", "/api/admin/namespace/commit?namespace=b")  # its server's
    assert status == 200 and body["committed"] == ["b"]
    assert [n.name for n in api.view.cfg.namespaces] == ["analytics", "a", "c", "b"]
    assert api.http("POST", "/api/admin/namespace/commit?namespace=zz")[0] == 404


def test_import_reads_every_toml_file_first(api: API, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "one.toml", 'namespace = "one"\n[backend]\ninstances = ["h:1"]\n')
    write(tmp_path / "two.toml", 'namespace = "two"\n[frontend]\nuser = "u2"\n'
          '[backend]\ninstances = ["h:2"]\n')
    write(tmp_path / "notes.txt", "not a namespace")
    assert api.ctl("namespace", "import", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("- file: ") == 2 and "notes" not in out
    assert {"one", "two"} <= set(listed(api, capsys))
    write(tmp_path / "three.toml", 'namespace = "three"\n[backend\n')  # does not parse
    assert api.ctl("namespace", "del", "one") == 0
    capsys.readouterr()
    assert api.ctl("namespace", "import", str(tmp_path)) == 1
    assert "three.toml: invalid TOML" in capsys.readouterr().err
    assert "one" not in listed(api, capsys)  # nothing was sent


def test_a_field_that_cannot_be_honoured_is_refused_by_name(
        api: API, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = write(tmp_path / "tls.toml", 'namespace = "t"\n[frontend]\nuser = "u"\n'
                '[frontend.security]\nca = "/etc/ca.pem"\n[backend]\ninstances = ["h:1"]\n')
    assert api.ctl("namespace", "put", "--ns", str(doc)) == 1
    err = capsys.readouterr().err
    assert "HTTP 400: frontend.security.ca: not supported" in err and err.count("\n") == 1
    random = write(tmp_path / "random.toml", 'namespace = "r"\n[backend]\ninstances = ["h:1"]\n'
                   'selector-type = "random"\n')  # as in TiProxy's conf/namespace examples
    assert api.ctl("namespace", "put", "--ns", str(random)) == 1
    assert "backend.selector-type: not supported" in capsys.readouterr().err
    assert set(listed(api, capsys)) == {"default", "analytics"}


def test_a_commit_the_config_refuses_changes_nothing(
        api: API, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = write(tmp_path / "dup.toml", 'namespace = "dup"\n[frontend]\nuser = "report"\n'
                '[backend]\ninstances = ["h:1"]\n')  # report is analytics' user already
    assert api.ctl("namespace", "put", "--ns", str(doc)) == 0
    assert api.ctl("namespace", "commit") == 1
    assert "namespaces.dup.users: user 'report' is in two namespaces" in \
        capsys.readouterr().err
    assert api.view.cfg == CONFIG
    assert "dup" in listed(api, capsys)  # still staged: fix it and commit again
    assert api.ctl("namespace", "del", "dup") == 0
    assert api.ctl("namespace", "commit") == 0
    assert api.view.cfg == CONFIG


def test_tiproxyctls_json_and_routes(api: API) -> None:
    """What TiProxy's own tiproxyctl sends: every field, empty TLS objects, PUT to the name."""
    doc = {"namespace": "ns2", "frontend": {"user": "xhe", "security": {}},
           "backend": {"instances": ["127.0.0.1:7000"], "security": {}}}
    assert api.http("PUT", "/api/admin/namespace/ns2", doc) == (
        200, {"namespace": "ns2", "staged": "put"})
    assert api.http("GET", "/api/admin/namespace/ns2") == (200, doc)
    assert api.http("PUT", "/api/admin/namespace/", {**doc, "namespace": "ns3"})[0] == 200
    status, body = api.http("PUT", "/api/admin/namespace/other", doc)
    assert status == 400 and "names 'ns2', the path 'other'" in str(body)
    status, listing = api.http("GET", "/api/admin/namespace")
    assert status == 200 and [d["namespace"] for d in listing] == [  # type: ignore[union-attr]
        "default", "analytics", "ns2", "ns3"]
    req = urllib.request.Request(f"http://127.0.0.1:{api.port}/api/admin/namespace/x",
                                 data=b"{not json", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 400
    assert api.http("DELETE", "/api/admin/namespace/never")[0] == 404


def test_the_global_options_may_follow_the_command(
        api: API, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["namespace", "list", "--host", "127.0.0.1", "--port", str(api.port),
                 "--log_level", "warn", "--log_encoder", "json", "--indent=false"]) == 0
    assert "default" in tomllib.loads(capsys.readouterr().out)
    assert main(["namespace", "--port", str(api.port), "get", "default"]) == 0
    assert main(["--port", str(api.port), "--indent", "--insecure=false", "config", "get"]) == 0
    with pytest.raises(SystemExit):
        main(["--log_level", "loud", "health"])
    with pytest.raises(SystemExit):
        main(["--indent=maybe", "health"])


def test_traffic_takes_tiproxys_flags_after_the_command(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Parsed as TiProxy's scripts write it (not a usage error): it fails only at the API."""
    assert main(["traffic", "capture", "--host", "127.0.0.1", "--port", "1",
                 "--output=/tmp/traffic", "--duration=1h"]) == 1
    assert "cannot reach the proxy API at http://127.0.0.1:1" in capsys.readouterr().err
