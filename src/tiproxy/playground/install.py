"""Finding MariaDB's programs and the installed datadir every throwaway server starts from.

`mariadb-install-db` runs once per mariadbd version and user, into a template datadir cached in
the temp directory (built in a private directory, then renamed into place, so concurrent
processes never see half a template). The tools (the client, install-db) are looked for next to
the mariadbd found first, so that one installation's programs are used together.

Standard library only: the installed package must not depend on test libraries.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Bump when TEMPLATE_ARGS change: cached templates built with other options must not be reused.
_TEMPLATE_LAYOUT = "2"
# The redo log is created by mariadb-install-db; servers must start with the same size.
TEMPLATE_ARGS = ("--innodb-log-file-size=8M",)
# install-db also grants root@<hostname>, which --skip-name-resolve warns about at every start.
_TEMPLATE_CLEANUP_SQL = """
DELETE FROM mysql.global_priv WHERE Host NOT IN ('localhost', '127.0.0.1', '::1');
DELETE FROM mysql.proxies_priv WHERE Host NOT IN ('localhost', '127.0.0.1', '::1');
"""
_SEARCH_DIRS = (
    "/usr/sbin",
    "/usr/local/sbin",
    "/usr/libexec",
    "/usr/bin",
    "/usr/local/bin",
    "/usr/local/mysql/bin",
)


class LauncherError(Exception):
    """A MariaDB server could not be found, prepared, started, stopped or queried."""


def find_mariadbd() -> Path:
    """Return the mariadbd binary ($TIPROXY_MARIADBD overrides the search)."""
    override = os.environ.get("TIPROXY_MARIADBD")
    if override:
        if not os.access(override, os.X_OK):
            raise LauncherError(f"TIPROXY_MARIADBD={override} is not an executable file")
        return Path(override)
    found = _find_program("mariadbd", ())
    if found is None:
        raise LauncherError(
            "mariadbd not found on PATH or in /usr/sbin: install MariaDB "
            "(Debian: apt-get install mariadb-server mariadb-client, or run scripts/setup.sh) "
            "or set TIPROXY_MARIADBD to the server binary"
        )
    return found


def _find_program(name: str, first_dirs: Sequence[Path]) -> Path | None:
    for directory in first_dirs:
        if os.access(directory / name, os.X_OK):
            return directory / name
    found = shutil.which(name)
    if found:
        return Path(found)
    for directory in map(Path, _SEARCH_DIRS):
        if os.access(directory / name, os.X_OK):
            return directory / name
    return None


def find_companion(name: str) -> Path:
    """Find a MariaDB tool (client, install-db) from the same installation as mariadbd."""
    server_dir = find_mariadbd().resolve().parent
    found = _find_program(name, (server_dir, server_dir.parent / "bin"))
    if found is None:
        raise LauncherError(f"{name} not found: install mariadb-client next to mariadbd")
    return found


@functools.cache
def _server_version(mariadbd: Path) -> str:
    result = subprocess.run([mariadbd, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"Ver\s+(\S+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise LauncherError(f"{mariadbd} --version failed: {result.stdout}{result.stderr}")
    return match.group(1)


def user_args() -> list[str]:
    # mariadbd refuses to run as root unless told to; the datadir then belongs to root.
    return ["--user=root"] if os.geteuid() == 0 else []


def template_datadir() -> Path:
    """Return a freshly installed datadir for this mariadbd, building and caching it once."""
    version = re.sub(r"[^A-Za-z0-9._+-]", "_", _server_version(find_mariadbd()))
    name = f"tiproxy-mariadb-template-{version}-{_TEMPLATE_LAYOUT}-u{os.geteuid()}"
    final = Path(tempfile.gettempdir()) / name
    if final.is_dir():
        return final
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        _install_db(staging / "data", staging / "cleanup.sql")
        try:
            (staging / "data").rename(final)
        except OSError:
            if not final.is_dir():  # else another process renamed its template first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _install_db(datadir: Path, cleanup_sql: Path) -> None:
    cleanup_sql.write_text(_TEMPLATE_CLEANUP_SQL)
    cmd = [
        str(find_companion("mariadb-install-db")),
        "--no-defaults",
        "--auth-root-authentication-method=normal",  # root@localhost, no password
        "--skip-test-db",
        "--skip-name-resolve",  # grants for 127.0.0.1/::1, not for this machine's hostname
        f"--datadir={datadir}",
        f"--extra-file={cleanup_sql}",
        *user_args(),
        *TEMPLATE_ARGS,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()[-40:]
        raise LauncherError(f"{' '.join(cmd)} failed:\n" + "\n".join(output))
