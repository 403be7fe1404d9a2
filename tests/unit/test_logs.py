"""`[log]`: the encoders and the rotated log file, on real files."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiproxy.cli.logs import setup_logging
from tiproxy.config import parse_config


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


def test_log_file_rotates_at_max_size_and_keeps_max_backups(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    cfg = parse_config(f'[log.log-file]\nfilename = "{path}"\nmax-size = 1\nmax-backups = 2\n')
    setup_logging(cfg.log)
    line = "x" * 1000
    for _ in range(3500):  # about 3.5 MB: three rotations at 1 MB
        logging.getLogger("tiproxy.test").info(line)
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["proxy.log", "proxy.log.1", "proxy.log.2"]
    assert all(p.stat().st_size <= 1024 * 1024 + 2000 for p in tmp_path.iterdir())
