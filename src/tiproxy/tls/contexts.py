"""ssl.SSLContext objects from `[security]` TLS objects, by TiProxy's rules.

A server object (`server-tls`, for clients of the SQL port) is on when it has `cert`, or
`auto-certs`; with `ca`, client certificates are verified and required unless `skip-ca` (then
verified when given); `cert-allowed-cn` is checked after the handshake (`peer_cn_allowed`).
A client object (`sql-tls`, for the backends) is on when it has `ca` (the backend's certificate
is verified, and its name: the backend's host) or `skip-ca` (encrypted, not verified); `cert`
and `key` are then a client certificate. Anything else means no TLS: `None`.

Building reads files, so callers off the event loop run it in a thread (store.py does). Each file
is read once, and OpenSSL loads those bytes (through a memfd), not the path again: the context is
exactly what the bytes kept in `Built.files` say, and a worker process given the same bytes
builds the same context (workers/messages.py), however the files change meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from tiproxy.config.model import TLSConfig
from tiproxy.tls.autocert import DEFAULT_LIFETIME, DEFAULT_RSA_KEY_SIZE, Issued, issue, load_into

# A PEM certificate chain or key is a few KiB; a bound keeps a path such as /dev/zero from
# making OpenSSL read without end.
MAX_PEM_BYTES = 1 << 20

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


class TLSLoadError(Exception):
    """A TLS object could not be built; the message names the file and the reason."""


@dataclass(frozen=True)
class Built:
    """One built context and what the store needs to know about it."""

    context: ssl.SSLContext
    not_after: datetime.datetime | None  # the served certificate's expiry, if one is served
    auto: Issued | None = None  # the generated certificate, with auto-certs
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # holds a key: secret


class LeanSSLObject(ssl.SSLObject):
    """ssl.SSLObject whose read, write and pending are the C methods themselves.

    The event loop's TLS protocol calls them for every record; the standard class forwards
    each call through a Python method, which on this proxy's hot path cost more than the
    encryption (profiled under sysbench with TLS on both legs). Same signatures, same errors.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> LeanSSLObject:
        obj: LeanSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        inner = obj._sslobj  # type: ignore[attr-defined]
        obj.read = inner.read  # type: ignore[method-assign]
        obj.write = inner.write  # type: ignore[method-assign]
        obj.pending = inner.pending  # type: ignore[method-assign]
        return obj


