"""The egress policy: which addresses a Dispatcher may connect to.

Off by default (``egress="any"``). With ``egress="public"`` only globally
reachable unicast addresses are allowed. The refused blocks come from this
module's own table of the IANA IPv4 and IPv6 special-purpose address
registries, plus multicast (224.0.0.0/4, ff00::/8): loopback, private
(RFC 1918, ULA), link-local (169.254.0.0/16 with the cloud metadata address,
fe80::/10), shared address space (CGNAT, 100.64.0.0/10), reserved, broadcast,
unspecified, documentation, benchmarking, translation and the anycast service
blocks. In IPv6 only 2000::/3 is global unicast at all. IPv4 addresses
embedded in IPv6 are unwrapped and the IPv4 address is checked: IPv4-mapped
(``::ffff:10.0.0.1``), IPv4-compatible (``::10.0.0.1``), IPv4-translated
(``::ffff:0:10.0.0.1``), NAT64 with the well-known prefix (``64:ff9b::/96``)
and 6to4 (``2002::/16``). Local-use NAT64 (``64:ff9b:1::/48``) and Teredo
(``2001::/32``) are refused whatever they carry. ``egress_allow`` lists CIDRs
and host names that are allowed anyway.

The decision uses only this table and integer arithmetic, never the
``is_global``/``is_private`` family of :mod:`ipaddress`, whose answers differ
between Python versions: it is the same on every supported Python.

The check runs on the address the socket connects to: the connection
resolves the host once, keeps only allowed addresses, connects to one of
them and checks the peer again. A DNS answer that changes between a check and
the connect (rebinding) therefore never reaches a refused address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any, NamedTuple

from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from dispatchkit.exceptions import EgressDenied, UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Block(NamedTuple):
    """A refused block: one entry of the IANA special-purpose registries (or multicast)."""

    network: IPNetwork
    name: str
    rfc: str
    #: IANA's "Globally Reachable" column; None where IANA says N/A or the block
    #: is not in the special-purpose registry. Every block here is refused either way.
    iana_global: bool | None


def _block(cidr: str, name: str, rfc: str, iana_global: bool | None) -> Block:
    return Block(ipaddress.ip_network(cidr), name, rfc, iana_global)


# Why some blocks IANA calls globally reachable are refused all the same: "public"
# means "safe for a webhook sender to connect to", and none of them holds a web
# server. The anycast service addresses (PCP, TURN, DNS-SD SRP, AMT relays, AS112)
# reach the *nearest* instance of the service, which is typically run by the
# sender's own network operator (the NAT gateway answers PCP; RFC 7534 invites
# operators to run AS112 inside their networks): exactly the kind of internal host
# the policy exists to keep out of reach. ORCHIDv2 and DETs (RFC 7343, RFC 9374)
# are hashes of public keys that name hosts for HIP and drone identification, not
# addresses of web servers.
REFUSED_V4: tuple[Block, ...] = (
    _block("0.0.0.0/8", '"This network"', "RFC 791", False),
    _block("0.0.0.0/32", '"This host on this network"', "RFC 1122", False),
    _block("10.0.0.0/8", "Private-Use", "RFC 1918", False),
    _block("100.64.0.0/10", "Shared Address Space (CGNAT)", "RFC 6598", False),
    _block("127.0.0.0/8", "Loopback", "RFC 1122", False),
    _block("169.254.0.0/16", "Link Local (with cloud metadata)", "RFC 3927", False),
    _block("172.16.0.0/12", "Private-Use", "RFC 1918", False),
    # 192.0.0.0/24 is not global; its global-looking members are refused with it.
    _block("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890", False),
    _block("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335", False),
    _block("192.0.0.8/32", "IPv4 dummy address", "RFC 7600", False),
    _block("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723", True),  # refused: above
    _block("192.0.0.10/32", "TURN Anycast", "RFC 8155", True),  # refused: above
    _block("192.0.0.170/31", "NAT64/DNS64 Discovery", "RFC 8880", False),
    _block("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737", False),
    _block("192.31.196.0/24", "AS112-v4", "RFC 7535", True),  # refused: anycast, above
    _block("192.52.193.0/24", "AMT", "RFC 7450", True),  # refused: relay anycast, above
    # Deprecated 6to4 relay anycast (and the 6a44 relay, 192.88.99.2): a relay, not a server.
    _block("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526", None),
    _block("192.168.0.0/16", "Private-Use", "RFC 1918", False),
    _block("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534", True),  # above
    _block("198.18.0.0/15", "Benchmarking", "RFC 2544", False),
    _block("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737", False),
    _block("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737", False),
    _block("224.0.0.0/4", "Multicast (not in the special-purpose registry)", "RFC 5771", None),
    _block("240.0.0.0/4", "Reserved", "RFC 1112", False),
    _block("255.255.255.255/32", "Limited Broadcast", "RFC 919, RFC 8190", False),
)

# IPv6: only 2000::/3 is global unicast; everything outside it is refused unless it
# is one of the embedded-IPv4 forms below (then the IPv4 address decides). The
# blocks outside 2000::/3 are listed for the record: the 2000::/3 rule refuses
# them, and any block the registry adds there later, anyway.
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
REFUSED_V6: tuple[Block, ...] = (
    _block("::/128", "Unspecified Address", "RFC 4291", False),
    _block("::1/128", "Loopback Address", "RFC 4291", False),
    # Local-use NAT64 prefixes are the operator's own translators, and where the
    # IPv4 address sits depends on a prefix length (/48 to /96) the address does
    # not tell: refused whatever it carries.
    _block("64:ff9b:1::/48", "IPv4-IPv6 Translat. (local use)", "RFC 8215", False),
    _block("100::/64", "Discard-Only Address Block", "RFC 6666", False),
    _block("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602", False),
    _block("fc00::/7", "Unique-Local", "RFC 4193", False),
    _block("fe80::/10", "Link-Local Unicast", "RFC 4291", False),
    _block("fec0::/10", "Site-Local (deprecated, not in the registry)", "RFC 3879", None),
    _block("ff00::/8", "Multicast (not in the special-purpose registry)", "RFC 4291", None),
    # Inside 2000::/3. 2001::/23 is not global; its global-looking members are
    # refused with it (see the IPv4 table for why).
    _block("2001::/23", "IETF Protocol Assignments", "RFC 2928", False),
    # Teredo: packets go through whichever Teredo relay the sender's network routes
    # to, then to the client's NAT mapping, whose IPv4 address is obfuscated in the
    # low 32 bits; bits 32-63 hold the Teredo server, which is not where the
    # connection goes. Teredo is obsolete and hosts no webhook receivers: refused.
    _block("2001::/32", "TEREDO", "RFC 4380", None),
    _block("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723", True),
    _block("2001:1::2/128", "TURN Anycast", "RFC 8155", True),
    _block("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665", True),
    _block("2001:2::/48", "Benchmarking", "RFC 5180", False),
    _block("2001:3::/32", "AMT", "RFC 7450", True),
    _block("2001:4:112::/48", "AS112-v6", "RFC 7535", True),
    _block("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843", None),
    _block("2001:20::/28", "ORCHIDv2", "RFC 7343", True),
    _block("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs)", "RFC 9374", True),
    _block("2001:db8::/32", "Documentation", "RFC 3849", False),
    _block("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534", True),
    _block("3fff::/20", "Documentation", "RFC 9637", False),
)

# What is_public checks, per connect: the networks, sorted; for IPv6 only those
# inside 2000::/3 (the rest never gets that far).
_REFUSED_V4 = tuple(sorted(block.network for block in REFUSED_V4))
_REFUSED_V6 = tuple(
    sorted(
        block.network for block in REFUSED_V6 if block.network.network_address in GLOBAL_UNICAST_V6
    )
)


class Embedding(NamedTuple):
    """An IPv6 form that carries an IPv4 address: its prefix, and the IPv4 address's lowest bit."""

    network: ipaddress.IPv6Network
    name: str
    rfc: str
    shift: int


