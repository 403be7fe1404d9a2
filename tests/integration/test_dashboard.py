"""The status page in a real headless Chromium, in front of a real proxy and MariaDB servers.

An operator opens the API's address, sees the backends, a backend joining through a config
change, a session and where it sits; drains its backend with the page's button and sees the
session move and the move appear in the chart and the list. Also: labels with markup in them are
shown as text; a wrong token is refused with the reason and the right one works; a hostile page
of another origin cannot drain or redirect through the operator's browser, nor can a page
reached under a DNS-rebound name.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pymysql.connections import Connection
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from support.backends import ADMIN_TOML
from support.browser import console_errors, save_screenshot, start_browser, wait_for
from support.proxy import ProxyFactory, ProxyProcess
from tiproxy.playground.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

MARKUP = "<img src=x onerror=\"document.title='pwned'\">"  # a label value an operator typed
REBOUND = "rebound.example"  # a name of the attacker's, resolved to 127.0.0.1 (DNS rebinding)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    driver = start_browser(tmp_path / "profile", resolver_rules=f"MAP {REBOUND} 127.0.0.1")
    try:
        yield driver
    finally:
        driver.quit()


def _page(proxy: ProxyProcess, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{proxy.api_port}/"


def _backend_rows(driver: WebDriver) -> dict[str, str]:
    """Backend address -> status, as the page shows them."""
    return {row.get_attribute("data-backend") or "": row.get_attribute("data-status") or ""
            for row in driver.find_elements(By.CSS_SELECTOR, "#backends tr[data-backend]")}


def _session_backend(driver: WebDriver, session: int) -> str:
    return _session_cell(driver, session, "backend")


def _session_cell(driver: WebDriver, session: int, column: str) -> str:
    cells = driver.find_elements(By.CSS_SELECTOR, f'#sessions tr[data-session="{session}"] '
                                 f"td.{column}")
    return cells[0].text if cells else ""


def _move_listed(driver: WebDriver, session: int, source: str, target: str) -> WebElement:
    """The successful move of `session` from `source` to `target` in the page's list."""
    css = (f'#moves li[data-session="{session}"][data-from="{source}"][data-to="{target}"]'
           '[data-result="succeed"]')
    return wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, css),
                    f"the move of session {session} in the list", driver=driver)[0]


def _drain(driver: WebDriver, addr: str) -> None:
    _click(driver, f'tr[data-backend="{addr}"] button[data-action="drain"]')
    _notice(driver, f"Drain {addr}: done")
    wait_for(lambda: _backend_rows(driver).get(addr) == "draining", f"{addr} draining",
             driver=driver)


def _undrain(driver: WebDriver, addr: str) -> None:
    _click(driver, f'tr[data-backend="{addr}"] button[data-action="undrain"]')
    _notice(driver, f"Undrain {addr}: done")
    wait_for(lambda: _backend_rows(driver).get(addr) == "healthy", f"{addr} healthy again",
             driver=driver)


def _port(conn: Connection[Any]) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT @@port")
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def _click(driver: WebDriver, css: str) -> None:
    """Click what `css` finds, again if the page redraws it under the click."""
    def click() -> bool:
        driver.find_element(By.CSS_SELECTOR, css).click()
        return True
    wait_for(click, f"a clickable {css}", driver=driver)


def _notice(driver: WebDriver, text: str) -> str:
    return wait_for(lambda: (n := driver.find_element(By.ID, "notice").text) and text in n and n,
                    f"a notice saying {text!r}", driver=driver)


def _set_token(driver: WebDriver, token: str) -> None:
    if not driver.find_element(By.ID, "auth").get_attribute("open"):
        _click(driver, "#auth summary")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    _click(driver, "#token-form button[type=submit]")


def test_page_shows_a_backend_joining_and_a_session_moving(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory, browser: WebDriver,
        tmp_path: Path) -> None:
    a, b = backends
    labels = f'\n[proxy.backend-labels]\n"{a.addr}" = {{ zone = {json.dumps(MARKUP)}, rack = "r1" }}'
    proxy = proxy_factory([a.addr], ADMIN_TOML + labels)  # the admin account lets it move
    browser.get(_page(proxy))
    assert browser.current_url == _page(proxy) + "dashboard"
    assert wait_for(lambda: _backend_rows(browser) == {a.addr: "healthy"},
                    "the one backend", driver=browser)
    cell = browser.find_element(By.CSS_SELECTOR, f'tr[data-backend="{a.addr}"] td.labels')
    assert f"zone={MARKUP}" in cell.text  # the markup is shown as text...
    assert not cell.find_elements(By.TAG_NAME, "img")  # ...and is no element
    assert browser.title == "TiProxy status"

    status, body = proxy.api("/api/admin/config", "PUT",
                             f'[proxy]\nbackend-addrs = ["{a.addr}", "{b.addr}"]\n'.encode())
    assert status == 200, body
    wait_for(lambda: _backend_rows(browser) == {a.addr: "healthy", b.addr: "healthy"},
             "the second backend to join", driver=browser)

    conn = proxy.connect()
    session = conn.thread_id()
    old = proxy.session(session)["backend"]
    new = b.addr if old == a.addr else a.addr
    wait_for(lambda: _session_backend(browser, session) == old, "the session", driver=browser)

    _drain(browser, old)
    wait_for(lambda: _session_backend(browser, session) == new, "the session to move",
             driver=browser)
    assert "drained" in _move_listed(browser, session, old, new).text
    bars = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#move-chart rect.bar.ok"),
                    "the move in the chart", driver=browser)
    assert sum(int(bar.get_attribute("data-count") or 0) for bar in bars) >= 1
    assert _port(conn) == (b.port if new == b.addr else a.port)  # where the page says it is

    # A session in a transaction waits, and the page says so, until it commits.
    txn = proxy.connect()  # on `new`: `old` is draining
    waiting = txn.thread_id()
    with txn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT 1")
    _undrain(browser, old)
    _drain(browser, new)
    wait_for(lambda: _session_backend(browser, session) == old, "the session to move back",
             driver=browser)
    wait_for(lambda: "in a transaction" in _session_cell(browser, waiting, "move"),
             "the waiting session's reason", driver=browser)
    assert _session_backend(browser, waiting) == new
    for path in save_screenshot(browser, "dashboard.png", tmp_path):
        print(f"status page screenshot: {path}")
    txn.commit()
    wait_for(lambda: _session_backend(browser, waiting) == old, "the committed session to move",
             driver=browser)
    _move_listed(browser, waiting, new, old)
    assert _port(txn) == (a.port if old == a.addr else b.port)

    _undrain(browser, new)
    conn.close()
    txn.close()
    assert console_errors(browser) == []
    assert browser.title == "TiProxy status"  # no label's markup ever ran


