"""A network namespace joined to this one by a veth pair: a real non-loopback peer for tests.

Needs root (ip netns, ip link). The addresses live on the pair only (a /30 of the test's own):
nothing is routed off the machine. The namespace and the pair are removed afterwards, pass or
fail, after first removing any left over by an earlier run.
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
