"""Write a `Config` back out: as a dict with TOML key names, as TOML text, and as a checksum.

The one place that decides what the outside sees of a config: `redact=True` replaces every field
declared `secret=True` in model.py with a placeholder, and the API only ever asks for that form.
`parse_config(config_to_toml(cfg)) == cfg` holds for every valid config.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import Any

import tomli_w

from tiproxy.config.fields import ENCODE, REDACTED, SECRET
from tiproxy.config.model import Config


def config_to_dict(cfg: Config, *, redact: bool = False) -> dict[str, Any]:
    """The config as nested dicts keyed by TOML names (`max-connections`), every key present."""
    return section_to_dict(cfg, redact=redact)


def config_to_toml(cfg: Config, *, redact: bool = False) -> str:
    """The config as a TOML document that `parse_config` reads back to an equal config."""
    return tomli_w.dumps(config_to_dict(cfg, redact=redact))


def config_checksum(cfg: Config) -> int:
    """A CRC-32 of the config (TiProxy's health endpoint reports one as `config_checksum`).
    Taken over the redacted config: a checksum of a password would let anyone who can read the
    health route test guesses of it offline."""
    return zlib.crc32(config_to_toml(cfg, redact=True).encode())


def section_to_dict(section: object, *, redact: bool) -> dict[str, Any]:
    """Any config dataclass as a dict; public so that redaction can be tested on its own."""
    if not dataclasses.is_dataclass(section) or isinstance(section, type):
        raise TypeError(f"expected a config dataclass instance, got {type(section).__name__}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[f.name.replace("_", "-")] = _encode_field(f, value, redact=redact)
    return out


def _encode_field(f: dataclasses.Field[Any], value: Any, *, redact: bool) -> Any:
    if redact and f.metadata.get(SECRET) and value:
        return REDACTED
    encode = f.metadata.get(ENCODE)
    if encode is not None:
        return encode(value)
    if dataclasses.is_dataclass(value):
        return section_to_dict(value, redact=redact)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value
