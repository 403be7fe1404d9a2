"""The Grafana dashboard in deploy/ is what its script writes, and is laid out as Grafana reads
it (tests/integration/test_grafana.py runs its expressions in a real Prometheus)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard", DEPLOY / "grafana" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dashboard_is_the_scripts_output() -> None:
    assert (DEPLOY / "grafana" / "tiproxy.json").read_text() == _script().render(), \
        "run deploy/grafana/dashboard.py and commit tiproxy.json"


def test_the_dashboard_has_tiproxys_rows_and_sound_panels() -> None:
    board = json.loads((DEPLOY / "grafana" / "tiproxy.json").read_text())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Server", "Query Summary", "Balance", "Backend", "Traffic"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    assert len({p["title"] for p in panels}) == len(panels)
    for p in panels:
        assert p["targets"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        assert p["gridPos"]["w"] == 12 and p["gridPos"]["x"] in (0, 12)
    places = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels}
    assert len(places) == len(panels)  # no two panels on one spot
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "job", "instance"]
    # TiProxy's panels are there under their names, ours beside them
    titles = {p["title"] for p in panels}
    assert {"Duration", "CPS by CMD", "Session Migration OPM", "Get Backend Duration",
            "Bytes/Second from Backends", "Cross Location Bytes/Second"} <= titles
    assert {"Pinned Sessions by Reason", "Health Check Results OPM"} <= titles
