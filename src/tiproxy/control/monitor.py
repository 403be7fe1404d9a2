"""The control process's clock monitor, as TiProxy's: is the wall clock going forward, and is
the event loop running on time.

Once a second it reads the wall clock. A reading earlier than the last one (an NTP step back, a
virtual machine restored) is logged and counted in tiproxy_monitor_time_jump_back_total: the
proxy's own timings use the monotonic clock, but logs, certificates' validity and TiDB's session
tokens do not. Every fifth round without a jump counts in tiproxy_monitor_keep_alive_total: a
heartbeat that comes less often when the control process's event loop runs late.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("tiproxy.server")

INTERVAL = 1.0
ROUNDS_PER_KEEP_ALIVE = 5


class ClockMonitor:
    def __init__(self) -> None:
        self.time_jump_back = 0
        self.keep_alive = 0
        self._rounds = 0
        self._last = time.time()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            self.look(time.time())

    def look(self, now: float) -> None:
        """One round: `now` is the wall clock's reading."""
        if now < self._last:
            self.time_jump_back += 1
            log.warning("the system clock went back by %.3fs", self._last - now)
        else:
            self._rounds += 1
            if self._rounds >= ROUNDS_PER_KEEP_ALIVE:
                self._rounds = 0
                self.keep_alive += 1
        self._last = now
