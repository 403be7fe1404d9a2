"""The data plane's counters, the exposition format and the figures around them (clock
monitor, processes, pins, the router's factors), without a proxy."""

from __future__ import annotations

import itertools
import os
import pickle
import time

from tiproxy.api.exposition import Family, render
from tiproxy.balance.router import Router
from tiproxy.config import parse_config
from tiproxy.control.monitor import ClockMonitor
from tiproxy.control.processes import ProcessReader
from tiproxy.control.proxy import owned_job
from tiproxy.discovery.base import DiscoveredBackend
from tiproxy.protocol.constants import Command
from tiproxy.session.state import PIN_KINDS, SessionState
from tiproxy.session.statements import statement_effects
from tiproxy.views.counters import (
    GET_BACKEND_BUCKETS,
    LIFETIME_BUCKETS,
    MIGRATE_BUCKETS,
    QUERY_BUCKETS,
    SINCE_CREATION_BUCKETS,
    DataPlaneCounts,
    Histogram,
)


def test_buckets_are_tiproxys() -> None:
    # pkg/metrics: ExponentialBuckets(start, 2, count), as Go computes and prints them
    for bounds, start, count in ((QUERY_BUCKETS, 0.0005, 29), (GET_BACKEND_BUCKETS, 1e-6, 26),
                                 (MIGRATE_BUCKETS, 0.0001, 26), (SINCE_CREATION_BUCKETS, 1, 21),
                                 (LIFETIME_BUCKETS, 0.1, 25)):
        assert len(bounds) == count
        assert bounds[0] == start
        assert all(b == a * 2 for a, b in itertools.pairwise(bounds))
    assert QUERY_BUCKETS[:4] == (0.0005, 0.001, 0.002, 0.004)


def test_a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() -> None:
    h = Histogram((0.1, 0.2))
    for value in (0.05, 0.1, 0.15, 0.2, 5.0):
        h.observe(value)
    assert h.counts == [2, 2, 1]  # upper bounds are inclusive (le); the last is +Inf
    assert h.count == 5
    assert abs(h.total - 5.5) < 1e-9


def _counts() -> DataPlaneCounts:
    counts = DataPlaneCounts()
    backend = counts.backend("a:1")
    backend.commands[Command.QUERY].observe(0.001)
    backend.commands[Command.STMT_EXECUTE].observe(0.003)
    backend.in_bytes, backend.out_packets = 100, 2
    counts.created = 3
    counts.disconnections["success"] += 2
    counts.migrated("a:1", "b:1", "redirect", True, 0.002)
    counts.migrated("b:1", "c:1", "redirect", False, 0.5)
    return counts


def test_counts_add_up_and_travel_as_they_are() -> None:
    total = DataPlaneCounts()
    total.add(_counts())
    total.add(pickle.loads(pickle.dumps(_counts())))  # a worker's, through its link
    backend = total.backends["a:1"]
    assert backend.commands[Command.QUERY].count == 2
    assert backend.in_bytes == 200 and backend.out_packets == 4
    assert total.created == 6 and total.disconnections["success"] == 4
    assert total.migrations[("a:1", "b:1", "redirect", "succeed")] == 2
    assert total.migration_times[("b:1", "c:1", "fail")].count == 2
    assert total.query_counts("a:1") == {"Query": 2, "StmtExecute": 2}
    assert total.query_counts("nowhere:1") == {}


def test_a_forgotten_backend_takes_its_series_with_it() -> None:
    counts = _counts()
    counts.backend("b:1")
    counts.forget({"a:1", "b:1"})
    assert set(counts.backends) == {"a:1", "b:1"}
    assert list(counts.migrations) == [("a:1", "b:1", "redirect", "succeed")]
    assert list(counts.migration_times) == [("a:1", "b:1", "succeed")]


