"""The plugin: sign every attempt of every call when a secret is configured."""

from __future__ import annotations

from dispatchkit import Request, Settings, hookimpl
from dispatchkit.signing import SigningKeys, sign_request

__all__ = ["SETTING", "SigningPlugin"]

#: The Dispatcher setting that holds the secret(s).
SETTING = "signing_secret"


class SigningPlugin:
    """Adds ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` to each attempt.

    Configured by ``Dispatcher(signing_secret=...)``: one ``"whsec_<base64>"``
    secret, the raw key as ``bytes``, a list of them (during a key rotation
    every request carries one signature per key), or
    :class:`~dispatchkit.signing.SigningKeys` parsed from them. Without it the
    plugin does nothing. Each attempt, retries included, is signed afresh with
    the current time; the id is the task id, the same on every attempt.
    """

    name = "signing"

    def __init__(self) -> None:
        self.keys: SigningKeys | None = None

    def __repr__(self) -> str:
        state = "off" if self.keys is None else repr(self.keys)
        return f"<SigningPlugin {state}>"

    @hookimpl
    def dispatchkit_configure(self, settings: Settings) -> None:
        secret = settings.extra(SETTING)
        if secret is not None:
            self.keys = SigningKeys.parse(secret, name=SETTING)

    @hookimpl
    def dispatchkit_prepare_request(self, request: Request) -> None:
        # Installed means loaded by every Dispatcher: unconfigured, this is the whole cost.
        keys = self.keys
        if keys is not None:
            sign_request(request, keys)
