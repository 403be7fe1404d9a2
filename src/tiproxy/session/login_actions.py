"""What the login state machine (session/login.py) asks its driver to do, and what it hands on.

`Login` is fed packets and returns a list of these actions; the driver (net/login_phase.py,
net/login_route.py) carries them out in order: bytes to either leg, a TLS upgrade of either leg,
routing the client to a backend, trying another backend, and the end of the login either way.
`Established` carries what the session keeps of the login; `PoolKey` what a kept backend
connection must share with a later login to serve it (net/pool.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SendClient:
    data: bytes


@dataclass(frozen=True)
class SendBackend:
    data: bytes


@dataclass(frozen=True)
class StartClientTLS:
    pass


@dataclass(frozen=True)
class StartBackendTLS:
    pass


@dataclass(frozen=True)
class BackendUnfit:
    reason: str  # this backend cannot serve this client (TLS, MariaDB capabilities): try another


@dataclass(frozen=True)
class Route:
    user: str
    database: str | None


@dataclass(frozen=True)
class Established:
    client_capabilities: int  # what the client leg negotiated (COMPRESS among them)
    backend_capabilities: int  # what the backend leg negotiated
    status: int
    backend_connection_id: int
    user: str
    mariadb_capabilities: int = 0  # MariaDB's extended capabilities of both legs
    # The backend's OK that ended the login (payload), for net/pool.py: the client got it.
    ok: bytes = field(default=b"", compare=False)


@dataclass(frozen=True)
class PoolKey:
    """What a kept backend connection must share with a login to serve it (net/pool.py)."""

    user: str
    database: bytes | None
    capabilities: int  # the client's, but those of its own leg (compression, TLS)
    mariadb_capabilities: int
    charset: int


@dataclass(frozen=True)
class Refused:
    reason: str  # for the log; the client already has the backend's ERR


Action = (SendClient | SendBackend | StartClientTLS | StartBackendTLS | BackendUnfit | Route
          | Established | Refused)
