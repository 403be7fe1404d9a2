"""What the data plane shows and is told besides its sessions' traffic: a traffic capture
(every session, open or to come, records its commands until it ends), credentials refreshed for
logins that matched no stored hash, and the read-only views the API and the metrics take of the
sessions and the moves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tiproxy.net.login_phase import COMMAND
from tiproxy.traffic.sink import CaptureSink, Deliver
from tiproxy.views.counters import MIGRATE_BUCKETS, DataPlaneCounts, Histogram
from tiproxy.views.history import MoveHistory
from tiproxy.views.interface import MigrationStats, SessionGauges, SessionView

if TYPE_CHECKING:
    from tiproxy.balance.router import Backend
    from tiproxy.config import Config
    from tiproxy.net.relay import Session
    from tiproxy.net.server import ControlPlane
    from tiproxy.session.credentials import CredentialStore


class ServerViews:
    """Mixed into ProxyServer (net/server.py), whose attributes it uses."""

    sessions: dict[int, Session]
    metrics: DataPlaneCounts
    errors: Counter[str]
    credentials: CredentialStore
    control: ControlPlane
    capture: CaptureSink | None
    _config: Config
    _history: MoveHistory
    _stale: list[tuple[Session, tuple[bytes, bytes]]]
    _capture_dropped: int

    if TYPE_CHECKING:  # provided by ProxyServer's other parts: for the type checker only
        def _staying_views(self) -> list[SessionView]: ...
        def lasting_move_problem(self, backend: Backend, problem: str) -> None: ...

    # -- traffic capture --------------------------------------------------------------------------

    async def start_capture(self, deliver: Deliver) -> None:
        """Every session, open or to come, records its commands for the capture
        (net/session_capture.py) until stop_capture."""
        self.begin_capture(deliver)

    def begin_capture(self, deliver: Deliver) -> None:
        """start_capture, done at once: this process holds the sessions."""
        if self.capture is not None:
            self.capture.close()
        self.capture = sink = CaptureSink(deliver)
        for session in self.sessions.values():
            if session.phase == COMMAND:
                session.follow_capture(sink)

    async def stop_capture(self) -> int:
        """The capture ends here; returns the commands this process dropped."""
        sink, self.capture = self.capture, None
        for session in self.sessions.values():
            session.follow_capture(None)
        if sink is None:
            return 0
        sink.close()
        self._capture_dropped = sink.dropped
        return sink.dropped

    def capture_dropped(self) -> int:
        """Commands the running capture (else the last one) had no room for."""
        return self.capture.dropped if self.capture is not None else self._capture_dropped

    # -- credentials ------------------------------------------------------------------------------

    def refresh_credential(self, session: Session, exchange: tuple[bytes, bytes]) -> None:
        """A login matched no stored hash: sync now, from the backend it logged in to first
        (another may not have the account, or not yet), then try that login again."""
        if not self._config.security.auth_sync_user:
            return
        self._stale.append((session, exchange))
        del self._stale[:-1000]  # bounded: unmatched logins of a burst, not forever
        self.control.sync_soon(session.backend.addr if session.backend is not None else "")

    def credentials_changed(self) -> None:
        """The stored hashes changed: logins that matched none are tried again, and a move's
        refused login is judged: the session's password changed since it logged in (it stops
        trying to move with it), or the target's account differs (a lasting move problem)."""
        stale, self._stale = self._stale, []
        for session, exchange in stale:
            if session.phase != COMMAND:
                continue
            credential = self.credentials.recover(session.user, *exchange)
            if credential is not None:
                session.credential_recovered(credential)
        for session in self.sessions.values():
            if session.phase != COMMAND:
                continue
            refused, session.refused_login = session.refused_login, None
            if refused is None:
                continue
            target, why, source = refused
            # Read from the backend the session is logged in to, the hashes tell whether its
            # password is still the account's there; if it is, the target's account differs.
            if self.credentials.synced_from == source and session.credential is not None \
                    and self.credentials.verifies(session.user, session.credential) is False:
                session.credential_outdated()
            else:
                self.lasting_move_problem(target, why)

    # -- what the API sees ------------------------------------------------------------------------

    async def refresh(self) -> None:
        pass  # this process holds the sessions: its counters are current

    def connection_count(self) -> int:
        return len(self.sessions)

    async def session_views(self) -> list[SessionView]:
        return self.local_session_views()

    def local_session_views(self) -> list[SessionView]:
        views = []
        for s in self.sessions.values():
            move = s.move_request
            waiting = move.waiting if move is not None else ""
            if not waiting and move is None and s.phase == COMMAND:
                pins = s.state.pins()
                waiting = "pinned: " + "; ".join(pins) if pins else ""
            views.append(SessionView(
                id=s.id, user=s.user, client=s.peer,
                backend=s.backend.addr if s.backend else "",
                moving=move is not None, move_reason=move.reason if move else "",
                waiting=waiting, moves=s.moves, client_tls=s.client_tls,
                backend_tls=s.backend_tls, direct=s.reads_direct,
            ))
        return views + self._staying_views()

    def data_plane_counts(self) -> DataPlaneCounts:
        return self.metrics

    def session_gauges(self) -> SessionGauges:
        """Moves asked for and not done, and pinned sessions, by kind: one walk, when asked."""
        pending: Counter[tuple[str, str, str]] = Counter()
        pinned: Counter[str] = Counter()
        for session in self.sessions.values():
            move = session.move_request
            if move is not None and session.backend is not None:
                target = move.target.addr if move.target is not None else ""
                pending[(session.backend.addr, target, move.reason)] += 1
            if session.phase == COMMAND:
                pinned.update(session.state.pin_kinds())
        return SessionGauges(pending, pinned)

    def migration_stats(self) -> MigrationStats:
        return migration_summary(self.metrics, self._history.copy())

    def data_plane_processes(self) -> int:
        return 1

    def server_errors(self) -> Mapping[str, int]:
        """This data plane's own errors (the cluster counts the TLS store's)."""
        return dict(self.errors)


def migration_summary(counts: DataPlaneCounts, history: MoveHistory) -> MigrationStats:
    """The moves, their durations whatever their backends and result, and the recent ones."""
    times = Histogram(MIGRATE_BUCKETS)
    for histogram in counts.migration_times.values():
        times.add(histogram)
    return MigrationStats(dict(counts.migrations), MIGRATE_BUCKETS, times.counts, times.total,
                          history)
