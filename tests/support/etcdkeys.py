"""What a test reads from a real etcd (tiproxy.playground.etcd): keys under a prefix, leases."""

from __future__ import annotations

from tiproxy.discovery.etcdapi import b64, prefix_range_end, unb64
from tiproxy.playground.etcd import EtcdServer


def keys_under(etcd: EtcdServer, prefix: str) -> dict[str, tuple[str, int]]:
    """key -> (value, lease) for every key under `prefix`."""
    raw = prefix.encode()
    doc = etcd.call("kv/range", {"key": b64(raw), "range_end": b64(prefix_range_end(raw))})
    return {unb64(kv["key"]).decode(): (unb64(kv.get("value", "")).decode(),
                                        int(kv.get("lease", 0)))
            for kv in doc.get("kvs", [])}


def lease_ttl(etcd: EtcdServer, lease: int) -> tuple[int, int, list[str]]:
    """(seconds left, granted seconds, keys attached); -1 seconds left once it is gone."""
    doc = etcd.call("lease/timetolive", {"ID": str(lease), "keys": True})
    return (int(doc.get("TTL", -1)), int(doc.get("grantedTTL", 0)),
            sorted(unb64(k).decode() for k in doc.get("keys", [])))
