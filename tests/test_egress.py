"""The egress policy: its table of addresses, its settings, and a rebinding resolver.

Refused destinations are refused before any connection is attempted, so the
addresses below (cloud metadata, private ranges) are never contacted. The calls
refused or allowed by the policy, and redirect following, run against both
drivers in ``tests/test_async_faults.py``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from dispatchkit import EgressDenied, UsageError
from dispatchkit._egress import REFUSED_V4, REFUSED_V6, Block, EgressPolicy, is_public
from dispatchkit.server import TaskApp, TaskServer


def _v6(value: int) -> str:
    return str(ipaddress.IPv6Address(value))


def _wrappings(v4: str) -> dict[str, str]:
    """Every IPv6 form that carries ``v4``, by name."""
    inner = int(ipaddress.IPv4Address(v4))
    return {
        "mapped": _v6(0xFFFF << 32 | inner),  # ::ffff:a.b.c.d
        "compatible": _v6(inner),  # ::a.b.c.d
        "translated": _v6(0xFFFF << 48 | inner),  # ::ffff:0:a.b.c.d
        "nat64": _v6(0x64FF9B << 96 | inner),  # 64:ff9b::a.b.c.d
        # 64:ff9b:1::/48 as a /48 translation prefix: a.b, then the zero u-octet, then c.d
        "nat64-local": _v6(0x64FF9B0001 << 80 | (inner >> 16) << 64 | (inner & 0xFFFF) << 40),
        "6to4": _v6(0x2002 << 112 | inner << 80 | 1),  # 2002:aabb:ccdd::1
        "teredo-server": _v6(0x20010000 << 96 | inner << 64 | 0xFFFF_FFFF),
        "teredo-client": _v6(0x20010000 << 96 | 0x08080808 << 64 | (inner ^ 0xFFFFFFFF)),
    }


_REFUSED_INNER = ["127.0.0.1", "10.0.0.1", "169.254.169.254"]
# Teredo and local-use NAT64 are refused outright, whatever they carry.
_ALWAYS_REFUSED_WRAPPINGS = {"nat64-local", "teredo-server", "teredo-client"}

ADDRESSES: list[tuple[str, bool]] = [
    # ordinary public addresses stay allowed
    ("8.8.8.8", True),
    ("1.1.1.1", True),
    ("9.9.9.9", True),
    ("2606:4700:4700::1111", True),
    ("2001:4860:4860::8888", True),
    ("2620:fe::fe", True),  # Quad9, in 2620::/23 like the AS112 block below
    ("2a00:1450:4001:81c::200e", True),
    ("2001:200:dff:fff1:216:3eff:feb1:44d7", True),  # first address past 2001::/23
    ("2003::1", True),  # first address past 6to4
    ("2000::1", True),  # start of 2000::/3
    ("3ffe::1", True),  # the returned 6bone block is ordinary space again
    ("3fff:1000::", True),  # just past 3fff::/20
    # IPv4 special-purpose registry, each block and its edges
    ("0.0.0.0", False),
    ("0.255.255.255", False),
    ("1.0.0.0", True),
    ("9.255.255.255", True),
    ("10.0.0.0", False),
    ("10.1.2.3", False),
    ("10.255.255.255", False),
    ("11.0.0.0", True),
    ("100.63.255.255", True),
    ("100.64.0.0", False),  # shared address space (CGNAT)
    ("100.64.0.1", False),
    ("100.127.255.255", False),
    ("100.128.0.0", True),
    ("126.255.255.255", True),
    ("127.0.0.0", False),
    ("127.0.0.1", False),
    ("127.255.0.9", False),
    ("127.255.255.255", False),
    ("128.0.0.0", True),
    ("169.253.255.255", True),
    ("169.254.0.0", False),
    ("169.254.169.254", False),  # cloud metadata
    ("169.254.255.255", False),
    ("169.255.0.0", True),
    ("172.15.255.255", True),
    ("172.16.0.0", False),
    ("172.16.0.1", False),
    ("172.31.255.255", False),
    ("172.32.0.0", True),
    ("191.255.255.255", True),
    ("192.0.0.0", False),  # IETF protocol assignments, service continuity (DS-Lite)
    ("192.0.0.8", False),  # dummy address
    ("192.0.0.9", False),  # PCP anycast: IANA says globally reachable, refused
    ("192.0.0.10", False),  # TURN anycast: the same
    ("192.0.0.170", False),  # NAT64/DNS64 discovery
    ("192.0.0.171", False),
    ("192.0.0.255", False),
    ("192.0.1.0", True),
    ("192.0.1.255", True),
    ("192.0.2.0", False),  # TEST-NET-1
    ("192.0.2.1", False),
    ("192.0.2.255", False),
    ("192.0.3.0", True),
    ("192.31.195.255", True),
    ("192.31.196.1", False),  # AS112-v4 anycast: globally reachable per IANA, refused
    ("192.31.197.0", True),
    ("192.52.192.255", True),
    ("192.52.193.1", False),  # AMT relay anycast: the same
    ("192.52.194.0", True),
    ("192.88.98.255", True),
    ("192.88.99.1", False),  # deprecated 6to4 relay anycast
    ("192.88.99.2", False),
    ("192.88.100.0", True),
    ("192.167.255.255", True),
    ("192.168.0.0", False),
    ("192.168.0.1", False),
    ("192.168.255.255", False),
    ("192.169.0.0", True),
    ("192.175.47.255", True),
    ("192.175.48.1", False),  # AS112 direct delegation anycast
    ("192.175.49.0", True),
    ("198.17.255.255", True),
    ("198.18.0.0", False),  # benchmarking
    ("198.18.0.1", False),
    ("198.19.255.255", False),
    ("198.20.0.0", True),
    ("198.51.99.255", True),
    ("198.51.100.0", False),  # TEST-NET-2
    ("198.51.100.255", False),
    ("198.51.101.0", True),
    ("203.0.112.255", True),
    ("203.0.113.0", False),  # TEST-NET-3
    ("203.0.113.255", False),
    ("203.0.114.0", True),
    ("223.255.255.255", True),
    ("224.0.0.0", False),  # multicast
    ("224.0.0.1", False),
    ("233.252.0.1", False),
    ("239.255.255.255", False),
    ("240.0.0.0", False),  # reserved
    ("240.0.0.1", False),
    ("255.255.255.254", False),
    ("255.255.255.255", False),  # limited broadcast
    # IPv6 special-purpose registry, each block and its edges
    ("::", False),
    ("::1", False),
    ("::2", False),
    ("::1:0:0:0", False),
    ("::fffe:ffff:ffff", False),
    ("64:ff9b::", False),  # NAT64 of 0.0.0.0
    ("64:ff9b::1:0:0", False),  # in 64:ff9b::/64 but outside the /96
    ("64:ff9b:1::", False),  # local-use NAT64: refused outright
    ("64:ff9b:1::808:808", False),
    ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", False),
    ("100::", False),  # discard-only
    ("100::ffff:ffff:ffff:ffff", False),
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False),  # just below 2000::/3
    ("2001::", False),  # Teredo
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo example of RFC 4380
    ("2001:1::1", False),  # PCP anycast: globally reachable per IANA, refused
    ("2001:1::2", False),  # TURN anycast: the same
    ("2001:1::3", False),  # DNS-SD SRP anycast: the same
    ("2001:2::1", False),  # benchmarking
    ("2001:3::1", False),  # AMT
    ("2001:4:112::1", False),  # AS112-v6
    ("2001:5::1", False),  # unassigned in the IETF block
    ("2001:10::1", False),  # deprecated ORCHID
    ("2001:20::1", False),  # ORCHIDv2
    ("2001:2f:ffff::1", False),
    ("2001:30::1", False),  # DETs
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", False),  # end of 2001::/23
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", True),
    ("2001:db8::", False),  # documentation
    ("2001:db8::1", False),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", False),
    ("2001:db9::", True),
    ("2620:4f:7fff:ffff:ffff:ffff:ffff:ffff", True),
    ("2620:4f:8000::1", False),  # AS112 direct delegation
    ("2620:4f:8001::", True),
    ("3fff::", False),  # documentation (RFC 9637)
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", False),
    ("3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", True),  # last of 2000::/3
    ("4000::", False),  # past 2000::/3
    ("5f00::1", False),  # SRv6 SIDs
    ("fc00::1", False),  # unique local
    ("fd12:3456:789a::1", False),
    ("fe80::1", False),  # link-local
    ("febf:ffff::1", False),
    ("fec0::1", False),  # deprecated site-local
    ("ff02::1", False),  # multicast
    ("ff0e::1", False),
    # embedded IPv4 of public addresses: checked by the inner address
    ("::ffff:8.8.8.8", True),  # IPv4-mapped
    ("::808:808", True),  # IPv4-compatible
    ("::ffff:0:808:808", True),  # IPv4-translated
    ("64:ff9b::808:808", True),  # NAT64, well-known prefix
    ("64:ff9b::101:101", True),
    ("2002:808:808::1", True),  # 6to4
    ("::ffff:192.0.0.9", False),  # the refused IANA exceptions stay refused inside too
    ("::ffff:224.0.0.1", False),
    ("2002:c058:6301::", False),  # 6to4 of the 6to4 relay anycast
    # the cases that ipaddress's is_global let through
    ("64:ff9b:1::a00:1", False),  # RFC 8215 local-use NAT64 (global for Python 3.10 to 3.12.1)
    ("::7f00:1", False),  # IPv4-compatible 127.0.0.1 (every Python)
    ("::ffff:0:7f00:1", False),  # IPv4-translated 127.0.0.1 (every Python)
]

# Every IPv6 wrapping of a refused IPv4 address is refused; of a public one, only
# Teredo and local-use NAT64 are. (label, address, public)
WRAPPED: list[tuple[str, str, bool]] = [
    *(
        (f"{name}({inner})", address, False)
        for inner in _REFUSED_INNER
        for name, address in _wrappings(inner).items()
    ),
    *(
        (name, address, name not in _ALWAYS_REFUSED_WRAPPINGS)
        for name, address in _wrappings("8.8.8.8").items()
    ),
]


@pytest.mark.parametrize(
    ("address", "public"),
    [*ADDRESSES, *(pytest.param(a, p, id=f"{a}={label}") for label, a, p in WRAPPED)],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("block", [*REFUSED_V4, *REFUSED_V6], ids=lambda block: str(block.network))
def test_every_block_of_the_table_is_refused_to_its_edges(block: Block) -> None:
    assert not is_public(block.network.network_address)
    assert not is_public(block.network.broadcast_address)


_CLASSIFIERS = [
    "is_global",
    "is_private",
    "is_reserved",
    "is_loopback",
    "is_link_local",
    "is_multicast",
    "is_unspecified",
    "is_site_local",
    "ipv4_mapped",
    "sixtofour",
    "teredo",
]


def test_the_decision_does_not_ask_the_ipaddress_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its classifications change between Python versions; ours must not."""

    def refuse(self: object) -> None:
        raise AssertionError("the egress decision consulted ipaddress")

    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        for name in _CLASSIFIERS:
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, property(refuse))
    for address, public in [*ADDRESSES, *((a, p) for _, a, p in WRAPPED)]:
        assert is_public(ipaddress.ip_address(address)) is public, address


