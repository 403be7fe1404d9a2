"""`tiproxyctl`: the admin CLI, a thin client of the proxy's HTTP API.

    tiproxyctl [--addr HOST:PORT] health
    tiproxyctl [--addr HOST:PORT] config get [--json]
    tiproxyctl [--addr HOST:PORT] backends

It uses only the standard library (urllib) so it starts fast and needs no event loop. Every
failure is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
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


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _get(addr: str, path: str, ok: tuple[int, ...] = (200,)) -> Reply:
    url = f"http://{addr}{path}"
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_SECONDS) as response:
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
