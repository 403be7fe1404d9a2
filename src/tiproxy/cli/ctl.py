"""`tiproxyctl`: the admin CLI, a thin client of the proxy's HTTP API.

    tiproxyctl [--addr HOST:PORT] health
    tiproxyctl [--addr HOST:PORT] config get [--json]
    tiproxyctl [--addr HOST:PORT] backends
    tiproxyctl [--addr HOST:PORT] backend drain|undrain ADDR
    tiproxyctl [--addr HOST:PORT] sessions
    tiproxyctl [--addr HOST:PORT] redirect

It uses only the standard library (urllib) so it starts fast and needs no event loop. Every
failure is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_API_ADDR = "127.0.0.1:3080"
_TIMEOUT_SECONDS = 5.0
# The API answers with a config or a backend list; a bound on what we read keeps a wrong
# address (some other server streaming data) from filling memory.
_MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class CtlError(Exception):
    """A failure to report as one line; the message is what the user sees."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> object:
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise CtlError(f"the API answered with something that is not JSON: {e}") from e


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except CtlError as e:
        print(f"tiproxyctl: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiproxyctl", description="Administer a tiproxy.")
    parser.add_argument(
        "--addr",
        default=DEFAULT_API_ADDR,
        help=f"the proxy's API address, host:port (default {DEFAULT_API_ADDR})",
    )
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    health = sub.add_parser("health", help="is the proxy up (exit 1 while it shuts down)")
    health.set_defaults(command=_health)
    config = sub.add_parser("config", help="the proxy's config")
    config_sub = config.add_subparsers(title="config commands", required=True, metavar="ACTION")
    get = config_sub.add_parser("get", help="print the effective config (TOML)")
    get.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    get.set_defaults(command=_config_get)
    backends = sub.add_parser("backends", help="list the backends and their connections")
    backends.set_defaults(command=_backends)
    backend = sub.add_parser("backend", help="drain or undrain one backend")
    backend.add_argument("action", choices=("drain", "undrain"))
    backend.add_argument("backend_addr", metavar="ADDR", help="the backend, host:port")
    backend.set_defaults(command=_backend)
    sessions = sub.add_parser("sessions", help="list the sessions, and why a move waits")
    sessions.set_defaults(command=_sessions)
    redirect = sub.add_parser("redirect", help="move every session to another backend")
    redirect.set_defaults(command=_redirect)
    return parser


def _health(args: argparse.Namespace) -> int:
    reply = _get(args.addr, "/api/debug/health", ok=(200, 502))
    body = reply.json()
    checksum = body.get("config_checksum") if isinstance(body, dict) else None
    if reply.status == 502:
        print(f"shutting down (config checksum {checksum})")
        return 1
    print(f"healthy (config checksum {checksum})")
    return 0


def _config_get(args: argparse.Namespace) -> int:
    path = "/api/admin/config?format=json" if args.json else "/api/admin/config"
    reply = _get(args.addr, path)
    text = reply.body.decode("utf-8", errors="replace")
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _backends(args: argparse.Namespace) -> int:
    body = _get(args.addr, "/api/admin/backends").json()
    if not isinstance(body, list):
        raise CtlError("the API answered /api/admin/backends with something other than a list")
    rows = [("ADDR", "STATUS", "CONNECTIONS")]
    for item in body:
        if not isinstance(item, dict):
            raise CtlError("the API answered /api/admin/backends with a malformed entry")
        rows.append((str(item.get("addr")), str(item.get("status")), str(item.get("connections"))))
    print(format_table(rows))
    return 0


def _backend(args: argparse.Namespace) -> int:
    path = f"/api/admin/backends/{urllib.parse.quote(args.backend_addr)}/{args.action}"
    _request(args.addr, path, method="POST")
    print(f"{args.backend_addr}: {'draining' if args.action == 'drain' else 'accepting sessions'}")
    return 0


def _sessions(args: argparse.Namespace) -> int:
    body = _get(args.addr, "/api/admin/sessions").json()
    if not isinstance(body, list):
        raise CtlError("the API answered /api/admin/sessions with something other than a list")
    rows = [("ID", "USER", "CLIENT", "BACKEND", "MOVE", "WAITING")]
    for item in body:
        if not isinstance(item, dict):
            raise CtlError("the API answered /api/admin/sessions with a malformed entry")
        move = str(item.get("move_reason")) if item.get("moving") else ""
        rows.append((str(item.get("id")), str(item.get("user")), str(item.get("client")),
                     str(item.get("backend")), move, str(item.get("waiting") or "")))
    print(format_table(rows))
    return 0


def _redirect(args: argparse.Namespace) -> int:
    body = _request(args.addr, "/api/debug/redirect", method="POST").json()
    count = body.get("sessions") if isinstance(body, dict) else "?"
    print(f"{count} sessions asked to move")
    return 0


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _get(addr: str, path: str, ok: tuple[int, ...] = (200,)) -> Reply:
    return _request(addr, path, ok=ok)


def _request(addr: str, path: str, method: str = "GET", ok: tuple[int, ...] = (200,)) -> Reply:
    request = urllib.request.Request(f"http://{addr}{path}", method=method,
                                     data=b"" if method != "GET" else None)
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_SECONDS) as response:  # noqa: S310 - http only
            reply = Reply(response.status, response.read(_MAX_RESPONSE_BYTES))
    except urllib.error.HTTPError as e:
        reply = Reply(e.code, e.read(_MAX_RESPONSE_BYTES))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CtlError(f"cannot reach the proxy API at {addr}: {reason}") from e
    if reply.status not in ok:
        detail = reply.body.decode("utf-8", errors="replace").strip().splitlines()
        raise CtlError(f"{path} failed with HTTP {reply.status}: {detail[0] if detail else ''}")
    return reply


if __name__ == "__main__":
    sys.exit(main())
