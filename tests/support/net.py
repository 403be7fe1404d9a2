"""Wait for, and probe, TCP ports the tests start servers on."""

from __future__ import annotations

import socket
import time

_POLL_INTERVAL = 0.02


def port_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connect to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_refuses(host: str, port: int) -> bool:
    """Whether a TCP connect to host:port is refused (nothing listens there)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until host:port accepts TCP connections; raise TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while not port_accepts(host, port, timeout=min(1.0, timeout)):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
        time.sleep(_POLL_INTERVAL)


def split_addr(addr: str) -> tuple[str, int]:
    """Split "host:port" (the form MariaDBServer.addr and the proxy config use)."""
    host, _, port = addr.rpartition(":")
    return host, int(port)
