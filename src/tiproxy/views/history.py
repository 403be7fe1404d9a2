"""Session moves over time, as the status page shows them: a timeline and the last few moves.

Every process that holds sessions (the one-process proxy, or each worker) keeps a MoveHistory
and records each move that ended, moved or failed (a session found pinned has not tried). The
timeline counts moves in buckets of STEP seconds of wall-clock time, so that the histories of
several workers add up bucket by bucket (they share the machine's clock); the control process
merges them for the API. Both parts are bounded whatever the move rate: the timeline by time
(SPAN buckets, each a counter over a reason and a result, and reasons are the balancer's few),
the list of moves by count (RECENT). The cumulative counts behind the metrics are elsewhere
(MigrationStats.counts): this history forgets, they do not.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

STEP = 5  # seconds in a bucket of the timeline
# Buckets kept: 15 minutes, so that a page opened after an incident still shows it; this bounds
# the timeline however many moves a rebalance storm makes.
SPAN = 180
# Moves kept in full per process (and shown by the page, newest first, of all processes): the
# list shows what just happened; the timeline and the metrics hold the rest as counts.
RECENT = 50
SUCCEEDED, FAILED = "succeed", "fail"  # tiproxy_balance_migrate_total's migrate_res


@dataclass(frozen=True)
class MoveRecord:
    """One move that ended; `error` says why a failed one failed (no secret is in it: it is
    the text the proxy logs)."""

    at: float  # time.time() when it ended
    session: int
    user: str
    source: str  # backend addresses
    target: str
    reason: str  # why it moved: "redirect", "drained", "conn", ...
    ok: bool
    seconds: float  # how long the move took
    error: str = ""

    @property
    def result(self) -> str:
        return SUCCEEDED if self.ok else FAILED


def bucket_of(at: float) -> int:
    """The start (epoch seconds) of the bucket that time `at` falls in."""
    return int(at // STEP) * STEP


class MoveHistory:
    """The timeline (bucket start -> (reason, result) -> moves) and the last RECENT moves."""

    def __init__(self) -> None:
        self.buckets: dict[int, Counter[tuple[str, str]]] = {}
        self.recent: deque[MoveRecord] = deque(maxlen=RECENT)

    def record(self, move: MoveRecord) -> None:
        start = bucket_of(move.at)
        bucket = self.buckets.get(start)
        if bucket is None:  # a new bucket, once every STEP seconds at most: forget old ones
            bucket = self.buckets[start] = Counter()
            self.forget_before(start - (SPAN - 1) * STEP)
        bucket[(move.reason, move.result)] += 1
        self.recent.append(move)

    def forget_before(self, start: int) -> None:
        for old in [s for s in self.buckets if s < start]:
            del self.buckets[old]

    def copy(self) -> MoveHistory:
        """A snapshot that later moves do not change (the API reads it after the fact)."""
        copy = MoveHistory()
        copy.buckets = {start: Counter(counts) for start, counts in self.buckets.items()}
        copy.recent.extend(self.recent)
        return copy

    def add(self, other: MoveHistory) -> None:
        """Take in another process's history: buckets add up, the newest moves of both stay."""
        for start, counts in other.buckets.items():
            self.buckets.setdefault(start, Counter()).update(counts)
        if self.buckets:
            self.forget_before(max(self.buckets) - (SPAN - 1) * STEP)
        newest = heapq.nlargest(RECENT, [*self.recent, *other.recent], key=lambda m: m.at)
        self.recent.clear()
        self.recent.extend(reversed(newest))

    @classmethod
    def merged(cls, histories: Iterable[MoveHistory]) -> MoveHistory:
        total = cls()
        for history in histories:
            total.add(history)
        return total


def history_json(history: MoveHistory, now: float) -> dict[str, object]:
    """What GET /api/admin/migrations says of the history: the timeline's buckets that saw a
    move (oldest first, within SPAN of `now`) and the recent moves, newest first."""
    oldest = bucket_of(now) - (SPAN - 1) * STEP
    timeline = []
    for start in sorted(s for s in history.buckets if s >= oldest):
        counts = history.buckets[start]
        reasons: Counter[str] = Counter()
        for (reason, _), n in counts.items():
            reasons[reason] += n
        timeline.append({
            "start": start,
            SUCCEEDED: sum(n for (_, result), n in counts.items() if result == SUCCEEDED),
            FAILED: sum(n for (_, result), n in counts.items() if result == FAILED),
            "reasons": dict(sorted(reasons.items())),
        })
    recent = [{"at": m.at, "session": m.session, "user": m.user, "from": m.source,
               "to": m.target, "reason": m.reason, "result": m.result,
               "seconds": m.seconds, "error": m.error}
              for m in reversed(history.recent)]  # kept oldest first
    return {"now": now, "step": STEP, "span": SPAN, "timeline": timeline, "recent": recent}
