"""Reading the files a config names (files.py), refusing offline keys on reload (load.py), and
refusing to start with a file the proxy cannot use (cli/server.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tiproxy.cli.server import main as server_main
from tiproxy.config import ConfigError, parse_config
from tiproxy.config.files import (
    CONFIG_FILES,
    TLS_FILE_LIMIT,
    TOKEN_FILE_LIMIT,
    USERS_FILE_LIMIT,
    FileRefusedError,
    check_config_files,
    read_small_file,
)
from tiproxy.config.load import offline_changes
from tiproxy.config.reload import check_offline_keys


def test_reads_a_regular_file_up_to_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_small_file(path, 100) == b"x" * 100


def test_a_file_past_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 101)
    with pytest.raises(FileRefusedError, match=r"^larger than 100 bytes$"):
        read_small_file(path, 100)
    with pytest.raises(FileRefusedError, match=r"^larger than 4 KiB$"):
        path.write_bytes(b"x" * (4097))
        read_small_file(path, 4096)


def test_a_file_that_says_it_is_empty_is_still_bounded() -> None:
    # /proc files report size 0; reading stops at limit + 1 bytes all the same.
    assert os.stat("/proc/self/maps").st_size == 0
    with pytest.raises(FileRefusedError, match="larger than 10 bytes"):
        read_small_file("/proc/self/maps", 10)


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "/"])
def test_devices_and_directories_are_refused(path: str) -> None:
    with pytest.raises(FileRefusedError, match=r"^not a regular file$"):
        read_small_file(path, 1024)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would block forever
    with pytest.raises(FileRefusedError, match=r"^not a regular file$"):
        read_small_file(fifo, 1024)


def test_a_unix_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(FileRefusedError, match=r"^not a regular file$"):
            read_small_file(path, 1024)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileRefusedError, match=r"^cannot open: No such file or directory$"):
        read_small_file(tmp_path / "nope", 1024)


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"token\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert read_small_file(tmp_path / "link", 1024) == b"token\n"


def test_the_table_names_every_file_with_its_limit() -> None:
    limits = {named.key: named.limit for named in CONFIG_FILES}
    assert limits["security.users-file"] == USERS_FILE_LIMIT == 16 * 1024 * 1024
    assert limits["api.auth-token-file"] == TOKEN_FILE_LIMIT == 4096
    for obj in ("server-tls", "server-http-tls", "cluster-tls", "sql-tls"):
        for part in ("cert", "key", "ca"):
            assert limits[f"security.{obj}.{part}"] == TLS_FILE_LIMIT == 1024 * 1024
    cfg = parse_config('[api]\nauth-token-file = "/t"\n[security]\nusers-file = "/u"\n')
    paths = {named.key: named.path(cfg) for named in CONFIG_FILES}
    assert paths["api.auth-token-file"] == "/t" and paths["security.users-file"] == "/u"


def test_check_config_files_names_the_dotted_key(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (TOKEN_FILE_LIMIT + 1))
    with pytest.raises(ConfigError) as info:
        check_config_files(parse_config('[security]\nusers-file = "/dev/zero"\n'))
    assert str(info.value) == "security.users-file: not a regular file"
    with pytest.raises(ConfigError) as info:
        check_config_files(parse_config(f'[api]\nauth-token-file = "{big}"\n'))
    assert str(info.value) == "api.auth-token-file: larger than 4 KiB"


def test_check_config_files_reads_only_changed_paths(tmp_path: Path) -> None:
    running = parse_config('[security]\nusers-file = "/dev/zero"\n')  # already running
    check_config_files(running, running)  # unchanged: not read again
    token = tmp_path / "token"
    token.write_text("secret\n")
    check_config_files(parse_config(f'[api]\nauth-token-file = "{token}"\n'))
    check_config_files(parse_config(""))  # nothing named, nothing read


def test_offline_changes_name_each_key() -> None:
    running = parse_config('[proxy]\naddr = "127.0.0.1:6000"\n')
    changed = parse_config(
        '[proxy]\naddr = "127.0.0.1:6001"\n'
        '[api]\naddr = "127.0.0.1:1"\n[log]\nlevel = "debug"\nencoder = "json"\n'
        '[log.log-file]\nmax-days = 9\n'
        '[security.server-tls]\nmin-tls-version = "1.3"\n')
    assert offline_changes(running, changed) == [
        "proxy.addr", "api.addr", "log.encoder", "log.log-file"]  # log.level is online


def test_online_changes_are_not_offline() -> None:
    running = parse_config("")
    changed = parse_config(
        '[proxy]\nbackend-addrs = ["127.0.0.1:3306"]\nmax-connections = 5\n'
        'fail-backend-list = ["127.0.0.1:3306"]\ngraceful-wait-before-shutdown = 3\n'
        'graceful-close-conn-timeout = 5\n'
        '[proxy.frontend-keepalive]\nidle = "5s"\n'
        '[api]\nauth-token-file = "/t"\n'
        '[security]\nusers-file = "/u"\nauth-sync-user = "a"\n'
        '[balance]\npolicy = "connection"\n[health]\ninterval = "1s"\n[labels]\nzone = "z"\n')
    assert offline_changes(running, changed) == []
    check_offline_keys(running, changed)


def test_check_offline_keys_says_restart() -> None:
    with pytest.raises(ConfigError) as info:
        check_offline_keys(parse_config(""), parse_config('[proxy]\naddr = "0.0.0.0:7000"\n'))
    assert str(info.value) == "proxy.addr: cannot change while the proxy runs (restart it)"


def test_the_proxy_refuses_to_start_with_an_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[security]\nusers-file = "/dev/zero"\n')
    assert server_main(["--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        "tiproxy: invalid config: security.users-file: not a regular file\n")
