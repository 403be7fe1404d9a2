"""Self-signed certificates for `auto-certs = true`, made with the `cryptography` package.

TiProxy makes one at start when a server TLS object has `auto-certs` and no `cert`, and makes a
new one before the old expires; so does `CertStore` (store.py) with these functions. The key and
certificate are written to a private temporary directory only long enough for OpenSSL to load
them (ssl.SSLContext reads PEM files, not bytes), then removed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

# TiProxy's defaults for auto-certs: a 4096-bit RSA key, valid for 90 days.
DEFAULT_RSA_KEY_SIZE = 4096
DEFAULT_LIFETIME = 90 * 24 * 3600.0
_CLOCK_SKEW = 3600.0  # valid from an hour ago: peers whose clocks lag still accept it


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, PEM-encoded. `key_pem` is a secret: never log it."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)  # never in a repr, so never in a log or a traceback
    not_after: datetime.datetime


def issue(common_name: str, *, key_size: int = DEFAULT_RSA_KEY_SIZE,
          lifetime: float = DEFAULT_LIFETIME, issuer: Issued | None = None,
          is_ca: bool = False, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
          ) -> Issued:
    """A certificate for `common_name`: self-signed, or signed by `issuer` (a CA)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(seconds=lifetime)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    if issuer is None:
        issuer_name, signing_key = subject, key
    else:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert_pem)
        issuer_name = issuer_cert.subject
        loaded = serialization.load_pem_private_key(issuer.key_pem, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise TypeError("the issuer's key must be an RSA key")
        signing_key = loaded
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=_CLOCK_SKEW))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(_names(hosts)),
                                        critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    return Issued(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        not_after,
    )


def _names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def load_into(ctx: ssl.SSLContext, issued: Issued) -> None:
    """ctx.load_cert_chain from PEM bytes, through files that exist only for the call."""
    with tempfile.TemporaryDirectory(prefix="tiproxy-autocert-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(issued.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(issued.key_pem)
        ctx.load_cert_chain(cert_path, key_path)
