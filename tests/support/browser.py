"""A real headless Chromium (Debian's `chromium` and `chromium-driver`), driven by Selenium.

Each browser gets a fresh profile in the test's temporary directory. Chromium runs as root here,
hence --no-sandbox; the machine's network is closed, hence every flag that stops Chromium from
calling home (its connections would be refused and logged). `resolver_rules` maps host names
to addresses inside this browser only (Chromium's --host-resolver-rules), which is how a test
plays a DNS rebinding: a name of the attacker's that resolves to 127.0.0.1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,1100")
# Artifacts a human looks at after a run (screenshots); git-ignored.
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

T = TypeVar("T")


def start_browser(profile: Path, resolver_rules: str = "") -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if resolver_rules:
        options.add_argument(f"--host-resolver-rules={resolver_rules}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    return driver


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """The console's errors since the last call (the log is drained as it is read)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 15.0,
             driver: WebDriver | None = None) -> T:
    """The condition's first truthy value; a page redrawn under the check is looked at again.
    On timeout, fails with `what` (and the page's text when a driver is given)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            page = driver.find_element("tag name", "body").text if driver else ""
            raise AssertionError(f"timed out waiting for {what}\n--- page ---\n{page}")
        time.sleep(0.1)


def save_screenshot(driver: WebDriver, name: str, tmp_path: Path) -> list[Path]:
    """The page as a PNG under the test's tmp_path and in tests/artifacts/; both paths."""
    png = driver.get_screenshot_as_png()
    ARTIFACTS.mkdir(exist_ok=True)
    paths = [tmp_path / name, ARTIFACTS / name]
    for path in paths:
        path.write_bytes(png)
    return paths
