"""`[log]`: the encoders and the rotated log file, on real files."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiproxy.config import parse_config
from tiproxy.logs import RotatingLogFile, apply_level, setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_encoder_and_level_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    cfg = parse_config(f'[log]\nlevel = "warn"\nencoder = "json"\n'
                       f'[log.log-file]\nfilename = "{path}"\n')
    setup_logging(cfg.log)
    logging.getLogger("tiproxy.test").info("not shown")
    logging.getLogger("tiproxy.test").warning("shown %d", 1)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["level"], record["logger"], record["message"]) == (
        "WARNING", "tiproxy.test", "shown 1")


def _write_mb(megabytes: float) -> None:
    line = "x" * 1000
    for _ in range(int(megabytes * 1000)):
        logging.getLogger("tiproxy.test").info(line)


def _backups(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "proxy.log")


def test_log_file_rotates_at_max_size_and_keeps_max_backups(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    cfg = parse_config(f'[log.log-file]\nfilename = "{path}"\nmax-size = 1\nmax-backups = 2\n')
    setup_logging(cfg.log)
    _write_mb(3.5)  # three rotations at 1 MB: the oldest backup is gone
    backups = _backups(tmp_path)
    assert len(backups) == 2, backups
    # lumberjack's names, as TiProxy's: proxy-2024-05-01T10-20-30.000.log
    assert all(re.fullmatch(r"proxy-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{3}\.log", b)
               for b in backups), backups
    assert all(p.stat().st_size <= 1024 * 1024 + 2000 for p in tmp_path.iterdir())
    assert path.stat().st_size < 1024 * 1024  # the current file started again


def test_max_backups_0_keeps_every_backup(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    cfg = parse_config(f'[log.log-file]\nfilename = "{path}"\nmax-size = 1\nmax-backups = 0\n'
                       "max-days = 0\n")
    setup_logging(cfg.log)
    _write_mb(3.5)
    assert len(_backups(tmp_path)) == 3


def test_backups_older_than_max_days_go_at_the_next_rotation(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    old = tmp_path / "proxy-2001-02-03T04-05-06.789.log"  # a backup from long ago
    old.write_text("old\n")
    unrelated = tmp_path / "proxy-notes.log"  # not a backup's name: left alone
    unrelated.write_text("mine\n")
    cfg = parse_config(f'[log.log-file]\nfilename = "{path}"\nmax-size = 1\nmax-backups = 0\n'
                       "max-days = 1\n")
    setup_logging(cfg.log)
    _write_mb(0.5)
    assert old.exists()  # no rotation yet
    _write_mb(1)
    assert not old.exists()
    assert unrelated.exists()
    assert len(_backups(tmp_path)) == 2  # the new backup and proxy-notes.log


def test_max_size_0_is_tiproxys_default(tmp_path: Path) -> None:
    cfg = parse_config(f'[log.log-file]\nfilename = "{tmp_path / "p.log"}"\nmax-size = 0\n')
    setup_logging(cfg.log)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, RotatingLogFile)
    assert handler.maxBytes == 300 * 1024 * 1024


def test_the_level_follows_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    cfg = parse_config(f'[log]\nlevel = "WARN"\n[log.log-file]\nfilename = "{path}"\n')
    setup_logging(cfg.log)
    logging.getLogger("tiproxy.test").info("hidden")
    apply_level(parse_config('[log]\nlevel = "debug"\n').log)
    logging.getLogger("tiproxy.test").debug("shown")
    assert path.read_text().count("\n") == 1 and "shown" in path.read_text()
