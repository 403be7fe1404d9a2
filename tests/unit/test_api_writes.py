"""Who may call the API's write routes, and what a config change must pass first: a real
aiohttp server on a real port, in front of a small fake of the data plane that records what it
was asked to change."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from support.views import QuietProxy
from tiproxy.api import build_app, listener, start_api
from tiproxy.api.auth import NEED_CREDENTIAL, NO_TOKEN_FILE, WRONG_TOKEN, is_loopback
from tiproxy.api.server import MAX_BODY_BYTES
from tiproxy.config import Config, parse_config
from tiproxy.config.files import USERS_FILE_LIMIT
from tiproxy.protocol.proxyproto import SIGNATURE, build
from tiproxy.views.interface import (
    ProxyControl,
)

CONFIG = parse_config('[proxy]\naddr = "127.0.0.1:6000"\nbackend-addrs = ["127.0.0.1:3306"]\n')
TOKEN = "s3cret-token-for-the-tests"


@dataclass
class ControlledView(QuietProxy):
    cfg: Config = CONFIG
    drained: list[tuple[str, bool]] = field(default_factory=list)
    redirects: int = 0

    def drain(self, addr: str, drain: bool) -> None:
        self.drained.append((addr, drain))

    async def redirect_all(self) -> int:
        self.redirects += 1
        return 2


def test_the_fake_is_a_control() -> None:
    assert isinstance(ControlledView(), ProxyControl)


Check = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


def _serve(view: ControlledView, check: Check, host: str = "127.0.0.1") -> None:
    """Start the API on a free port of `host`, run `check(session, base_url)`, stop it."""

    async def main() -> None:
        server = await start_api(view, f"{host}:0")
        try:
            async with aiohttp.ClientSession() as session:
                await asyncio.wait_for(check(session, f"http://{host}:{server.port}"), 60)
        finally:
            await server.close()

    asyncio.run(main())


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")  # stripped when read
    return path


def _with_token_file(path: Path) -> ControlledView:
    return ControlledView(cfg=replace(CONFIG, api=replace(CONFIG.api,
                                                          auth_token_file=str(path))))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _error(r: aiohttp.ClientResponse) -> str:
    body = await r.json()
    assert set(body) == {"error"}
    return str(body["error"])


# -- who may write ------------------------------------------------------------------------------


def test_write_routes_from_loopback_work() -> None:
    view = ControlledView()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.put(f"{base}/api/admin/config",
                               data="[proxy]\nmax-connections = 5\n") as r:
            assert r.status == 200, await r.text()
        async with session.post(f"{base}/api/debug/redirect") as r:
            assert r.status == 200 and (await r.json()) == {"sessions": 2}
        async with session.post(f"{base}/api/admin/backends/127.0.0.1:3306/drain") as r:
            assert r.status == 200
        async with session.post(f"{base}/api/admin/backends/127.0.0.1:3306/undrain/") as r:
            assert r.status == 200

    _serve(view, check)
    assert [c.proxy.max_connections for c in view.applied] == [5]
    assert view.redirects == 1
    assert view.drained == [("127.0.0.1:3306", True), ("127.0.0.1:3306", False)]


def test_a_bearer_token_works_and_a_wrong_one_is_refused(
    token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    view = _with_token_file(token_file)
    caplog.set_level(logging.DEBUG)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.post(f"{base}/api/debug/redirect", headers=_bearer(TOKEN)) as r:
            assert r.status == 200
        for wrong in (TOKEN + "x", TOKEN[:-1], "x"):
            async with session.post(f"{base}/api/debug/redirect", headers=_bearer(wrong)) as r:
                assert r.status == 403
                assert await _error(r) == WRONG_TOKEN
        async with session.put(f"{base}/api/admin/config", headers=_bearer("nope"),
                               data="[proxy]\nmax-connections = 5\n") as r:
            assert r.status == 403
            assert TOKEN not in await r.text()
        async with session.post(f"{base}/api/debug/redirect",
                                headers={"Authorization": f"Basic {TOKEN}"}) as r:
            assert r.status == 403
            assert "Bearer <token>" in await _error(r)

    _serve(view, check)
    assert view.redirects == 1  # only the request with the right token
    assert view.applied == []
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


def test_a_bearer_token_without_a_token_file_is_refused() -> None:
    view = ControlledView()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.post(f"{base}/api/debug/redirect", headers=_bearer(TOKEN)) as r:
            assert r.status == 403
            assert await _error(r) == NO_TOKEN_FILE

    _serve(view, check)
    assert view.redirects == 0


def test_the_token_file_is_read_again_when_it_changes(token_file: Path) -> None:
    view = _with_token_file(token_file)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.post(f"{base}/api/debug/redirect", headers=_bearer(TOKEN)) as r:
            assert r.status == 200
        await asyncio.to_thread(token_file.write_text, "the-next-token-which-is-longer\n")
        async with session.post(f"{base}/api/debug/redirect", headers=_bearer(TOKEN)) as r:
            assert r.status == 403
        async with session.post(f"{base}/api/debug/redirect",
                                headers=_bearer("the-next-token-which-is-longer")) as r:
            assert r.status == 200
        await asyncio.to_thread(token_file.write_text, "")  # empty: no token works
        async with session.post(f"{base}/api/debug/redirect", headers=_bearer("")) as r:
            assert r.status == 403

    _serve(view, check)
    assert view.redirects == 2


def test_a_token_file_that_is_a_fifo_refuses_tokens_and_blocks_nothing(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    view = _with_token_file(fifo)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.post(f"{base}/api/debug/redirect", headers=_bearer(TOKEN)) as r:
            assert r.status == 403
            assert "cannot be used" in await _error(r)
        async with session.get(f"{base}/api/debug/health") as r:
            assert r.status == 200

    _serve(view, check)


def _non_loopback_ipv4() -> str:
    """An address of this machine that is not loopback: a connection to it from here has a
    real non-loopback peer address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: no packet is sent, the kernel only picks a route
        except OSError:
            pytest.skip("this machine has no non-loopback IPv4 address")
        addr: str = s.getsockname()[0]
    if ipaddress.ip_address(addr).is_loopback:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return addr


