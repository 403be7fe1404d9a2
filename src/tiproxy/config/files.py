"""Reading the files a config names, and checking them before a config is accepted.

A path in the config may name anything: `/dev/zero` (endless), a FIFO (blocks until a writer
comes), a 5 GB log. `read_small_file` is the one way the proxy reads such a file: it opens
without blocking, looks at what it opened (not at what the path named a moment before), refuses
anything but a regular file, and never reads more than its limit plus one byte. It blocks on
disk I/O like any read, so the event loop calls it through `asyncio.to_thread`.

`CONFIG_FILES` is the one table of the files a config names, with their size limits;
`check_config_files` reads each of them (in the caller's thread) so that a config naming a file
the proxy cannot use is refused with the dotted key before it takes effect.
"""

from __future__ import annotations

import operator
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from tiproxy.config.load import ConfigError
from tiproxy.config.model import Config

KIB = 1024
MIB = 1024 * KIB
USERS_FILE_LIMIT = 16 * MIB  # `user *HEX` lines: 16 MiB holds some 250,000 accounts
TOKEN_FILE_LIMIT = 4 * KIB  # one bearer token
TLS_FILE_LIMIT = 1 * MIB  # a PEM certificate chain, key or CA bundle
CONFIG_FILE_LIMIT = 1 * MIB  # the TOML config itself, when SIGHUP re-reads it
KEY_FILE_LIMIT = 4 * KIB  # TiProxy's encryption key: 32 bytes (and perhaps a newline)

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


class FileRefusedError(ValueError):
    """A file the proxy will not read; the message is the reason, without the path."""


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole content of the regular file at `path`, which must not exceed `limit` bytes.

    A path that is not a regular file is refused before it is opened; as the path may change
    in between, O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer,
    and fstat on the opened descriptor checks again what was actually opened. The size is
    checked before reading and again while reading (files in /proc say they are empty; a file
    may grow), so at most `limit + 1` bytes are ever read.
    """
    try:
        # Not even opened: opening a device may act (a tape rewinds).
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise FileRefusedError("not a regular file")
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise FileRefusedError(f"cannot open: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefusedError("not a regular file")
        if info.st_size > limit:
            raise FileRefusedError(_too_large(limit))
        return _read_at_most(fd, limit)
    except OSError as e:
        raise FileRefusedError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """The regular file at `path` opened for reading, with read_small_file's checks but no
    size limit: for files read as a stream (traffic captures). Raises FileRefusedError."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise FileRefusedError("not a regular file")
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise FileRefusedError(f"cannot open: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefusedError("not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, min(limit + 1 - size, MIB))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise FileRefusedError(_too_large(limit))


def _too_large(limit: int) -> str:
    if limit % MIB == 0:
        return f"larger than {limit // MIB} MiB"
    if limit % KIB == 0:
        return f"larger than {limit // KIB} KiB"
    return f"larger than {limit} bytes"


@dataclass(frozen=True)
class NamedFile:
    """A config key that names a file: its dotted TOML key, how to read it, its size limit."""

    key: str
    path: Callable[[Config], str]
    limit: int


def _named(attribute: str, limit: int) -> NamedFile:
    """A NamedFile for the attribute path "security.server_tls.cert" (key: with dashes)."""
    getter: Callable[[Config], str] = operator.attrgetter(attribute)
    return NamedFile(attribute.replace("_", "-"), getter, limit)


_TLS_OBJECTS = ("server_tls", "server_http_tls", "cluster_tls", "sql_tls")

CONFIG_FILES: tuple[NamedFile, ...] = (
    _named("security.users_file", USERS_FILE_LIMIT),
    _named("api.auth_token_file", TOKEN_FILE_LIMIT),
    _named("security.encryption_key_path", KEY_FILE_LIMIT),
    *(_named(f"security.{obj}.{part}", TLS_FILE_LIMIT)
      for obj in _TLS_OBJECTS for part in ("cert", "key", "ca")),
)


def check_config_files(cfg: Config, running: Config | None = None) -> None:
    """Raise ConfigError(dotted key, reason) for the first file of `cfg` that cannot be read.

    With `running`, only the paths that differ from it are read: the others were checked when
    they were set. Blocks on the files: call it from a thread (or before the loop starts).
    """
    for named in _changed(cfg, running):
        try:
            read_small_file(named.path(cfg), named.limit)
        except FileRefusedError as e:
            raise ConfigError(named.key, str(e)) from None


def _changed(cfg: Config, running: Config | None) -> Iterable[NamedFile]:
    for named in CONFIG_FILES:
        path = named.path(cfg)
        if path and (running is None or named.path(running) != path):
            yield named
