"""What the data plane counts for the metrics: plain numbers, bumped where things happen.

Sessions add to ints and to the bucket lists of histograms in place: no prometheus object and
no label lookup on the data path. api/metrics.py turns a snapshot of these into TiProxy's metric
families only when Prometheus scrapes. The objects pickle as they are: a worker sends its own to
the control process once a second (workers/messages.py Stats), which adds up the live workers'
and those of workers that died, so that no counter ever goes back.

Histogram buckets are TiProxy's (pkg/metrics), so that its dashboards' quantiles read the same.
A backend's counters are forgotten with the backend (`forget`), as TiProxy deletes its series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Container

from tiproxy.protocol.constants import COMMAND_NAMES


def exponential(start: float, factor: float, count: int) -> tuple[float, ...]:
    """Upper bounds start, start*factor, ...: `count` of them (Prometheus' ExponentialBuckets,
    multiplied step by step as it does, so that the bounds print the same)."""
    bounds = []
    for _ in range(count):
        bounds.append(start)
        start *= factor
    return tuple(bounds)


QUERY_BUCKETS = exponential(0.0005, 2, 29)  # queries and handshakes: 0.5 ms to 1.5 days
GET_BACKEND_BUCKETS = exponential(0.000001, 2, 26)  # 1 us to 30 s
MIGRATE_BUCKETS = exponential(0.0001, 2, 26)  # 0.1 ms to 1 h
SINCE_CREATION_BUCKETS = exponential(1, 2, 21)  # 1 s to 24 days
LIFETIME_BUCKETS = exponential(0.1, 2, 25)  # 0.1 s to 38 days

# tiproxy_server_disconnection_total's types: TiProxy's names for what ended a session.
QUIT_OK = "success"  # the client sent COM_QUIT
CLIENT_NETWORK = "client network break"  # the client hung up or its socket failed
CLIENT_HANDSHAKE = "client handshake fail"  # TLS, a client certificate, the login's time
AUTH_FAIL = "auth fail"  # the backend refused the login
MALFORMED = "malformed packet"  # a protocol error, from either side
NO_BACKEND = "get backend fail"  # no backend could take the session
PROXY_ERROR = "proxy error"  # a move or a KILL went wrong, TLS turned off meanwhile
PROXY_SHUTDOWN = "proxy shutdown"  # shutdown, or failover-timeout on a draining backend
BACKEND_NETWORK = "backend network break"  # the backend closed the connection
BACKEND_HANDSHAKE = "backend handshake fail"  # the backend failed during the login


class Histogram:
    """Counts per bucket (the last one is +Inf) and the sum: one histogram's series."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        counts = self.counts
        for i, n in enumerate(other.counts):
            counts[i] += n
        self.total += other.total

    def __getstate__(self) -> tuple[tuple[float, ...], list[int], float]:
        return self.bounds, self.counts, self.total

    def __setstate__(self, state: tuple[tuple[float, ...], list[int], float]) -> None:
        self.bounds, self.counts, self.total = state


class CommandTimes(dict[int, Histogram]):
    """Command byte -> its durations on one backend; a command's histogram is made when the
    command first completes there."""

    def __missing__(self, cmd: int) -> Histogram:
        times = self[cmd] = Histogram(QUERY_BUCKETS)
        return times


