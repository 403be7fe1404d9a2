"""`tiproxyctl`: the admin CLI, a thin client of the proxy's HTTP API, with TiProxy's commands.

    tiproxyctl [OPTIONS] health
    tiproxyctl [OPTIONS] config get [--json]
    tiproxyctl [OPTIONS] config set [--input FILE]     (TOML; standard input without --input)
    tiproxyctl [OPTIONS] namespace list|get NAME|put [--ns FILE]|del NAME|commit [NAME...]
    tiproxyctl [OPTIONS] namespace import DIR
    tiproxyctl [OPTIONS] backends
    tiproxyctl [OPTIONS] backend drain|undrain ADDR
    tiproxyctl [OPTIONS] sessions
    tiproxyctl [OPTIONS] redirect
    tiproxyctl [OPTIONS] traffic capture|replay|cancel|show ...   (cli/traffic.py)

The options (apiclient.py) may come before or after the command, as TiProxy's cobra flags may:
`tiproxyctl --host 127.0.0.1 --port 3080 config get` and `tiproxyctl config get --port 3080`.
TiProxy's `--log_encoder`, `--log_level` and `--indent` are accepted and checked; they change
nothing, since this command logs nothing but its one error line. `traffic` (TiProxy's capture
and replay) is not built and says so. Every failure is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from collections.abc import Callable, Sequence

from tiproxy import __version__
from tiproxy.cli import ctl_namespace, traffic
from tiproxy.cli.apiclient import (
    DEFAULT_API_ADDR,
    TOKEN_ENV,
    CtlError,
    Target,
    api_target,
    get,
    request,
)
from tiproxy.config.files import CONFIG_FILE_LIMIT, FileRefusedError, read_small_file
from tiproxy.config.model import LOG_ENCODERS, LOG_LEVELS

__all__ = ["CtlError", "Target", "api_target", "format_table", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(_cobra_booleans(sys.argv[1:] if argv is None else argv))
    except CtlError as e:
        parser.error(str(e))
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        args.target = api_target(args, os.environ)
        return command(args)
    except CtlError as e:
        print(f"tiproxyctl: {e}", file=sys.stderr)
        return 1


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes. The top-level parser holds their defaults; a command's
    parser takes them too (SUPPRESS: only what is given there overrides)."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--addr", default=default(DEFAULT_API_ADDR),
                        help="the proxy's API address, [https://]host:port "
                             f"(default {DEFAULT_API_ADDR})")
    parser.add_argument("--host", default=default(None),
                        help="the API's host (overrides the host of --addr)")
    parser.add_argument("--port", type=int, default=default(None),
                        help="the API's port (overrides the port of --addr)")
    parser.add_argument("-k", "--insecure", action="store_true", default=default(False),
                        help="HTTPS without checking the server's certificate")
    parser.add_argument("--ca", default=default(None),
                        help="HTTPS: the CA file that signed the server's certificate")
    parser.add_argument("--cert", default=default(None),
                        help="HTTPS: a client certificate (PEM) to present")
    parser.add_argument("--key", default=default(None),
                        help="HTTPS: the client certificate's key (PEM)")
    parser.add_argument("--token-file", metavar="PATH", default=default(None),
                        help=f"a file holding the API's bearer token (else ${TOKEN_ENV})")
    parser.add_argument("--log_encoder", choices=LOG_ENCODERS, default=default("tidb"),
                        help="TiProxy's; accepted, changes nothing")
    parser.add_argument("--log_level", type=_log_level, default=default("warn"),
                        help="TiProxy's; accepted, changes nothing")
    parser.add_argument("--indent", action="store_true", default=default(True),
                        help="TiProxy's; accepted, changes nothing")


def _log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value


_BOOLEAN_FLAGS = ("--insecure", "--indent", "-k")
_TRUE, _FALSE = ("true", "t", "1"), ("false", "f", "0")


def _cobra_booleans(argv: Sequence[str]) -> list[str]:
    """Cobra's boolean flags also take `--flag=true` and `--flag=false`: the first is the
    flag, the second its absence (both flags are off by default or change nothing)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            out += argv[i:]
            break
        flag, sep, value = arg.partition("=")
        if sep and flag in _BOOLEAN_FLAGS:
            if value.lower() in _TRUE:
                out.append(flag)
            elif value.lower() not in _FALSE:
                raise CtlError(f"{flag}: {value!r} is not true or false")
            continue
        out.append(arg)
    return out


