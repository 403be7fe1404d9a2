"""The capture directory, laid out as TiProxy lays it out (pkg/sqlreplay/store).

- `traffic-<local time>.log`, or `.log.gz` when compressed: the time the file was closed, in
  Go's layout "2006-01-02T15-04-05.999" (milliseconds, trailing zeros dropped), so that files
  sort by it. A file is closed, and the next one begun, once it holds 300 MiB of commands
  (counted before compression); a command never spans two files.
- Each file is gzip(IV || AES-256-CTR(commands)) when both are on: encryption inside the
  compression, as TiProxy's writer stacks them, with a random 16-byte IV per file; the key is
  the first 32 bytes of the file `[security] encryption-key-path` names. gzip runs at its
  fastest level: it shares the machine with the data path, and commands shrink to a tenth
  even so.
- `meta`: JSON written when the capture ends: {"Version": "v1", "Duration": nanoseconds,
  "Cmds", "FilteredCmds", "EncryptMethod"} (TiProxy's fields; ours, "DroppedCmds", is ignored by
  its reader). A directory that has one is refused for a new capture.
A file being written is `.traffic-partial` until it is complete, so a reader never takes half of
one. Directories and files are created for the proxy's user only (0700, 0600): captures hold
the application's data.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import stat
import zlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, BinaryIO

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tiproxy.config.files import (
    KEY_FILE_LIMIT,
    FileRefusedError,
    open_regular_file,
    read_small_file,
)

FILE_PREFIX, FILE_SUFFIX, GZ_SUFFIX = "traffic-", ".log", ".gz"
PARTIAL = ".traffic-partial"
META = "meta"
FILE_SIZE = 300 * 1024 * 1024
ENCRYPT_PLAIN, ENCRYPT_AES = "plaintext", "aes256-ctr"
KEY_SIZE, IV_SIZE = 32, 16
META_LIMIT = 64 * 1024
_NAME_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d)-(\d\d)-(\d\d)(?:\.(\d{1,3}))?")
_READ_CHUNK = 1024 * 1024


class StoreError(Exception):
    """A capture directory, file or key the proxy cannot use; the message says why."""


# -- keys and directories -----------------------------------------------------------------------


def encrypt_method(method: str) -> str:
    """The method by TiProxy's names ("" and "plaintext": none); StoreError if unknown."""
    method = method.strip().lower()
    if method in ("", ENCRYPT_PLAIN):
        return ""
    if method != ENCRYPT_AES:
        raise StoreError(f"unsupported encrypt method: {method}")
    return method


def load_key(method: str, path: str) -> bytes | None:
    """The AES key for `method` from the key file (blocking: call it in a thread). The key's
    bytes never appear in a message."""
    if not encrypt_method(method):
        return None
    if not path:
        raise StoreError("security.encryption-key-path is not set")
    try:
        key = read_small_file(path, KEY_FILE_LIMIT)
    except FileRefusedError as e:
        raise StoreError(f"security.encryption-key-path: {e}") from None
    if len(key) < KEY_SIZE:
        raise StoreError(f"invalid aes-256 key length: {len(key)}, expecting {KEY_SIZE}")
    return key[:KEY_SIZE]


def _local_dir(path: str, what: str) -> Path:
    if not path:
        raise StoreError(f"{what} is required")
    if "://" in path:
        raise StoreError(f"{what} {path}: only a local directory is supported (no "
                         "external storage)")
    return Path(path)


def prepare_output(path: str) -> Path:
    """The directory a capture writes to, created if missing; refused if it is not a
    directory or already holds a capture (its `meta`)."""
    out = _local_dir(path, "output")
    try:
        if not out.exists():
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not stat.S_ISDIR(out.stat().st_mode):
            raise StoreError(f"output {path}: not a directory")
        if (out / META).exists() or (out / META).is_symlink():
            raise StoreError(f"file {META} already exists, please remove it before capture")
        partial = out / PARTIAL
        if partial.is_symlink() or (partial.exists() and not partial.is_file()):
            raise StoreError(f"output {path}: {PARTIAL} is not a regular file")
        if not os.access(out, os.W_OK | os.X_OK):
            raise StoreError(f"output {path}: not writable")
    except OSError as e:
        raise StoreError(f"output {path}: {e.strerror or e}") from None
    return out


