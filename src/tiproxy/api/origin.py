"""Which browser requests may write: the API's defence against cross-site request forgery.

A browser adds what it holds to any request a page makes, whoever wrote the page: its client
certificate, and, by where it runs, the loopback address that the write routes trust
(auth.py). Without more, a page from anywhere, open in an operator's browser on the proxy's
host, could drain every backend with a form that posts to http://127.0.0.1:3080. So:
- every browser tells a write's origin (`Origin` on every request but GET and HEAD; current
  browsers also `Sec-Fetch-Site`): a write whose `Origin` is not the API's own origin (scheme
  and Host, port included), or is "null", or whose `Sec-Fetch-Site` is not "same-origin" or
  "none" (typed by the user), is refused, however it is authenticated. Requests that name no
  origin (curl, tiproxyctl, scripts) are not from a page and go on to auth.py's checks;
- DNS rebinding makes a hostile name resolve to 127.0.0.1, so that the browser takes the API for
  the hostile page's own origin: a request from a page (it names an origin) gets loopback trust
  only when the Host it reached is an IP address or localhost, names no attacker can re-point.
A bearer token is no ambient credential (the page sends it from its own storage; another
origin's page cannot read it, nor send the header without a CORS preflight, which the API does
not answer), so it needs no more than the origin check.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from aiohttp import hdrs, web

SEC_FETCH_SITE = "Sec-Fetch-Site"
_SAME_SITE_VALUES = frozenset({"same-origin", "none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def own_origin(request: web.Request) -> tuple[str, str, int] | None:
    """(scheme, host, port) of the origin the request was sent to: its Host, over TLS or not."""
    transport = request.transport
    tls = transport is not None and transport.get_extra_info("ssl_object") is not None
    return _parse_origin(("https" if tls else "http") + "://" + request.host)


def _parse_origin(origin: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/") or parts.query:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def cross_site_refusal(request: web.Request) -> str | None:
    """Why a write request made by another site's page is refused; None when it is not one."""
    site = request.headers.get(SEC_FETCH_SITE)
    if site is not None and site.strip().lower() not in _SAME_SITE_VALUES:
        return (f"cross-site write refused (Sec-Fetch-Site: {site[:40]}): write routes take "
                "requests from the API's own page or from clients that are not browsers")
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return None
    theirs = _parse_origin(origin)
    if theirs is None or theirs != own_origin(request):
        return (f"cross-origin write refused: Origin {origin[:200]!r} is not this API's own "
                f"origin ({_shown(own_origin(request))})")
    return None


def from_page(request: web.Request) -> bool:
    """Whether a browser's page made the request (it says where from)."""
    return hdrs.ORIGIN in request.headers or SEC_FETCH_SITE in request.headers


def host_may_be_rebound(request: web.Request) -> bool:
    """Whether the Host a page reached is a name that DNS rebinding could point at loopback."""
    origin = own_origin(request)
    if origin is None:
        return True
    host = origin[1].strip("[]")
    if host == "localhost" or host.endswith(".localhost"):  # browsers keep these on loopback
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def rebinding_refusal(host: str) -> str:
    return (f"a page reached as {host[:200]!r} gets no loopback trust (that name could be "
            "re-pointed by DNS rebinding): open it at an IP address or localhost, or use a "
            "bearer token")


def _shown(origin: tuple[str, str, int] | None) -> str:
    if origin is None:
        return "unknown: the request has no valid Host"
    scheme, host, port = origin
    return f"{scheme}://{host}:{port}"
