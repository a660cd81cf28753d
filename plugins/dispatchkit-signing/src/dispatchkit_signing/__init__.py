"""Standard Webhooks signatures for dispatchkit's outgoing calls.

Installed, the plugin is found through the entry point ``signing``; it signs
once a secret is given::

    from dispatchkit import Dispatcher
    from dispatchkit_signing import generate_secret

    secret = generate_secret()  # share it with the receiver
    with Dispatcher(signing_secret=secret) as d:
        d.call("https://example.com/hook", event="paid")

Receivers check requests with :func:`verify` (any Python server),
``TaskApp(signing_secret=...)``, or any Standard Webhooks library. The scheme
lives in :mod:`dispatchkit.signing`; this package re-exports its helpers.
"""

from __future__ import annotations

from dispatchkit.signing import (
    SignatureError,
    SigningKeys,
    generate_secret,
    query_payload,
    verify,
)
from dispatchkit_signing._plugin import SETTING, SigningPlugin

__all__ = [
    "SETTING",
    "SignatureError",
    "SigningKeys",
    "SigningPlugin",
    "generate_secret",
    "query_payload",
    "verify",
]