def test_a_non_loopback_peer_needs_a_token(token_file: Path) -> None:
    view = _with_token_file(token_file)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        for path in ("/api/debug/health", "/api/admin/config", "/api/admin/backends",
                     "/api/admin/sessions", "/metrics"):
            async with session.get(base + path) as r:
                assert r.status == 200, path
        async with session.put(f"{base}/api/admin/config",
                               data="[proxy]\nmax-connections = 5\n") as r:
            assert r.status == 403
            assert await _error(r) == NEED_CREDENTIAL
        for method in ("POST", "DELETE", "PATCH", "OPTIONS"):  # by method, not by route
            async with session.request(method, f"{base}/api/debug/redirect") as r:
                assert r.status == 403, method
        async with session.request("POST", f"{base}/api/not-a-route") as r:
            assert r.status == 403
        async with session.post(f"{base}/api/debug/redirect", headers=_bearer(TOKEN)) as r:
            assert r.status == 200

    _serve(view, check, host=_non_loopback_ipv4())
    assert view.redirects == 1
    assert view.applied == []


@pytest.mark.parametrize(
    ("peername", "loopback"),
    [(("127.0.0.1", 1), True), (("127.255.0.9", 1), True), (("::1", 1, 0, 0), True),
     (("::ffff:127.0.0.1", 1, 0, 0), True), (("10.0.0.1", 1), False),
     (("::ffff:10.0.0.1", 1, 0, 0), False), (("fe80::1%eth0", 1, 0, 2), False),
     (("::", 1, 0, 0), False), ("", False), (None, False), (("not an ip", 1), False)],
)
def test_is_loopback(peername: object, loopback: bool) -> None:
    assert is_loopback(peername) is loopback


def _dual_stack_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 peers as ::ffff:a.b.c.d
    sock.bind(("::", 0))
    sock.listen()
    return sock


def test_ipv4_mapped_peers_are_judged_by_their_ipv4_address(token_file: Path) -> None:
    view = _with_token_file(token_file)
    outside = _non_loopback_ipv4()

    async def main() -> None:
        runner = web.AppRunner(build_app(view))
        await runner.setup()
        sock = _dual_stack_socket()
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{port}/api/debug/redirect") as r:
                    assert r.status == 200  # peer ::ffff:127.0.0.1
                async with session.post(f"http://{outside}:{port}/api/debug/redirect") as r:
                    assert r.status == 403  # peer ::ffff:<outside>
        finally:
            await runner.cleanup()
            sock.close()

    asyncio.run(main())
    assert view.redirects == 1


