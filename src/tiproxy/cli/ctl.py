"""`tiproxyctl`: the admin CLI, a thin client of the proxy's HTTP API.

    tiproxyctl [OPTIONS] health
    tiproxyctl [OPTIONS] config get [--json]
    tiproxyctl [OPTIONS] config set [--input FILE]     (TOML; standard input without --input)
    tiproxyctl [OPTIONS] backends
    tiproxyctl [OPTIONS] backend drain|undrain ADDR
    tiproxyctl [OPTIONS] sessions
    tiproxyctl [OPTIONS] redirect
    tiproxyctl [OPTIONS] traffic capture|replay|cancel|show ...   (cli/traffic.py)

Options: where the API is (`--addr [https://]HOST:PORT`, ours, or TiProxy's `--host` and
`--port`, which override it), how to speak TLS to it (`--ca`, `--cert`, `--key`, `-k` /
`--insecure`: any of them, or an https:// address, means HTTPS), and the bearer token that the
write routes need from a caller that is not on loopback (`--token-file PATH`, else the
environment variable TIPROXYCTL_TOKEN).

It speaks HTTP with the standard library (urllib) so it starts fast and needs no event loop.
Every failure is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tiproxy.cli.traffic import add_traffic_commands
from tiproxy.config.files import (
    CONFIG_FILE_LIMIT,
    TOKEN_FILE_LIMIT,
    FileRefusedError,
    read_small_file,
)
from tiproxy.config.values import split_host_port

DEFAULT_API_ADDR = "127.0.0.1:3080"
TOKEN_ENV = "TIPROXYCTL_TOKEN"  # noqa: S105 - the variable's name, not a token
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


@dataclass(frozen=True)
class Target:
    """Where and how to reach the API: its base URL, TLS settings and bearer token."""

    base_url: str  # "http://127.0.0.1:3080", no trailing slash
    ssl_context: ssl.SSLContext | None = None
    token: bytes | None = None

    def headers(self) -> dict[str, bytes]:
        return {"Authorization": b"Bearer " + self.token} if self.token else {}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        args.target = api_target(args, os.environ)
        return command(args)
    except CtlError as e:
        print(f"tiproxyctl: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiproxyctl", description="Administer a tiproxy.")
    parser.add_argument(
        "--addr",
        default=DEFAULT_API_ADDR,
        help=f"the proxy's API address, [https://]host:port (default {DEFAULT_API_ADDR})",
    )
    parser.add_argument("--host", help="the API's host (overrides the host of --addr)")
    parser.add_argument("--port", type=int, help="the API's port (overrides the port of --addr)")
    parser.add_argument("-k", "--insecure", action="store_true",
                        help="HTTPS without checking the server's certificate")
    parser.add_argument("--ca", help="HTTPS: the CA file that signed the server's certificate")
    parser.add_argument("--cert", help="HTTPS: a client certificate (PEM) to present")
    parser.add_argument("--key", help="HTTPS: the client certificate's key (PEM)")
    parser.add_argument("--token-file", metavar="PATH",
                        help=f"a file holding the API's bearer token (else ${TOKEN_ENV})")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    health = sub.add_parser("health", help="is the proxy up (exit 1 while it shuts down)")
    health.set_defaults(command=_health)
    config = sub.add_parser("config", help="the proxy's config")
    config_sub = config.add_subparsers(title="config commands", required=True, metavar="ACTION")
    get = config_sub.add_parser("get", help="print the effective config (TOML)")
    get.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    get.set_defaults(command=_config_get)
    put = config_sub.add_parser("set", help="change the running config (a TOML document with "
                                "the keys to change; standard input without --input)")
    put.add_argument("--input", metavar="FILE", help="the TOML file to send")
    put.set_defaults(command=_config_set)
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
    add_traffic_commands(sub, _request)
    return parser


def _health(args: argparse.Namespace) -> int:
    reply = _get(args.target, "/api/debug/health", ok=(200, 502))
    body = reply.json()
    checksum = body.get("config_checksum") if isinstance(body, dict) else None
    if reply.status == 502:
        reason = body.get("unhealthy_reason") if isinstance(body, dict) else None
        print(f"unhealthy: {reason or 'shutting down'} (config checksum {checksum})")
        return 1
    print(f"healthy (config checksum {checksum})")
    return 0


def _config_get(args: argparse.Namespace) -> int:
    path = "/api/admin/config?format=json" if args.json else "/api/admin/config"
    reply = _get(args.target, path)
    text = reply.body.decode("utf-8", errors="replace")
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _config_set(args: argparse.Namespace) -> int:
    if args.input:
        try:
            data = read_small_file(args.input, CONFIG_FILE_LIMIT)
        except FileRefusedError as e:
            raise CtlError(f"--input {args.input}: {e}") from None
    else:
        data = sys.stdin.buffer.read(CONFIG_FILE_LIMIT + 1)
        if len(data) > CONFIG_FILE_LIMIT:
            raise CtlError(f"the config on standard input is over {CONFIG_FILE_LIMIT} bytes")
    _request(args.target, "/api/admin/config", method="PUT", data=data)
    print("config changed")
    return 0


def _backends(args: argparse.Namespace) -> int:
    body = _get(args.target, "/api/admin/backends").json()
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
    _request(args.target, path, method="POST")
    print(f"{args.backend_addr}: {'draining' if args.action == 'drain' else 'accepting sessions'}")
    return 0


def _sessions(args: argparse.Namespace) -> int:
    body = _get(args.target, "/api/admin/sessions").json()
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
    body = _request(args.target, "/api/debug/redirect", method="POST").json()
    count = body.get("sessions") if isinstance(body, dict) else "?"
    print(f"{count} sessions asked to move")
    return 0


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def api_target(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    """The Target that the global options (and the environment) describe."""
    scheme, host, port = _split_addr(args.addr)
    host = args.host or host
    port = args.port if args.port is not None else port
    if not 0 < port < 65536:
        raise CtlError(f"port {port} is out of range 1..65535")
    tls_options = args.insecure or args.ca or args.cert or args.key
    if scheme == "http" and tls_options:
        raise CtlError("-k, --ca, --cert and --key are for HTTPS, but --addr says http://")
    https = scheme == "https" or bool(tls_options)
    url_host = f"[{host}]" if ":" in host else host
    return Target(f"{'https' if https else 'http'}://{url_host}:{port}",
                  _ssl_context(args) if https else None, _token(args, environ))


def _split_addr(addr: str) -> tuple[str, str, int]:
    """("http" | "https" | "", host, port) of "[scheme://]host:port"."""
    scheme, sep, rest = addr.partition("://")
    if not sep:
        scheme, rest = "", addr
    elif scheme not in ("http", "https"):
        raise CtlError(f"--addr {addr!r}: the scheme must be http:// or https://")
    try:
        host, port = split_host_port(rest.rstrip("/"))
    except ValueError as e:
        raise CtlError(f"--addr: {e}") from None
    return scheme, host, port


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    if args.key and not args.cert:
        raise CtlError("--key needs --cert")
    try:
        context = ssl.create_default_context(cafile=args.ca)
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as e:
        raise CtlError(f"cannot load the TLS files: {e}") from None
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> bytes | None:
    """The bearer token from --token-file, else from $TIPROXYCTL_TOKEN; never printed."""
    if args.token_file:
        try:
            token = read_small_file(args.token_file, TOKEN_FILE_LIMIT).strip()
        except FileRefusedError as e:
            raise CtlError(f"--token-file {args.token_file}: {e}") from None
        where = f"--token-file {args.token_file}"
    else:
        token = environ.get(TOKEN_ENV, "").strip().encode("utf-8", "surrogateescape")
        where = f"${TOKEN_ENV}"
        if not token:
            return None
    if not token:
        raise CtlError(f"{where} is empty")
    if any(b <= 0x20 or b == 0x7F for b in token):
        raise CtlError(f"{where}: the token contains white space or control characters")
    return token


def _get(target: Target, path: str, ok: tuple[int, ...] = (200,)) -> Reply:
    return _request(target, path, ok=ok)


def _request(target: Target, path: str, method: str = "GET",
             ok: tuple[int, ...] = (200,), data: bytes | None = None) -> Reply:
    # http.client sends bytes header values as they are (a str would have to be latin-1).
    headers: dict[str, str] = target.headers()  # type: ignore[assignment]
    url = target.base_url + path  # http:// or https://, built by api_target
    if data is None and method != "GET":
        data = b""
    request = urllib.request.Request(url, data, headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(  # noqa: S310 - see url
                request, timeout=_TIMEOUT_SECONDS, context=target.ssl_context) as response:
            reply = Reply(response.status, response.read(_MAX_RESPONSE_BYTES))
    except urllib.error.HTTPError as e:
        reply = Reply(e.code, e.read(_MAX_RESPONSE_BYTES))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CtlError(f"cannot reach the proxy API at {target.base_url}: {reason}") from e
    if reply.status not in ok:
        detail = reply.body.decode("utf-8", errors="replace").strip().splitlines()
        raise CtlError(f"{path} failed with HTTP {reply.status}: {detail[0] if detail else ''}")
    return reply


if __name__ == "__main__":
    sys.exit(main())
