"""What a running proxy accepts as its next config, whether it comes by PUT or by SIGHUP.

A new config is refused, with the dotted key and the reason, when it changes a key the running
proxy does not re-read (it would look applied and not be), or when a file it names is not one
the proxy can read (a FIFO, /dev/zero, a file past its size limit: see files.py). The files are
read in a thread, so a bad path costs the event loop nothing.
"""

from __future__ import annotations

import asyncio

from tiproxy.config.files import check_config_files
from tiproxy.config.load import ConfigError, offline_changes
from tiproxy.config.model import Config

OFFLINE_REASON = "cannot change while the proxy runs (restart it)"


def check_offline_keys(running: Config, new: Config) -> None:
    """ConfigError naming every key that `new` changes but the running proxy cannot."""
    keys = offline_changes(running, new)
    if keys:
        raise ConfigError(", ".join(keys), OFFLINE_REASON)


async def check_reload(running: Config, new: Config) -> None:
    """ConfigError unless `new` may replace `running` in the running proxy."""
    check_offline_keys(running, new)
    await asyncio.to_thread(check_config_files, new, running)
