"""Traffic capture and replay in tests: the API's jobs, the replayer, and TiProxy's file rules.

`tiproxy_read` and `tiproxy_write` are a second, independent implementation of TiProxy's native
format, written from its description (pkg/sqlreplay/cmd/native.go, store/*.go) and not from
tiproxy.traffic: what the proxy writes must read by these rules, and what these rules write must
replay.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from support.proxy import ProxyProcess

_FILE = re.compile(r"traffic-(\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d)(\.\d{1,3})?\.log(\.gz)?")
_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


def form(proxy: ProxyProcess, path: str, **fields: str) -> tuple[int, str]:
    """POST TiProxy's form fields (names with "_" sent with "-")."""
    body = urllib.parse.urlencode({k.replace("_", "-"): v for k, v in fields.items()}).encode()
    status, text = proxy.api(path, "POST", body)
    return status, text.decode()


def jobs(proxy: ProxyProcess) -> list[dict[str, Any]]:
    status, body = proxy.api("/api/traffic/show")
    assert status == 200, body
    result: list[dict[str, Any]] = json.loads(body)
    return result


def wait_job(proxy: ProxyProcess, timeout: float = 60) -> dict[str, Any]:
    """The last job, once it is no longer running."""
    deadline = time.monotonic() + timeout
    while True:
        job = jobs(proxy)[-1]
        if job["status"] != "running":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def capture(proxy: ProxyProcess, output: Path, **fields: str) -> None:
    fields.setdefault("duration", "10m")
    status, text = form(proxy, "/api/traffic/capture", output=str(output), **fields)
    assert (status, text) == (200, "capture started"), text


def stop_capture(proxy: ProxyProcess) -> dict[str, Any]:
    status, text = form(proxy, "/api/traffic/cancel")
    assert status == 200 and text.startswith("stopped:"), text
    return wait_job(proxy)


def replayer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The standalone tiproxy-replayer."""
    return subprocess.run([sys.executable, "-m", "tiproxy.cli.replayer", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def report(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / "report.json").read_text())
    return result


def differing(rep: dict[str, Any], kind: str) -> list[str]:
    """The sample statements of the digests with differences of `kind`."""
    return [s["sample"] for s in rep["statements"] if kind in s]


# -- TiProxy's rules, written from the format's description ----------------------------------------


def tiproxy_read(directory: Path, key: bytes | None = None) -> list[dict[str, Any]]:
    """Every command of a capture directory as TiProxy's replayer reads it: the traffic files
    by the time in their names, each gunzipped if .gz, then IV + AES-256-CTR if encrypted,
    concatenated; each command `# Key: value` lines up to Payload_len, then the payload and a
    newline. Keys it does not know are kept too (TiProxy skips them)."""
    found = []
    for name in os.listdir(directory):
        m = _FILE.fullmatch(name)
        if m:
            moment = datetime.strptime(m.group(1), "%Y-%m-%dT%H-%M-%S")
            found.append((moment + timedelta(milliseconds=int((m.group(2) or ".0")[1:]
                                                                  .ljust(3, "0"))), name))
    stream = b""
    for _, name in sorted(found):
        data = (directory / name).read_bytes()
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        if key is not None:
            decryptor = Cipher(algorithms.AES(key), modes.CTR(data[:16])).decryptor()
            data = decryptor.update(data[16:])
        stream += data
    commands, pos = [], 0
    while pos < len(stream):
        command: dict[str, Any] = {"Cmd_type": "Query", "Success": "true"}
        while True:
            end = stream.index(b"\n", pos)
            line = stream[pos:end].decode()
            pos = end + 1
            assert line.startswith("# ") and ": " in line, line
            name, value = line[2:].split(": ", 1)
            assert value, line
            if name == "Payload_len":
                size = int(value)
                command["Payload"] = stream[pos:pos + size]
                assert stream[pos + size:pos + size + 1] == b"\n"
                pos += size + 1
                break
            command[name] = value
        assert _TIME.fullmatch(command["Time"]), command
        assert int(command["Conn_ID"]) > 0, command
        commands.append(command)
    return commands


def rfc3339_nano(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".") + "Z"


def tiproxy_write(directory: Path, files: list[list[tuple[int, str, bytes, dict[str, str]]]],
                  ) -> None:
    """A capture as TiProxy writes one: per file, commands (conn id, Cmd_type, payload without
    the command byte, more keys), the second and later files gzipped; then `meta`."""
    directory.mkdir(parents=True, exist_ok=True)
    moment = datetime.now(UTC)
    name_time = datetime.now()
    count = 0
    for i, commands in enumerate(files):
        out = b""
        for conn, cmd_type, payload, keys in commands:
            moment += timedelta(milliseconds=20)
            head = f"# Time: {rfc3339_nano(moment)}\n# Conn_ID: {conn}\n"
            if cmd_type != "Query":
                head += f"# Cmd_type: {cmd_type}\n"
            head += "".join(f"# {k}: {v}\n" for k, v in keys.items())
            out += f"{head}# Payload_len: {len(payload)}\n".encode() + payload + b"\n"
            count += 1
        stamp = (name_time + timedelta(seconds=i)).strftime("%Y-%m-%dT%H-%M-%S") + ".5"
        if i:
            (directory / f"traffic-{stamp}.log.gz").write_bytes(gzip.compress(out))
        else:
            (directory / f"traffic-{stamp}.log").write_bytes(out)
    (directory / "meta").write_text(json.dumps({"Version": "v1", "Duration": 10**9,
                                                "Cmds": count}))
