"""Checks and conversions for single config values: addresses, durations, enums, counts.

Each check takes an already type-checked value and raises `ValueError` with a reason a user can
act on ("port 70000 is out of range 1..65535"); the loader adds the dotted key in front. Nothing
here knows about the config's layout, so the data plane may use `split_host_port` too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

Check = Callable[[Any], None]

_MAX_PORT = 65535
_NS_PER_SECOND = 1_000_000_000

# Go's time.ParseDuration units, which TiProxy's TOML (BurntSushi) accepts in duration strings.
_DURATION_UNITS_NS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # Go accepts the micro sign
    "μs": 1_000,  # and the Greek mu
    "ms": 1_000_000,
    "s": _NS_PER_SECOND,
    "m": 60 * _NS_PER_SECOND,
    "h": 3600 * _NS_PER_SECOND,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def split_host_port(addr: str, *, listen: bool = False) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets: "[::1]:4000") into host and port.

    A listen address may leave the host empty (":6000", all interfaces) and may use port 0 (the
    kernel picks a free port, which tests rely on); an address to dial needs both.
    """
    if addr != addr.strip() or not addr:
        raise ValueError(f"{addr!r} is not a host:port address")
    if addr.startswith("["):
        close = addr.find("]")
        if close < 0 or addr[close + 1 : close + 2] != ":":
            raise ValueError(f"{addr!r} is not a host:port address")
        host, port_text = addr[1:close], addr[close + 2 :]
        _check_ipv6(host, addr)
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep:
            raise ValueError(f"{addr!r} has no port: write it as host:port")
        if ":" in host:
            raise ValueError(f"{addr!r}: write an IPv6 host in brackets, as [::1]:4000")
    if not host and not listen:
        raise ValueError(f"{addr!r} has no host")
    if any(c.isspace() for c in host):
        raise ValueError(f"{addr!r}: the host contains white space")
    return host, _parse_port(port_text, addr, listen=listen)


def _check_ipv6(host: str, addr: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{addr!r}: {host!r} in brackets is not an IPv6 address") from None


def _parse_port(text: str, addr: str, *, listen: bool) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{addr!r}: port {text!r} is not a number")
    port = int(text)
    low = 0 if listen else 1
    if not low <= port <= _MAX_PORT:
        raise ValueError(f"{addr!r}: port {port} is out of range {low}..{_MAX_PORT}")
    return port


def check_dial_addr(value: str) -> None:
    """An address the proxy connects to: host and port 1..65535 are both required."""
    split_host_port(value)


def check_listen_addr(value: str) -> None:
    """An address the proxy listens on: the host may be empty."""
    split_host_port(value, listen=True)


def check_listen_addr_list(value: str) -> None:
    """TiProxy's `proxy.addr` may list several listen addresses separated by commas."""
    for part in value.split(","):
        check_listen_addr(part.strip())


def check_optional_dial_addr(value: str) -> None:
    if value:
        check_dial_addr(value)


def check_host(value: str) -> None:
    """A host name or IP without a port (TiProxy's `advertise-addr`); empty means unset."""
    if not value:
        return
    if any(c.isspace() for c in value):
        raise ValueError(f"{value!r} contains white space")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value.strip("[]"))
        except ValueError:
            raise ValueError(f"{value!r}: give the host only, without a port") from None


def check_virtual_ip(value: str) -> None:
    """TiProxy's `[ha] virtual-ip`: an IPv4 address with a prefix length ("10.0.0.10/24", as
    TiProxy reads it) or without one (/32, the host route TiProxy recommends); empty: no VIP."""
    if not value:
        return
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (with an optional /prefix)") from None
    if iface.version != 4:
        raise ValueError(f"{value!r}: only IPv4 is supported (takeover is announced by "
                         "gratuitous ARP)")
    ip = iface.ip
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local \
            or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{value!r} cannot be a service address")


def check_interface_name(value: str) -> None:
    """A Linux network interface's name (at most 15 bytes, no '/', no white space)."""
    if not value:
        return
    if len(value.encode()) > 15 or value in (".", "..") or "/" in value \
            or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{value!r} is not a network interface name")


NAMESPACE_NAME_LIMIT = 128


