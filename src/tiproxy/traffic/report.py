"""A replay's report: each replayed command compared with the captured one, grouped by digest.

Where TiProxy records only whether a command failed, a capture of ours also holds what its
response said (format.py), and each replayed command is compared with it:
- fails now: it succeeded in the capture and fails in the replay (with the error);
- succeeds now: it failed in the capture and succeeds now;
- another error: it failed both times, with different error codes;
- different results: rows affected, rows sent, the rows' checksum or the column types differ
  (outcome.py);
- without an index now: the server says it used no (good) index, where it did in the capture
  (SERVER_QUERY_NO_INDEX_USED / NO_GOOD_INDEX_USED: a dropped or unusable index);
- slower: the statement's mean latency is SLOWER_RATIO times the captured one and SLOWER_MIN_MS
  longer (both measured at the proxy's side of the client, so one machine's noise is not a
  regression). Faster ones are listed too.
Statements group by (command, digest of the normalized text: sql.py), each with one sample of
every kind of difference. Connection and file errors are listed apart. The report is JSON and
one self-contained HTML page (no script, no external asset; every text escaped).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any

from tiproxy.protocol.constants import ServerStatus
from tiproxy.traffic.format import CMD_NAMES, TrafficCommand, format_time
from tiproxy.traffic.outcome import Outcome

SLOWER_RATIO = 2.0
SLOWER_MIN_MS = 1.0
SAMPLE_TEXT = 2000  # characters of a sample statement kept
# A capture may hold any number of distinct statements and error messages: past these, the rest
# are counted together, so that the report (kept in memory while the replay runs) is bounded.
MAX_GROUPS = 10_000
MAX_ERRORS = 1_000
MORE_STATEMENTS = "(more statements than the report keeps)"  # the sample of the rest
_NO_INDEX = ServerStatus.NO_INDEX_USED | ServerStatus.NO_GOOD_INDEX_USED
DIFFERENCES = ("fails_now", "succeeds_now", "error_changed", "results_differ", "index_lost")
_TITLES = {"fails_now": "Fails now", "succeeds_now": "Succeeds now",
           "error_changed": "Another error", "results_differ": "Different results",
           "index_lost": "Without an index now"}


@dataclass
class Group:
    """One statement digest of one command type."""

    cmd_type: str
    digest: str
    sample: str
    count: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # difference -> commands
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)  # difference -> one
    timed: int = 0  # commands with both latencies
    captured_ms: float = 0.0
    replayed_ms: float = 0.0

    def note(self, kind: str, sample: dict[str, Any]) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.samples.setdefault(kind, sample)

    @property
    def ratio(self) -> float | None:
        if not self.timed or self.captured_ms <= 0:
            return None
        return self.replayed_ms / self.captured_ms

    @property
    def slower(self) -> bool:
        ratio = self.ratio
        return ratio is not None and ratio >= SLOWER_RATIO \
            and (self.replayed_ms - self.captured_ms) / self.timed >= SLOWER_MIN_MS

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cmd_type": self.cmd_type, "digest": self.digest,
                               "sample": self.sample, "count": self.count}
        for kind in DIFFERENCES:
            if kind in self.kinds:
                out[kind] = {"count": self.kinds[kind], "sample": self.samples[kind]}
        if self.timed:
            out["latency"] = {"commands": self.timed,
                              "captured_ms": round(self.captured_ms / self.timed, 3),
                              "replayed_ms": round(self.replayed_ms / self.timed, 3),
                              "ratio": round(self.ratio, 2) if self.ratio is not None else None,
                              "slower": self.slower}
        return out


@dataclass
class ReplayReport:
    """Filled as the replay goes; `to_dict` and `html` render it."""

    input: str
    target: str
    speed: float
    started: str = ""
    finished: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # read, replayed, skipped ...
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    errors: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def other_error(self, kind: str, message: str, conn_id: int) -> None:
        """A connection that could not log in, a file that could not be read..."""
        if (kind, message) not in self.errors and len(self.errors) >= MAX_ERRORS:
            message = "(more messages than the report keeps)"
        entry = self.errors.setdefault((kind, message), {
            "kind": kind, "message": message, "count": 0, "sample_conn_id": conn_id})
        entry["count"] += 1

    def add(self, c: TrafficCommand, o: Outcome, latency_ns: int, text: str,
            digest: str) -> None:
        """One replayed command and what its response said."""
        self.count("replayed")
        name = CMD_NAMES[c.cmd]
        group = self.groups.get((name, digest))
        if group is None:
            key = (name, digest) if len(self.groups) < MAX_GROUPS else ("", "")
            group = self.groups.get(key)
            if group is None:
                sample = text if key[0] else MORE_STATEMENTS
                group = self.groups[key] = Group(key[0], key[1], sample[:SAMPLE_TEXT])
        group.count += 1
        if c.query_ns is not None:
            group.timed += 1
            group.captured_ms += c.query_ns / 1e6
            group.replayed_ms += latency_ns / 1e6
        kind, detail = _difference(c, o)
        if kind:
            self.count("differences")
            group.note(kind, {"conn_id": c.conn_id, "capture_time": format_time(c.start_ns),
                              "where": c.where, "statement": text[:SAMPLE_TEXT], **detail})

    def to_dict(self) -> dict[str, Any]:
        groups = sorted(self.groups.values(),
                        key=lambda g: (-sum(g.kinds.values()), -(g.ratio or 0), -g.count))
        summary = dict(self.counts)
        for kind in DIFFERENCES:
            summary[f"{kind}_statements"] = sum(1 for g in groups if kind in g.kinds)
        summary["slower_statements"] = sum(1 for g in groups if g.slower)
        return {"input": self.input, "target": self.target, "speed": self.speed,
                "started": self.started, "finished": self.finished, "summary": summary,
                "statements": [g.to_dict() for g in groups],
                "other_errors": list(self.errors.values())}

    def json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def html(self) -> str:
        return render_html(self.to_dict())


def _difference(c: TrafficCommand, o: Outcome) -> tuple[str, dict[str, Any]]:
    """The kind of difference between the capture and the replay ("" for none), and details."""
    if c.success and o.error:
        return "fails_now", {"error": o.error, "message": o.message}
    if not c.success and not o.error:
        return "succeeds_now", {"captured_error": c.error_code or None}
    if not c.success:
        if c.error_code and c.error_code != o.error:
            return "error_changed", {"captured_error": c.error_code, "error": o.error,
                                     "message": o.message}
        return "", {}
    expected = {"affected": c.affected, "rows": c.rows, "checksum": c.checksum,
                "types": c.types}
    actual = {"affected": o.affected, "rows": o.rows, "checksum": o.checksum, "types": o.types}
    changed = [k for k, v in expected.items() if v is not None and actual[k] != v]
    if changed:
        return "results_differ", {
            "differs_in": changed,
            "expected": {k: _shown(k, v) for k, v in expected.items() if v is not None},
            "actual": {k: _shown(k, v) for k, v in actual.items() if v is not None}}
    if c.status is not None and o.status is not None and not c.status & _NO_INDEX \
            and o.status & _NO_INDEX:
        return "index_lost", {"captured_status": c.status, "status": o.status}
    return "", {}


def _shown(key: str, value: int) -> int | str:
    return f"{value:08x}" if key in ("checksum", "types") else value


# -- HTML ---------------------------------------------------------------------------------------

_STYLE = """body{font-family:sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f0f0f0}code,pre{font-family:monospace;
white-space:pre-wrap;word-break:break-all;margin:0}.bad{color:#a00}.none{color:#070}"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _statement(text: str) -> str:
    return f"<pre><code>{_e(text)}</code></pre>"


def render_html(report: dict[str, Any]) -> str:
    """The report as one page; every value from the capture or the servers is escaped."""
    parts = [f"<h1>Traffic replay report</h1><p>Capture <code>{_e(report['input'])}</code> "
             f"replayed against <code>{_e(report['target'])}</code> at speed "
             f"{_e(report['speed'])}, {_e(report['started'])} to {_e(report['finished'])}.</p>"]
    summary = report["summary"]
    parts.append(_table(["figure", "value"], [[_e(k), _e(v)] for k, v in summary.items()]))
    statements = report["statements"]
    for kind in DIFFERENCES:
        rows = [[_e(s["cmd_type"]), _statement(s["sample"]), _e(s[kind]["count"]),
                 _statement(json.dumps(s[kind]["sample"], indent=1))]
                for s in statements if kind in s]
        parts.append(f"<h2 id='{kind}'>{_e(_TITLES[kind])}</h2>")
        parts.append(_table(["command", "statement", "commands", "sample"], rows) if rows
                     else "<p class='none'>None.</p>")
    timed = [s for s in statements if "latency" in s]
    parts.append("<h2 id='latency'>Latency (mean per command, ms)</h2>")
    parts.append(_table(
        ["command", "statement", "commands", "captured", "replayed", "ratio"],
        [[_e(s["cmd_type"]), _statement(s["sample"]), _e(s["latency"]["commands"]),
          _e(s["latency"]["captured_ms"]), _e(s["latency"]["replayed_ms"]),
          f"<span class='{'bad' if s['latency']['slower'] else ''}'>"
          f"{_e(s['latency']['ratio'])}</span>"] for s in timed]) if timed
        else "<p class='none'>No captured latencies.</p>")
    errors = report["other_errors"]
    parts.append("<h2 id='other_errors'>Other errors</h2>")
    parts.append(_table(["kind", "message", "count", "connection"],
                        [[_e(e["kind"]), _e(e["message"]), _e(e["count"]),
                          _e(e["sample_conn_id"])] for e in errors]) if errors
                 else "<p class='none'>None.</p>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Traffic replay report"
            f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
