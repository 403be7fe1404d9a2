"""TiProxy's virtual IP: the proxy elected in PD's etcd carries `[ha] virtual-ip`.

Clients connect to one address that always reaches a live proxy. The proxies that set the same
`virtual-ip` campaign for `/tiproxy/vip/<ip>/owner` (TiProxy's key) with their registered
`ip:port` (ha/election.py). With TiProxy's semantics (pkg/manager/vip):
- at start, the address is removed from the interface if this machine has it (a run that died
  left it there), then the proxy campaigns;
- elected, it adds the address to `[ha] interface` (ha/address.py) and sends
  `garp-burst-count` gratuitous ARP packets (0 counts as 1) so that neighbours send to its MAC
  from now on; then the same burst once a second, `garp-refresh-count` times, for devices that
  look later than the moment of the takeover;
- when another proxy leads (it lost its lease, or its etcd was cut off and another was
  elected), it stops announcing and removes the address;
- a clean shutdown gives the address up before anything else (before the listeners close):
  it never adds it again, removes it, then resigns, so the next proxy takes over at once and
  the address is never on two machines because of a shutdown.
A proxy killed outright keeps nothing: its lease expires within its 3 seconds, the next
candidate is elected and announces itself; the address left on the dead proxy's interface is
removed when that proxy starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence

from tiproxy.config.model import HAConfig
from tiproxy.ha.address import AddressError, VirtualAddress
from tiproxy.ha.election import Election

log = logging.getLogger("tiproxy.ha")

VIP_KEY = "/tiproxy/vip/{ip}/owner"  # TiProxy's election key, one per address
GARP_REFRESH_INTERVAL = 1.0  # seconds between the bursts after a takeover (TiProxy's)
BURST_GAP = 0.01  # seconds between the packets of one burst


class VirtualIPOwner:
    """Campaigns for the address and carries it while elected (see the module docstring)."""

    def __init__(self, ha: HAConfig, endpoints: Sequence[str], me: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self.address = VirtualAddress(ha.virtual_ip, ha.interface)
        self._burst = max(1, ha.garp_burst_count)
        self._refreshes = ha.garp_refresh_count
        self.election = Election(endpoints, VIP_KEY.format(ip=self.address.ip), me,
                                 on_elected=self._elected, on_retired=self._retired, tls=tls)
        self._announcing: asyncio.Task[None] | None = None
        self._closing = False
        self.error = ""  # why the address could not be added or removed, if it could not

    @property
    def status(self) -> str:
        """"owner", "standby", or why the election or the address fails."""
        if self.error or self.election.error:
            return self.error or self.election.error
        return "owner" if self.election.owner else "standby"

    async def start(self) -> None:
        await self._remove()  # left by an earlier run of this proxy that did not shut down
        self.election.start()

    async def close(self) -> None:
        """Give the address up, then resign: the next proxy takes it over at once."""
        self._closing = True
        await self.election.stop()
        await self._stop_announcing()
        await self._remove()
        await self.election.resign()

    async def _elected(self) -> None:
        if self._closing:
            return
        try:
            await self.address.add()
        except AddressError as e:
            self.error = str(e)
            log.error("elected, but the virtual IP %s could not be added: %s",  # noqa: TRY400
                      self.address, e)
            return
        self.error = ""
        log.info("virtual IP %s added; announcing it", self.address)
        self._announcing = asyncio.get_running_loop().create_task(self._announce())

    async def _retired(self) -> None:
        await self._stop_announcing()
        await self._remove()

    async def _announce(self) -> None:
        """The burst at once, then once a second garp-refresh-count times."""
        for round_ in range(1 + self._refreshes):
            if round_:
                await asyncio.sleep(GARP_REFRESH_INTERVAL)
            try:
                for i in range(self._burst):
                    if i:
                        await asyncio.sleep(BURST_GAP)
                    self.address.announce()
            except AddressError as e:
                log.warning("virtual IP %s: %s", self.address, e)

    async def _stop_announcing(self) -> None:
        task, self._announcing = self._announcing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _remove(self) -> None:
        try:
            if await self.address.present():
                await self.address.delete()
                log.info("virtual IP %s removed", self.address)
        except AddressError as e:
            self.error = str(e)
            log.error("virtual IP %s could not be removed: %s", self.address, e)  # noqa: TRY400