def input_dir(path: str) -> Path:
    where = _local_dir(path, "input")
    try:
        if not stat.S_ISDIR(where.stat().st_mode):
            raise StoreError(f"input {path}: not a directory")
    except OSError as e:
        raise StoreError(f"input {path}: {e.strerror or e}") from None
    return where


def write_meta(directory: Path, *, duration_ns: int, cmds: int, filtered: int, method: str,
               dropped: int) -> None:
    meta: dict[str, Any] = {"Version": "v1", "Duration": duration_ns, "Cmds": cmds}
    if filtered:
        meta["FilteredCmds"] = filtered
    if method:
        meta["EncryptMethod"] = method
    if dropped:
        meta["DroppedCmds"] = dropped
    fd = os.open(directory / META, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f)


def read_meta(directory: Path) -> dict[str, Any]:
    """The capture's meta; {} when there is none (TiProxy replays without one too)."""
    try:
        data = read_small_file(directory / META, META_LIMIT)
    except FileRefusedError:
        return {}
    try:
        meta = json.loads(data)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


# -- writing --------------------------------------------------------------------------------------


class CaptureFiles:
    """Writes whole commands into rotated, compressed and encrypted files (blocking)."""

    def __init__(self, directory: Path, compress: bool, key: bytes | None,
                 file_size: int = FILE_SIZE) -> None:
        self.directory = directory
        self.compress = compress
        self.key = key
        self.file_size = file_size
        self.files: list[str] = []  # names of the complete files, in order
        self._raw: BinaryIO | None = None
        self._out: IO[bytes] | None = None
        self._encrypt: Any = None
        self._size = 0
        self._last_name = ""

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._out is None:
            self._open()
        assert self._out is not None
        self._out.write(self._encrypt.update(data) if self._encrypt is not None else data)
        self._size += len(data)
        if self._size >= self.file_size:
            self._close_file()

    def close(self) -> None:
        if self._out is not None:
            self._close_file()

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        raw = os.fdopen(os.open(self.directory / PARTIAL, flags, 0o600), "wb")
        self._raw = raw
        out: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) \
            if self.compress else raw  # type: ignore[assignment]
        self._out = out
        self._encrypt = None
        if self.key is not None:
            iv = os.urandom(IV_SIZE)
            self._encrypt = Cipher(algorithms.AES(self.key), modes.CTR(iv)).encryptor()
            out.write(iv)
        self._size = 0

    def _close_file(self) -> None:
        assert self._out is not None and self._raw is not None
        self._out.close()
        self._raw.close()
        self._out = self._raw = None
        partial = self.directory / PARTIAL
        name = self._next_name(datetime.now())
        while True:
            try:
                os.link(partial, self.directory / name)
                break
            except FileExistsError:  # a file of another capture: the next millisecond
                name = self._next_name(None)
        partial.unlink()
        self.files.append(name)

    def _next_name(self, now: datetime | None) -> str:
        """traffic-<time>.log[.gz], always later than the name before (by a millisecond if the
        clock says otherwise)."""
        last = stamp_ns(self._last_name) if self._last_name else None
        stamp = file_stamp(now) if now is not None else ""
        ns = stamp_ns(stamp) if stamp else None
        if ns is None or (last is not None and ns <= last):
            base = datetime.fromtimestamp(last / 1e9) if last is not None else datetime.now()
            stamp = file_stamp(base + timedelta(milliseconds=1))
        self._last_name = stamp
        return FILE_PREFIX + stamp + FILE_SUFFIX + (GZ_SUFFIX if self.compress else "")


def file_stamp(moment: datetime) -> str:
    """Go's "2006-01-02T15-04-05.999" of a local time."""
    text = moment.strftime("%Y-%m-%dT%H-%M-%S")
    millis = f"{moment.microsecond // 1000:03d}".rstrip("0")
    return text + ("." + millis if millis else "")


