"""The proxy's TLS contexts, kept current while certificate files change.

Theory of operation
-------------------
`CertStore` builds one context per TLS object in use (`server-tls` for the SQL port, `sql-tls`
towards the backends) when the proxy starts; a file that does not load then refuses the start
with the dotted key. Afterwards `watch()` looks at the files once a second (their inode, size and
mtime; a rename onto the path, as cert-manager and certbot do, counts) and rebuilds, in a thread,
the contexts whose files changed or whose config changed on reload. New handshakes take the new
context; live sessions keep theirs. A rebuild that fails keeps the old context, logs why and
counts `tiproxy_server_err{type="load_cert"}`. A served certificate within 24 hours of its expiry
logs a warning once; an auto-certs certificate is renewed when a tenth of its life is left.
Polling rather than inotify: the standard library has no file watch, and a stat a second per file
costs nothing.

With workers, only the control process watches: each time a context is (re)built it hands the
bytes it was built from (`materials()`) to the workers, whose stores follow (`follow()`), so
every worker serves the same certificate, auto-certs' too, and a file is judged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tiproxy.config.model import Config, TLSConfig
from tiproxy.tls.autocert import Issued
from tiproxy.tls.contexts import Built, TLSLoadError, build_client, build_server

log = logging.getLogger("tiproxy.tls")

POLL_INTERVAL = 1.0
EXPIRY_WARNING = datetime.timedelta(hours=24)
_RENEW_FRACTION = 0.1  # auto-certs: renew when this much of the lifetime is left

Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Material:
    """What one TLS object's context was built from, for another process to build the same."""

    cfg: TLSConfig
    files: Mapping[str, bytes] = field(repr=False)  # path -> content; holds a key: secret
    auto: Issued | None = None


@dataclass
class _Slot:
    """One TLS object: its config, its built context and what its files looked like."""

    key: str  # the dotted config key, for messages
    server_side: bool
    cfg: TLSConfig
    built: Built | None = None
    files: Signature | None = ()  # None: rebuild at the next look (the config changed)
    built_cfg: TLSConfig | None = None  # the config `built` was made from
    renew: bool = False  # auto-certs: the next build makes a new certificate
    warned_expiry: bool = False
    issued_at: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC))

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cfg.cert, self.cfg.key, self.cfg.ca) if p)

    def build(self) -> Built | None:
        if self.server_side:
            same = self.built is not None and self.cfg == self.built_cfg and not self.renew
            keep = self.built.auto if same and self.built is not None else None
            return build_server(self.cfg, auto=keep)
        return build_client(self.cfg)

    def build_from(self, material: Material) -> Built | None:
        if self.server_side:
            return build_server(material.cfg, auto=material.auto, files=material.files)
        return build_client(material.cfg, files=material.files)


