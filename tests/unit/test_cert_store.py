"""CertStore: contexts built from the config, rebuilt when files or the config change, the old
one kept when a new file does not load. Real files and real OpenSSL, no sockets."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from support.certs import make_pki
from tiproxy.config import parse_config
from tiproxy.tls import CertStore, TLSLoadError


def _check_all(store: CertStore) -> None:
    async def run() -> None:
        for slot in store._slots.values():
            await store._check(slot)

    asyncio.run(run())


def test_turning_auto_certs_on_by_reload_builds_a_context() -> None:
    store = CertStore(parse_config(""))
    assert store.server is None and store.sql is None and store.http is None
    store.reconfigure(parse_config("[security.server-tls]\nauto-certs = true\n"
                                   "rsa-key-size = 2048\n"))
    _check_all(store)
    assert store.server is not None


def test_a_bad_file_keeps_the_old_context_and_is_counted(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    cert = tmp_path / "cert.pem"
    cert.write_bytes(pki.server.cert.read_bytes())
    store = CertStore(parse_config(f'[security.server-tls]\ncert = "{cert}"\n'
                                   f'key = "{pki.server.key}"\n'))
    good = store.server
    assert good is not None
    cert.write_text("not a certificate\n")
    with caplog.at_level(logging.ERROR, logger="tiproxy.tls"):
        _check_all(store)
    assert store.server is good
    assert store.errors["load_cert"] == 1
    assert "not reloaded" in caplog.text and str(cert) in caplog.text


def test_a_file_that_does_not_load_refuses_the_start(tmp_path: Path) -> None:
    with pytest.raises(TLSLoadError, match=r"security.sql-tls: .*not a regular file"):
        CertStore(parse_config(f'[security.sql-tls]\nca = "{tmp_path}"\n'))
