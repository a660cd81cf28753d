"""The plugin system: discovery, registration, validation and every extension point.

Servers are real (the Node peer on 127.0.0.1); the only transport that does not
use a socket is the in-process ``memory://`` one, and that is the point of its test.
Entry-point plugins are installed for real: a ``*.dist-info`` directory in
``tmp_path`` put on ``sys.path``.
"""

from __future__ import annotations

import logging
import sys
import textwrap
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tenacity
from dispatchkit_example import ExamplePlugin

import dispatchkit
from dispatchkit import (
    AsyncDispatcher,
    Codec,
    Dispatcher,
    DispatchError,
    Envelope,
    HTTPStatusError,
    InvalidResponseError,
    Outcome,
    PluginInfo,
    PluginLoadError,
    RemoteExecuteError,
    Request,
    Response,
    Settings,
    Transport,
    UsageError,
    _plugins,
    hookimpl,
)
from dispatchkit.builtin import DEFAULT_PLUGINS
from dispatchkit.builtin import transport as builtin_transport
from dispatchkit.builtin.transport import PoolTransport

MakeDispatcher = Callable[..., Dispatcher]


def info(d: Dispatcher, name: str) -> PluginInfo:
    """The listing of plugin ``name`` in ``d``; fails the test when it is absent."""
    found = [p for p in d.plugins if p.name == name]
    assert found, f"plugin {name!r} not in {[p.name for p in d.plugins]}"
    return found[0]


def names(d: Dispatcher) -> list[str]:
    return [p.name for p in d.plugins]


def seen(d: Dispatcher, peer: str, task_id: str) -> int:
    """How many requests the peer's /flaky and /record saw with this Idempotency-Key."""
    counts: dict[str, int] = d.call(f"{peer}/seen")
    return counts.get(task_id, 0)


# -- the example entry-point plugin ------------------------------------------------


def test_example_plugin_is_loaded_by_default(dispatcher: Dispatcher) -> None:
    example = info(dispatcher, "example")
    assert example == PluginInfo(
        name="example",
        hooks=("dispatchkit_call_done", "dispatchkit_prepare_request"),
        distribution="dispatchkit-example",
        version="0.1.0",
        builtin=False,
    )
    assert isinstance(example.plugin, ExamplePlugin)
    # Entry-point plugins come after the built-ins.
    assert names(dispatcher).index("example") > names(dispatcher).index("retry")


def test_example_header_reaches_the_peer(dispatcher: Dispatcher, peer: str) -> None:
    echo = dispatcher.call(f"{peer}/echo")
    assert echo["headers"]["x-dispatchkit-example"] == "attempt=1"


def test_example_counts_calls_and_failures(dispatcher: Dispatcher, peer: str) -> None:
    example = info(dispatcher, "example").plugin
    assert isinstance(example, ExamplePlugin)
    for x in range(3):
        assert dispatcher.call(f"{peer}/multiply", x=x, y=2) == 2 * x
    with pytest.raises(RemoteExecuteError):
        dispatcher.call(f"{peer}/fail")
    assert (example.calls, example.failures) == (4, 1)