def check_namespace_name(name: str) -> None:
    """A namespace's name travels in URL paths (/api/admin/namespace/NAME) and TOML keys."""
    if not name:
        raise ValueError("a namespace needs a name")
    if len(name) > NAMESPACE_NAME_LIMIT:
        raise ValueError(f"a namespace name is at most {NAMESPACE_NAME_LIMIT} characters")
    if "/" in name or any(c.isspace() or not c.isprintable() for c in name):
        raise ValueError(f"{name!r}: a namespace name has no '/', white space or control "
                         "characters")


def check_backend_name(value: str) -> None:
    """An entry of `fail-backend-list`: a backend's name (a pod name) or its host:port."""
    if not value.strip():
        raise ValueError("must not be empty")
    if value != value.strip() or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} contains white space")
    if ":" in value:
        check_dial_addr(value)


def one_of(*choices: str) -> Check:
    def check(value: str) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{value!r} is not one of {allowed}")

    return check


def non_negative(value: float) -> None:
    if value < 0:
        raise ValueError(f"must not be negative (got {value})")


def zero_or_range(low: int, high: int) -> Check:
    """0 means "the default"; anything else must lie in [low, high] (TiProxy's conn-buffer-size)."""

    def check(value: int) -> None:
        if value != 0 and not low <= value <= high:
            raise ValueError(f"must be 0 (the default) or between {low} and {high} (got {value})")

    return check


def in_range(low: float, high: float) -> Check:
    def check(value: float) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (got {value})")

    return check


def zero_or_above(threshold: float) -> Check:
    def check(value: float) -> None:
        if value != 0 and value <= threshold:
            raise ValueError(f"must be 0 (the default) or greater than {threshold} (got {value})")

    return check


class ItemError(ValueError):
    """A value inside a list or table was refused; `where` is "[2]" or ".zone"."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(reason)
        self.where = where
        self.reason = reason


def each(check: Check) -> Check:
    """Apply `check` to every item of a list; the error names the item's index."""

    def check_all(values: Iterable[Any]) -> None:
        for i, item in enumerate(values):
            try:
                check(item)
            except ValueError as e:
                raise ItemError(f"[{i}]", str(e)) from None

    return check_all


def unique(values: Iterable[str]) -> None:
    seen: set[str] = set()
    for item in values:
        if item in seen:
            raise ValueError(f"{item!r} is listed twice")
        seen.add(item)


def all_of(*checks: Check) -> Check:
    def check(value: Any) -> None:
        for c in checks:
            c(value)

    return check


def parse_duration(raw: object) -> float:
    """A duration in seconds from a Go duration string ("1m30s", "500ms") or an integer.

    An integer counts nanoseconds: that is how TiProxy writes `time.Duration` values in TOML
    (`idle = 60000000000`), so its config files load unchanged.
    """
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise TypeError('a duration string such as "60s" or an integer of nanoseconds')
    if isinstance(raw, int):
        if raw < 0:
            raise ValueError(f"must not be negative (got {raw})")
        return raw / _NS_PER_SECOND
    return _duration_ns(raw) / _NS_PER_SECOND


def _duration_ns(text: str) -> int:
    if text == "0":
        return 0
    total = Decimal(0)
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += Decimal(match.group(1)) * _DURATION_UNITS_NS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f'{text!r} is not a duration such as "60s", "1m30s" or "500ms"')
    return int(total)


def format_duration(seconds: float) -> str:
    """A Go duration string for `seconds` ("1m30s", "1.5s", "500ms"), exact to the nanosecond."""
    ns = round(seconds * _NS_PER_SECOND)
    if ns < _NS_PER_SECOND:
        for unit in ("ms", "us"):
            size = _DURATION_UNITS_NS[unit]
            if ns and ns % size == 0:
                return f"{ns // size}{unit}"
        return f"{ns}ns" if ns else "0s"
    hours, rest = divmod(ns, _DURATION_UNITS_NS["h"])
    minutes, rest = divmod(rest, _DURATION_UNITS_NS["m"])
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if rest:
        parts.append(format(Decimal(rest).scaleb(-9).normalize(), "f") + "s")
    return "".join(parts)
