"""Built-in plugin: sign every attempt of every call (Standard Webhooks).

Loaded only when the Dispatcher is given ``signing_secret``, so that an
unsigned Dispatcher does not pay for a hook per call::

    from dispatchkit import Dispatcher
    from dispatchkit.signing import generate_secret

    secret = generate_secret()  # share it with the receiver
    with Dispatcher(signing_secret=secret) as d:
        d.call("https://example.com/hook", event="paid")

The scheme itself, and :func:`~dispatchkit.signing.verify` for receivers, is
:mod:`dispatchkit.signing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatchkit.hookspecs import hookimpl
from dispatchkit.signing import SigningKeys, sign_request

if TYPE_CHECKING:
    from dispatchkit._models import Request
    from dispatchkit._settings import Settings

#: The Dispatcher setting that holds the secret(s); the plugin is loaded when it is given.
SETTING = "signing_secret"


class Plugin:
    """Adds ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` to each attempt.

    ``signing_secret`` is one ``"whsec_<base64>"`` secret, the raw key as
    ``bytes``, a list of them (during a key rotation every request carries one
    signature per key), or :class:`~dispatchkit.signing.SigningKeys`. Each
    attempt, retries included, is signed afresh with the current time; the id
    is the task id, the same on every attempt.
    """

    name = "signing"

    def __init__(self) -> None:
        self.keys: SigningKeys | None = None

    def __repr__(self) -> str:
        return f"<signing {self.keys!r}>"

    @hookimpl(trylast=True)
    def dispatchkit_configure(self, settings: Settings) -> None:
        self.keys = SigningKeys.parse(settings.extra(SETTING), name=SETTING)

    @hookimpl(trylast=True)
    def dispatchkit_prepare_request(self, request: Request) -> None:
        if self.keys is not None:
            sign_request(request, self.keys)