def test_the_text_format_keeps_tiproxys_names() -> None:
    err = Family("tiproxy_server_err", "Counter of server error.", "counter", ("type",))
    err.add(("load_cert",), 2)
    odd = Family("x_info", 'a "help"\\ on\ntwo lines', "gauge", ("backend", "addr"))
    odd.add(('1.2.3.4:5 "quoted"\\', "z"), 1.5)
    times = Family("x_seconds", "h", "histogram", ("to", "from"))
    h = Histogram((0.001, 0.01))
    h.observe(0.005)
    h.observe(1.0)
    times.add_histogram(("b", "a"), h)
    lines = render([err, odd, times]).decode().splitlines()
    assert lines[:3] == ["# HELP tiproxy_server_err Counter of server error.",
                         "# TYPE tiproxy_server_err counter",  # Go's name: no _total
                         'tiproxy_server_err{type="load_cert"} 2.0']
    assert '# HELP x_info a "help"\\\\ on\\ntwo lines' in lines
    assert 'x_info{addr="z",backend="1.2.3.4:5 \\"quoted\\"\\\\"} 1.5' in lines  # sorted
    assert lines[-5:] == ['x_seconds_bucket{from="a",to="b",le="0.001"} 0.0',
                          'x_seconds_bucket{from="a",to="b",le="0.01"} 1.0',
                          'x_seconds_bucket{from="a",to="b",le="+Inf"} 2.0',
                          'x_seconds_sum{from="a",to="b"} 1.005',
                          'x_seconds_count{from="a",to="b"} 2.0']


def test_pins_have_fixed_kinds_for_the_labels() -> None:
    state = SessionState()
    assert state.pin_kinds() == []
    state.apply(statement_effects(b"CREATE TEMPORARY TABLE secret_name (id INT)"))
    state.apply(statement_effects(b"LOCK TABLES t READ"))
    assert state.pin_kinds() == ["temporary_table", "lock_tables"]
    assert set(state.pin_kinds()) <= set(PIN_KINDS)
    assert len(state.pins()) == 2 and "secret_name" in state.pins()[0]
    state = SessionState(role_set=True)  # every kind a pin can have is a label
    for sql in (b"FLUSH TABLES WITH READ LOCK", b"BACKUP STAGE START", b"HANDLER t OPEN",
                b"DO GET_LOCK('x', 1)", b"PREPARE s FROM @v"):
        state.apply(statement_effects(sql))
    assert len(state.pin_kinds()) == 6
    assert set(state.pin_kinds()) <= set(PIN_KINDS)


def test_the_routers_factors_and_what_is_another_location() -> None:
    cfg = parse_config('[balance]\nlabel-name = "zone"\n[labels]\nzone = "east"\n'
                       '[proxy.backend-labels]\n"a:1" = { zone = "west" }\n'
                       '"b:1" = { zone = "east" }\n')
    r = Router()
    r.configure(cfg)
    r.update("static", {a: DiscoveredBackend(a) for a in ("a:1", "b:1", "c:1")})
    r.backends["b:1"].connections = 3
    r.backends["b:1"].load.threads_running = 4.0
    assert r.factors(r.backends["a:1"]) == {"status": 0, "health": 0, "label": 1, "load": 0,
                                            "conn": 0}
    assert r.factors(r.backends["b:1"]) == {"status": 0, "health": 0, "label": 0, "load": 2,
                                            "conn": 3}
    r.failed(r.backends["c:1"], "refused")
    r.doubt(r.backends["c:1"], "1047")
    assert r.factors(r.backends["c:1"])["status"] == 1
    assert r.factors(r.backends["c:1"])["health"] == 1
    assert [r.cross_location(r.backends[a]) for a in ("a:1", "b:1", "c:1")] == [
        True, False, True]  # c:1 has no zone label
    r.configure(parse_config(""))  # no label-name: nothing is another location
    assert not r.cross_location(r.backends["a:1"])


def test_the_clock_monitor_counts_jumps_back_and_beats_on_time() -> None:
    monitor = ClockMonitor()
    now = time.time()
    for i in range(1, 11):
        monitor.look(now + i)
    assert (monitor.keep_alive, monitor.time_jump_back) == (2, 0)
    monitor.look(now)  # 10 s back
    assert monitor.time_jump_back == 1
    assert monitor.keep_alive == 2


def test_an_election_is_named_as_tiproxy_names_it() -> None:
    assert owned_job("/tiproxy/vip/10.0.0.9/owner") == "vip/10.0.0.9"


def test_the_processes_are_read_from_proc() -> None:
    reader = ProcessReader()
    first = reader.read([os.getpid()])
    sum(i * i for i in range(300_000))  # some CPU
    second = reader.read([os.getpid(), 2**22 + 1])  # a pid that does not exist is skipped
    assert 0 < first.cpu_seconds <= second.cpu_seconds
    assert time.time() - 3600 < first.start_time < time.time()
    assert first.resident_bytes > 1 << 20 and first.virtual_bytes >= first.resident_bytes
    assert first.open_fds >= 3 and first.max_fds >= first.open_fds
