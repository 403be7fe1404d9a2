"""Network namespaces for tests: real non-loopback peers, and a LAN of them.

`veth_namespace`: one namespace joined to this one by a veth pair (a /30 of the test's own).
`bridged_namespaces`: several namespaces on one L2 segment, a bridge in this namespace with an
address of its own (a /24), each namespace joined to it by a veth pair: they see each other's
ARP, as machines on one switch do, and reach this namespace's servers at the bridge's address.

Needs root (ip netns, ip link). Nothing is routed off the machine. Everything is removed
afterwards, pass or fail, after first removing whatever an earlier run left.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class VethNamespace:
    name: str
    root_if: str  # interface names: at most 15 characters
    ns_if: str
    root_ip: str  # this side's address
    ns_ip: str  # the namespace's

    def exec_argv(self, *argv: str) -> list[str]:
        """A command line that runs `argv` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _remove(ns: VethNamespace) -> None:
    _ip("link", "del", ns.root_if, check=False)  # takes its peer with it
    _ip("netns", "del", ns.name, check=False)  # and the peer, had it been moved there


@contextmanager
def veth_namespace(ns: VethNamespace) -> Iterator[VethNamespace]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it creates a network namespace", pytrace=False)
    _remove(ns)
    try:
        _ip("netns", "add", ns.name)
        _ip("link", "add", ns.root_if, "type", "veth", "peer", "name", ns.ns_if)
        _ip("link", "set", ns.ns_if, "netns", ns.name)
        _ip("addr", "add", f"{ns.root_ip}/30", "dev", ns.root_if)
        _ip("link", "set", ns.root_if, "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if)
        _ip("-n", ns.name, "link", "set", ns.ns_if, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        _remove(ns)


@dataclass(frozen=True)
class Member:
    """A namespace on a bridged segment: `ns_if` (`ip`/24) inside, `root_if` on the bridge."""

    name: str
    root_if: str
    ns_if: str
    ip: str

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


def _remove_segment(bridge: str, members: tuple[Member, ...]) -> None:
    for m in members:
        _ip("link", "del", m.root_if, check=False)
        _ip("netns", "del", m.name, check=False)
    _ip("link", "del", bridge, check=False)


@contextmanager
def bridged_namespaces(bridge: str, bridge_ip: str,
                       members: tuple[Member, ...]) -> Iterator[tuple[Member, ...]]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it creates network namespaces", pytrace=False)
    _remove_segment(bridge, members)
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{bridge_ip}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for m in members:
            _ip("netns", "add", m.name)
            _ip("link", "add", m.root_if, "type", "veth", "peer", "name", m.ns_if)
            _ip("link", "set", m.ns_if, "netns", m.name)
            _ip("link", "set", m.root_if, "master", bridge)
            _ip("link", "set", m.root_if, "up")
            _ip("-n", m.name, "addr", "add", f"{m.ip}/24", "dev", m.ns_if)
            _ip("-n", m.name, "link", "set", m.ns_if, "up")
            _ip("-n", m.name, "link", "set", "lo", "up")
        yield members
    finally:
        _remove_segment(bridge, members)