class BackendCounts:
    """What the sessions counted on one backend: their commands and traffic, their logins."""

    __slots__ = ("commands", "dial_failures", "handshakes", "in_bytes", "in_packets",
                 "out_bytes", "out_packets")

    def __init__(self) -> None:
        self.commands = CommandTimes()  # tiproxy_session_query_duration_seconds, query_total
        self.handshakes = Histogram(QUERY_BUCKETS)  # logins that ended on this backend
        self.in_bytes = 0  # from the backend, in the command phase
        self.in_packets = 0
        self.out_bytes = 0  # to the backend, the clients' commands
        self.out_packets = 0
        self.dial_failures = 0  # sessions that could not connect to it

    def add(self, other: BackendCounts) -> None:
        for cmd, times in other.commands.items():
            self.commands[cmd].add(times)
        self.handshakes.add(other.handshakes)
        self.in_bytes += other.in_bytes
        self.in_packets += other.in_packets
        self.out_bytes += other.out_bytes
        self.out_packets += other.out_packets
        self.dial_failures += other.dial_failures

    def __getstate__(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[object, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)


class DataPlaneCounts:
    """Everything one data plane (a process's sessions) counted since it started."""

    def __init__(self) -> None:
        self.backends: dict[str, BackendCounts] = {}
        self.created = 0  # sessions accepted (not refused at once)
        self.disconnections: Counter[str] = Counter()  # by what ended them (above)
        self.get_backend = Histogram(GET_BACKEND_BUCKETS)  # a login's wait for a backend
        self.get_backend_results: Counter[str] = Counter()  # "succeed", "fail"
        self.since_creation = Histogram(SINCE_CREATION_BUCKETS)  # commands, by session age
        self.lifetimes = Histogram(LIFETIME_BUCKETS)  # sessions that ended
        self.cross_location_bytes = 0  # both ways, with backends of another location
        # (from, to, reason, migrate_res) -> moves; (from, to, migrate_res) -> their times
        self.migrations: Counter[tuple[str, str, str, str]] = Counter()
        self.migration_times: dict[tuple[str, str, str], Histogram] = {}
        # Transaction replays (net/replay.py): (reason, "succeed" | "fail") -> replays
        self.replays: Counter[tuple[str, str]] = Counter()
        # Backend connections kept for the next login, and logins that took one (net/pool.py)
        self.pool_events: Counter[str] = Counter()

    def backend(self, addr: str) -> BackendCounts:
        counts = self.backends.get(addr)
        if counts is None:
            counts = self.backends[addr] = BackendCounts()
        return counts

    def migrated(self, source: str, target: str, reason: str, ok: bool,
                 seconds: float) -> None:
        result = "succeed" if ok else "fail"
        self.migrations[(source, target, reason, result)] += 1
        times = self.migration_times.get((source, target, result))
        if times is None:
            times = self.migration_times[(source, target, result)] = Histogram(MIGRATE_BUCKETS)
        times.observe(seconds)

    def add(self, other: DataPlaneCounts) -> None:
        for addr, counts in other.backends.items():
            self.backend(addr).add(counts)
        self.created += other.created
        self.disconnections.update(other.disconnections)
        self.get_backend.add(other.get_backend)
        self.get_backend_results.update(other.get_backend_results)
        self.since_creation.add(other.since_creation)
        self.lifetimes.add(other.lifetimes)
        self.cross_location_bytes += other.cross_location_bytes
        self.migrations.update(other.migrations)
        self.replays.update(other.replays)
        self.pool_events.update(other.pool_events)
        for key, times in other.migration_times.items():
            mine = self.migration_times.get(key)
            if mine is None:
                mine = self.migration_times[key] = Histogram(MIGRATE_BUCKETS)
            mine.add(times)

    def forget(self, known: Container[str]) -> None:
        """Drop the counters of backends no longer `known`, and the moves from or to them:
        a proxy in front of ever-changing addresses (pods) must not keep every one."""
        for addr in [a for a in self.backends if a not in known]:
            del self.backends[addr]
        for key in [k for k in self.migrations if k[0] not in known or k[1] not in known]:
            del self.migrations[key]
        for times in [k for k in self.migration_times if k[0] not in known or k[1] not in known]:
            del self.migration_times[times]

    def query_counts(self, addr: str) -> dict[str, int]:
        """cmd_type -> commands completed on `addr` (the API's backend list shows them)."""
        counts = self.backends.get(addr)
        if counts is None:
            return {}
        return {command_name(cmd): times.count for cmd, times in sorted(counts.commands.items())}


def command_name(cmd: int) -> str:
    """tiproxy_session_query_total's cmd_type: TiProxy's name of the command."""
    return COMMAND_NAMES.get(cmd, f"Unknown{cmd:#04x}")
