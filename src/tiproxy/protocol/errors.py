"""Errors of the protocol layer; each says where it came from and what the client may see."""

from __future__ import annotations

import enum


class Origin(enum.Enum):
    """Who caused an error: decides whether the client gets an ERR packet or a closed socket."""

    CLIENT = "client"
    BACKEND = "backend"
    PROXY = "proxy"


class ProtocolError(Exception):
    """Bytes that do not follow the protocol. The session that received them ends."""

    def __init__(self, message: str, origin: Origin = Origin.CLIENT) -> None:
        super().__init__(message)
        self.origin = origin


class BackendRefusedError(ProtocolError):
    """A backend answered a new connection with an ERR packet instead of its greeting (1040:
    too many connections; 1129: host blocked)."""

    def __init__(self, code: int, message: str, sqlstate: str = "HY000") -> None:
        super().__init__(f"backend refused the connection: {code} {message}", Origin.BACKEND)
        self.code = code
        self.message = message  # the server's own words and SQLSTATE, for the client
        self.sqlstate = sqlstate  # (HY000 where it sent none, as a client reads it then)


class SQLError(Exception):
    """An error the client sees as an ERR packet with this code and SQLSTATE."""

    def __init__(
        self, code: int, sqlstate: str, message: str, origin: Origin = Origin.PROXY
    ) -> None:
        super().__init__(message)
        self.code = code
        self.sqlstate = sqlstate
        self.message = message
        self.origin = origin
