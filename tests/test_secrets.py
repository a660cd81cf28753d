"""Secrets never leak: URL passwords and secret-looking query values are masked everywhere.

Each failure mode below is produced for real (refused port, timeout, failure
envelope, HTTP error, invalid body), then every text a user could see is
grepped for the secrets: the message, the repr, the error's ``url``, the
request's repr, the traceback of an asynchronous result, the CLI's stderr and
the log output.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, cast

import pytest

from dispatchkit import URL, AsyncResult, Dispatcher, DispatchError, Settings, hookimpl
from dispatchkit._cli import main

PASSWORD = "pw-8c1f0e"
TOKEN = "tok-77d2aa"
SECRETS = (PASSWORD, TOKEN)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _secret_url(base: str, path: str) -> str:
    return base.replace("http://", f"http://alice:{PASSWORD}@") + f"{path}?api_key={TOKEN}&x=1"


def _texts(error: DispatchError) -> list[str]:
    return [str(error), repr(error), error.url or "", repr(error.request), repr(error.__cause__)]


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("/fail", {}),
        ("/fail500", {}),
        ("/status/404", {}),
        ("/invalid/json", {}),
        ("/slow", {"delay": 3000}),
        ("/redirect", {}),
    ],
)
def test_errors_mask_secrets(
    make_dispatcher: Any, peer: str, caplog: pytest.LogCaptureFixture, path: str, kwargs: Any
) -> None:
    d = make_dispatcher(timeout=0.5, retry_attempts=1)
    with caplog.at_level(logging.DEBUG, logger="dispatchkit"), pytest.raises(DispatchError) as info:
        d.call(_secret_url(peer, path), **kwargs)
    assert info.value.request is not None
    assert PASSWORD in info.value.request.url  # it was sent; it is only masked on display
    texts = [*_texts(info.value), caplog.text]
    for secret in SECRETS:
        assert not any(secret in text for text in texts), secret
    assert "alice:***@" in str(info.value)


def test_refused_connection_masks_secrets(make_dispatcher: Any) -> None:
    d = make_dispatcher(retry_attempts=1)
    with pytest.raises(DispatchError) as info:
        d.call(_secret_url(f"http://127.0.0.1:{_free_port()}", "/task"))
    for secret in SECRETS:
        assert not any(secret in text for text in _texts(info.value))


def test_async_results_and_reprs_mask_secrets(dispatcher: Dispatcher, peer: str) -> None:
    result = cast(AsyncResult, dispatcher.submit(_secret_url(peer, "/fail"), reason="nope"))
    error = result.get(timeout=10, propagate=False)
    texts = [repr(result), result.traceback or "", repr(error), str(error), repr(dispatcher)]
    texts.append(repr(URL(_secret_url(peer, "/multiply"))))
    for secret in SECRETS:
        assert not any(secret in text for text in texts), secret


def test_keyword_arguments_that_look_secret_are_masked(dispatcher: Dispatcher, peer: str) -> None:
    with pytest.raises(DispatchError) as info:
        dispatcher.call(f"{peer}/status/500", password=PASSWORD, session_token=TOKEN)
    for secret in SECRETS:
        assert secret not in str(info.value)


def test_cli_errors_mask_secrets(peer: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["call", _secret_url(peer, "/status/500")]) == 1
    captured = capsys.readouterr()
    for secret in SECRETS:
        assert secret not in captured.err
        assert secret not in captured.out


def test_settings_repr_masks_plugin_secrets() -> None:
    with Dispatcher(
        plugins=[_Reads("celery_broker", "api_token")],
        celery_broker=f"redis://:{PASSWORD}@127.0.0.1:6379/0",
        api_token=TOKEN,
    ) as d:
        shown = repr(d.settings)
    assert "celery_broker" in shown
    for secret in SECRETS:
        assert secret not in shown


class _Reads:
    """A plugin that claims the given settings, as a real plugin would."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.name = "reads-" + "-".join(names)

    @hookimpl
    def dispatchkit_configure(self, settings: Settings) -> None:
        for name in self.names:
            settings.extra(name)