def _context(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.sslobject_class = LeanSSLObject
    return ctx


def server_enabled(cfg: TLSConfig) -> bool:
    return bool(cfg.cert) or cfg.auto_certs


def client_enabled(cfg: TLSConfig) -> bool:
    return bool(cfg.ca) or cfg.skip_ca


def check_pem_file(path: str) -> None:
    """Refuse what is not a regular, reasonably small file, before OpenSSL opens it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TLSLoadError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TLSLoadError(f"{path}: not a regular file")
    if st.st_size > MAX_PEM_BYTES:
        raise TLSLoadError(f"{path}: larger than {MAX_PEM_BYTES} bytes")


def read_files(cfg: TLSConfig) -> dict[str, bytes]:
    """Every file the object names, read once and bounded."""
    files: dict[str, bytes] = {}
    for path in (cfg.cert, cfg.key, cfg.ca):
        if not path or path in files:
            continue
        check_pem_file(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PEM_BYTES + 1)
        except OSError as e:
            raise TLSLoadError(f"{path}: {e.strerror}") from None
        if len(data) > MAX_PEM_BYTES:
            raise TLSLoadError(f"{path}: larger than {MAX_PEM_BYTES} bytes")
        files[path] = data
    return files


@contextlib.contextmanager
def _loadable(files: Mapping[str, bytes]) -> Iterator[dict[str, str]]:
    """A path OpenSSL can open for each file's bytes, for the time of the build."""
    fds: list[int] = []
    try:
        paths = {}
        for path, data in files.items():
            fd = os.memfd_create("tiproxy-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
            paths[path] = f"/proc/self/fd/{fd}"
        yield paths
    finally:
        for fd in fds:
            os.close(fd)


def build_server(cfg: TLSConfig, auto: Issued | None = None,
                 files: Mapping[str, bytes] | None = None) -> Built | None:
    """The context for a server object, or None when it is off. `auto` reuses a certificate
    generated before (auto-certs), so that a reload does not make a new key each time; `files`
    are the files' bytes as read before (by another process), else they are read now."""
    if not server_enabled(cfg):
        return None
    files = read_files(cfg) if files is None else files
    ctx = _context(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_tls_version]
    not_after: datetime.datetime | None
    try:
        if cfg.cert:
            _load_chain(ctx, cfg.cert, cfg.key, files)
            not_after = _expiry(files[cfg.cert])
            auto = None
        else:
            if auto is None:
                auto = issue("tiproxy", key_size=cfg.rsa_key_size or DEFAULT_RSA_KEY_SIZE,
                             lifetime=cfg.autocert_expire_duration or DEFAULT_LIFETIME)
            load_into(ctx, auto)
            not_after = auto.not_after
        if cfg.ca:
            _load_ca(ctx, cfg.ca, files)
            ctx.verify_mode = ssl.CERT_OPTIONAL if cfg.skip_ca else ssl.CERT_REQUIRED
    except ssl.SSLError as e:
        raise TLSLoadError(_ssl_reason(e)) from None
    return Built(ctx, not_after, auto, files)


def build_client(cfg: TLSConfig, files: Mapping[str, bytes] | None = None) -> Built | None:
    """The context for a client object, or None when it is off."""
    if not client_enabled(cfg):
        return None
    files = read_files(cfg) if files is None else files
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[cfg.min_tls_version]
    not_after = None
    try:
        if cfg.ca:
            _load_ca(ctx, cfg.ca, files)
        else:  # skip-ca: encrypted, the backend's certificate is not checked
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert:
            _load_chain(ctx, cfg.cert, cfg.key, files)
            not_after = _expiry(files[cfg.cert])
    except ssl.SSLError as e:
        raise TLSLoadError(_ssl_reason(e)) from None
    return Built(ctx, not_after, None, files)


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, files: Mapping[str, bytes]) -> None:
    try:
        with _loadable({cert: files[cert], key: files[key]}) as paths:
            ctx.load_cert_chain(paths[cert], paths[key])
    except ssl.SSLError as e:
        raise TLSLoadError(f"{cert} / {key}: {_ssl_reason(e)}") from None
    except OSError as e:
        raise TLSLoadError(f"{cert} / {key}: {e.strerror}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str, files: Mapping[str, bytes]) -> None:
    try:
        with _loadable({ca: files[ca]}) as paths:
            ctx.load_verify_locations(cafile=paths[ca])
    except ssl.SSLError as e:
        raise TLSLoadError(f"{ca}: {_ssl_reason(e)}") from None
    except OSError as e:
        raise TLSLoadError(f"{ca}: {e.strerror}") from None


def _ssl_reason(e: ssl.SSLError) -> str:
    return e.reason.lower().replace("_", " ") if e.reason else str(e)


def _expiry(pem: bytes) -> datetime.datetime | None:
    try:
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc
    except ValueError:
        return None


def certificate_expiry(path: str) -> datetime.datetime | None:
    """When the first certificate in a PEM file expires (None if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read(MAX_PEM_BYTES))
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc


def peer_cn(peercert: object) -> str | None:
    """The common name in a peer certificate as ssl's getpeercert() gives it."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def peer_cn_allowed(cfg: TLSConfig, peercert: object) -> str | None:
    """None when the peer may go on; else why not (`cert-allowed-cn`)."""
    if not cfg.cert_allowed_cn:
        return None
    cn = peer_cn(peercert)
    if cn is None:
        return "no client certificate, and cert-allowed-cn is set"
    if cn not in cfg.cert_allowed_cn:
        return f"client certificate CN {cn!r} is not in cert-allowed-cn"
    return None


__all__ = ["Built", "TLSLoadError", "build_client", "build_server",
           "certificate_expiry", "check_pem_file", "client_enabled", "peer_cn",
           "peer_cn_allowed", "server_enabled"]
