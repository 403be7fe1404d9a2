"""PROXY protocol v2 headers: read from the start of a client's bytes, written for backends."""

from __future__ import annotations

import pytest

from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.proxyproto import SIGNATURE, ProxyHeader, build, parse

HANDSHAKE = b"\x20\x00\x00\x01" + b"\x00" * 32  # what a client without a header sends first


def test_a_header_round_trips_and_what_follows_is_left() -> None:
    for src, dst in ((("192.0.2.7", 4321), ("10.0.0.1", 6000)),
                     (("2001:db8::7", 4321), ("2001:db8::1", 6000))):
        header = build(src, dst)
        assert header.startswith(SIGNATURE)
        assert parse(header + HANDSHAKE) == (ProxyHeader(src, dst), len(header))


def test_ipv4_facing_ipv6_is_written_as_mapped_addresses() -> None:
    header = build(("192.0.2.7", 1), ("::1", 2))
    assert parse(header) == (ProxyHeader(("::ffff:c000:207", 1), ("::1", 2)), len(header))


def test_a_client_without_a_header_is_not_delayed() -> None:
    assert parse(HANDSHAKE) == (None, 0)
    assert parse(b"\x20") == (None, 0)


def test_a_header_cut_anywhere_asks_for_more() -> None:
    header = build(("192.0.2.7", 4321), ("10.0.0.1", 6000))
    for cut in range(1, len(header)):
        assert parse(header[:cut]) is None, cut


def test_local_and_tlvs() -> None:
    local = SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(local + HANDSHAKE) == (ProxyHeader(None, None), len(local))
    header = build(("192.0.2.7", 4321), ("10.0.0.1", 6000))
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP
    longer = header[:14] + (12 + len(tlv)).to_bytes(2, "big") + header[16:] + tlv
    assert parse(longer) == (ProxyHeader(("192.0.2.7", 4321), ("10.0.0.1", 6000)), len(longer))


@pytest.mark.parametrize("bad", [
    SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 signature
    SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
    SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # shorter than its IPv4 addresses
    SIGNATURE + b"\x21\x51\x00\x00",  # address family 5
    SIGNATURE + b"\x21\x11\xff\xff",  # 64 KiB of header
])
def test_a_malformed_header_is_refused(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(bad)
