from collections.abc import Callable, Iterable
from typing import Any

DICT_FIELDS: dict[str, tuple[str, ...]]
TRACKER_PHASES: tuple[int, int, int]  # responses.py's IDLE, FIRST, SINGLE, as the C knows them

def command(session: Any, data: bytes, /) -> bool: ...
def response(session: Any, data: bytes, /) -> bool: ...
def configure(
    command_phase: int,
    plans: dict[int, tuple[Any, int, int]],
    state_first_bytes: Iterable[int],
    letters: Iterable[int],
    state_prefixes: frozenset[bytes],
    compound_first_bytes: Iterable[int],
    compound_match: Callable[..., Any],
    tracker_class: type,
    counts_class: type,
    histogram_class: type,
    /,
) -> None: ...

def setsockopts(fd: int, options: tuple[tuple[int, int, int], ...], /) -> None: ...

class Feed:
    def __init__(
        self, fast: Callable[[Any, bytes], bool], session: Any,
        fallback: Callable[[bytes], object], /,
    ) -> None: ...
    def __call__(self, data: bytes, /) -> None: ...

class DirectLeg:
    """The loop's reader callback for one socket of a steady session (net/_direct.c)."""

    def __init__(self, session: Any, fd: int, backend: bool, peer_fd: int, peer: Any,
                 tls: object = None, peer_tls: object = None, peer_raw: Any = None, /
                 ) -> None: ...
    def __call__(self) -> None: ...

def tls_quiet(sslobj: object, /) -> bool:
    """Whether a DirectLeg may drive this TLS connection (ssl.SSLObject's _sslobj) now."""
