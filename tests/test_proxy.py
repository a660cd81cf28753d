"""Proxies: the ``proxy`` and ``trust_env`` settings, against real proxy processes.

proxy.py (HTTP forwarding, ``CONNECT``, basic auth, and TLS to its clients) and
pproxy (SOCKS5) run as subprocesses on 127.0.0.1 (``support.proxies``); the
targets are echo servers that answer with the request they saw. A request
"went through the proxy" when the target saw proxy.py's ``Via`` header, or
the proxy's own log names the target (a ``CONNECT`` tunnel carries no
header the proxy could add). Most tests run on both drivers
(``support.drivers``); SOCKS is the sync Dispatcher's alone.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from dispatchkit import (
    Attempt,
    Call,
    ConnectError,
    Dispatcher,
    DispatchTimeout,
    EgressDenied,
    TransportError,
    UsageError,
)
from dispatchkit.builtin._proxy import NoProxy, Proxy, routes_from_environment
from support.drivers import DRIVERS, AsyncClient, Client, make_client
from support.probes import free_port
from support.proxies import (
    SLEEP,
    EchoServer,
    ProxyProcess,
    echo_server,
    http_proxy,
    socks_proxy,
)
from support.tls import server_context

pytestmark = pytest.mark.timeout(30)

CREDENTIALS = "alice:s3cr3t-pw"
SECRET = "s3cr3t-pw"
VIA = "proxy.py"
MakeClient = Callable[..., Client]
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "request_method")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable from the machine running the tests leaks into them."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(params=DRIVERS)
def new_client(request: pytest.FixtureRequest) -> Iterator[MakeClient]:
    """Build clients of one driver (the test runs once per driver); all closed after."""
    made: list[Client] = []

    def make(**settings: Any) -> Client:
        settings.setdefault("timeout", 5)
        settings.setdefault("retry_attempts", 1)
        client = make_client(request.param, **settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with http_proxy(CREDENTIALS) as running:
        yield running


@pytest.fixture(scope="module")
def target() -> Iterator[EchoServer]:
    with echo_server() as server:
        yield server


@pytest.fixture(scope="module")
def tls_target(ca: trustme.CA) -> Iterator[EchoServer]:
    with echo_server(server_context(ca)) as server:
        yield server


def dead_proxy() -> str:
    return f"http://bob:{SECRET}@127.0.0.1:{free_port()}"


def assert_masked(exc: BaseException) -> None:
    assert SECRET not in str(exc)
    assert SECRET not in repr(exc)
    assert SECRET not in repr(exc.args)


# -- through the proxy ---------------------------------------------------------------------


def test_http_target_goes_through_the_proxy_in_absolute_form(
    new_client: MakeClient, proxy: ProxyProcess, target: EchoServer
) -> None:
    client = new_client(proxy=proxy.url())
    path = f"/hook?x={uuid.uuid4().hex}"
    seen = client.call(f"{target.url}{path}")
    assert VIA in seen["headers"]["via"]
    assert seen["target"] == path  # the proxy forwarded it in origin form
    assert "proxy-authorization" not in seen["headers"]
    client.close()  # proxy.py logs a connection when it closes
    proxy.wait_for(f"GET 127.0.0.1:{target.port}{path}")


def test_https_target_goes_through_a_connect_tunnel(
    new_client: MakeClient, proxy: ProxyProcess, tls_target: EchoServer, ca_file: str
) -> None:
    client = new_client(proxy=proxy.url(), ca_certs=ca_file)
    tunnel = f"CONNECT 127.0.0.1:{tls_target.port}"
    tunnels = proxy.output().count(tunnel)
    before = tls_target.connections
    for n in range(3):
        seen = client.call(f"{tls_target.url}/hook", n=n)
        # End to end TLS: the proxy cannot add a header, and its credentials stayed on CONNECT.
        assert "via" not in seen["headers"]
        assert "proxy-authorization" not in seen["headers"]
    assert tls_target.connections - before == 1  # one tunnel, kept alive in the pool
    client.close()
    proxy.wait_for(tunnel, seen=tunnels)


def test_the_targets_certificate_is_verified_through_the_tunnel(
    new_client: MakeClient, proxy: ProxyProcess, tls_target: EchoServer, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    client = new_client(proxy=proxy.url(), ca_certs=str(other))
    with pytest.raises(TransportError, match="TLS failed") as caught:
        client.call(f"{tls_target.url}/hook")
    assert not isinstance(caught.value, ConnectError)  # the tunnel was up: TLS failed in it
    assert caught.value.transient is False


@pytest.mark.parametrize("credentials", ["alice:wrong", None], ids=["wrong", "none"])
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_refused_credentials_are_a_connect_error(
    new_client: MakeClient,
    proxy: ProxyProcess,
    target: EchoServer,
    tls_target: EchoServer,
    ca_file: str,
    credentials: str | None,
    tls: bool,
) -> None:
    # Three attempts allowed, with no wait: a refusal of the credentials uses one.
    client = new_client(
        proxy=proxy.url(credentials), ca_certs=ca_file, retry_attempts=3, retry_backoff=0.001
    )
    url = f"{(tls_target if tls else target).url}/hook"
    with pytest.raises(ConnectError, match="407 Proxy Authentication Required") as caught:
        client.call(url)
    shown = proxy.url(None if credentials is None else "alice:***")
    what = "the tunnel to 127.0.0.1:" if tls else "the request"
    assert f"proxy {shown} refused {what}" in str(caught.value)
    assert caught.value.transient is False
    # Not retried: the proxy would refuse the same credentials again.
    records: list[Attempt] = []
    execute = client.dispatcher.execute  # type: ignore[attr-defined]
    run = client.run if isinstance(client, AsyncClient) else (lambda done: done)
    with pytest.raises(ConnectError):
        run(execute(Call(url), attempts=records))
    assert [a.outcome for a in records] == ["ConnectError"]


def test_proxy_credentials_are_masked_in_errors_reprs_and_attempts(
    new_client: MakeClient, proxy: ProxyProcess, target: EchoServer
) -> None:
    client = new_client(proxy=proxy.url(f"alice:{SECRET}x"))
    with pytest.raises(ConnectError) as caught:
        client.call(f"{target.url}/hook")
    assert_masked(caught.value)
    assert "alice:***@" in str(caught.value)
    assert SECRET not in repr(client.dispatcher.settings)  # type: ignore[attr-defined]
    records: list[Attempt] = []
    call = Call(f"{target.url}/hook")
    execute = client.dispatcher.execute  # type: ignore[attr-defined]
    run = client.run if isinstance(client, AsyncClient) else (lambda done: done)
    with pytest.raises(ConnectError):
        run(execute(call, attempts=records))
    [attempt] = records
    assert attempt.outcome == "ConnectError"
    assert attempt.error is not None
    assert "alice:***@" in attempt.error
    assert SECRET not in repr(attempt.to_dict())
    assert SECRET not in repr(Proxy.parse(proxy.url(f"alice:{SECRET}"), "test"))


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_dead_proxy_is_a_connect_error(
    new_client: MakeClient, target: EchoServer, tls_target: EchoServer, ca_file: str, tls: bool
) -> None:
    client = new_client(proxy=dead_proxy(), ca_certs=ca_file)
    with pytest.raises(
        ConnectError, match="cannot connect to the proxy http://bob:\\*\\*\\*@"
    ) as caught:
        client.call(f"{(tls_target if tls else target).url}/hook")
    assert_masked(caught.value)


def test_a_tunnel_the_proxy_cannot_open_is_a_connect_error(
    new_client: MakeClient, proxy: ProxyProcess
) -> None:
    port = free_port()
    client = new_client(proxy=proxy.url())
    with pytest.raises(
        ConnectError, match=f"refused the tunnel to 127.0.0.1:{port}: 502"
    ) as caught:
        client.call(f"https://127.0.0.1:{port}/hook")
    assert caught.value.transient is True  # the proxy's 5xx: the target may come back


# -- the environment ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_the_environment_names_the_proxy_for_http(
    new_client: MakeClient,
    proxy: ProxyProcess,
    target: EchoServer,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    monkeypatch.setenv(name, proxy.url())
    monkeypatch.setenv("HTTPS_PROXY", dead_proxy())  # for https URLs only
    seen = new_client().call(f"{target.url}/hook")
    assert VIA in seen["headers"]["via"]


def test_https_proxy_variable_serves_https_urls(
    new_client: MakeClient,
    proxy: ProxyProcess,
    target: EchoServer,
    tls_target: EchoServer,
    ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    tunnel = f"CONNECT 127.0.0.1:{tls_target.port}"
    tunnels = proxy.output().count(tunnel)
    client = new_client(ca_certs=ca_file)
    assert "via" not in client.call(f"{target.url}/hook")["headers"]  # http: no HTTP_PROXY
    client.call(f"{tls_target.url}/from-env")
    client.close()
    proxy.wait_for(tunnel, seen=tunnels)


@pytest.mark.parametrize(
    "no_proxy", ["127.0.0.1", "127.0.0.0/8", "*", "localhost,127.0.0.1:{port}"]
)
def test_no_proxy_hosts_are_reached_directly(
    new_client: MakeClient, target: EchoServer, monkeypatch: pytest.MonkeyPatch, no_proxy: str
) -> None:
    monkeypatch.setenv("HTTP_PROXY", dead_proxy())
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=target.port))
    seen = new_client().call(f"{target.url}/hook")
    assert "via" not in seen["headers"]


def test_no_proxy_on_another_port_does_not_bypass(
    new_client: MakeClient, target: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", dead_proxy())
    monkeypatch.setenv("no_proxy", f"127.0.0.1:{free_port()}")
    with pytest.raises(ConnectError, match="cannot connect to the proxy"):
        new_client().call(f"{target.url}/hook")


def test_trust_env_false_ignores_the_environment(
    new_client: MakeClient, target: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", dead_proxy())
    monkeypatch.setenv("ALL_PROXY", "not a url at all://")
    seen = new_client(trust_env=False).call(f"{target.url}/hook")
    assert "via" not in seen["headers"]


def test_an_explicit_proxy_beats_the_environment(
    new_client: MakeClient, proxy: ProxyProcess, target: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", dead_proxy())
    monkeypatch.setenv("NO_PROXY", "*")  # the environment's bypass list goes too
    seen = new_client(proxy=proxy.url()).call(f"{target.url}/hook")
    assert VIA in seen["headers"]["via"]


def test_a_bad_proxy_variable_says_how_to_ignore_it(
    new_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"ftp://bob:{SECRET}@proxy.example:21")
    with pytest.raises(UsageError, match=r"HTTPS_PROXY .*trust_env=False") as caught:
        new_client()
    assert_masked(caught.value)
    new_client(trust_env=False)  # fine


def test_lower_case_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://upper.example:1")
    monkeypatch.setenv("http_proxy", "http://lower.example:2")
    routes = routes_from_environment(urllib.request.getproxies_environment())
    assert routes is not None
    assert routes.http == Proxy("http", "lower.example", 2)
    assert routes.https is None


# -- settings and NO_PROXY, without a network --------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"proxy": "ftp://proxy.example"}, "unsupported proxy scheme 'ftp'"),
        ({"proxy": "http://proxy.example/path"}, "expected scheme://"),
        ({"proxy": "http://proxy.example:99999"}, "not a valid proxy URL"),
        ({"proxy": 3128}, "expected a proxy URL"),
        ({"trust_env": "yes"}, "'trust_env' must be True or False"),
    ],
)
def test_bad_settings_are_refused(
    new_client: MakeClient, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        new_client(**settings)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("proxy.example:3128", Proxy("http", "proxy.example", 3128)),
        ("http://proxy.example", Proxy("http", "proxy.example", 80)),
        ("HTTPS://Proxy.Example/", Proxy("https", "proxy.example", 443)),
        ("socks5h://[::1]", Proxy("socks5h", "::1", 1080)),
        ("http://a%40b:p%3Aw@h:1", Proxy("http", "h", 1, "a@b", "p:w")),
    ],
)
def test_proxy_urls(value: str, expected: Proxy) -> None:
    proxy = Proxy.parse(value, "test")
    assert proxy == expected
    assert proxy.password == expected.password


def test_proxy_authorization_and_masking() -> None:
    proxy = Proxy.parse("http://a%40b:p%3Aw@h:1", "test")
    assert proxy.headers == {"Proxy-Authorization": "Basic YUBiOnA6dw=="}
    assert str(proxy) == "http://a%40b:***@h:1"
    assert "p:w" not in repr(proxy)
    assert Proxy.parse("http://[::1]:8", "test").url == "http://[::1]:8"
    assert Proxy.parse("http://h:8", "test").headers == {}


NO_PROXY = (
    "localhost, .example.com,*.example.org, internal.test:8080, 10.0.0.0/8, [::1]:9000, fd00::/8"
)


@pytest.mark.parametrize(
    ("host", "port", "bypass"),
    [
        ("localhost", 80, True),
        ("LOCALHOST.", 80, True),
        ("a.localhost", 80, True),
        ("example.com", 443, True),
        ("api.example.com", 443, True),
        ("notexample.com", 443, False),
        ("example.org", 80, True),
        ("a.b.example.org", 80, True),
        ("internal.test", 8080, True),
        ("internal.test", 80, False),
        ("10.20.30.40", 80, True),
        ("11.0.0.1", 80, False),
        ("[::1]", 9000, True),
        ("::1", 80, False),
        ("[fd00::5]", 443, True),
        ("127.0.0.1", 80, False),  # "localhost" is a name: never resolved
    ],
)
def test_no_proxy_entries(host: str, port: int, bypass: bool) -> None:
    assert NoProxy(NO_PROXY).bypass(host, port) is bypass


@pytest.mark.parametrize(
    "entry",
    [
        "exa*mple.com",
        "host:port",
        "[::1]x",
        "a b",
        "host:\u00b2",
        "[::1]:\u00b9",
        "h:" + "1" * 5000,
    ],
)
def test_no_proxy_refuses_what_it_cannot_read(entry: str) -> None:
    with pytest.raises(UsageError, match="NO_PROXY"):
        NoProxy(entry)


def test_no_proxy_star_and_blanks() -> None:
    assert NoProxy(" * ").bypass("anything.example", 1)
    assert not NoProxy(" , ,").bypass("anything.example", 1)


# -- the egress policy ---------------------------------------------------------------------------


def test_egress_checks_a_literal_target_but_not_the_proxy_or_a_name(
    new_client: MakeClient, proxy: ProxyProcess, target: EchoServer
) -> None:
    # The proxy on 127.0.0.1 is the operator's choice: allowed under egress="public".
    client = new_client(proxy=proxy.url(), egress="public")
    with pytest.raises(EgressDenied, match=r"127\.0\.0\.1"):
        client.call(f"{target.url}/hook")
    # A name is resolved by the proxy, out of dispatchkit's sight: the proxy must filter.
    seen = client.call(f"http://localhost:{target.port}/hook")
    assert VIA in seen["headers"]["via"]


# -- an https:// proxy -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_proxy(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp("tls-proxy")
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    with http_proxy(CREDENTIALS, (str(directory / "cert.pem"), str(directory / "key.pem"))) as p:
        yield p


@pytest.fixture(params=DRIVERS)
def tls_proxy_client(
    request: pytest.FixtureRequest, tls_proxy: ProxyProcess, ca_file: str
) -> Iterator[Client]:
    """A client of the https:// proxy; asyncio has TLS in TLS only from Python 3.11."""
    settings: dict[str, Any] = {"proxy": tls_proxy.url(), "ca_certs": ca_file, "timeout": 5}
    if request.param == "async" and sys.version_info < (3, 11):
        with pytest.raises(UsageError, match=r"on Python 3\.10 .*use an http:// proxy"):
            make_client("async", **settings)
        pytest.skip("asyncio has TLS in TLS from Python 3.11")
    client = make_client(request.param, retry_attempts=1, **settings)
    yield client
    client.close()


