"""The egress policy and redirect following, on loopback only.

Refused destinations are refused before any connection is attempted, so the
addresses below (cloud metadata, private ranges) are never contacted.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import peer_stats
from dispatchkit import (
    DispatchError,
    EgressDenied,
    HTTPStatusError,
    Request,
    UsageError,
    hookimpl,
)
from dispatchkit._egress import is_public
from dispatchkit.server import TaskApp, TaskServer


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("127.255.0.9", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # CGNAT
        ("224.0.0.1", False),  # multicast
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("240.0.0.1", False),  # reserved
        ("192.0.2.1", False),  # documentation
        ("198.18.0.1", False),  # benchmarking
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("2001:db8::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:a00:1::", False),  # 6to4 of 10.0.0.1
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


class Attempts:
    def __init__(self) -> None:
        self.count = 0

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.count += 1


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1", "[::ffff:127.0.0.1]"],
)
def test_public_only_refuses_before_sending(make_dispatcher: Any, peer: str, host: str) -> None:
    port = peer.rpartition(":")[2]
    attempts = Attempts()
    d = make_dispatcher(egress="public", plugins=[attempts])
    with make_dispatcher() as plain:
        plain.call(f"{peer}/stats/reset")
        with pytest.raises(EgressDenied, match="egress policy refuses") as info:
            d.call(f"http://{host}:{port}/multiply", "POST", x=1, y=2)
        assert peer_stats(plain, peer)["requests"] == 1  # only the stats call: nothing was sent
    assert isinstance(info.value, DispatchError)
    assert info.value.method == "POST"
    assert attempts.count == 1  # not retried


def test_allow_list_by_cidr_and_by_name(make_dispatcher: Any, peer: str) -> None:
    port = peer.rpartition(":")[2]
    by_cidr = make_dispatcher(egress="public", egress_allow=["127.0.0.0/8"])
    assert by_cidr.call(f"{peer}/multiply", x=2, y=3) == 6
    by_name = make_dispatcher(egress="public", egress_allow=["localhost"])
    assert by_name.call(f"http://localhost:{port}/multiply", x=2, y=4) == 8
    with pytest.raises(EgressDenied):
        by_name.call(f"{peer}/multiply", x=1, y=1)  # 127.0.0.1 by address is not "localhost"


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


# -- redirects -------------------------------------------------------------------------


def test_redirects_are_followed_when_asked(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(follow_redirects=2)
    assert d.call(f"{peer}/redirect", to="/multiply?x=6&y=7") == 42


def test_too_many_redirects_give_the_last_3xx(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(follow_redirects=2)
    loop = "/redirect?to=/redirect%3Fto%3D/redirect%253Fto%253D/multiply"
    with pytest.raises(HTTPStatusError) as info:
        d.call(f"{peer}{loop}")
    assert info.value.status == 302


@pytest.mark.parametrize(("code", "method"), [(303, "GET"), (302, "GET"), (307, "POST")])
def test_redirect_methods(make_dispatcher: Any, peer: str, code: int, method: str) -> None:
    d = make_dispatcher(follow_redirects=1)
    echo = d.call(f"{peer}/status/{code}", "POST", location="/echo", x="1")
    assert echo["method"] == method
    assert echo["body"] == ("location=%2Fecho&x=1" if method == "POST" else "")


def test_credentials_do_not_follow_a_redirect_to_another_origin(
    make_dispatcher: Any, peer: str
) -> None:
    port = peer.rpartition(":")[2]
    d = make_dispatcher(follow_redirects=1)
    same = d.apply(
        f"{peer}/redirect", kwargs={"to": "/echo"}, headers={"Authorization": "Bearer t"}
    )
    assert same["headers"]["authorization"] == "Bearer t"
    other = d.apply(
        f"{peer}/redirect",
        kwargs={"to": f"http://localhost:{port}/echo"},
        headers={"Authorization": "Bearer t", "Cookie": "c=1", "X-Keep": "yes"},
    )
    assert "authorization" not in other["headers"]
    assert "cookie" not in other["headers"]
    assert other["headers"]["x-keep"] == "yes"


def test_every_hop_passes_the_egress_policy(make_dispatcher: Any, peer: str) -> None:
    port = peer.rpartition(":")[2]
    d = make_dispatcher(follow_redirects=3, egress="public", egress_allow=["127.0.0.1/32"])
    assert d.call(f"{peer}/redirect", to="/multiply?x=2&y=2") == 4
    with pytest.raises(EgressDenied, match=r"127\.0\.0\.2"):
        d.call(f"{peer}/redirect", to=f"http://127.0.0.2:{port}/multiply?x=1&y=1")


def test_redirect_to_another_scheme_is_refused(make_dispatcher: Any, peer: str) -> None:
    d = make_dispatcher(follow_redirects=1)
    with pytest.raises(UsageError, match="unsupported scheme"):
        d.call(f"{peer}/redirect", to="file:///etc/passwd")