def test_a_verified_client_certificate_may_write(tmp_path: Path) -> None:
    """Over TLS that verifies client certificates (as the API's HTTPS will), a non-loopback
    peer with a certificate may write and one without may not."""
    from support.certs import make_pki  # noqa: PLC0415 - needs the TLS test helpers

    pki = make_pki(tmp_path / "pki")
    view = ControlledView()
    host = _non_loopback_ipv4()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca)
    server_ctx.load_cert_chain(pki.server.cert, pki.server.key)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL

    def client_ctx(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=pki.ca)
        ctx.check_hostname = False  # the server's certificate names localhost
        if with_cert:
            ctx.load_cert_chain(pki.client.cert, pki.client.key)
        return ctx

    async def main() -> None:
        runner = web.AppRunner(build_app(view))
        await runner.setup()
        site = web.TCPSite(runner, host, 0, ssl_context=server_ctx)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session:
                url = f"https://{host}:{port}/api/debug/redirect"
                async with session.post(url, ssl=client_ctx(with_cert=False)) as r:
                    assert r.status == 403
                async with session.post(url, ssl=client_ctx(with_cert=True)) as r:
                    assert r.status == 200
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert view.redirects == 1


# -- what a config change must pass -------------------------------------------------------------


def test_a_huge_body_is_413_and_harms_nothing() -> None:
    view = ControlledView()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        body = "# " + "x" * MAX_BODY_BYTES + "\n"
        async with session.put(f"{base}/api/admin/config", data=body) as r:
            assert r.status == 413
        async with session.get(f"{base}/api/debug/health") as r:
            assert r.status == 200
        async with session.put(f"{base}/api/admin/config",
                               data="[proxy]\nmax-connections = 7\n") as r:
            assert r.status == 200

    _serve(view, check)
    assert [c.proxy.max_connections for c in view.applied] == [7]


def test_a_body_that_is_not_utf8_is_400() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.put(f"{base}/api/admin/config", data=b"\xff\xfe") as r:
            assert r.status == 400
            assert await _error(r) == "the body is not UTF-8 text"

    _serve(ControlledView(), check)


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)  # no disk blocks: only the size matters
    return path


@pytest.fixture(params=["/dev/zero", "fifo", "too-large", "directory", "missing"])
def bad_file(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    kind: str = request.param
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        yield tmp_path / "fifo", "not a regular file"
    elif kind == "too-large":
        yield _sparse(tmp_path / "big", USERS_FILE_LIMIT + 1), "larger than 16 MiB"
    elif kind == "directory":
        yield tmp_path, "not a regular file"
    elif kind == "missing":
        yield tmp_path / "nope", "cannot open: No such file or directory"
    else:
        yield Path(kind), "not a regular file"


def test_a_users_file_the_proxy_cannot_read_is_refused(bad_file: tuple[Path, str]) -> None:
    path, reason = bad_file
    view = ControlledView()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.put(f"{base}/api/admin/config",
                               data=f'[security]\nusers-file = "{path}"\n') as r:
            assert r.status == 400
            assert await _error(r) == f"security.users-file: {reason}"
        async with session.get(f"{base}/api/debug/health") as r:
            assert r.status == 200

    _serve(view, check)
    assert view.applied == []


def test_a_token_file_the_proxy_cannot_read_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"t" * 4097)
    view = ControlledView()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        for path, reason in (("/dev/zero", "not a regular file"), (big, "larger than 4 KiB")):
            async with session.put(f"{base}/api/admin/config",
                                   data=f'[api]\nauth-token-file = "{path}"\n') as r:
                assert r.status == 400
                assert await _error(r) == f"api.auth-token-file: {reason}"

    _serve(view, check)
    assert view.applied == []


