from collections.abc import Callable, Iterable
from typing import Any

SESSION_FIELDS: tuple[str, ...]

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
