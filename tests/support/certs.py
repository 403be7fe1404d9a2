"""Certificates for the TLS tests: a CA, server and client certificates signed by it, and a
second CA that signed nothing the servers use (for "wrong CA" tests). Written as PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiproxy.tls.autocert import Issued, issue

_KEY_SIZE = 2048  # fast to make; the tests check behaviour, not key strength


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA every server and client certificate below is signed by
    other_ca: Path  # a CA that signed none of them
    server: CertFiles  # for 127.0.0.1 and localhost: the proxy's and MariaDB's
    client: CertFiles  # CN "app-client"
    other_client: CertFiles  # CN "intruder", signed by the same CA
    untrusted_client: CertFiles  # CN "app-client", signed by other_ca
    ca_issued: Issued

    def issue_server(self, directory: Path, name: str, lifetime: float = 3600.0) -> CertFiles:
        """One more server certificate from the same CA (rotation tests)."""
        return _write(directory, name, issue("localhost", key_size=_KEY_SIZE,
                                             issuer=self.ca_issued, lifetime=lifetime))


def _write(directory: Path, name: str, issued: Issued) -> CertFiles:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    return CertFiles(cert, key)


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca = issue("tiproxy test CA", key_size=_KEY_SIZE, is_ca=True)
    other = issue("another CA", key_size=_KEY_SIZE, is_ca=True)
    ca_files = _write(directory, "ca", ca)
    other_files = _write(directory, "other-ca", other)
    return PKI(
        ca=ca_files.cert,
        other_ca=other_files.cert,
        server=_write(directory, "server", issue("localhost", key_size=_KEY_SIZE, issuer=ca)),
        client=_write(directory, "client", issue("app-client", key_size=_KEY_SIZE, issuer=ca)),
        other_client=_write(directory, "intruder",
                            issue("intruder", key_size=_KEY_SIZE, issuer=ca)),
        untrusted_client=_write(directory, "untrusted",
                                issue("app-client", key_size=_KEY_SIZE, issuer=other)),
        ca_issued=ca,
    )


def mariadb_tls_args(pki: PKI) -> tuple[str, ...]:
    """mariadbd options for TLS with the test CA's server certificate."""
    return (f"--ssl-ca={pki.ca}", f"--ssl-cert={pki.server.cert}", f"--ssl-key={pki.server.key}")