def stamp_ns(stamp: str) -> int | None:
    """Nanoseconds since the epoch of a file name's local time, None if it is not one."""
    m = _NAME_TIME.fullmatch(stamp)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    try:
        moment = datetime(year, month, day, hour, minute, second)  # local, as Go names them
    except ValueError:
        return None
    millis = int((m.group(7) or "0").ljust(3, "0"))
    return int(moment.timestamp()) * 1_000_000_000 + millis * 1_000_000


# -- reading --------------------------------------------------------------------------------------


def traffic_files(directory: Path) -> list[tuple[int, str]]:
    """(time, name) of the directory's traffic files in time order; other names are skipped."""
    found = []
    for name in os.listdir(directory):
        if not name.startswith(FILE_PREFIX):
            continue
        stem = name[len(FILE_PREFIX):]
        stem = stem.removesuffix(GZ_SUFFIX)
        if not stem.endswith(FILE_SUFFIX):
            continue
        ns = stamp_ns(stem[: -len(FILE_SUFFIX)])
        if ns is not None:
            found.append((ns, name))
    return sorted(found)


class _Plain(io.RawIOBase):
    """One traffic file's commands: decompressed, then decrypted."""

    def __init__(self, raw: BinaryIO, compressed: bool, key: bytes | None, name: str) -> None:
        self._raw = raw
        self._src: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed \
            else raw  # type: ignore[assignment]
        self._decrypt: Any = None
        if key is not None:
            iv = self._src.read(IV_SIZE)
            if len(iv) != IV_SIZE:
                raise StoreError(f"{name}: too short for an encrypted file")
            self._decrypt = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._src.read(min(len(buffer), _READ_CHUNK))
        if self._decrypt is not None and data:
            data = self._decrypt.update(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._src.close()
        self._raw.close()
        super().close()


class TrafficReader:
    """The directory's traffic files read as one stream, in time order (format.Source).
    Blocking: the replay calls it from a thread. Raises StoreError for a file it cannot read
    (a gzip or I/O error names the file)."""

    def __init__(self, directory: Path, key: bytes | None, since_ns: int | None = None) -> None:
        self._directory = directory
        self._key = key
        # Files closed before `since_ns` hold only earlier commands: skipped, as TiProxy does.
        self._names = [name for ns, name in traffic_files(directory)
                       if since_ns is None or ns > since_ns]
        self._current: io.BufferedReader | None = None
        self._name = ""
        self._line = 1

    def position(self) -> str:
        return f"{self._name or self._directory}, line {self._line}"

    def readline(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < limit:
            part = self._call(lambda f, want=limit - size: f.readline(want))
            if part is None:
                break
            parts.append(part)
            size += len(part)
            if part.endswith(b"\n"):
                self._line += 1
                break
        return b"".join(parts)

    def read(self, size: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < size:
            part = self._call(lambda f, want=size - got: f.read(want))
            if part is None:
                break
            parts.append(part)
            got += len(part)
            self._line += part.count(b"\n")
        return b"".join(parts)

    def _call(self, op: Any) -> bytes | None:
        """op(current file), moving to the next file at the end of one; None at the end."""
        while True:
            if self._current is None and not self._next_file():
                return None
            assert self._current is not None
            try:
                part: bytes = op(self._current)
            except (OSError, EOFError, zlib.error) as e:
                self._current.close()  # the next call goes on with the next file
                self._current = None
                raise StoreError(f"{self._name}: {e}") from None
            if part:
                return part
            self._current.close()
            self._current = None

    def _next_file(self) -> bool:
        if not self._names:
            return False
        self._name = self._names.pop(0)
        self._line = 1
        try:
            raw = open_regular_file(self._directory / self._name)
        except FileRefusedError as e:
            raise StoreError(f"{self._name}: {e}") from None
        try:
            plain = _Plain(raw, self._name.endswith(GZ_SUFFIX), self._key, self._name)
        except (OSError, EOFError, zlib.error) as e:
            raw.close()
            raise StoreError(f"{self._name}: {e}") from None
        self._current = io.BufferedReader(plain, _READ_CHUNK)
        return True

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