def test_each_dispatcher_has_its_own_example_instance(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    first, second = make_dispatcher(), make_dispatcher()
    one, two = info(first, "example").plugin, info(second, "example").plugin
    assert isinstance(one, ExamplePlugin)
    assert isinstance(two, ExamplePlugin)
    assert one is not two
    first.call(f"{peer}/multiply", x=1, y=1)
    assert (one.calls, two.calls) == (1, 0)


def test_autoload_env_var_turns_entry_points_off(
    monkeypatch: pytest.MonkeyPatch, make_dispatcher: MakeDispatcher, peer: str
) -> None:
    monkeypatch.setenv("DISPATCHKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    d = make_dispatcher()
    assert names(d) == list(DEFAULT_PLUGINS)
    echo = d.call(f"{peer}/echo")
    assert "x-dispatchkit-example" not in echo["headers"]


def test_disable_leaves_the_example_out(make_dispatcher: MakeDispatcher, peer: str) -> None:
    d = make_dispatcher(disable=["example"])
    assert "example" not in names(d)
    echo = d.call(f"{peer}/echo")
    assert "x-dispatchkit-example" not in echo["headers"]


def test_disable_removes_the_builtin_retry(make_dispatcher: MakeDispatcher, peer: str) -> None:
    with_retry = make_dispatcher()
    assert with_retry.apply(f"{peer}/flaky", kwargs={"fail": 1}) == 2

    d = make_dispatcher(disable=["retry"])
    assert "retry" not in names(d)
    task_id = uuid.uuid4().hex
    with pytest.raises(HTTPStatusError) as excinfo:
        d.apply(f"{peer}/flaky", kwargs={"fail": 1}, task_id=task_id)
    assert excinfo.value.status == 503
    assert seen(d, peer, task_id) == 1


def test_builtins_are_listed_as_builtin(dispatcher: Dispatcher) -> None:
    builtins = [p for p in dispatcher.plugins if p.builtin]
    assert [p.name for p in builtins] == list(DEFAULT_PLUGINS)
    for p in builtins:
        assert p.distribution == "dispatchkit"
        assert p.version == dispatchkit.__version__
    assert info(dispatcher, "transport").hooks == ("dispatchkit_configure", "dispatchkit_transport")
    assert info(dispatcher, "codec").hooks == ("dispatchkit_codec",)
    assert info(dispatcher, "retry").hooks == ("dispatchkit_retry_policy",)


def test_plugins_listing_is_a_copy(dispatcher: Dispatcher) -> None:
    dispatcher.plugins.clear()
    assert names(dispatcher)[: len(DEFAULT_PLUGINS)] == list(DEFAULT_PLUGINS)


# -- entry points installed for real in tmp_path ------------------------------------


class Site:
    """A directory on ``sys.path`` to install distributions into."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def module(self, name: str, source: str) -> None:
        (self.root / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        self.modules.append(name)

    def distribution(self, name: str, version: str, entry_points: Mapping[str, str]) -> None:
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
        )
        lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[dispatchkit]\n{lines}", encoding="utf-8")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """A fresh site directory; the discovery cache is dropped before and after."""
    _plugins.forget_discovery()
    monkeypatch.syspath_prepend(str(tmp_path))
    installed = Site(tmp_path)
    try:
        yield installed
    finally:
        # The cache must never carry this test's distributions into another test.
        _plugins.forget_discovery()
        for name in installed.modules:
            sys.modules.pop(name, None)


GOOD_MODULE = """
    from __future__ import annotations

    from dispatchkit import hookimpl

    class GoodPlugin:
        def __init__(self):
            self.prepared = 0

        @hookimpl
        def dispatchkit_prepare_request(self, request):
            self.prepared += 1
            request.headers["X-Good"] = "yes"

    @hookimpl
    def dispatchkit_prepare_request(request):
        request.headers["X-Good-Module"] = "yes"
"""


def test_failing_entry_point_raises_plugin_load_error(site: Site) -> None:
    site.distribution("broken-plugin", "0.1", {"broken": "no_such_module_xyz:Plugin"})
    with pytest.raises(PluginLoadError) as excinfo:
        Dispatcher()
    error = excinfo.value
    assert error.plugin == "broken"
    assert "'broken'" in str(error)
    assert "no_such_module_xyz" in str(error)
    assert "broken-plugin 0.1" in str(error)
    assert isinstance(error.__cause__, ImportError)
    assert isinstance(error, DispatchError)


def test_disabled_entry_point_is_not_imported(site: Site, make_dispatcher: MakeDispatcher) -> None:
    site.distribution("broken-plugin", "0.1", {"broken": "no_such_module_xyz:Plugin"})
    d = make_dispatcher(disable=["broken"])
    assert "broken" not in names(d)
    assert "example" in names(d)
    assert "no_such_module_xyz" not in sys.modules


def test_entry_point_class_from_a_distribution(
    site: Site, make_dispatcher: MakeDispatcher, peer: str
) -> None:
    site.module("dk_test_good_plugin", GOOD_MODULE)
    site.distribution("dk-test-good", "2.3.4", {"good": "dk_test_good_plugin:GoodPlugin"})
    first, second = make_dispatcher(), make_dispatcher()
    good = info(first, "good")
    assert good.distribution == "dk-test-good"
    assert good.version == "2.3.4"
    assert good.hooks == ("dispatchkit_prepare_request",)
    assert not good.builtin
    assert type(good.plugin).__name__ == "GoodPlugin"
    # A class entry point gives each Dispatcher its own instance.
    assert info(second, "good").plugin is not good.plugin

    echo = first.call(f"{peer}/echo")
    assert echo["headers"]["x-good"] == "yes"
    assert good.plugin.prepared == 1  # type: ignore[attr-defined]
    assert info(second, "good").plugin.prepared == 0  # type: ignore[attr-defined]


def test_entry_point_module_is_registered_as_is(
    site: Site, make_dispatcher: MakeDispatcher, peer: str
) -> None:
    site.module("dk_test_good_plugin", GOOD_MODULE)
    site.distribution("dk-test-good", "2.3.4", {"good-module": "dk_test_good_plugin"})
    first, second = make_dispatcher(), make_dispatcher()
    module = sys.modules["dk_test_good_plugin"]
    assert info(first, "good-module").plugin is module
    assert info(second, "good-module").plugin is module
    echo = first.call(f"{peer}/echo")
    assert echo["headers"]["x-good-module"] == "yes"


def test_entry_point_class_that_cannot_be_built(site: Site) -> None:
    site.module(
        "dk_test_bad_init",
        """
        from __future__ import annotations

        class Plugin:
            def __init__(self):
                raise RuntimeError("no config here")
        """,
    )
    site.distribution("dk-test-bad-init", "1.0", {"bad-init": "dk_test_bad_init:Plugin"})
    with pytest.raises(PluginLoadError, match="no config here") as excinfo:
        Dispatcher()
    assert excinfo.value.plugin == "bad-init"


def test_entry_points_are_discovered_once_per_process(
    site: Site, make_dispatcher: MakeDispatcher
) -> None:
    assert "good" not in names(make_dispatcher())
    site.module("dk_test_good_plugin", GOOD_MODULE)
    site.distribution("dk-test-good", "2.3.4", {"good": "dk_test_good_plugin:GoodPlugin"})
    assert "good" not in names(make_dispatcher())  # the discovery is cached
    _plugins.forget_discovery()
    assert "good" in names(make_dispatcher())


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dispatchkit_confgure", "configure"])
def test_marked_method_that_is_no_hook_is_refused(method: str) -> None:
    def impl(self: object, dispatcher: Dispatcher) -> None:
        raise AssertionError("never called")

    plugin = type("Misspelt", (), {"name": "misspelt", method: hookimpl(impl)})
    with pytest.raises(PluginLoadError) as excinfo:
        Dispatcher(plugins=[plugin])
    assert excinfo.value.plugin == "misspelt"
    assert method in str(excinfo.value)


def test_hook_with_an_unknown_argument_is_refused() -> None:
    class Extra:
        name = "extra"

        @hookimpl
        def dispatchkit_configure(self, settings: Settings, color: str) -> None:
            raise AssertionError("never called")

    with pytest.raises(PluginLoadError, match="color") as excinfo:
        Dispatcher(plugins=[Extra])
    assert excinfo.value.plugin == "extra"


def test_unmarked_methods_are_ignored(make_dispatcher: MakeDispatcher, peer: str) -> None:
    class Unmarked:
        name = "unmarked"

        def dispatchkit_prepare_request(self, request: Request) -> None:
            raise AssertionError("an unmarked method is not a hook")

        def configure(self) -> None:
            raise AssertionError("never called")

    d = make_dispatcher(plugins=[Unmarked])
    assert info(d, "unmarked").hooks == ()
    assert d.call(f"{peer}/multiply", x=2, y=3) == 6


# -- plugins given in code -----------------------------------------------------------


class Tagger:
    """Adds ``X-Tag`` to every attempt and counts them."""

    name = "tagger"

    def __init__(self, tag: str = "class") -> None:
        self.tag = tag
        self.prepared = 0

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.prepared += 1
        request.headers["X-Tag"] = self.tag


def test_plugin_class_is_instantiated_per_dispatcher(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    first, second = make_dispatcher(plugins=[Tagger]), make_dispatcher(plugins=[Tagger])
    one, two = info(first, "tagger").plugin, info(second, "tagger").plugin
    assert isinstance(one, Tagger)
    assert isinstance(two, Tagger)
    assert one is not two
    assert info(first, "tagger").distribution is None
    assert first.call(f"{peer}/echo")["headers"]["x-tag"] == "class"
    assert (one.prepared, two.prepared) == (1, 0)


def test_plugin_instance_is_registered_as_is(make_dispatcher: MakeDispatcher, peer: str) -> None:
    tagger = Tagger("instance")
    d = make_dispatcher(plugins=[tagger])
    assert info(d, "tagger").plugin is tagger
    assert names(d)[-1] == "tagger"  # plugins given in code come last
    assert d.call(f"{peer}/echo")["headers"]["x-tag"] == "instance"
    assert tagger.prepared == 1


def test_plugin_classes_without_a_name_are_named_after_the_class() -> None:
    class First:
        @hookimpl
        def dispatchkit_prepare_request(self, request: Request) -> None:
            pass

    class Second:
        @hookimpl
        def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
            pass

    with Dispatcher(plugins=[First, Second()]) as d:
        first, second = d.plugins[-2:]
    assert first.name == f"{__name__}.{First.__qualname__}"
    assert isinstance(first.plugin, First)
    assert second.name == f"{__name__}.{Second.__qualname__}"
    assert isinstance(second.plugin, Second)


# -- custom scheme and media type: the extension points without HTTP -------------------

KV = "text/x-kv"


class KVCodec:
    """``key=value`` lines: ``status=success`` then ``retval=...`` (or ``reason=...``)."""

    media_type = KV

    def decode(self, response: Response) -> Envelope:
        fields: dict[str, str] = {}
        for line in response.body.decode("utf-8").splitlines():
            key, sep, value = line.partition("=")
            if not sep:
                raise InvalidResponseError(f"not a key=value line: {line!r}", body=response.body)
            fields[key] = value
        return Envelope.from_object(fields, response.body)

    def encode(self, envelope: Envelope) -> bytes:
        fields = envelope.to_object()
        return "".join(f"{k}={v}\n" for k, v in fields.items()).encode("utf-8")


class MemoryTransport:
    """Answers ``memory://<task>`` in-process from a dict of Python functions."""

    def __init__(self, tasks: Mapping[str, Callable[..., object]], codec: KVCodec) -> None:
        self.tasks = tasks
        self.codec = codec
        self.sent: list[Request] = []
        self.closed = 0

    def send(self, request: Request) -> Response:
        self.sent.append(request)
        parts = urlsplit(request.url)
        task = self.tasks.get(parts.netloc + parts.path)
        if task is None:
            return Response(404, {"Content-Type": "text/plain"}, b"no such task")
        try:
            envelope = Envelope.success(task(**request.kwargs))
        except Exception as exc:
            envelope = Envelope.failure(f"{type(exc).__name__}: {exc}")
        return Response(200, {"Content-Type": f"{KV}; charset=utf-8"}, self.codec.encode(envelope))

    def close(self) -> None:
        self.closed += 1


class MemoryPlugin:
    name = "memory"

    def __init__(self, tasks: Mapping[str, Callable[..., object]]) -> None:
        self.codec = KVCodec()
        self.transport = MemoryTransport(tasks, self.codec)

    @hookimpl
    def dispatchkit_transport(self, scheme: str, dispatcher: Dispatcher) -> Transport | None:
        return self.transport if scheme == "memory" else None

    @hookimpl
    def dispatchkit_codec(self, media_type: str, dispatcher: Dispatcher) -> Codec | None:
        return self.codec if media_type == KV else None


def add(x: str, y: str) -> int:
    return int(x) + int(y)


def divide(x: str, y: str) -> float:
    return int(x) / int(y)


def test_custom_scheme_transport_and_codec(make_dispatcher: MakeDispatcher) -> None:
    memory = MemoryPlugin({"calc/add": add, "calc/divide": divide})
    assert isinstance(memory.transport, Transport)
    assert isinstance(memory.codec, Codec)
    d = make_dispatcher(plugins=[memory])

    assert d.call("memory://calc/add", x=2, y=3) == "5"
    assert d.call("MEMORY://calc/add", method="POST", x=1, y=1) == "2"
    with pytest.raises(RemoteExecuteError, match="ZeroDivisionError"):
        d.call("memory://calc/divide", x=1, y=0)
    with pytest.raises(HTTPStatusError) as excinfo:
        d.call("memory://calc/nope")
    assert excinfo.value.status == 404

    assert [r.method for r in memory.transport.sent] == ["GET", "POST", "GET", "GET"]
    assert memory.transport.sent[0].kwargs == {"x": 2, "y": 3}
    d.close()
    d.close()
    assert memory.transport.closed == 1  # the Dispatcher closes what it was given, once


def test_custom_scheme_works_without_the_http_transport(make_dispatcher: MakeDispatcher) -> None:
    d = make_dispatcher(plugins=[MemoryPlugin({"add": add})], disable=["transport"])
    assert d.call("memory://add", x=40, y=2) == "42"
    with pytest.raises(UsageError, match="no transport for scheme 'http'"):
        d.call("http://127.0.0.1:9/")


class CountingTransport:
    """Counts requests and delegates them to the built-in pool transport."""

    def __init__(self, inner: PoolTransport) -> None:
        self.inner = inner
        self.sent = 0

    def send(self, request: Request) -> Response:
        self.sent += 1
        return self.inner.send(request)

    def close(self) -> None:
        self.inner.close()


class CountingPlugin:
    name = "counting"

    def __init__(self) -> None:
        self.transport: CountingTransport | None = None

    @hookimpl
    def dispatchkit_transport(self, scheme: str, dispatcher: Dispatcher) -> Transport | None:
        if scheme != "http":
            return None
        if self.transport is None:
            self.transport = CountingTransport(PoolTransport(dispatcher.settings))
        return self.transport


@pytest.mark.parametrize("builtin_first", [True, False])
def test_plugin_transport_overrides_builtin_whatever_the_order(
    make_dispatcher: MakeDispatcher, peer: str, builtin_first: bool
) -> None:
    # Register the built-in again under another name, before or after the plugin:
    # being trylast, it loses either way.
    late_builtin = builtin_transport.Plugin()
    late_builtin.name = "transport-again"
    counting = CountingPlugin()
    order = [late_builtin, counting] if builtin_first else [counting, late_builtin]
    d = make_dispatcher(plugins=order, disable=["transport"])
    for x in range(5):
        assert d.call(f"{peer}/multiply", x=x, y=3) == 3 * x
    assert counting.transport is not None
    assert counting.transport.sent == 5


def test_plugin_transport_overrides_the_default_builtin(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    counting = CountingPlugin()
    d = make_dispatcher(plugins=[counting])
    assert d.call(f"{peer}/multiply", x=6, y=7) == 42
    assert counting.transport is not None
    assert counting.transport.sent == 1
    d.close()
    assert counting.transport.inner._closed


# -- strategies are resolved once ------------------------------------------------------


class Probe:
    """Counts how often the strategy factories are asked; answers nothing itself."""

    name = "probe"

    def __init__(self) -> None:
        self.asked: Counter[tuple[str, str]] = Counter()

    @hookimpl
    def dispatchkit_transport(self, scheme: str, dispatcher: Dispatcher) -> None:
        self.asked["transport", scheme] += 1

    @hookimpl
    def dispatchkit_codec(self, media_type: str, dispatcher: Dispatcher) -> None:
        self.asked["codec", media_type] += 1

    @hookimpl
    def dispatchkit_retry_policy(self, settings: Settings) -> None:
        self.asked["retry", ""] += 1


def test_strategies_are_resolved_once(make_dispatcher: MakeDispatcher, peer: str) -> None:
    probe = Probe()
    d = make_dispatcher(plugins=[probe])
    assert probe.asked == {("retry", ""): 1}  # once, when the Dispatcher is built
    for i in range(18):
        assert d.call(f"{peer}/multiply", x=i, y=1) == i
    for _ in range(2):
        assert d.call(f"{peer}/content-type", type="text/plain") == "typed"
    assert probe.asked == {
        ("retry", ""): 1,
        ("transport", "http"): 1,
        ("codec", "application/json"): 1,
        ("codec", "text/plain"): 1,
    }
    # Another Dispatcher resolves its own strategies.
    other = Probe()
    make_dispatcher(plugins=[other]).call(f"{peer}/multiply", x=1, y=1)
    assert other.asked["transport", "http"] == 1
    assert probe.asked["transport", "http"] == 1


def test_a_missing_codec_is_resolved_once_too(make_dispatcher: MakeDispatcher, peer: str) -> None:
    probe = Probe()
    d = make_dispatcher(plugins=[probe])
    for _ in range(3):
        with pytest.raises(InvalidResponseError, match="no codec"):
            d.call(f"{peer}/content-type", type="application/x-nothing")
    assert probe.asked["codec", "application/x-nothing"] == 1


# -- per-call hooks ---------------------------------------------------------------------


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.attempts: list[tuple[int, str]] = []
        self.done: list[tuple[Request, Outcome]] = []

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        self.attempts.append((request.attempt, request.headers["Idempotency-Key"]))

    @hookimpl
    def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
        self.done.append((request, outcome))


def test_prepare_request_runs_before_every_attempt(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    recorder = Recorder()
    d = make_dispatcher(plugins=[recorder])
    task_id = uuid.uuid4().hex
    assert d.apply(f"{peer}/flaky", kwargs={"fail": 2}, task_id=task_id) == 3
    assert recorder.attempts == [(1, task_id), (2, task_id), (3, task_id)]
    assert seen(d, peer, task_id) == 3

    ((request, outcome),) = recorder.done[:1]
    assert request.task_id == task_id
    assert outcome.ok
    assert (outcome.retval, outcome.error, outcome.attempts) == (3, None, 3)
    assert outcome.duration >= 0


def test_call_done_sees_the_error(make_dispatcher: MakeDispatcher, peer: str) -> None:
    recorder = Recorder()
    d = make_dispatcher(plugins=[recorder])
    with pytest.raises(RemoteExecuteError) as excinfo:
        d.call(f"{peer}/fail", reason="nope")
    ((request, outcome),) = recorder.done
    assert not outcome.ok
    assert outcome.error is excinfo.value
    assert outcome.retval is None
    assert outcome.attempts == 1
    assert request.task_id == excinfo.value.task_id


def test_call_done_error_is_logged_not_raised(
    make_dispatcher: MakeDispatcher, peer: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        name = "broken-observer"

        @hookimpl
        def dispatchkit_call_done(self, request: Request, outcome: Outcome) -> None:
            raise RuntimeError("observer bug")

    d = make_dispatcher(plugins=[Broken])
    with caplog.at_level(logging.ERROR, logger="dispatchkit"):
        assert d.call(f"{peer}/multiply", x=2, y=2) == 4
        with pytest.raises(RemoteExecuteError, match="boom"):
            d.call(f"{peer}/fail")
    failures = [r for r in caplog.records if r.name == "dispatchkit" and r.exc_info]
    assert len(failures) == 2
    for record in failures:
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)


def test_dispatch_error_in_prepare_request_fails_the_call(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    class Guard:
        name = "guard"

        @hookimpl
        def dispatchkit_prepare_request(self, request: Request) -> None:
            raise DispatchError("no credentials for this host")

    recorder = Recorder()
    d = make_dispatcher(plugins=[recorder, Guard])
    task_id = uuid.uuid4().hex
    with pytest.raises(DispatchError, match="no credentials") as excinfo:
        d.apply(f"{peer}/record", task_id=task_id)
    assert excinfo.value.task_id == task_id  # bound to the call
    assert excinfo.value.method == "GET"
    ((_, outcome),) = recorder.done
    assert outcome.error is excinfo.value
    assert recorder.attempts == []  # Guard, registered later, ran first and stopped it

    with Dispatcher(timeout=5, disable=["example"]) as plain:
        assert seen(plain, peer, task_id) == 0  # nothing was sent


# -- settings --------------------------------------------------------------------------


def test_unknown_setting_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="timout"):
        Dispatcher(timout=5)


class OptionPlugin:
    name = "option"

    def __init__(self) -> None:
        self.value: object = None

    @hookimpl
    def dispatchkit_configure(self, settings: Settings) -> None:
        self.value = settings.extra("my_option", "default")


def test_plugin_setting_read_in_configure_is_valid(make_dispatcher: MakeDispatcher) -> None:
    d = make_dispatcher(my_option=1, plugins=[OptionPlugin])
    plugin = info(d, "option").plugin
    assert isinstance(plugin, OptionPlugin)
    assert plugin.value == 1
    d = make_dispatcher(plugins=[OptionPlugin])
    assert info(d, "option").plugin.value == "default"  # type: ignore[attr-defined]


def test_plugin_setting_without_its_plugin_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="my_option"):
        Dispatcher(my_option=1)
    with pytest.raises(UsageError, match="my_optoin") as excinfo:
        Dispatcher(my_option=1, my_optoin=2, plugins=[OptionPlugin])
    assert "'my_option'" not in str(excinfo.value)


# -- retry policy -------------------------------------------------------------------------


class FiveAttempts:
    name = "five-attempts"

    @hookimpl
    def dispatchkit_retry_policy(self, settings: Settings) -> tenacity.Retrying:
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(5),
            wait=tenacity.wait_none(),
            retry=tenacity.retry_if_exception_type(HTTPStatusError),
            reraise=True,
        )


def test_plugin_retry_policy_replaces_the_builtin(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    builtin = make_dispatcher()
    with pytest.raises(HTTPStatusError):
        builtin.apply(f"{peer}/flaky", kwargs={"fail": 4})  # three attempts only

    d = make_dispatcher(plugins=[FiveAttempts])
    assert d.apply(f"{peer}/flaky", kwargs={"fail": 4}) == 5
    task_id = uuid.uuid4().hex
    with pytest.raises(HTTPStatusError) as excinfo:
        d.apply(f"{peer}/flaky", kwargs={"fail": 5}, task_id=task_id)
    assert excinfo.value.status == 503
    assert seen(d, peer, task_id) == 5


def test_retry_policy_must_be_a_retrying() -> None:
    class Wrong:
        name = "wrong"

        @hookimpl
        def dispatchkit_retry_policy(self, settings: Settings) -> Any:
            return 5

    with pytest.raises(UsageError, match=r"tenacity\.Retrying"):
        Dispatcher(plugins=[Wrong])


# -- names, and plugins that break their contract ------------------------------------


def test_plugin_given_in_code_replaces_the_entry_point_of_its_name(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    mine = ExamplePlugin()
    d = make_dispatcher(plugins=[mine])
    (example,) = [p for p in d.plugins if p.name == "example"]
    assert example.plugin is mine
    assert example.distribution is None  # not the entry point's
    d.call(f"{peer}/multiply", x=1, y=1)
    assert mine.calls == 1


def test_plugin_given_in_code_replaces_a_builtin_of_its_name(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    counting = CountingPlugin()
    counting.name = "transport"
    d = make_dispatcher(plugins=[counting])
    assert d.call(f"{peer}/multiply", x=2, y=5) == 10
    assert counting.transport is not None
    assert counting.transport.sent == 1
    assert [p.plugin for p in d.plugins if p.name == "transport"] == [counting]


def test_two_plugins_of_one_name_are_refused() -> None:
    with pytest.raises(PluginLoadError, match="two plugins are named 'tagger'"):
        Dispatcher(plugins=[Tagger, Tagger()])


def test_disable_must_be_a_list() -> None:
    with pytest.raises(UsageError, match="lists, not a single string"):
        Dispatcher(disable="example")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"disable": 5}, "'disable' takes a list of plugin names, got int"),
        ({"disable": ["example", None]}, r"'disable' takes plugin names \(str\), got None"),
        ({"plugins": 5}, "'plugins' takes a list, got int"),
    ],
)
def test_plugins_and_disable_that_are_not_lists_are_refused(
    options: dict[str, Any], message: str
) -> None:
    for dispatcher in (Dispatcher, AsyncDispatcher):
        with pytest.raises(UsageError, match=message):
            dispatcher(**options)


class FlakyTransport:
    """Times out twice without saying which call (no ``request=``), then answers."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, request: Request) -> Response:
        self.sent += 1
        if self.sent <= 2:
            raise dispatchkit.DispatchTimeout("slow")
        return Response(200, {}, b'{"status": "success", "retval": "late"}')

    def close(self) -> None:
        pass


def test_errors_of_a_plugin_transport_are_bound_before_the_retry_policy_sees_them(
    make_dispatcher: MakeDispatcher,
) -> None:
    flaky = FlakyTransport()

    class Plugin:
        name = "flaky"

        @hookimpl
        def dispatchkit_transport(self, scheme: str, dispatcher: Dispatcher) -> Transport:
            return flaky

    d = make_dispatcher(plugins=[Plugin])
    assert d.call("flaky://anywhere/task") == "late"
    assert flaky.sent == 3


def test_a_foreign_exception_in_a_hook_becomes_a_dispatch_error(
    make_dispatcher: MakeDispatcher, peer: str
) -> None:
    class Buggy:
        name = "buggy"

        @hookimpl
        def dispatchkit_prepare_request(self, request: Request) -> None:
            raise KeyError("missing-header")

    recorder = Recorder()
    d = make_dispatcher(plugins=[recorder, Buggy])
    with pytest.raises(DispatchError, match="plugin failure: KeyError") as excinfo:
        d.call(f"{peer}/multiply", x=1, y=1)
    assert isinstance(excinfo.value.__cause__, KeyError)
    assert excinfo.value.method == "GET"
    ((_, outcome),) = recorder.done
    assert outcome.error is excinfo.value
