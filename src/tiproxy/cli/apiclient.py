"""tiproxyctl's side of the proxy's HTTP API: where it is, how to reach it, and one request.

The global options say where the API is (`--addr [https://]HOST:PORT`, ours, or TiProxy's
`--host` and `--port`, which override it), how to speak TLS to it (`--ca`, `--cert`, `--key`,
`-k` / `--insecure`: any of them, or an https:// address, means HTTPS), and the bearer token
that the write routes need from a caller that is not on loopback (`--token-file PATH`, else the
environment variable TIPROXYCTL_TOKEN). It speaks HTTP with the standard library (urllib) so
that the command starts fast and needs no event loop.
"""

from __future__ import annotations

import argparse
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from tiproxy.config.files import TOKEN_FILE_LIMIT, FileRefusedError, read_small_file
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

    def reason(self) -> str:
        """An error answer's reason: its `error` field, else its first line."""
        text = self.body.decode("utf-8", errors="replace").strip()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        error = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(error, str):
            return error
        return text.splitlines()[0] if text else ""

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


def get(target: Target, path: str, ok: tuple[int, ...] = (200,)) -> Reply:
    return request(target, path, ok=ok)


def request(target: Target, path: str, method: str = "GET", *,
            ok: tuple[int, ...] = (200,), data: bytes | None = None,
            content_type: str = "") -> Reply:
    """One request; CtlError unless the status is in `ok` (the message is the API's reason)."""
    # http.client sends bytes header values as they are (a str would have to be latin-1).
    headers: dict[str, str] = target.headers()  # type: ignore[assignment]
    if content_type:
        headers["Content-Type"] = content_type
    url = target.base_url + path  # http:// or https://, built by api_target
    if data is None and method != "GET":
        data = b""
    req = urllib.request.Request(url, data, headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(  # noqa: S310 - see url
                req, timeout=_TIMEOUT_SECONDS, context=target.ssl_context) as response:
            reply = Reply(response.status, response.read(_MAX_RESPONSE_BYTES))
    except urllib.error.HTTPError as e:
        reply = Reply(e.code, e.read(_MAX_RESPONSE_BYTES))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CtlError(f"cannot reach the proxy API at {target.base_url}: {reason}") from e
    if reply.status not in ok:
        raise CtlError(f"{path} failed with HTTP {reply.status}: {reply.reason()}")
    return reply


