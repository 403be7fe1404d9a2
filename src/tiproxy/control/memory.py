"""How much of the memory it may use the proxy uses, for `[proxy]
high-memory-usage-reject-threshold` (TiProxy's: at or over it, new clients are refused and the
health route says so; sessions already there go on).

The use is the resident memory of the proxy's processes (the control process and its
workers; their proportional set size, so that pages they share count once). What it may use is
its memory cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) when there is one
below the machine's memory, else the machine's memory. The cgroup's own count is not the use:
it holds the page cache of everything in the container, which fills any limit on a busy
machine and is given back on demand.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_PAGE = os.sysconf("SC_PAGE_SIZE")
MIN_THRESHOLD = 0.5  # TiProxy raises a threshold in (0, 0.5) to this


def effective_threshold(configured: float) -> float:
    """0 is off; a value in (0, 0.5) counts as 0.5, as in TiProxy."""
    return 0.0 if configured <= 0 else max(configured, MIN_THRESHOLD)


def memory_use(pids: Iterable[int], root: Path = CGROUP_ROOT) -> float | None:
    """The share (0..1, or more) of the memory the proxy may use that it uses; None if it
    cannot be read."""
    limit = _machine_memory()
    cgroup = _cgroup_limit(root, limit)
    if cgroup is not None:
        limit = cgroup
    if not limit:
        return None
    return sum(resident_bytes(pid) for pid in pids) / limit


def resident_bytes(pid: int) -> int:
    """Bytes of a process's resident memory, its share of pages shared with the others (PSS)
    counted once; RSS where the kernel gives no PSS. 0 for a process that has exited."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _machine_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cgroup_limit(root: Path, total: int) -> int | None:
    """The memory limit of this process's cgroup, when it has one below the machine's."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2
            limit = _read_limit(root, path, "memory.max")
        elif "memory" in controllers.split(","):  # v1
            limit = _read_limit(root / "memory", path, "memory.limit_in_bytes")
        else:
            continue
        if limit is not None and limit > 0 and (not total or limit < total):
            return limit
    return None


def _read_limit(base: Path, path: str, name: str) -> int | None:
    # In a container the cgroup named may be the namespace's root: try it, then the root.
    for directory in (base / path.lstrip("/"), base):
        try:
            text = (directory / name).read_text().strip()
        except OSError:
            continue
        try:
            return None if text == "max" else int(text)
        except ValueError:
            return None
    return None