def test_a_wrong_token_is_refused_with_the_reason_and_the_right_one_works(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory, browser: WebDriver,
        tmp_path: Path) -> None:
    token_file = tmp_path / "api-token"
    token_file.write_text("page-test-token\n")
    a, b = backends
    proxy = proxy_factory([a.addr, b.addr], api_token_file=token_file)
    browser.get(_page(proxy))
    wait_for(lambda: len(_backend_rows(browser)) == 2, "the backends", driver=browser)
    assert console_errors(browser) == []

    _set_token(browser, "not-the-token")
    _click(browser, f'tr[data-backend="{a.addr}"] button[data-action="drain"]')
    _notice(browser, "refused: wrong bearer token")
    wait_for(lambda: browser.find_element(By.ID, "auth").get_attribute("open") is not None,
             "the token field, open again after the refusal", driver=browser)
    save_screenshot(browser, "dashboard-refused.png", tmp_path)
    assert {x["addr"]: x["status"] for x in proxy.backends()}[a.addr] == "healthy"
    errors = console_errors(browser)  # the browser reports the 403 itself, and only that
    assert errors and all("403" in e["message"] for e in errors), errors

    _set_token(browser, "page-test-token")
    _click(browser, f'tr[data-backend="{a.addr}"] button[data-action="drain"]')
    _notice(browser, f"Drain {a.addr}: done")
    wait_for(lambda: _backend_rows(browser).get(a.addr) == "draining", "the drain",
             driver=browser)
    assert console_errors(browser) == []
    assert "page-test-token" not in proxy.log()


class _HostilePage(BaseHTTPRequestHandler):
    """Another origin's page: it tries a redirect with fetch, then a drain with a form."""

    html = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *args: object) -> None:
        pass


def test_another_origins_page_cannot_write_through_the_operators_browser(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory,
        browser: WebDriver) -> None:
    a, b = backends
    proxy = proxy_factory([a.addr, b.addr])
    api = f"http://127.0.0.1:{proxy.api_port}"
    _HostilePage.html = (
        f'<form id="f" method="POST" action="{api}/api/admin/backends/{a.addr}/drain"></form>'
        f'<script>fetch("{api}/api/debug/redirect", {{method: "POST", mode: "no-cors"}})'
        '.finally(() => document.getElementById("f").submit());</script>').encode()
    hostile = ThreadingHTTPServer(("127.0.0.1", 0), _HostilePage)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://localhost:{hostile.server_address[1]}/")
        wait_for(lambda: "write refused" in browser.page_source,
                 "the API's refusal of the form", driver=browser)
    finally:
        hostile.shutdown()
        hostile.server_close()
    proxy.wait_log("API POST '/api/debug/redirect' from")  # the fetch, sent first
    line = next(x for x in proxy.log().splitlines() if "'/api/debug/redirect' from" in x)
    assert "refused: cross-site write refused" in line, line
    assert {x["addr"]: x["status"] for x in proxy.backends()} == \
        {a.addr: "healthy", b.addr: "healthy"}


def test_a_page_reached_under_a_rebound_name_gets_no_loopback_trust(
        backends: list[MariaDBServer], proxy_factory: ProxyFactory,
        browser: WebDriver) -> None:
    a, b = backends
    proxy = proxy_factory([a.addr, b.addr])
    browser.get(_page(proxy, REBOUND))  # the browser takes the API for REBOUND's own site
    wait_for(lambda: len(_backend_rows(browser)) == 2, "the backends", driver=browser)
    _click(browser, f'tr[data-backend="{a.addr}"] button[data-action="drain"]')
    _notice(browser, "gets no loopback trust")
    assert {x["addr"]: x["status"] for x in proxy.backends()}[a.addr] == "healthy"
