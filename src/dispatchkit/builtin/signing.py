"""Built-in plugin: sign every attempt of every call (Standard Webhooks).

Loaded only when the Dispatcher is given ``signing_secret`` or
``signing_keys``, so that an unsigned Dispatcher does not pay for a hook per
call::

    from dispatchkit import Dispatcher
    from dispatchkit.signing import generate_secret

    secret = generate_secret()  # share it with the receiver
    with Dispatcher(signing_secret=secret) as d:
        d.call("https://example.com/hook", event="paid")

One key per receiver: ``signing_keys`` maps key ids to keys (or reads them
from the environment, ``signing_keys="env"``) and a call names its key::

    d.apply(url, "POST", {"event": "paid"}, options={"signing_key": "acme"})

The scheme itself, and :func:`~dispatchkit.signing.verify` for receivers, is
:mod:`dispatchkit.signing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatchkit.exceptions import UsageError
from dispatchkit.hookspecs import hookimpl
from dispatchkit.signing import KEY_OPTION, KeyStore, SigningKeys, sign_request

if TYPE_CHECKING:
    from dispatchkit._models import Request
    from dispatchkit._settings import Settings

#: The Dispatcher setting that holds the default secret(s).
SETTING = "signing_secret"
#: The Dispatcher setting that holds the keys calls name (``options={"signing_key": id}``).
KEYS_SETTING = "signing_keys"


class Plugin:
    """Adds ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` to each attempt.

    ``signing_secret`` is the default key: one ``"whsec_<base64>"`` secret,
    the raw key as ``bytes``, a list of them (during a key rotation every
    request carries one signature per key), or
    :class:`~dispatchkit.signing.SigningKeys`. ``signing_keys`` (see
    :meth:`KeyStore.parse <dispatchkit.signing.KeyStore.parse>`) holds the
    keys that calls name with ``options={"signing_key": id}``; such a call is
    signed with that key only. A call that names an unknown key, or names
    none when there is no default key, fails with
    :class:`~dispatchkit.UsageError` before anything is sent. Each attempt,
    retries included, is signed afresh with the current time; the id is the
    task id, the same on every attempt.
    """

    name = "signing"

    def __init__(self) -> None:
        self.keys: SigningKeys | None = None
        self.store: KeyStore | None = None

    def __repr__(self) -> str:
        store = "" if self.store is None else f" {KEYS_SETTING}={self.store!r}"
        return f"<signing {self.keys!r}{store}>"

    @hookimpl(trylast=True)
    def dispatchkit_configure(self, settings: Settings) -> None:
        secret, store = settings.extra(SETTING), settings.extra(KEYS_SETTING)
        if store is None:
            self.keys = SigningKeys.parse(secret, name=SETTING)
            return
        self.keys = None if secret is None else SigningKeys.parse(secret, name=SETTING)
        self.store = KeyStore.parse(store, name=KEYS_SETTING)

    @hookimpl(trylast=True)
    def dispatchkit_prepare_request(self, request: Request) -> None:
        key_id = request.options.get(KEY_OPTION)
        if key_id is not None:
            if self.store is None:
                raise UsageError(
                    f"the call names the signing key {key_id!r}, and this Dispatcher has no "
                    f"{KEYS_SETTING}",
                    request=request,
                )
            keys = self.store.resolve(key_id)
        elif self.keys is not None:
            keys = self.keys
        else:
            raise UsageError(
                f"the call names no signing key (options={{{KEY_OPTION!r}: ...}}) and there is "
                f"no default key ({SETTING})",
                request=request,
            )
        sign_request(request, keys)