EMBEDDED_V4: tuple[Embedding, ...] = (
    Embedding(ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped", "RFC 4291", 0),
    # ::/96 also holds :: and ::1; their "IPv4" (0.0.0.0, 0.0.0.1) is refused anyway.
    Embedding(ipaddress.IPv6Network("::/96"), "IPv4-compatible (deprecated)", "RFC 4291", 0),
    Embedding(ipaddress.IPv6Network("::ffff:0:0:0/96"), "IPv4-translated (SIIT)", "RFC 2765", 0),
    Embedding(ipaddress.IPv6Network("64:ff9b::/96"), "NAT64 well-known prefix", "RFC 6052", 0),
    Embedding(ipaddress.IPv6Network("2002::/16"), "6to4", "RFC 3056", 80),
)


def embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for the forms of ``EMBEDDED_V4``."""
    for form in EMBEDDED_V4:
        if ip in form.network:
            return ipaddress.IPv4Address(int(ip) >> form.shift & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True for a globally reachable unicast address (embedded IPv4 checked too).

    The same answer on every Python: only the tables above and integer
    arithmetic decide, never ``ip.is_global`` and its kin.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_v4(ip)
        if inner is not None:
            return is_public(inner)
        if ip not in GLOBAL_UNICAST_V6:
            return False
        return not any(ip in network for network in _REFUSED_V6)
    return not any(ip in network for network in _REFUSED_V4)


class EgressPolicy:
    """Allows public addresses, plus the CIDRs and host names of ``allow``."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        for entry in allow:
            if not isinstance(entry, str) or not entry:
                raise UsageError(f"egress_allow takes CIDRs and host names, got {entry!r}")
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    def permits(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).partition("%")[0])
        return is_public(ip) or any(ip in network for network in self.networks)

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".").strip("[]") in self.hosts

    def refuses_literal(self, host: str) -> bool:
        """True for an address-literal ``host`` the policy refuses; a name is never refused here.

        Behind a proxy this is all there is to check: the proxy resolves names.
        """
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return not (self.permits(ip) or self.host_allowed(host))

    def __repr__(self) -> str:
        allowed = [*map(str, self.networks), *sorted(self.hosts)]
        return f"EgressPolicy(public, allow={allowed})"


def connect_guarded(conn: Any, policy: EgressPolicy) -> socket.socket:
    """Resolve, keep the allowed addresses, connect to one, check the peer: urllib3's contract."""
    host, port = conn._dns_host, conn.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    trusted = policy.host_allowed(host)
    allowed = [i for i in infos if trusted or policy.permits(ipaddress.ip_address(str(i[4][0])))]
    if not allowed:
        shown = ", ".join(sorted({str(i[4][0]) for i in infos}))
        raise EgressDenied(f"egress policy refuses {host} ({shown}): not a public address")
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in allowed:
        sock = socket.socket(family, kind, proto)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(conn.timeout)
            sock.connect(sockaddr)
            peer = ipaddress.ip_address(sock.getpeername()[0])
            if not trusted and not policy.permits(peer):
                raise EgressDenied(f"egress policy refuses the connected peer {peer}")
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeoutError(
                conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
            ) from exc
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise NewConnectionError(conn, f"Failed to establish a new connection: {last}")
