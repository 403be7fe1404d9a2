"""The proxy's processes as one: CPU, memory and files for Prometheus' `process_*` metrics.

A proxy with `[proxy] workers` is a control process and its workers; the metrics a process
usually reports of itself would show the control process only, which holds no session. So the
figures here add up every process of the proxy, read from /proc when Prometheus scrapes:
- CPU seconds: the live processes', plus those of workers that exited (the kernel adds a
  child's CPU to the parent's RUSAGE_CHILDREN when it is reaped). A worker reaped between two
  reads could be seen twice or not at all; the total never goes back (a high-water mark).
- resident memory: each process's share of the pages they use (control/memory.py), so that
  pages the workers share with each other count once; virtual memory and open files: summed.
- start time: the control process's (the proxy's uptime); the file limit: its own.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from pathlib import Path

from tiproxy.control.memory import resident_bytes
from tiproxy.views.interface import ProcessTotals

_TICKS = os.sysconf("SC_CLK_TCK")
# Fields of /proc/PID/stat counted after the command name's closing parenthesis (state is 0).
_UTIME, _STIME, _STARTTIME, _VSIZE = 11, 12, 19, 20


class ProcessReader:
    """Reads the totals of the proxy's processes; keeps the CPU total from going back."""

    def __init__(self) -> None:
        self._cpu_seconds = 0.0
        self._boot_time = _boot_time()

    def read(self, pids: Sequence[int]) -> ProcessTotals:
        """The totals of `pids` (the control process, or the only one, first)."""
        cpu = virtual = fds = 0.0
        start = 0.0
        for i, pid in enumerate(pids):
            fields = _stat(pid)
            if fields is None:
                continue  # exited meanwhile
            cpu += (int(fields[_UTIME]) + int(fields[_STIME])) / _TICKS
            virtual += int(fields[_VSIZE])
            fds += _open_fds(pid)
            if i == 0:
                start = self._boot_time + int(fields[_STARTTIME]) / _TICKS
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu += children.ru_utime + children.ru_stime
        self._cpu_seconds = max(self._cpu_seconds, cpu)
        return ProcessTotals(
            cpu_seconds=self._cpu_seconds,
            resident_bytes=sum(resident_bytes(pid) for pid in pids),
            virtual_bytes=int(virtual),
            open_fds=int(fds),
            max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            start_time=start,
        )


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # the command name may hold spaces and ")"


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _boot_time() -> float:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0
