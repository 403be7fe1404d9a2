"""The capture directory, the writer and the sink, on real files in a temporary directory."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from tiproxy.protocol.packets import build_ok, frame
from tiproxy.traffic import report as report_module
from tiproxy.traffic import sql
from tiproxy.traffic import writer as writer_module
from tiproxy.traffic.format import Decoder, TrafficCommand, encode
from tiproxy.traffic.outcome import Outcome
from tiproxy.traffic.sink import CaptureSink, Record
from tiproxy.traffic.store import (
    PARTIAL,
    CaptureFiles,
    StoreError,
    TrafficReader,
    input_dir,
    load_key,
    prepare_output,
    read_meta,
    traffic_files,
    write_meta,
)
from tiproxy.traffic.writer import QUEUE_BYTES, CaptureWriter

KEY = bytes(range(32))
NAME = re.compile(r"traffic-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d(\.\d{1,3})?\.log(\.gz)?")


def command(i: int, conn: int = 1) -> TrafficCommand:
    return TrafficCommand(1_700_000_000_000_000_000 + i, conn, b"\x03SELECT " + str(i).encode())


def read_back(directory: Path, key: bytes | None) -> list[TrafficCommand]:
    reader = TrafficReader(directory, key)
    decoder = Decoder(reader)
    out = []
    while (c := decoder.next()) is not None:
        out.append(c)
    reader.close()
    return out


@pytest.mark.parametrize(("compress", "key"), [(False, None), (True, None), (False, KEY),
                                               (True, KEY)])
def test_files_rotate_and_read_back_as_one_stream(tmp_path: Path, compress: bool,
                                                  key: bytes | None) -> None:
    files = CaptureFiles(tmp_path, compress, key, file_size=2000)
    written = [command(i) for i in range(300)]
    for i in range(0, 300, 7):
        files.write(b"".join(encode(c) for c in written[i:i + 7]))
    files.close()
    # In time order (not the names' order: "...05.log" is later than "...05.001.log")
    assert len(files.files) > 3 and files.files == [n for _, n in traffic_files(tmp_path)]
    assert sorted(files.files) == sorted(os.listdir(tmp_path))
    assert all(NAME.fullmatch(n) and n.endswith(".gz") == compress for n in files.files)
    assert not (tmp_path / PARTIAL).exists()
    assert all(stat.S_IMODE((tmp_path / n).stat().st_mode) == 0o600 for n in files.files)
    assert [c.packet for c in read_back(tmp_path, key)] == [c.packet for c in written]


def test_an_encrypted_file_is_gzip_of_iv_and_ciphertext(tmp_path: Path) -> None:
    for _ in range(2):
        files = CaptureFiles(tmp_path, True, KEY)
        files.write(encode(command(1)))
        files.close()
    first, second = (gzip.decompress((tmp_path / n).read_bytes()) for n in
                     sorted(os.listdir(tmp_path)))
    assert b"SELECT" not in first
    assert first[:16] != second[:16]  # a fresh IV per file
    assert len(first) == 16 + len(encode(command(1)))


def test_a_wrong_key_reads_as_garbage_not_as_commands(tmp_path: Path) -> None:
    files = CaptureFiles(tmp_path, True, KEY)
    files.write(encode(command(1)))
    files.close()
    with pytest.raises(ValueError, match="line"):
        read_back(tmp_path, bytes(32))


def test_the_output_directory_is_made_private_and_a_finished_capture_refused(
        tmp_path: Path) -> None:
    out = prepare_output(str(tmp_path / "a" / "b"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    write_meta(out, duration_ns=5, cmds=3, filtered=1, method="aes256-ctr", dropped=0)
    assert json.loads((out / "meta").read_text()) == {
        "Version": "v1", "Duration": 5, "Cmds": 3, "FilteredCmds": 1,
        "EncryptMethod": "aes256-ctr"}
    assert read_meta(out)["Cmds"] == 3
    with pytest.raises(StoreError, match="meta already exists"):
        prepare_output(str(out))
    (tmp_path / "file").write_text("x")
    for bad, reason in ((str(tmp_path / "file"), "Not a directory|not a directory"),
                        ("s3://bucket/x", "only a local directory"), ("", "required")):
        with pytest.raises(StoreError, match=reason):
            prepare_output(bad)


def test_reading_refuses_a_fifo_among_the_traffic_files(tmp_path: Path) -> None:
    files = CaptureFiles(tmp_path, False, None)
    files.write(encode(command(1)))
    files.close()
    os.mkfifo(tmp_path / "traffic-2999-01-01T00-00-00.log")  # sorts after the real one
    reader = TrafficReader(input_dir(str(tmp_path)), None)
    decoder = Decoder(reader)
    assert decoder.next() is not None
    with pytest.raises(StoreError, match="not a regular file"):
        decoder.next()
    with pytest.raises(StoreError, match=r"not a directory|No such file"):
        input_dir(str(tmp_path / "none"))


def test_keys_are_checked_and_never_shown(tmp_path: Path) -> None:
    assert load_key("", "") is None
    assert load_key("plaintext", "/nowhere") is None
    path = tmp_path / "key"
    path.write_bytes(b"k" * 32 + b"\n")
    assert load_key("AES256-CTR", str(path)) == b"k" * 32
    path.write_bytes(b"secret-but-short")
    with pytest.raises(StoreError) as e:
        load_key("aes256-ctr", str(path))
    assert "expecting 32" in str(e.value) and "secret" not in str(e.value)
    with pytest.raises(StoreError, match="encryption-key-path is not set"):
        load_key("aes256-ctr", "")
    with pytest.raises(StoreError, match="unsupported encrypt method"):
        load_key("rot13", str(path))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(StoreError, match="not a regular file"):
        load_key("aes256-ctr", str(tmp_path / "fifo"))


# -- the writer ------------------------------------------------------------------------------


def record(start: int, packet: bytes, conn: int = 1,
           statement: tuple[int, int, bytes | None] | None = None) -> Record:
    return (start, conn, packet, start + 1000, 0, 2, None, statement, 1)


def test_the_writer_orders_by_start_names_statements_and_leaves_secrets_out(
        tmp_path: Path) -> None:
    writer = CaptureWriter(CaptureFiles(tmp_path, True, None))
    base = 1_700_000_000_000_000_000
    execute_without_types = b"\x17" + (9).to_bytes(4, "little") + b"\x00\x01\x00\x00\x00" \
        + b"\x00" + b"\x00" + b"\x05\x00\x00\x00"
    batch = [
        record(base + 30, b"\x03SELECT 3"),
        record(base + 10, b"\x16SELECT ? + 1", statement=(9, 1, b"\x03\x00")),  # rebuilt
        record(base + 40, execute_without_types),
        record(base + 20, b"\x03CREATE USER x IDENTIFIED BY 'pw'"),
        record(base + 21, b"\x16GRANT ALL ON *.* TO y IDENTIFIED BY ?", statement=(4, 1, None)),
        record(base + 22, b"\x17\x04\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00"),
        record(base + 23, b"\xfa\x09\x00\x00\x00"),  # COM_STMT_BULK_EXECUTE: no TiProxy name
        record(base + 24, b""),  # a 16 MiB command
    ]
    assert writer.put(batch, 1000)
    writer.finish()
    written = read_back(tmp_path, None)
    assert [c.start_ns - base for c in written] == [10, 30, 40]
    execute = written[2]
    assert (execute.ps_id, execute.prepared_sql) == (9, b"SELECT ? + 1")
    assert execute.packet == b"\x17" + (9).to_bytes(4, "little") + b"\x00\x01\x00\x00\x00" \
        + b"\x00" + b"\x01\x03\x00" + b"\x05\x00\x00\x00"  # the types put back
    assert (writer.captured, writer.filtered) == (3, 5)
    data = b"".join(gzip.decompress((tmp_path / n).read_bytes()) for n in writer.files.files)
    assert b"pw" not in data and b"IDENTIFIED" not in data


def test_a_writer_that_cannot_write_makes_room_by_dropping(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / PARTIAL)  # opening it blocks the writer's thread until a reader comes
    writer = CaptureWriter(CaptureFiles(tmp_path, False, None))
    big = record(0, b"\x03" + b"x" * 1000)
    taken = 0
    deadline = time.monotonic() + 30
    while writer.put([big] * 100, 100 * 1000):
        taken += 1
        assert time.monotonic() < deadline
    assert taken * 100 * 1000 <= QUEUE_BYTES
    reader = threading.Thread(target=(tmp_path / PARTIAL).read_bytes)
    reader.start()
    writer.finish()
    reader.join()
    assert writer.captured == taken * 100


def test_the_sink_hands_batches_on_and_counts_what_had_no_room() -> None:
    async def run() -> tuple[list[int], int]:
        delivered: list[int] = []

        def deliver(batch: list[Record], size: int) -> bool:
            delivered.append(len(batch))
            return len(delivered) == 1  # room for the first batch only

        sink = CaptureSink(deliver)
        for i in range(3):
            sink.add(record(i, b"\x03SELECT 1"))
        await asyncio.sleep(0.2)  # the flush interval passes
        for i in range(600):
            sink.add(record(i, b"\x03SELECT 1"))  # a full batch goes at once
        sink.close()
        sink.add(record(0, b"\x03SELECT 1"))  # closed: not taken
        return delivered, sink.dropped

    delivered, dropped = asyncio.run(run())
    assert delivered == [3, 512, 88]
    assert dropped == 600


# -- statement text ------------------------------------------------------------------------------


def test_digests_group_statements_that_differ_in_literals_only() -> None:
    assert sql.normalize("SELECT * FROM t WHERE id IN (1, 2, 3) AND n = 'x' -- c") == \
        "select * from t where id in (...) and n = ?"
    assert sql.normalize("INSERT INTO t VALUES (1,'a'),(2,'b')") == "insert into t values (...)"
    assert sql.normalize("/*!40101 SET NAMES utf8 */") == "set names utf8"
    assert sql.digest("select 1") == sql.digest("SELECT  2 /* x */")
    assert sql.digest("SELECT `a b` FROM t") != sql.digest("SELECT `a c` FROM t")


@pytest.mark.parametrize(("text", "read_only"), [
    ("SELECT 1", True), ("select * from t for update", False), ("  /*x*/ SHOW TABLES", True),
    ("WITH x AS (SELECT 1) SELECT * FROM x", True), ("BEGIN", True), ("start transaction", True),
    ("SET NAMES utf8mb4", True), ("SET @a = 1", True), ("set session sql_mode = ''", True),
    ("SET @@session.x = 1", True), ("SET GLOBAL x = 1", False), ("SET @@global.x = 1", False),
    ("INSERT INTO t VALUES (1)", False), ("UPDATE t SET a = 1", False), ("DROP TABLE t", False),
    ("SELECT * INTO OUTFILE '/tmp/x' FROM t", False), ("", False),
])
def test_read_only_statements(text: str, read_only: bool) -> None:
    assert sql.is_read_only(text.encode()) is read_only


@pytest.mark.parametrize(("text", "sensitive"), [
    ("CREATE USER u IDENTIFIED BY 'p'", True), ("create or replace user u", True),
    ("ALTER USER u IDENTIFIED VIA ed25519 USING PASSWORD('p')", True),
    ("SET PASSWORD FOR u = PASSWORD('p')", True), ("GRANT SELECT ON db.* TO u", True),
    ("/* c */ grant all on *.* to u", True), ("CHANGE MASTER TO MASTER_PASSWORD='p'", True),
    ("LOAD DATA LOCAL INFILE 'f' INTO TABLE t", True), ("SELECT password FROM users", False),
    ("SELECT * FROM grants", False), ("UPDATE t SET identified = 1", False),
    # after another statement, inside another one, and the other password functions
    ("SELECT 1; SET PASSWORD = '*0123456789ABCDEF0123456789ABCDEF01234567'", True),
    ("DO 1;grant all on db.* to u", True), ("SELECT ED25519_PASSWORD('p')", True),
    ("EXECUTE IMMEDIATE 'SET PASSWORD = ''*0123'''", True),
    ("PREPARE s FROM 'ALTER USER u ACCOUNT LOCK'", True),
    ("BEGIN NOT ATOMIC CREATE USER u; END", True),
    ("SELECT 'a; grant' FROM t", False), ("SELECT user_password FROM t", False),
])
def test_statements_that_may_carry_secrets(text: str, sensitive: bool) -> None:
    assert sql.is_sensitive(text.encode()) is sensitive


def test_a_report_keeps_a_bounded_number_of_statements_and_errors() -> None:
    rep = report_module.ReplayReport("in", "target", 1.0)
    total = report_module.MAX_GROUPS + 50
    for i in range(total):
        text = f"SELECT c{i} FROM t"
        rep.add(TrafficCommand(i, 1, b"\x03" + text.encode()), Outcome(), 0, text, sql.digest(text))
    for i in range(report_module.MAX_ERRORS + 5):
        rep.other_error("connect", f"error {i}", i)
    assert len(rep.groups) == report_module.MAX_GROUPS + 1
    assert rep.groups[("", "")].count == 50
    assert rep.groups[("", "")].sample == report_module.MORE_STATEMENTS
    assert len(rep.errors) == report_module.MAX_ERRORS + 1
    assert sum(g.count for g in rep.groups.values()) == total == rep.counts["replayed"]


def test_a_workers_summarized_batch_writes_what_the_raw_one_does(tmp_path: Path) -> None:
    ok = frame(build_ok(2, affected=3), 1)
    column = b"\x03def\x00\x00\x00\x011\x00\x0c\x3f\x00\x01\x00\x00\x00\x08\x81\x00\x00\x00\x00"
    rows = frame(b"\x01", 1) + frame(column, 2) + frame(b"\x011", 3) \
        + frame(build_ok(2, header=0xFE), 4)
    base = 1_700_000_000_000_000_000
    batch: list[Record] = [
        (base, 1, b"\x03UPDATE t SET a = 1", base + 5, 0, 2, ok, None, 1),
        (base + 10, 1, b"\x03SELECT 1", base + 15, 0, 2, rows, None, 1),
        (base + 20, 1, b"\x03SELECT x", base + 25, 1146, 2, b"\xff...", None, 1),
    ]
    summarized, size = writer_module.summarized(batch)
    assert [type(r[6]) for r in summarized] == [tuple, tuple, type(None)]
    assert size < sum(len(r[2]) + len(r[6] or b"") for r in batch) + 64 * 3
    written = []
    for name, records in (("raw", batch), ("summarized", summarized)):
        out = tmp_path / name
        out.mkdir()
        writer = CaptureWriter(CaptureFiles(out, False, None))
        assert writer.put(records, 100)
        writer.finish()
        written.append([dataclasses.replace(c, where="") for c in read_back(out, None)])
    assert written[0] == written[1]
    assert (written[0][0].affected, written[0][1].rows) == (3, 1)
