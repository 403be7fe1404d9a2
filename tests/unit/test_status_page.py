"""The status page as served (routes, headers, what the files may load) and the move history
behind its chart: a real aiohttp server on a real port in front of a small fake view. The page's
behaviour in a browser is tests/integration/test_dashboard.py's."""

from __future__ import annotations

import asyncio
import fnmatch
import pickle
import re
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import aiohttp

from support.views import QuietView
from tiproxy.api import start_api
from tiproxy.api.dashboard import CSP, FILES, PAGE
from tiproxy.config import Config, parse_config
from tiproxy.views.history import RECENT, SPAN, STEP, MoveHistory, MoveRecord, history_json
from tiproxy.views.interface import MigrationStats

CONFIG = parse_config('[proxy]\naddr = "127.0.0.1:6000"\nbackend-addrs = ["127.0.0.1:3306"]\n')
STATIC = resources.files("tiproxy.api") / "static"
T0 = 1_800_000_000.0  # a wall-clock time on a bucket boundary


def _move(at: float, session: int = 1, ok: bool = True, reason: str = "drained") -> MoveRecord:
    return MoveRecord(at, session, "app", "10.0.0.1:3306", "10.0.0.2:3306", reason, ok, 0.004,
                      "" if ok else "capture: lost connection")


@dataclass
class PageView(QuietView):
    cfg: Config = CONFIG
    history: MoveHistory = field(default_factory=MoveHistory)

    def migration_stats(self) -> MigrationStats:
        return MigrationStats({("10.0.0.1:3306", "10.0.0.2:3306", "drained", "succeed"): 7,
                               ("10.0.0.1:3306", "10.0.0.2:3306", "drained", "fail"): 1},
                              (0.01,), [8, 0], 0.03, self.history)


Check = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


def _serve(view: PageView, check: Check) -> None:
    async def main() -> None:
        server = await start_api(view, "127.0.0.1:0")
        try:
            async with aiohttp.ClientSession() as session:
                await asyncio.wait_for(check(session, f"http://127.0.0.1:{server.port}"), 60)
        finally:
            await server.close()

    asyncio.run(main())


# -- the page as served -------------------------------------------------------------------------


def test_the_root_leads_to_the_page_and_every_file_has_its_type_and_the_csp() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        for path in ("/", PAGE + "/"):
            async with session.get(base + path, allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == PAGE
        for path, (name, content_type) in FILES.items():
            async with session.get(base + path) as r:
                assert r.status == 200, path
                assert r.content_type == content_type
                assert r.headers["Content-Security-Policy"] == CSP
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["X-Frame-Options"] == "DENY"
                assert r.headers["Referrer-Policy"] == "same-origin"  # keeps Origin on writes
                assert await r.read() == (STATIC / name).read_bytes()
        async with session.get(f"{base}{PAGE}/other.js") as r:
            assert r.status == 404  # only the listed files, nothing else of the package

    _serve(PageView(), check)


def test_the_csp_allows_only_the_pages_own_files() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "img-src", "connect-src"):
        assert directives[name] == "'self'", name
    assert "unsafe" not in CSP
    assert directives["frame-ancestors"] == "'none'"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.inline_styles = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href", "action") and v]
        self._in_script = tag == "script"
        self.inline_styles += tag == "style" or "style" in values
        self.inline_scripts += any(k.startswith("on") for k in values)

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


def test_the_page_loads_only_its_own_files_and_has_no_inline_code() -> None:
    links = _Links()
    links.feed((STATIC / "index.html").read_text())
    assert links.inline_scripts == 0 and links.inline_styles == 0  # the CSP would block them
    served = {path.lstrip("/") for path in FILES}
    assert links.urls and all(url in served for url in links.urls), links.urls


def test_the_script_inserts_data_as_text_and_fetches_only_its_own_origin() -> None:
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in script, sink
    for name in ("index.html", "app.js", "style.css", "icon.svg"):
        text = (STATIC / name).read_text()
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (name, urls)  # air-gapped: nothing from another host
        assert "@import" not in text


def test_a_package_build_ships_every_file_of_the_page() -> None:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"][
        "tiproxy.api"]
    for name, _ in FILES.values():
        assert any(fnmatch.fnmatch(f"static/{name}", p) for p in patterns), name


# -- the move history behind the chart ---------------------------------------------------------


def test_migrations_route_gives_the_timeline_the_recent_moves_and_the_totals() -> None:
    view = PageView()
    now = time.time()
    view.history.record(_move(now - 3 * STEP, session=1))
    view.history.record(_move(now - 3 * STEP, session=2, ok=False))
    view.history.record(_move(now, session=3, reason="redirect"))

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/api/admin/migrations") as r:
            assert r.status == 200
            body = await r.json()
        assert (body["step"], body["span"]) == (STEP, SPAN)
        assert [(b["succeed"], b["fail"], b["reasons"]) for b in body["timeline"]] == [
            (1, 1, {"drained": 2}), (1, 0, {"redirect": 1})]
        assert [m["session"] for m in body["recent"]] == [3, 2, 1]  # newest first
        failed = body["recent"][1]
        assert (failed["result"], failed["error"]) == ("fail", "capture: lost connection")
        assert (failed["from"], failed["to"], failed["user"]) == (
            "10.0.0.1:3306", "10.0.0.2:3306", "app")
        assert sorted((t["result"], t["count"]) for t in body["totals"]) == [
            ("fail", 1), ("succeed", 7)]

    _serve(view, check)


def test_the_history_is_bounded_whatever_the_move_rate() -> None:
    history = MoveHistory()
    for i in range(10_000):  # two hours of moves, every 0.72 s
        history.record(_move(T0 + i * 0.72, session=i))
    assert len(history.buckets) <= SPAN
    assert min(history.buckets) >= T0 + 9_999 * 0.72 - SPAN * STEP
    assert len(history.recent) == RECENT
    assert [m.session for m in history.recent] == list(range(10_000 - RECENT, 10_000))


def test_histories_of_workers_add_up_bucket_by_bucket() -> None:
    one, two = MoveHistory(), MoveHistory()
    for i in range(RECENT):
        one.record(_move(T0 + i, session=2 * i))
        two.record(_move(T0 + i + 0.5, session=2 * i + 1, ok=i % 2 == 0))
    total = MoveHistory.merged([one, pickle.loads(pickle.dumps(two))])  # as workers send it
    assert sum(sum(c.values()) for c in total.buckets.values()) == 2 * RECENT
    assert set(total.buckets) == set(one.buckets) | set(two.buckets)
    assert [m.session for m in total.recent] == list(range(RECENT, 2 * RECENT))  # the newest
    assert len(one.recent) == RECENT  # the parts are not changed


def test_old_buckets_are_left_out_before_a_new_move_makes_them_go() -> None:
    history = MoveHistory()
    history.record(_move(T0))
    assert [b["start"] for b in history_json(history, now=T0 + 1)["timeline"]] == [int(T0)]
    assert history_json(history, now=T0 + SPAN * STEP)["timeline"] == []  # quiet since
    assert len(history_json(history, now=T0 + SPAN * STEP)["recent"]) == 1  # still listed
    history.record(_move(T0 + SPAN * STEP))
    assert list(history.buckets) == [int(T0) + SPAN * STEP]
