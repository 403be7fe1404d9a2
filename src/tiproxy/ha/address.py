"""The virtual IP on this machine: add it to an interface, remove it, announce it by ARP.

The address is added and removed with iproute2's `ip addr` (the command operators use to see
it, and what TiProxy falls back on): a takeover is rare, a short-lived child process costs
nothing there, and rtnetlink of our own would be a few hundred lines to get the same. The
announcement is a gratuitous ARP of our own, sent on a packet socket (AF_PACKET): a broadcast
ARP request whose sender and target protocol addresses are both the virtual IP, with this
interface's MAC as sender hardware address, the frame `arping -U` sends (and TiProxy with it).
Hosts and switches that have the address in their ARP cache replace the old owner's MAC with
ours; Linux does so even for an entry it has just confirmed (a gratuitous ARP overrides
`locktime`).

Both need privileges: CAP_NET_ADMIN for `ip addr`, CAP_NET_RAW for the packet socket (root has
both). `problem()` says what is missing, before the proxy starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import socket
import struct
from pathlib import Path

log = logging.getLogger("tiproxy.ha")

CAP_NET_ADMIN = 12  # linux/capability.h
CAP_NET_RAW = 13
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
BROADCAST_MAC = b"\xff" * 6
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # RFC 826: htype, ptype, hlen, plen, op, sha, spa, tha, tpa
_MIN_FRAME = 60  # Ethernet's minimum without the FCS: shorter frames are padded
IP_TIMEOUT = 5.0  # seconds an `ip` command may take


class AddressError(Exception):
    """An `ip` command or a packet socket failed; the message says which and why."""


def effective_capabilities(status: str | None = None) -> int:
    """The process's effective capabilities (the CapEff line of /proc/self/status)."""
    text = Path("/proc/self/status").read_text() if status is None else status
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def problem(virtual_ip: str, interface: str) -> tuple[str, str] | None:
    """(dotted key, reason) when this machine cannot carry `virtual_ip` on `interface`."""
    caps = effective_capabilities()
    missing = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN),
                                      ("CAP_NET_RAW", CAP_NET_RAW)) if not caps >> bit & 1]
    if missing:
        return ("ha.virtual-ip", f"the proxy needs {' and '.join(missing)} (run it as root, or "
                "grant them) to add the address and announce it")
    try:
        socket.if_nametoindex(interface)
    except OSError:
        return "ha.interface", f"no network interface {interface!r} on this machine"
    if shutil.which("ip") is None:
        return "ha.virtual-ip", "the ip command (iproute2) is not installed"
    return None


class VirtualAddress:
    """`virtual_ip` ("10.0.0.10" or "10.0.0.10/24"; /32 when no prefix) on `interface`."""

    def __init__(self, virtual_ip: str, interface: str) -> None:
        self.interface_address = ipaddress.IPv4Interface(virtual_ip)
        self.ip = self.interface_address.ip
        self.interface = interface

    def __str__(self) -> str:
        return f"{self.interface_address.with_prefixlen} on {self.interface}"

    async def present(self) -> bool:
        """The address is on the interface now."""
        out = await _ip("-o", "-4", "addr", "show", "dev", self.interface)
        wanted = self.interface_address.with_prefixlen
        return any(wanted in line.split() for line in out.splitlines())

    async def add(self) -> None:
        if not await self.present():
            await _ip("addr", "add", self.interface_address.with_prefixlen, "dev", self.interface)

    async def delete(self) -> None:
        if await self.present():
            await _ip("addr", "del", self.interface_address.with_prefixlen, "dev", self.interface)

    def announce(self) -> None:
        """One gratuitous ARP for the address, from this interface."""
        mac = interface_mac(self.interface)
        frame = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP) + _ARP.pack(
            1, ETH_P_IP, 6, 4, ARP_REQUEST, mac, self.ip.packed, BROADCAST_MAC, self.ip.packed)
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
                s.setblocking(False)
                s.bind((self.interface, 0))
                s.send(frame.ljust(_MIN_FRAME, b"\0"))
        except OSError as e:
            raise AddressError(f"gratuitous ARP on {self.interface}: {e}") from e


def interface_mac(interface: str) -> bytes:
    try:
        text = Path(f"/sys/class/net/{interface}/address").read_text().strip()
        mac = bytes.fromhex(text.replace(":", ""))
    except (OSError, ValueError) as e:
        raise AddressError(f"no hardware address for {interface}: {e}") from e
    if len(mac) != 6:
        raise AddressError(f"{interface} has no Ethernet address ({text})")
    return mac


async def _ip(*args: str) -> str:
    """Run `ip ARGS`; its output, or AddressError with what it printed."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise AddressError(f"ip {' '.join(args)}: {e}") from e
    try:
        async with asyncio.timeout(IP_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise AddressError(f"ip {' '.join(args)}: no answer in {IP_TIMEOUT:.0f}s") from None
    except asyncio.CancelledError:
        # The command goes on: let it end first, so that whatever comes next (the delete of a
        # shutdown) comes after it, not before an add still under way.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), IP_TIMEOUT)
        raise
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise AddressError(f"ip {' '.join(args)}: {detail}")
    return out.decode(errors="replace")