def test_an_https_proxy_forwards_http(tls_proxy_client: Client, target: EchoServer) -> None:
    seen = tls_proxy_client.call(f"{target.url}/hook")
    assert VIA in seen["headers"]["via"]


def test_an_https_proxy_tunnels_tls_in_tls(
    tls_proxy_client: Client, tls_proxy: ProxyProcess, tls_target: EchoServer
) -> None:
    tunnel = f"CONNECT 127.0.0.1:{tls_target.port}"
    tunnels = tls_proxy.output().count(tunnel)
    seen = tls_proxy_client.call(f"{tls_target.url}/hook")
    assert "via" not in seen["headers"]
    tls_proxy_client.close()
    tls_proxy.wait_for(tunnel, seen=tunnels)


def test_an_https_proxy_with_an_unknown_certificate_is_refused(
    tls_proxy: ProxyProcess, target: EchoServer, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    d = Dispatcher(proxy=tls_proxy.url(), ca_certs=str(other), retry_attempts=1)
    with d, pytest.raises(TransportError, match="TLS failed") as caught:
        d.call(f"{target.url}/hook")
    assert caught.value.transient is False


# The sync Dispatcher's watchdog (the AsyncDispatcher's deadline is aiohttp's total timeout,
# tested for a TLS connection in tests/test_async_faults.py).
@pytest.mark.parametrize("kind", ["http", "https"])
def test_the_deadline_cuts_an_attempt_inside_a_tunnel(
    proxy: ProxyProcess,
    tls_proxy: ProxyProcess,
    tls_target: EchoServer,
    ca_file: str,
    kind: str,
) -> None:
    # Through an https:// proxy the watchdog shuts the TCP socket under both TLS layers.
    via = proxy if kind == "http" else tls_proxy
    d = Dispatcher(proxy=via.url(), ca_certs=ca_file, deadline=0.5, retry_attempts=1)
    with d:
        d.call(f"{tls_target.url}/hook")  # the tunnel is up: the cut lands on a read in it
        started = time.monotonic()
        with pytest.raises(DispatchTimeout, match="deadline"):
            d.call(f"{tls_target.url}/sleep")
    assert time.monotonic() - started < SLEEP


# -- SOCKS: the sync Dispatcher --------------------------------------------------------------


@pytest.fixture(scope="module")
def socks() -> Iterator[ProxyProcess]:
    with socks_proxy(CREDENTIALS) as running:
        yield running


@pytest.mark.parametrize("scheme", ["socks5h", "socks5"])
def test_socks5_carries_http_and_https(
    socks: ProxyProcess,
    target: EchoServer,
    tls_target: EchoServer,
    ca_file: str,
    scheme: str,
) -> None:
    url = socks.url().replace("socks5h://", f"{scheme}://")
    needles = [f"-> 127.0.0.1:{target.port}", f"-> 127.0.0.1:{tls_target.port}"]
    seen = [socks.output().count(needle) for needle in needles]
    with Dispatcher(proxy=url, ca_certs=ca_file, timeout=5, retry_attempts=1) as d:
        assert d.call(f"{target.url}/hook")["target"] == "/hook"
        assert d.call(f"{tls_target.url}/hook")["target"] == "/hook"
    for needle, count in zip(needles, seen, strict=True):
        socks.wait_for(needle, seen=count)


def test_socks5_wrong_password_is_a_connect_error(socks: ProxyProcess, target: EchoServer) -> None:
    proxy = socks.url(f"alice:{SECRET}-wrong")
    d = Dispatcher(proxy=proxy, timeout=5, retry_attempts=1)
    shown = re.escape("cannot connect to the proxy socks5h://alice:***@")
    with d, pytest.raises(ConnectError, match=shown) as caught:
        d.call(f"{target.url}/hook")
    assert_masked(caught.value)


def test_socks_without_pysocks_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "socks", None)  # what `import socks` sees when absent
    d = Dispatcher(proxy="socks5h://127.0.0.1:1", retry_attempts=1)
    with d, pytest.raises(UsageError, match=r"dispatchkit\[socks\]"):
        d.call("http://127.0.0.1:1/hook")


def test_the_asyncio_transport_refuses_socks(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="aiohttp has no SOCKS support"):
        make_client("async", proxy=f"socks5://bob:{SECRET}@127.0.0.1:1080")
    monkeypatch.setenv("ALL_PROXY", "socks5h://127.0.0.1:1080")
    with pytest.raises(UsageError, match="trust_env=False"):
        make_client("async")
    make_client("async", trust_env=False).close()
