"""The process's logging from `[log]`: level, encoder (tidb, json, console) and log-file.

`log-file.filename` sends the log to that file instead of stderr, rotated when it reaches
`max-size` MB; `max-backups` rotated files are kept, and rotated files older than `max-days`
days are removed at each rotation (0: no limit), as TiProxy's lumberjack logger does.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from pathlib import Path

from tiproxy.config.model import LogConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR, "panic": logging.CRITICAL}
_TEXT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"
_CONSOLE = "%(asctime)s %(levelname)-5s %(name)s %(message)s"


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _AgedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    def __init__(self, path: str, max_bytes: int, backups: int, max_days: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._max_age = max_days * 86400.0

    def doRollover(self) -> None:  # noqa: N802 - logging's name
        super().doRollover()
        if not self._max_age:
            return
        base = Path(self.baseFilename)
        cutoff = time.time() - self._max_age
        for old in base.parent.glob(base.name + ".*"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                continue


def setup_logging(cfg: LogConfig | str) -> None:
    """Configure the root logger from `[log]` (or just a level name, for the playground)."""
    log_cfg = LogConfig(level=cfg) if isinstance(cfg, str) else cfg
    handler: logging.Handler
    file = log_cfg.log_file
    if file.filename:
        handler = _AgedRotatingFileHandler(file.filename, file.max_size * 1024 * 1024,
                                           file.max_backups, file.max_days)
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
    root.setLevel(level_of(log_cfg))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def level_of(cfg: LogConfig) -> int:
    return _LEVELS.get(cfg.level, logging.INFO)
