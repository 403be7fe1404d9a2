"""The process's logging from `[log]`: level, encoder (tidb, json, console) and log-file.

`log-file.filename` sends the log to that file instead of stderr, rotated as TiProxy's
lumberjack logger rotates it: when the file would pass `max-size` MB (0: TiProxy's 300) it is
renamed to `<name>-<local time>.<ext>` (`proxy-2024-05-01T10-20-30.000.log`) and a new one is
started; of the rotated files the newest `max-backups` are kept (0: all) and those older than
`max-days` days are removed (0: no age limit). `level` may change while the proxy runs
(`apply_level`); the encoder and the file are set up once, at start.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from datetime import datetime
from pathlib import Path

from tiproxy.config.model import LogConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR, "panic": logging.CRITICAL}
_TEXT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"
_CONSOLE = "%(asctime)s %(levelname)-5s %(name)s %(message)s"
DEFAULT_MAX_SIZE_MB = 300  # TiProxy's, for max-size = 0
_STAMP = "%Y-%m-%dT%H-%M-%S"  # lumberjack's backup time format, then ".000" milliseconds


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class RotatingLogFile(logging.handlers.RotatingFileHandler):
    """A log file rotated by size into time-stamped backups, pruned by count and by age."""

    def __init__(self, path: str, max_size_mb: int, backups: int, max_days: int) -> None:
        max_bytes = (max_size_mb or DEFAULT_MAX_SIZE_MB) * 1024 * 1024
        super().__init__(path, maxBytes=max_bytes, encoding="utf-8")
        self.max_backups = backups
        self.max_age = max_days * 86400.0

    def doRollover(self) -> None:  # noqa: N802 - logging's name
        if self.stream:
            self.stream.close()
            self.stream = None  # reopened below, as logging does
        self.rotate(self.baseFilename, self._backup_path(time.time()))
        self.prune(time.time())
        if not self.delay:
            self.stream = self._open()

    def _backup_path(self, now: float) -> str:
        base = Path(self.baseFilename)
        millis = int(now * 1000)
        while True:  # two rotations within one millisecond must not overwrite a backup
            stamp = datetime.fromtimestamp(millis / 1000)
            name = f"{base.stem}-{stamp.strftime(_STAMP)}.{millis % 1000:03d}{base.suffix}"
            path = base.with_name(name)
            if not path.exists():
                return str(path)
            millis += 1

    def backups(self) -> list[tuple[float, Path]]:
        """The rotated files of this log, newest first, with the time in their names."""
        base = Path(self.baseFilename)
        found = []
        for path in base.parent.glob(f"{base.stem}-*{base.suffix}"):
            stamp = path.name[len(base.stem) + 1: len(path.name) - len(base.suffix)]
            try:
                when = datetime.strptime(stamp, _STAMP + ".%f").timestamp()
            except ValueError:
                continue  # not one of ours
            found.append((when, path))
        return sorted(found, reverse=True)

    def prune(self, now: float) -> None:
        for i, (when, path) in enumerate(self.backups()):
            too_many = bool(self.max_backups) and i >= self.max_backups
            too_old = bool(self.max_age) and when < now - self.max_age
            if too_many or too_old:
                try:
                    path.unlink()
                except OSError:
                    continue


def setup_logging(cfg: LogConfig | str) -> None:
    """Configure the root logger from `[log]` (or just a level name, for the playground)."""
    log_cfg = LogConfig(level=cfg) if isinstance(cfg, str) else cfg
    handler: logging.Handler
    file = log_cfg.log_file
    if file.filename:
        handler = RotatingLogFile(file.filename, file.max_size, file.max_backups, file.max_days)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_cfg.encoder == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(_CONSOLE if log_cfg.encoder == "console"
                                               else _TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    apply_level(log_cfg)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def apply_level(cfg: LogConfig) -> None:
    """`[log] level` as the root logger's level: at start, and when a reload changes it."""
    root = logging.getLogger()
    level = level_of(cfg)
    if root.level != level:
        root.setLevel(level)


def level_of(cfg: LogConfig) -> int:
    return _LEVELS.get(cfg.level.lower(), logging.INFO)
