"""The egress policy: which addresses a Dispatcher may connect to.

Off by default (``egress="any"``). With ``egress="public"`` only globally
routable unicast addresses are allowed: loopback, private (RFC 1918, ULA),
link-local (169.254.0.0/16 with the cloud metadata address, fe80::/10),
CGNAT (100.64.0.0/10), multicast, reserved, unspecified, documentation and
benchmarking ranges are refused, for IPv4 and IPv6, including IPv4 addresses
embedded in IPv6 (``::ffff:10.0.0.1``, NAT64, 6to4). ``egress_allow`` lists
CIDRs and host names that are allowed anyway.

The check runs on the address the socket connects to: the connection
resolves the host once, keeps only allowed addresses, connects to one of
them and checks the peer again. A DNS answer that changes between a check and
the connect (rebinding) therefore never reaches a refused address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from dispatchkit.exceptions import EgressDenied, UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


def is_public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address (embedded IPv4 checked too)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            return is_public(inner)
    return ip.is_global and not ip.is_multicast


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