def _signature(paths: tuple[str, ...]) -> Signature:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0))
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class CertStore:
    """The TLS contexts in force. Raises TLSLoadError (with the dotted key) when built."""

    def __init__(self, cfg: Config, materials: Mapping[str, Material | None] | None = None,
                 ) -> None:
        """`materials`: a worker's store, built from what the control process's built."""
        self.errors: Counter[str] = Counter()  # tiproxy_server_err by type
        self.changed: Callable[[], None] | None = None  # called after each rebuild
        self._following = materials is not None
        self._slots = {
            "server": _Slot("security.server-tls", True, cfg.security.server_tls),
            "sql": _Slot("security.sql-tls", False, cfg.security.sql_tls),
            "cluster": _Slot("security.cluster-tls", False, cfg.security.cluster_tls),
            "http": _Slot("security.server-http-tls", True, cfg.security.server_http_tls),
        }
        self.require_backend_tls = cfg.security.require_backend_tls
        self._wake = asyncio.Event()
        if materials is not None:
            self.follow(materials)
            return
        for slot in self._slots.values():
            slot.files = _signature(slot.paths())
            try:
                self._install(slot, slot.build())
            except TLSLoadError as e:
                raise TLSLoadError(f"{slot.key}: {e}") from None

    def materials(self) -> dict[str, Material | None]:
        return {name: Material(slot.built_cfg or slot.cfg, slot.built.files, slot.built.auto)
                if slot.built is not None else None for name, slot in self._slots.items()}

    def follow(self, materials: Mapping[str, Material | None]) -> None:
        """Take the contexts another process built (a worker's store)."""
        for name, material in materials.items():
            slot = self._slots[name]
            if material is None:
                self._install(slot, None)
                continue
            slot.cfg = material.cfg
            try:
                self._install(slot, slot.build_from(material))
            except TLSLoadError as e:  # it loaded there: this process's OpenSSL differs
                self.errors["load_cert"] += 1
                log.error("%s: not taken from the control process: %s", slot.key, e)  # noqa: TRY400

    # -- what sessions use --------------------------------------------------------------------

    def _context(self, name: str) -> ssl.SSLContext | None:
        built = self._slots[name].built
        return built.context if built is not None else None

    @property
    def server(self) -> ssl.SSLContext | None:
        """For clients of the SQL port; None: the proxy offers no TLS."""
        return self._context("server")

    @property
    def server_config(self) -> TLSConfig:
        return self._slots["server"].cfg

    @property
    def sql(self) -> ssl.SSLContext | None:
        """Towards the backends; None: `sql-tls` is not configured."""
        return self._context("sql")

    def admin_options(self) -> dict[str, Any]:
        """AdminConnection.open's TLS arguments for the proxy's own connections: with sql-tls
        they always use TLS (they read password hashes; a greeting stripped of CLIENT_SSL on
        the way must not turn that into plaintext)."""
        sql = self.sql
        return {"tls": sql, "require_tls": self.require_backend_tls or sql is not None}

    @property
    def client_certificate_required(self) -> bool:
        """server-tls asks every client for a certificate (ca without skip-ca, or
        cert-allowed-cn): a client that does not use TLS cannot be let in."""
        cfg = self.server_config
        return self.server is not None and ((bool(cfg.ca) and not cfg.skip_ca)
                                            or bool(cfg.cert_allowed_cn))

    @property
    def http(self) -> ssl.SSLContext | None:
        """For the API port; None: plain HTTP only."""
        return self._context("http")

    @property
    def http_config(self) -> TLSConfig:
        return self._slots["http"].cfg

    @property
    def cluster(self) -> ssl.SSLContext | None:
        """Towards etcd (`pd-addrs`) and TiDB's status ports; None: plain HTTP."""
        return self._context("cluster")

    # -- changes --------------------------------------------------------------------------------

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config: changed TLS objects are rebuilt by the watch loop."""
        self.require_backend_tls = cfg.security.require_backend_tls
        if self._following:
            return  # the control process sends what it rebuilt
        for name, new in (("server", cfg.security.server_tls), ("sql", cfg.security.sql_tls),
                          ("cluster", cfg.security.cluster_tls),
                          ("http", cfg.security.server_http_tls)):
            slot = self._slots[name]
            if slot.cfg != new:
                slot.cfg = new
                slot.files = None  # rebuild at the next look, even with no files to watch
        self._wake.set()

    async def watch(self, interval: float = POLL_INTERVAL) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            for slot in self._slots.values():
                await self._check(slot)

    async def _check(self, slot: _Slot) -> None:
        files = await asyncio.to_thread(_signature, slot.paths())
        renew = self._auto_renew_due(slot)
        if files != slot.files or renew:
            slot.files = files
            slot.renew = renew  # a new certificate, not the one kept for reloads
            try:
                built = await asyncio.to_thread(slot.build)
            except TLSLoadError as e:
                self.errors["load_cert"] += 1
                log.error("%s: not reloaded, the previous certificate stays: %s",  # noqa: TRY400
                          slot.key, e)
                return
            self._install(slot, built)
            log.info("%s: %s", slot.key, "loaded" if built is not None else "turned off")
            if self.changed is not None:
                self.changed()
        self._warn_expiry(slot)

    def _install(self, slot: _Slot, built: Built | None) -> None:
        slot.built = built
        slot.built_cfg = slot.cfg
        slot.renew = False
        slot.warned_expiry = False
        slot.issued_at = datetime.datetime.now(datetime.UTC)

    def _auto_renew_due(self, slot: _Slot) -> bool:
        built = slot.built
        if built is None or built.auto is None:
            return False
        left = built.auto.not_after - datetime.datetime.now(datetime.UTC)
        return left < (built.auto.not_after - slot.issued_at) * _RENEW_FRACTION

    def _warn_expiry(self, slot: _Slot, now: Callable[[], datetime.datetime] | None = None) -> None:
        built = slot.built
        if built is None or built.not_after is None or slot.warned_expiry:
            return
        current = (now or (lambda: datetime.datetime.now(datetime.UTC)))()
        if built.not_after - current < EXPIRY_WARNING:
            slot.warned_expiry = True
            log.warning("%s: the certificate expires at %s", slot.key,
                        built.not_after.isoformat(timespec="seconds"))
