"""The options both ways of replaying traffic take, by TiProxy's names: `tiproxy-replayer` (the
replay runs in that process) and `tiproxyctl traffic replay` (the proxy runs it)."""

from __future__ import annotations

import argparse


def add_replay_options(p: argparse.ArgumentParser) -> None:
    """What is replayed and how; each caller adds --username and --speed its own way."""
    p.add_argument("--input", required=True, help="the directory of the traffic files")
    p.add_argument("--password", help="its password (asked for when not given)")
    p.add_argument("--read-only", action="store_true", help="replay reads only")
    p.add_argument("--ignore-errs", action="store_true",
                   help="skip what cannot be read in the files instead of stopping")
    p.add_argument("--command-start-time", "--cmd-start-time", default="",
                   help="replay the commands that started after this time (RFC 3339)")
    p.add_argument("--command-end-time", "--cmd-end-time", default="",
                   help="replay the commands that started up to this time (RFC 3339)")
    p.add_argument("--start-time", default="", help="start at this time (RFC 3339)")
    p.add_argument("--format", default="", help="the files' format: native (the default)")
    p.add_argument("--report-dir", default="",
                   help="where report.json and report.html go (default: --input)")
