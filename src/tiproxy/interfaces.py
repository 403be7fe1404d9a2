"""The machine's own addresses, for the address the proxy announces (discovery/registration.py).

Go's `net.InterfaceAddrs` lists every interface's addresses in the order of the interfaces'
indexes; TiProxy takes the first "global unicast" one of them. We read the same: each
interface's IPv4 address with the SIOCGIFADDR ioctl and its IPv6 addresses from
/proc/net/if_inet6 (Linux). "Global unicast" is Go's sense: any address but the unspecified,
loopback, multicast, link-local and broadcast ones, so private ranges (10/8, fd00::/8) count.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

_SIOCGIFADDR = 0x8915  # linux/sockios.h
_IFREQ = struct.Struct("16s16x")  # ifr_name, then the ifr_addr union the kernel fills
_IF_INET6 = Path("/proc/net/if_inet6")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def names_no_one(host: str) -> bool:
    """An empty, unspecified (0.0.0.0, ::), broadcast or multicast listen host: an address to
    listen on that a client cannot dial. A host name or any other IP can be dialed."""
    if not host:
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return ip.is_unspecified or ip.is_multicast or ip == _BROADCAST


def _global_unicast(ip: IPAddress) -> bool:
    return not (ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local
                or ip == _BROADCAST)


def first_global_unicast(skip: str = "") -> str | None:
    """The first global unicast address of the interfaces, by interface index, other than
    `skip` (the virtual IP, which TiProxy leaves out too); None if none."""
    for ip in interface_addresses():
        if _global_unicast(ip) and str(ip) != skip:
            return str(ip)
    return None


def interface_addresses() -> list[IPAddress]:
    """Every interface's addresses, the interfaces in index order, IPv4 before IPv6."""
    ipv6 = _ipv6_by_interface()
    found: list[IPAddress] = []
    for index, name in sorted(socket.if_nameindex()):
        ipv4 = _ipv4_of(name)
        if ipv4 is not None:
            found.append(ipv4)
        found.extend(ipv6.get(index, []))
    return found


def _ipv4_of(name: str) -> ipaddress.IPv4Address | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, _IFREQ.pack(name.encode()[:15]))
        except OSError:  # no IPv4 address on this interface
            return None
    return ipaddress.IPv4Address(answer[20:24])  # sockaddr_in: family, port, then the address


def _ipv6_by_interface() -> dict[int, list[ipaddress.IPv6Address]]:
    """/proc/net/if_inet6: `address index prefix-length scope flags name`, hex."""
    out: dict[int, list[ipaddress.IPv6Address]] = {}
    with contextlib.suppress(OSError):
        for line in _IF_INET6.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and len(fields[0]) == 32:
                with contextlib.suppress(ValueError):
                    ip = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
                    out.setdefault(int(fields[1], 16), []).append(ip)
    return out
