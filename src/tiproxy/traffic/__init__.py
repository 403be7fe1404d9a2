"""Traffic capture and replay in TiProxy's native file format, with a report of differences.

- format.py: one command as `# Key: value` lines and its payload (TiProxy's reader accepts ours)
- store.py: the capture directory: rotated `traffic-<time>.log[.gz]` files, AES-256-CTR, `meta`
- outcome.py: what a response says (error, rows, a checksum of the result), from its packets
- statements.py: SQL digests, read-only and secret-bearing statements
- sink.py: the data plane's side, a bounded per-process buffer (the relay's hook and the state
  a joined session is rebuilt with are net/session_capture.py and net/capture_rebuild.py)
- writer.py, capture.py: the control process's side (ordering, encoding, files; the job)
- replay.py, report.py: replaying a capture and comparing each command with what was captured
- jobs.py: TiProxy's capture / replay / cancel / show, for the API and tiproxyctl
"""