def test_a_readable_users_file_is_accepted(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("app *0123456789ABCDEF0123456789ABCDEF01234567\n")
    view = ControlledView()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.put(f"{base}/api/admin/config",
                               data=f'[security]\nusers-file = "{users}"\n') as r:
            assert r.status == 200, await r.text()

    _serve(view, check)
    assert [c.security.users_file for c in view.applied] == [str(users)]


@pytest.mark.parametrize(
    ("toml", "keys"),
    [('[proxy]\naddr = "127.0.0.1:6001"\n', "proxy.addr"),
     ('[api]\naddr = "127.0.0.1:1"\n', "api.addr"),
     ('[proxy]\naddr = "127.0.0.1:1"\n[log]\nencoder = "json"\n', "proxy.addr, log.encoder"),
     ('[log.log-file]\nmax-days = 9\n', "log.log-file")],
)
def test_an_offline_key_is_refused_by_name(toml: str, keys: str) -> None:
    view = ControlledView()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.put(f"{base}/api/admin/config", data=toml) as r:
            assert r.status == 400
            assert await _error(r) == f"{keys}: cannot change while the proxy runs (restart it)"
        async with session.put(f"{base}/api/admin/config",  # the running value: no change
                               data='[proxy]\naddr = "127.0.0.1:6000"\n') as r:
            assert r.status == 200

    _serve(view, check)
    assert len(view.applied) == 1


def test_with_proxy_protocol_the_headers_client_is_judged() -> None:
    """`[api] proxy-protocol`: a balancer on loopback forwards a remote client's write: refused
    as that client's; a local client's, or one without a header, is loopback's."""
    view = ControlledView()

    async def request(port: int, header: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(header + b"POST /api/debug/redirect HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        reply = await reader.read()
        writer.close()
        return reply.split(b"\r\n", 1)[0]

    async def main() -> None:
        server = await start_api(view, "127.0.0.1:0", proxy_protocol=True)
        try:
            remote = build(("192.0.2.7", 4000), ("127.0.0.1", server.port))
            local = build(("127.0.0.1", 4001), ("127.0.0.1", server.port))
            assert await request(server.port, remote) == b"HTTP/1.1 403 Forbidden"
            assert await request(server.port, local) == b"HTTP/1.1 200 OK"
            assert await request(server.port, b"") == b"HTTP/1.1 200 OK"
            assert await request(server.port, SIGNATURE + b"\x21\x51\x00\x00") == b""  # bad
        finally:
            await server.close()

    asyncio.run(main())
    assert view.redirects == 2
    assert not listener._PROXIED  # forgotten once the connections closed



# -- writes from browsers' pages (origin.py) ----------------------------------------------------


def test_a_write_from_another_sites_page_is_refused_however_authenticated(
        token_file: Path) -> None:
    view = _with_token_file(token_file)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        port = int(base.rsplit(":", 1)[1])
        refused = [
            {"Origin": "http://evil.example"},
            {"Origin": f"http://127.0.0.1:{port + 1}"},  # another port is another origin
            {"Origin": f"https://127.0.0.1:{port}"},  # so is another scheme
            {"Origin": "null"},  # a sandboxed or privacy-stripped page
            {"Origin": "not a url"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},  # 127.0.0.1:other-port is the same site
            {"Origin": base, "Sec-Fetch-Site": "cross-site"},
        ]
        for headers in refused:
            for credential in ({}, _bearer(TOKEN)):  # a token does not make it right
                async with session.post(f"{base}/api/debug/redirect",
                                        headers={**headers, **credential}) as r:
                    assert r.status == 403, headers
                    assert "write refused" in await _error(r)
        # What an HTML form sends: a body, its content type, the page's origin.
        async with session.post(f"{base}/api/admin/backends/127.0.0.1:3306/drain",
                                data={"x": "1"}, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with session.put(f"{base}/api/admin/config", data="[proxy]\nmax-connections = 5\n",
                               headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        # The API's own page, a typed request, and clients that are not browsers go on.
        for headers in ({"Origin": base}, {"Origin": base, "Sec-Fetch-Site": "same-origin"},
                        {"Origin": f"http://127.0.0.1:{port}/"}, {"Sec-Fetch-Site": "none"}, {}):
            async with session.post(f"{base}/api/debug/redirect", headers=headers) as r:
                assert r.status == 200, headers
        async with session.get(f"{base}/api/admin/backends",
                               headers={"Origin": "http://evil.example",
                                        "Sec-Fetch-Site": "cross-site"}) as r:
            assert r.status == 200  # reads are open (a page of another origin cannot read them)

    _serve(view, check)
    assert view.redirects == 5
    assert view.drained == []
    assert view.applied == []


def test_a_page_reached_under_a_host_name_gets_no_loopback_trust(token_file: Path) -> None:
    """DNS rebinding: the browser took the API for the page's own origin, whose name resolved
    to 127.0.0.1; the request is same-origin and comes from loopback."""
    view = _with_token_file(token_file)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        port = int(base.rsplit(":", 1)[1])

        async def redirect(host: str, origin: bool, token: str = "") -> aiohttp.ClientResponse:
            headers = {"Host": f"{host}:{port}"}
            if origin:
                headers["Origin"] = f"http://{host}:{port}"
            if token:
                headers.update(_bearer(token))
            async with session.post(f"{base}/api/debug/redirect", headers=headers) as r:
                await r.read()
                return r

        r = await redirect("rebound.example", origin=True)
        assert r.status == 403
        async with session.post(f"{base}/api/debug/redirect", headers={
                "Host": f"rebound.example:{port}",
                "Origin": f"http://rebound.example:{port}"}) as r:
            assert "gets no loopback trust" in await _error(r)
        for host in ("127.0.0.1", "localhost", "app.localhost", "[::1]"):
            assert (await redirect(host, origin=True)).status == 200, host
        assert (await redirect("rebound.example", origin=False)).status == 200  # not a page
        assert (await redirect("rebound.example", origin=True, token=TOKEN)).status == 200

    _serve(view, check)
    assert view.redirects == 6
