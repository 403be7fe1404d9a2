"""TLS for the proxy's legs: contexts built from `[security]`, reloaded when files change."""

from tiproxy.tls.contexts import TLSLoadError, peer_cn_allowed
from tiproxy.tls.store import CertStore

__all__ = ["CertStore", "TLSLoadError", "peer_cn_allowed"]
