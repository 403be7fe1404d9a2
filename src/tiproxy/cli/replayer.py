"""`tiproxy-replayer`: replay a capture from any machine against any MySQL-protocol server.

    tiproxy-replayer --addr HOST:PORT --input DIR --username U [--password P] [--speed 1]
                     [--read-only] [--ignore-errs] [--command-start-time T]
                     [--command-end-time T] [--start-time T]
                     [--encryption-key-path FILE] [--report-dir DIR]

TiProxy's replayer flags (cmd/replayer/main.go), with the key file TiProxy's config names
(`[security] encryption-key-path`) as a flag of its own. It replays as the API's replay does
(traffic/replay.py), writes report.json and report.html into --report-dir (default: the
input), prints a one-line summary and exits 0; 1 when the replay could not run or stopped on an
error, 2 for a bad flag. Ctrl-C stops it; the report of what was replayed is written all the
same.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
import time
from pathlib import Path

from tiproxy.cli.replay_options import add_replay_options
from tiproxy.config.values import split_host_port
from tiproxy.net.loop import install_event_loop
from tiproxy.traffic.format import FormatError, parse_time
from tiproxy.traffic.jobs import JobError, check_report_dir, write_report
from tiproxy.traffic.replay import MAX_SPEED, MIN_SPEED, Replay, ReplayError, ReplaySpec
from tiproxy.traffic.store import StoreError, input_dir, load_key, read_meta

log = logging.getLogger("tiproxy.traffic")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tiproxy-replayer",
                                description="Replay captured traffic and report differences.")
    p.add_argument("--addr", default="127.0.0.1:4000", help="the server to replay against")
    p.add_argument("--username", default="root", help="the user to log in as")
    p.add_argument("--speed", type=float, default=1.0, help="replay speed, 0.1 to 10")
    add_replay_options(p)
    p.add_argument("--encryption-key-path", default="",
                   help="the AES-256 key file of an encrypted capture")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warn", "error"))
    return p


def _time(text: str, flag: str) -> int | None:
    if not text:
        return None
    try:
        return parse_time(text)
    except FormatError as e:
        raise JobError(f"{flag}: {e}") from None


def spec_from(args: argparse.Namespace, password: str) -> tuple[ReplaySpec, Path, int | None]:
    """The replay's spec, report directory and start time from the flags (JobError if bad)."""
    if args.format not in ("", "native"):
        raise JobError(f"--format {args.format}: only TiProxy's native format is supported")
    if not MIN_SPEED <= args.speed <= MAX_SPEED:
        raise JobError(f"speed should be between {MIN_SPEED:f} and {MAX_SPEED:f}")
    try:
        host, port = split_host_port(args.addr)
        where = input_dir(args.input)
        key = load_key(read_meta(where).get("EncryptMethod", ""), args.encryption_key_path)
    except (ValueError, StoreError) as e:
        raise JobError(str(e).replace("security.encryption-key-path",
                                      "--encryption-key-path")) from None
    spec = ReplaySpec(input=where, host=host, port=port, username=args.username,
                      password=password, speed=args.speed, read_only=args.read_only,
                      ignore_errs=args.ignore_errs,
                      cmd_start_ns=_time(args.command_start_time, "--command-start-time"),
                      cmd_end_ns=_time(args.command_end_time, "--command-end-time"), key=key)
    report_dir = Path(args.report_dir) if args.report_dir else where
    check_report_dir(report_dir)
    return spec, report_dir, _time(args.start_time, "--start-time")


async def replay(spec: ReplaySpec, report_dir: Path, start_ns: int | None) -> int:
    job = Replay(spec)
    task = asyncio.get_running_loop().create_task(_run(job, start_ns))
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    code = 0
    try:
        await task
    except ReplayError as e:
        print(f"tiproxy-replayer: {e}", file=sys.stderr)
        code = 1
    except asyncio.CancelledError:
        print("tiproxy-replayer: stopped", file=sys.stderr)
        code = 1
    paths = await asyncio.to_thread(write_report, job.report, report_dir)
    counts = job.report.counts
    print(f"replayed {counts.get('replayed', 0)} commands of {counts.get('read', 0)}, "
          f"{counts.get('differences', 0)} differences; report: {', '.join(paths)}")
    return code


async def _run(job: Replay, start_ns: int | None) -> None:
    if start_ns is not None and start_ns > time.time_ns():
        await asyncio.sleep((start_ns - time.time_ns()) / 1e9)
    await job.run()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper().replace("WARN", "WARNING"),
                        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    password = args.password
    if password is None:
        password = getpass.getpass(f"Input password for user {args.username}: ")
    try:
        spec, report_dir, start_ns = spec_from(args, password)
    except JobError as e:
        print(f"tiproxy-replayer: {e}", file=sys.stderr)
        return 2
    install_event_loop()
    return asyncio.run(replay(spec, report_dir, start_ns))


if __name__ == "__main__":
    sys.exit(main())
