"""Turn TOML text into a checked `Config`, refusing anything unknown, mistyped or out of range.

Theory of operation: a TOML document is decoded onto a base `Config` (the defaults for a file,
the running config for `merge_config`). Each table is matched against the fields of the
dataclass at that place; a key with no field, a value of the wrong type, or a value its field's
check refuses raises `ConfigError` naming the full dotted key. Keys the document does not mention
keep the base's value, so `[proxy.backend-healthy-keepalive] idle = "5s"` keeps the other
keep-alive defaults, as in TiProxy. Nothing is filled in silently for a bad value.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from tiproxy.config.fields import CHECK, DECODE, ONLINE, REDACTED, SECRET
from tiproxy.config.model import OFFLINE_SECTIONS, Config
from tiproxy.config.tables import FrozenMap
from tiproxy.config.values import ItemError

T = TypeVar("T")


class ConfigError(Exception):
    """A config value was refused; `key` is its dotted TOML key ("" for the whole document)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


def load_config(path: str | Path | None) -> Config:
    """The config in the TOML file at `path`; all defaults when `path` is None."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read config file {str(path)!r}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError("", f"config file {str(path)!r} is not UTF-8 text") from e
    return parse_config(text)


def parse_config(text: str) -> Config:
    """The config in a TOML document; keys it leaves out take TiProxy's defaults."""
    return _decode_onto(Config(), _parse_toml(text), "", merging=False)


def merge_config(cfg: Config, partial_toml_text: str) -> Config:
    """`cfg` with the keys of a partial TOML document replaced, checked like a whole file.

    A secret field given as the redaction placeholder keeps its current value, so a config read
    from the API (redacted) can be edited and sent back without erasing passwords.
    """
    return _decode_onto(cfg, _parse_toml(partial_toml_text), "", merging=True)


def offline_changes(running: object, new: object, path: str = "") -> list[str]:
    """The dotted keys whose value differs between two configs (or sections of one) although
    the running proxy does not re-read them (`online=False` in model.py, or a field whose class
    is in OFFLINE_SECTIONS, which counts as one key)."""
    changed: list[str] = []
    for f in dataclasses.fields(running):  # type: ignore[arg-type]
        old_value, new_value = getattr(running, f.name), getattr(new, f.name)
        if old_value == new_value:
            continue
        key = f"{path}.{f.name.replace('_', '-')}" if path else f.name.replace("_", "-")
        if not f.metadata.get(ONLINE, True) or type(old_value) in OFFLINE_SECTIONS:
            changed.append(key)
        elif dataclasses.is_dataclass(old_value):
            changed.extend(offline_changes(old_value, new_value, key))
    return changed


def _parse_toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"invalid TOML: {e}") from e


def _decode_onto(base: T, table: object, path: str, *, merging: bool) -> T:
    """A copy of the dataclass instance `base` with the keys of `table` decoded onto it."""
    if not isinstance(table, dict):
        raise ConfigError(path, f"expected a table, got {_describe(table)}")
    fields = _fields_by_key(type(base))
    changes: dict[str, Any] = {}
    for key, raw in table.items():
        key_path = f"{path}.{key}" if path else key
        f = fields.get(key)
        if f is None:
            raise ConfigError(key_path, _unknown_key_reason(key, raw, fields))
        if merging and f.metadata.get(SECRET) and raw == REDACTED:
            continue
        changes[f.name] = _decode_field(base, f, raw, key_path, merging=merging)
    result = dataclasses.replace(base, **changes)  # type: ignore[type-var]
    _cross_check(result, path)
    return result


def _decode_field(
    base: object, f: dataclasses.Field[Any], raw: object, key_path: str, *, merging: bool
) -> Any:
    tp = _type_hints(type(base))[f.name]
    if dataclasses.is_dataclass(tp):
        return _decode_onto(getattr(base, f.name), raw, key_path, merging=merging)
    decode = f.metadata.get(DECODE)
    check = f.metadata.get(CHECK)
    try:
        value = decode(raw) if decode is not None else _decode_typed(tp, raw)
    except TypeError as e:  # the decoders raise TypeError(what they expected) for a wrong type
        raise ConfigError(key_path, f"expected {e}, got {_describe(raw)}") from None
    except ValueError as e:
        raise _refused(key_path, e) from None
    try:
        if check is not None:
            check(value)
    except ValueError as e:
        raise _refused(key_path, e) from None
    return value


def _refused(key_path: str, e: ValueError) -> ConfigError:
    if isinstance(e, ItemError):
        return ConfigError(key_path + e.where, e.reason)
    return ConfigError(key_path, str(e))


def _decode_typed(tp: Any, raw: object) -> Any:
    """Decode by the annotated type; TypeError(what was expected) when `raw` is another type."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(raw, list):
            raise TypeError("a list of strings")
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                raise ItemError(f"[{i}]", f"expected a string, got {_describe(item)}")
        return tuple(raw)
    if origin is Mapping:
        if not isinstance(raw, dict):
            raise TypeError("a table of strings")
        for key, item in raw.items():
            if not isinstance(item, str):
                raise ItemError(f".{key}", f"expected a string, got {_describe(item)}")
        return FrozenMap(raw)
    return _decode_scalar(tp, raw)


def _decode_scalar(tp: Any, raw: object) -> Any:
    if tp is bool:
        if not isinstance(raw, bool):
            raise TypeError("a boolean (true or false)")
        return raw
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise TypeError("an integer")
        return raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise TypeError("a number")
        return float(raw)
    if tp is str:
        if not isinstance(raw, str):
            raise TypeError("a string")
        return raw
    raise AssertionError(f"config field of unsupported type {tp!r}")  # a bug in model.py


def _cross_check(section: object, path: str) -> None:
    cross_check = getattr(section, "cross_check", None)
    if cross_check is None:
        return
    problem: tuple[str, str] | None = cross_check()
    if problem is not None:
        key, reason = problem
        raise ConfigError(f"{path}.{key}" if path else key, reason)


def _unknown_key_reason(key: str, raw: object, fields: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = "section" if isinstance(raw, dict) else "key"
    return f"unknown {what}{hint}"


def _describe(raw: object) -> str:
    """What a TOML value is, in the user's words: "a string ('100')"."""
    if isinstance(raw, bool):
        return f"a boolean ({str(raw).lower()})"
    if isinstance(raw, int):
        return f"an integer ({raw})"
    if isinstance(raw, float):
        return f"a float ({raw})"
    if isinstance(raw, str):
        return f"a string ({raw!r})"
    if isinstance(raw, list):
        return "a list"
    if isinstance(raw, dict):
        return "a table"
    return f"a {type(raw).__name__}"


# Per config class, filled on first use: bounded by the number of classes in model.py.
_FIELDS_BY_KEY: dict[type, dict[str, dataclasses.Field[Any]]] = {}
_TYPE_HINTS: dict[type, dict[str, Any]] = {}


def _fields_by_key(cls: type) -> dict[str, dataclasses.Field[Any]]:
    found = _FIELDS_BY_KEY.get(cls)
    if found is None:
        found = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        _FIELDS_BY_KEY[cls] = found
    return found


def _type_hints(cls: type) -> dict[str, Any]:
    found = _TYPE_HINTS.get(cls)
    if found is None:
        found = _TYPE_HINTS[cls] = typing.get_type_hints(cls)
    return found
