"""Typed configuration with TiProxy's TOML keys: the model, loading and checking, and dumping."""

from __future__ import annotations

from tiproxy.config.dump import config_checksum, config_to_dict, config_to_toml
from tiproxy.config.fields import REDACTED
from tiproxy.config.load import ConfigError, load_config, merge_config, parse_config
from tiproxy.config.model import (
    APIConfig,
    BalanceConfig,
    Config,
    LogConfig,
    LogFileConfig,
    ProxyConfig,
    SecurityConfig,
    TLSConfig,
)

__all__ = [
    "REDACTED",
    "APIConfig",
    "BalanceConfig",
    "Config",
    "ConfigError",
    "LogConfig",
    "LogFileConfig",
    "ProxyConfig",
    "SecurityConfig",
    "TLSConfig",
    "config_checksum",
    "config_to_dict",
    "config_to_toml",
    "load_config",
    "merge_config",
    "parse_config",
]
