"""`tiproxy`'s own flags as TiProxy has them: --config-info, --advertise-addr and the address
that the proxy registers in etcd."""

from __future__ import annotations

import ipaddress
import json

import pytest

from tiproxy import __version__
from tiproxy.cli.server import main
from tiproxy.config import Config, config_to_dict, parse_config
from tiproxy.discovery.registration import ProxyInfo, advertise_host
from tiproxy.interfaces import first_global_unicast, interface_addresses, names_no_one


def _flatten(table: dict[str, object], path: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in table.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(value, dict) and key not in ("labels", "namespaces", "backend-labels"):
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def test_config_info_lists_every_key_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config-info", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["Component"] == "TiProxy Server" and info["Version"] == __version__
    params = {p["key"]: p for p in info["Parameters"]}
    defaults = _flatten(config_to_dict(Config()))
    assert set(params) == set(defaults)  # every key the config file takes, and no other
    assert params["proxy.addr"] == {"key": "proxy.addr", "type": "string",
                                    "default_value": "0.0.0.0:6000", "hot_reloadable": False}
    assert params["proxy.max-connections"]["type"] == "int"
    assert params["proxy.max-connections"]["hot_reloadable"] is True
    assert params["proxy.high-memory-usage-reject-threshold"]["type"] == "float"
    assert params["health.interval"]["default_value"] == "3s"  # as the file writes it
    assert params["log.level"]["hot_reloadable"] is True
    assert params["log.log-file.max-size"]["hot_reloadable"] is False  # its section is not
    assert params["security.require-backend-tls"]["type"] == "bool"
    assert params["proxy.backend-addrs"] == {"key": "proxy.backend-addrs", "type": "json",
                                             "default_value": [], "hot_reloadable": True}
    for key, value in defaults.items():
        if not isinstance(value, list | dict):
            assert params[key]["default_value"] == value, key


def test_config_info_writes_list_items_as_tiproxy_does() -> None:
    from tiproxy.config.info import parameters  # noqa: PLC0415

    cfg = parse_config('[proxy]\nbackend-addrs = ["a:1"]\n[labels]\nzone = "z1"\n')
    params = {p["key"]: p for p in parameters(cfg)}
    assert params["proxy.backend-addrs"]["default_value"] == ['"a:1"']
    assert params["labels"]["default_value"] == {"zone": '"z1"'}


@pytest.mark.parametrize(("argv", "message"), [
    (["--config-info", "yaml"], "--config-info 'yaml': only json is supported"),
    (["--advertise-addr", "h:6000"], "--advertise-addr: 'h:6000': give the host only"),
])
def test_bad_flags_are_one_line_and_exit_2(argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_registered_address() -> None:
    cfg = parse_config('[proxy]\naddr = "127.0.0.1:6001"\n[api]\naddr = "0.0.0.0:3081"\n')
    info = ProxyInfo.of(cfg, started=1_700_000_000.5)
    assert (info.ip, info.port, info.status_port, info.start_timestamp) == (
        "127.0.0.1", "6001", "3081", 1_700_000_000)
    assert info.key("info") == "/topology/tiproxy/127.0.0.1:6001/info"
    assert ProxyInfo.of(parse_config('[proxy]\naddr = "[::1]:6000"\n')).addr == "[::1]:6000"
    flagged = parse_config('[proxy]\naddr = "0.0.0.0:6000"\nadvertise-addr = "tiproxy-0.svc"\n')
    assert ProxyInfo.of(flagged).addr == "tiproxy-0.svc:6000"
    assert ProxyInfo.parse(info.to_json().encode()) == info


def test_a_listen_address_nobody_can_dial_is_replaced_by_the_machines() -> None:
    for host in ("", "0.0.0.0", "::", "255.255.255.255", "224.0.0.1"):
        assert names_no_one(host), host
    for host in ("127.0.0.1", "10.0.0.1", "proxy.example", "::1"):
        assert not names_no_one(host), host
    found = first_global_unicast()
    assert found is not None  # the test machines have a network interface
    ip = ipaddress.ip_address(found)
    assert not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)
    assert ip in interface_addresses()
    assert advertise_host("", "0.0.0.0") == found
    assert advertise_host("", "::") == found
    assert advertise_host("given.example", "0.0.0.0") == "given.example"
