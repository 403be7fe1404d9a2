"""How a config field is declared: the metadata the loader (load.py) and the dumper (dump.py)
read of each field, the common kinds of field, and a key that is refused until it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tiproxy.config.values import Check, format_duration, non_negative, one_of, parse_duration

# Field metadata keys, read by load.py and dump.py.
CHECK = "check"  # Check: raises ValueError with the reason a value is refused
DECODE = "decode"  # raw TOML value -> attribute value, instead of the type-driven decoding
ENCODE = "encode"  # attribute value -> TOML value, the inverse of DECODE
# True: config_to_dict(redact=True) writes REDACTED instead of the value.
SECRET = "secret"  # noqa: S105 - a metadata key, not a password
# False: the running proxy reads the field only at start, so a reload (PUT /api/admin/config,
# SIGHUP) that changes it is refused by name (load.offline_changes). A dataclass-valued field
# marked offline counts as one key; so does a field whose class is in OFFLINE_SECTIONS.
ONLINE = "online"

REDACTED = "******"


def not_built(section: object, keys: Mapping[str, str]) -> tuple[str, str] | None:
    """(key, "not supported yet: why") for the first of `keys` whose value differs from its
    default: a key the proxy does not act on is refused, never parsed and ignored. The default
    itself passes, so a config written out by the API (every key) can be sent back."""
    default = type(section)()
    for key, why in keys.items():
        attr = key.replace("-", "_")
        if getattr(section, attr) != getattr(default, attr):
            return key, f"not supported yet: {why}"
    return None


def rules(
    *,
    check: Check | None = None,
    decode: Callable[[object], Any] | None = None,
    encode: Callable[[Any], object] | None = None,
    secret: bool = False,
    online: bool = True,
) -> dict[str, Any]:
    """Field metadata telling the loader and the dumper how to treat a field."""
    return {CHECK: check, DECODE: decode, ENCODE: encode, SECRET: secret, ONLINE: online}


def offline(metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`metadata` (or no rules) for a field that cannot change while the proxy runs."""
    return {**(metadata if metadata is not None else rules()), ONLINE: False}


def one_of_rules(*choices: str) -> dict[str, Any]:
    return rules(check=one_of(*choices))


# A duration in seconds, written as a Go duration string ("60s"), which TiProxy also reads.
DURATION = rules(check=non_negative, decode=parse_duration, encode=format_duration)
# A count or a number of seconds: never negative.
COUNT = rules(check=non_negative)
# Migrations per second: never negative, 0 means the router's default.
RATE = COUNT
