"""`tiproxy --config-info json`: every config key with its type, default and reloadability.

TiProxy prints this (lib/config/output.go) for the tools that deploy it: a JSON object with
`Component`, `Version` and `Parameters`, one parameter per leaf key, named by its dotted TOML
key, with `type` (bool, int, float, string, or json for lists and tables), `default_value` and
`hot_reloadable`. A list's default is given as a list of its items written as TOML literals
("\"a\"") and a table's as an object of them, as TiProxy gives them. A key is hot reloadable
when a reload may change it (model.py's `online`, and that of every section above it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from tiproxy import __version__
from tiproxy.config.fields import ENCODE, ONLINE
from tiproxy.config.model import OFFLINE_SECTIONS, Config

COMPONENT = "TiProxy Server"  # TiProxy's name for it: tools read this field


class ConfigInfoError(ValueError):
    """An output format other than json."""


def config_info(output_format: str) -> str:
    if output_format.lower() != "json":
        raise ConfigInfoError(f"{output_format!r}: only json is supported")
    info = {"Component": COMPONENT, "Version": __version__, "Parameters": parameters(Config())}
    return json.dumps(info, indent=4)


def parameters(section: object, path: str = "", online: bool = True) -> list[dict[str, Any]]:
    """One entry per leaf key of a config dataclass, in the order model.py declares them."""
    out: list[dict[str, Any]] = []
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        key = f"{path}.{f.name.replace('_', '-')}" if path else f.name.replace("_", "-")
        value = getattr(section, f.name)
        reloadable = online and f.metadata.get(ONLINE, True)
        if dataclasses.is_dataclass(value) and f.metadata.get(ENCODE) is None:
            out += parameters(value, key, reloadable and type(value) not in OFFLINE_SECTIONS)
            continue
        encode = f.metadata.get(ENCODE)
        shown = encode(value) if encode is not None else value
        kind, default = _typed(shown)
        out.append({"key": key, "type": kind, "default_value": default,
                    "hot_reloadable": bool(reloadable)})
    return out


def _typed(value: object) -> tuple[str, object]:
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, int):
        return "int", value
    if isinstance(value, float):
        return "float", value
    if isinstance(value, str):
        return "string", value
    if isinstance(value, list | tuple):
        return "json", [_literal(item) for item in value]
    if isinstance(value, Mapping):
        return "json", {str(k): _literal(v) for k, v in value.items()}
    raise TypeError(f"config value of unsupported type {type(value).__name__}")  # a model bug


def _literal(value: object) -> str:
    """An item as TiProxy writes it: strings quoted, numbers and booleans as they are."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # a table inside a table (labels)
