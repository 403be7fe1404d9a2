"""`[ha]`, TiProxy's virtual IP: its keys, defaults and refusals, and the pieces of the address
that need no network (the ARP frame's layout is checked on a real LAN in
tests/integration/test_virtual_ip.py)."""

from __future__ import annotations

import pytest

from tiproxy.config import ConfigError, merge_config, parse_config
from tiproxy.config.info import parameters
from tiproxy.config.model import Config
from tiproxy.config.reload import check_offline_keys
from tiproxy.discovery.registration import advertise_host
from tiproxy.ha.address import CAP_NET_ADMIN, CAP_NET_RAW, VirtualAddress, effective_capabilities
from tiproxy.ha.vip import VIP_KEY
from tiproxy.interfaces import first_global_unicast

PD = '[proxy]\npd-addrs = ["10.0.0.9:2379"]\n'


def test_tiproxys_keys_and_defaults() -> None:
    ha = parse_config(f'{PD}[ha]\nvirtual-ip = "10.0.1.10/24"\ninterface = "eth0"').ha
    assert (ha.virtual_ip, ha.interface) == ("10.0.1.10/24", "eth0")
    assert (ha.garp_burst_count, ha.garp_refresh_count) == (5, 30)  # TiProxy's
    info = {p["key"]: p for p in parameters(Config())}
    for key in ("ha.virtual-ip", "ha.interface", "ha.garp-burst-count", "ha.garp-refresh-count"):
        assert info[key]["hot_reloadable"] is False  # as in TiProxy


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[ha]\nvirtual-ip = "10.0.1.10"\ninterface = "eth0"', "ha.virtual-ip",
         "needs [proxy] pd-addrs"),
        (f'{PD}[ha]\nvirtual-ip = "10.0.1.10"', "ha.interface", "needed with virtual-ip"),
        (f'{PD}[ha]\ninterface = "eth0"', "ha.virtual-ip", "needed with interface"),
        (f'{PD}[ha]\nvirtual-ip = "fd00::10"\ninterface = "eth0"', "ha.virtual-ip",
         "only IPv4"),
        (f'{PD}[ha]\nvirtual-ip = "10.0.1.300"\ninterface = "eth0"', "ha.virtual-ip",
         "not an IP address"),
        (f'{PD}[ha]\nvirtual-ip = "127.0.0.5"\ninterface = "lo"', "ha.virtual-ip",
         "cannot be a service address"),
        (f'{PD}[ha]\nvirtual-ip = "10.0.1.10"\ninterface = "a-name-far-too-long"',
         "ha.interface", "not a network interface name"),
        ("[ha]\ngarp-burst-count = -1", "ha.garp-burst-count", "must not be negative"),
        ("[ha]\ngarp-refresh-count = -1", "ha.garp-refresh-count", "must not be negative"),
        ("[ha]\nvirtual_ip = '10.0.1.10'", "ha.virtual_ip", "unknown key"),
    ],
)
def test_what_cannot_work_is_refused_by_key(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert reason in info.value.reason


def test_a_reload_cannot_change_the_address() -> None:
    running = parse_config(f'{PD}[ha]\nvirtual-ip = "10.0.1.10"\ninterface = "eth0"')
    changed = merge_config(running, '[ha]\nvirtual-ip = "10.0.1.11"')
    with pytest.raises(ConfigError, match=r"ha\.virtual-ip: cannot change while the proxy runs"):
        check_offline_keys(running, changed)


def test_the_address_and_its_election_key() -> None:
    plain = VirtualAddress("10.0.1.10", "eth0")
    assert str(plain) == "10.0.1.10/32 on eth0"  # no prefix: a host route
    assert str(VirtualAddress("10.0.1.10/24", "eth0")) == "10.0.1.10/24 on eth0"
    assert VIP_KEY.format(ip=plain.ip) == "/tiproxy/vip/10.0.1.10/owner"  # TiProxy's key


def test_capabilities_are_read_from_the_status_file() -> None:
    both = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
    assert effective_capabilities(f"Name:\tx\nCapEff:\t{both:016x}\n") == both
    assert effective_capabilities("Name:\tx\n") == 0


def test_the_registered_address_is_never_the_virtual_ip() -> None:
    found = first_global_unicast()
    if found is None:
        pytest.skip("this machine has no global unicast address")
    assert first_global_unicast(skip=found) != found
    assert advertise_host("", "0.0.0.0", found) != found