def test_allow_list_overrides_the_table() -> None:
    policy = EgressPolicy(["192.0.0.9/32", "64:ff9b:1::/48", "fe80::/10"])
    assert policy.permits(ipaddress.ip_address("192.0.0.9"))
    assert policy.permits(ipaddress.ip_address("64:ff9b:1::a00:1"))
    assert policy.permits(ipaddress.ip_address("fe80::1%1"))  # the scope is dropped
    assert policy.permits(ipaddress.ip_address("8.8.8.8"))
    assert not policy.permits(ipaddress.ip_address("192.0.0.10"))
    assert not policy.permits(ipaddress.ip_address("::7f00:1"))


def test_bad_egress_settings(make_dispatcher: Any) -> None:
    with pytest.raises(UsageError, match="egress"):
        make_dispatcher(egress="private")
    with pytest.raises(UsageError, match="egress_allow"):
        make_dispatcher(egress_allow="10.0.0.0/8")


@pytest.fixture
def server_on_127_0_0_2() -> Iterator[TaskServer]:
    app = TaskApp()

    @app.task
    def multiply(x: int, y: int) -> int:
        return x * y

    with app.server(host="127.0.0.2", port=0) as server:
        yield server


def test_the_address_connected_to_is_checked_not_an_earlier_answer(
    make_dispatcher: Any, server_on_127_0_0_2: TaskServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebinding resolver: allowed address first, a refused one afterwards."""
    answers = ["127.0.0.2", "127.0.0.1"]
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        address = answers[min(len(lookups), len(answers) - 1)]
        lookups.append(address)
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.test:{server_on_127_0_0_2.port}/multiply"
    first = make_dispatcher(egress="public", egress_allow=["127.0.0.2/32"])
    assert first.call(url, x=3, y=3) == 9
    assert lookups == ["127.0.0.2"]  # one lookup per connection, and that address was used
    second = make_dispatcher(egress="public", egress_allow=["127.0.0.2/32"])
    with pytest.raises(EgressDenied, match=r"127\.0\.0\.1"):
        second.call(url, x=3, y=3)  # the new answer is checked where it is connected to