class _Commands:
    """Adds command parsers that take the global options too."""

    def __init__(self, parser: argparse.ArgumentParser, title: str) -> None:
        self._sub = parser.add_subparsers(title=title, required=True, metavar="COMMAND")

    def add(self, name: str, help_text: str,
            command: Callable[[argparse.Namespace], int] | None = None
            ) -> argparse.ArgumentParser:
        parser = self._sub.add_parser(name, help=help_text, description=help_text)
        _global_options(parser, defaults=False)
        if command is not None:
            parser.set_defaults(command=command)
        return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiproxyctl", description="Administer a tiproxy.")
    _global_options(parser, defaults=True)
    parser.add_argument("-v", "--version", action="version", version=f"tiproxyctl {__version__}")
    commands = _Commands(parser, "commands")
    commands.add("health", "is the proxy up (exit 1 while it shuts down)", _health)
    config = _Commands(commands.add("config", "the proxy's config"), "config commands")
    get_config = config.add("get", "print the effective config (TOML)", _config_get)
    get_config.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    put = config.add("set", "change the running config (a TOML document with the keys to "
                     "change; standard input without --input)", _config_set)
    put.add_argument("--input", metavar="FILE", help="the TOML file to send")
    put.add_argument("ignored", nargs="*", help=argparse.SUPPRESS)  # TiProxy's `set ""`
    ctl_namespace.add_commands(_Commands(
        commands.add("namespace", "TiProxy's namespaces: stage changes, then commit them"),
        "namespace commands"))
    commands.add("backends", "list the backends and their connections", _backends)
    backend = commands.add("backend", "drain or undrain one backend", _backend)
    backend.add_argument("action", choices=("drain", "undrain"))
    backend.add_argument("backend_addr", metavar="ADDR", help="the backend, host:port")
    commands.add("sessions", "list the sessions, and why a move waits", _sessions)
    commands.add("redirect", "move every session to another backend", _redirect)
    commands.add("upgrade", "start a new proxy process that takes the listeners and the "
                 "sessions over (ours)", _upgrade)
    traffic.add_commands(_Commands(
        commands.add("traffic", "capture traffic, replay it, show the jobs"),
        "traffic commands"))
    return parser


def _health(args: argparse.Namespace) -> int:
    """TiProxy's output: the API's answer, `{"config_checksum": ...}` and more; while the
    proxy is unhealthy also the reason on stderr, and exit code 1."""
    reply = get(args.target, "/api/debug/health", ok=(200, 502))
    body = reply.json()
    print(reply.body.decode("utf-8", errors="replace").strip())
    if reply.status == 502:
        reason = body.get("unhealthy_reason") if isinstance(body, dict) else None
        print(f"tiproxyctl: unhealthy: {reason or 'shutting down'}", file=sys.stderr)
        return 1
    return 0


def _config_get(args: argparse.Namespace) -> int:
    path = "/api/admin/config?format=json" if args.json else "/api/admin/config"
    reply = get(args.target, path)
    text = reply.body.decode("utf-8", errors="replace")
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _config_set(args: argparse.Namespace) -> int:
    if any(args.ignored):
        raise CtlError(f"config set takes no arguments (got {args.ignored[0]!r}): the TOML "
                       "comes from --input FILE or standard input")
    if args.input:
        try:
            data = read_small_file(args.input, CONFIG_FILE_LIMIT)
        except FileRefusedError as e:
            raise CtlError(f"--input {args.input}: {e}") from None
    else:
        data = sys.stdin.buffer.read(CONFIG_FILE_LIMIT + 1)
        if len(data) > CONFIG_FILE_LIMIT:
            raise CtlError(f"the config on standard input is over {CONFIG_FILE_LIMIT} bytes")
    request(args.target, "/api/admin/config", method="PUT", data=data)
    print("config changed")
    return 0


def _backends(args: argparse.Namespace) -> int:
    body = get(args.target, "/api/admin/backends").json()
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
    request(args.target, path, method="POST")
    print(f"{args.backend_addr}: {'draining' if args.action == 'drain' else 'accepting sessions'}")
    return 0


def _sessions(args: argparse.Namespace) -> int:
    body = get(args.target, "/api/admin/sessions").json()
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
    body = request(args.target, "/api/debug/redirect", method="POST").json()
    count = body.get("sessions") if isinstance(body, dict) else "?"
    print(f"{count} sessions asked to move")
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    body = request(args.target, "/api/admin/upgrade", method="POST", ok=(202,)).json()
    pid = body.get("pid") if isinstance(body, dict) else "?"
    print(f"new proxy process {pid} started; sessions follow at their next safe point")
    return 0


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


if __name__ == "__main__":
    sys.exit(main())
