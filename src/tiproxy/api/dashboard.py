"""The status page: static HTML, CSS and JavaScript shipped in the package, served as they are.

`GET /` redirects to `/dashboard`, the page; its script polls the JSON routes (backends,
sessions, migrations, health) and drains or undrains backends through the write routes, so it
needs nothing the API does not serve to any other client, and nothing from outside the proxy:
the page must work on a host with no internet. The files (api/static/) are read once, when the
app is built. Every response of the page carries a Content-Security-Policy that lets it load
only its own script, style and icon and talk only to its own origin, and forbids framing; the
script inserts data as text only (user names and labels come from clients).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

PAGE = "/dashboard"
# The page's own files, and nothing else: no inline script or style, no other origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # The page's writes must carry its Origin (origin.py): "no-referrer" would make a browser
    # send "Origin: null" even to its own origin.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",  # a new version of the proxy serves its new page at once
}
# path -> (file in api/static/, content type)
FILES = {
    PAGE: ("index.html", "text/html"),
    PAGE + "/app.js": ("app.js", "text/javascript"),
    PAGE + "/style.css": ("style.css", "text/css"),
    PAGE + "/icon.svg": ("icon.svg", "image/svg+xml"),
}


def add_page_routes(app: web.Application) -> None:
    """The page's routes: `/`, `/dashboard` and its files."""
    static = resources.files("tiproxy.api") / "static"
    for path, (name, content_type) in FILES.items():
        body = (static / name).read_bytes()
        app.router.add_get(path, _file_handler(body, content_type))
    app.router.add_get("/", _to_page)
    app.router.add_get(PAGE + "/", _to_page)


def _file_handler(body: bytes,
                  content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type,
                            charset="utf-8" if content_type.startswith("text/") else None,
                            headers=HEADERS)

    return serve


async def _to_page(request: web.Request) -> web.Response:
    raise web.HTTPFound(PAGE)
