"""`tiproxyctl traffic capture | replay | cancel | show`: TiProxy's traffic commands.

    tiproxyctl traffic capture --output DIR --duration 1h [--compress true|false]
                               [--encryption-method aes256-ctr] [--start-time RFC3339]
    tiproxyctl traffic replay --input DIR --username U [--password P] [--speed 1.0]
                              [--read-only] [--ignore-errs] [--command-start-time T]
                              [--command-end-time T] [--report-dir DIR] [--start-time T]
    tiproxyctl traffic cancel [--type capture|replay] [--graceful]
    tiproxyctl traffic show

The flags are TiProxy's (lib/cli/traffic.go; `--cmd-start-time` and `--cmd-end-time` are
accepted too) and go to the API as TiProxy's form fields. Without --password, replay asks for
it on the terminal, as TiProxy's does.
"""

from __future__ import annotations

import argparse
import getpass
import urllib.parse
from typing import TYPE_CHECKING

from tiproxy.cli.apiclient import request
from tiproxy.cli.replay_options import add_replay_options

if TYPE_CHECKING:
    from tiproxy.cli.ctl import _Commands


def add_commands(commands: _Commands) -> None:
    """The subcommands of `traffic` (cli/ctl.py adds the command itself)."""
    capture = commands.add("capture", "capture the proxy's traffic into files",
                           lambda args: _post(args, "/api/traffic/capture", {
                               "output": args.output, "duration": args.duration,
                               "encrypt-method": args.encryption_method,
                               "compress": args.compress, "start-time": args.start_time}))
    capture.add_argument("--output", required=True, help="the directory for the traffic files")
    capture.add_argument("--duration", required=True, help='how long, as "10m" or "1h"')
    capture.add_argument("--encryption-method", "--encrypt-method", default="",
                         help="aes256-ctr, with [security] encryption-key-path; default none")
    capture.add_argument("--compress", default="true", choices=("true", "false"),
                         help="gzip the traffic files (default true)")
    capture.add_argument("--start-time", default="", help="the job's start time (RFC 3339)")

    replay = commands.add("replay", "replay captured traffic through the proxy", _replay)
    replay.add_argument("--username", required=True, help="the user the replay logs in as")
    replay.add_argument("--speed", default="1", help="replay speed, 0.1 to 10 (default 1)")
    add_replay_options(replay)

    cancel = commands.add("cancel", "stop the running capture or replay",
                          lambda args: _post(args, "/api/traffic/cancel", {
                              "type": args.type, "graceful": "true" if args.graceful else ""}))
    cancel.add_argument("--type", default="", choices=("", "capture", "replay"),
                        help="stop only a job of this type")
    cancel.add_argument("--graceful", action="store_true",
                        help="a replay stops reading and finishes what it read")

    commands.add("show", "the running and last jobs (JSON)", _show)


def _replay(args: argparse.Namespace) -> int:
    password = args.password
    if password is None:
        password = getpass.getpass(f"Input password for user {args.username}: ")
    return _post(args, "/api/traffic/replay", {
        "input": args.input, "username": args.username, "password": password,
        "speed": args.speed, "readonly": "true" if args.read_only else "false",
        "ignore-errs": "true" if args.ignore_errs else "false",
        "cmdstarttime": args.command_start_time, "cmdendtime": args.command_end_time,
        "format": args.format, "report-dir": args.report_dir, "start-time": args.start_time})


def _post(args: argparse.Namespace, path: str, form: dict[str, str]) -> int:
    data = urllib.parse.urlencode({k: v for k, v in form.items() if v}).encode()
    reply = request(args.target, path, method="POST", data=data,
                    content_type="application/x-www-form-urlencoded")
    print(reply.body.decode("utf-8", errors="replace").strip())
    return 0


def _show(args: argparse.Namespace) -> int:
    reply = request(args.target, "/api/traffic/show")
    print(reply.body.decode("utf-8", errors="replace").strip())
    return 0
