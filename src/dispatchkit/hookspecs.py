"""The plugin API of dispatchkit: every hook a plugin may implement.

A plugin is any object (a module, or an instance of a class) whose methods
are marked with :data:`hookimpl` and named after a hook below; every hook
name starts with ``dispatchkit_``. Register plugins in code with
``Dispatcher(plugins=[...])`` or through an entry point in the group
``dispatchkit``. Built-in plugins are ``trylast``, so any installed plugin
overrides a default whatever the registration order.

Hooks come in three groups:

* lifecycle: :func:`dispatchkit_configure`, :func:`dispatchkit_close`;
* strategy factories, ``firstresult``, called once and cached per Dispatcher:
  :func:`dispatchkit_transport` (and :func:`dispatchkit_async_transport` for
  the AsyncDispatcher), :func:`dispatchkit_codec`,
  :func:`dispatchkit_retry_policy`, :func:`dispatchkit_endpoint_guard`,
  :func:`dispatchkit_executor`;
* per call: :func:`dispatchkit_submit_options` (when a call is handed to the
  executor, in the caller), :func:`dispatchkit_prepare_request` (before each
  attempt), :func:`dispatchkit_attempt_done` (after each attempt) and
  :func:`dispatchkit_call_done` (after each call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Mapping

    import tenacity

    from dispatchkit._async_dispatcher import AsyncDispatcher
    from dispatchkit._dispatcher import Dispatcher
    from dispatchkit._endpoints import EndpointGuard
    from dispatchkit._models import (
        AsyncTransport,
        Attempt,
        Call,
        Codec,
        Executor,
        Outcome,
        Request,
        Transport,
    )
    from dispatchkit._settings import Settings

PROJECT = "dispatchkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- lifecycle -----------------------------------------------------------------


@hookspec
def dispatchkit_configure(settings: Settings) -> None:
    """Called once for every plugin while a Dispatcher is built, before any other hook.

    Read the settings here (a plugin's own through ``settings.extra(name, default)``,
    which also marks the name as understood) and check them: raising
    :class:`~dispatchkit.UsageError` refuses the Dispatcher. There is no Dispatcher
    to see yet: the hooks that need one (transport, codec, executor) get it.

    :param settings: the Dispatcher's :class:`~dispatchkit.Settings`.
    """


@hookspec
def dispatchkit_close(dispatcher: Dispatcher) -> None:
    """Called once for every plugin on ``Dispatcher.close()``; release resources.

    The Dispatcher closes the transports it got from :func:`dispatchkit_transport`
    and shuts its executor down itself, before this hook runs; a plugin only
    releases what else it opened.

    :param dispatcher: the Dispatcher being closed.
    """


# -- strategies (firstresult, cached) --------------------------------------------


@hookspec(firstresult=True)
def dispatchkit_transport(scheme: str, dispatcher: Dispatcher) -> Transport | None:
    """Return the :class:`~dispatchkit.Transport` for URLs of ``scheme``, or ``None``.

    Called once per scheme per Dispatcher; the answer is cached. Stops at the
    first non-``None`` result.

    :param scheme: the URL scheme, lower-case (``"http"``, ``"https"``, ...).
    :param dispatcher: the Dispatcher asking.
    """


@hookspec(firstresult=True)
def dispatchkit_async_transport(scheme: str, dispatcher: AsyncDispatcher) -> AsyncTransport | None:
    """Return the :class:`~dispatchkit.AsyncTransport` for URLs of ``scheme``, or ``None``.

    The AsyncDispatcher's twin of :func:`dispatchkit_transport`: called once
    per scheme per AsyncDispatcher (``http`` and ``https`` when it is built);
    the answer is cached, and the AsyncDispatcher awaits its ``aclose()``
    when it is closed. Stops at the first non-``None`` result.

    :param scheme: the URL scheme, lower-case.
    :param dispatcher: the AsyncDispatcher asking.
    """


@hookspec(firstresult=True)
def dispatchkit_codec(media_type: str, dispatcher: Dispatcher) -> Codec | None:
    """Return the :class:`~dispatchkit.Codec` for a response media type, or ``None``.

    Called once per media type per Dispatcher; the answer (``None`` too) is
    cached. Stops at the first non-``None`` result.

    :param media_type: the response's Content-Type without parameters,
        lower-case; ``""`` when the response has none.
    :param dispatcher: the Dispatcher asking.
    """


@hookspec(firstresult=True)
def dispatchkit_retry_policy(settings: Settings) -> tenacity.Retrying | None:
    """Return the tenacity ``Retrying`` that decides whether an attempt is repeated.

    Called once per Dispatcher, after :func:`dispatchkit_configure`. The
    policy's predicates see the exception of a failed attempt, a
    :class:`~dispatchkit.DispatchError` whose ``.request`` is the call;
    ``reraise=True`` is expected. Stops at the first non-``None`` result.

    :param settings: the Dispatcher's :class:`~dispatchkit.Settings`.
    """


@hookspec(firstresult=True)
def dispatchkit_endpoint_guard(settings: Settings) -> EndpointGuard | None:
    """Return the :class:`~dispatchkit.EndpointGuard` that isolates endpoints, or ``None``.

    Called once per Dispatcher (and AsyncDispatcher), after
    :func:`dispatchkit_configure`; the answer is kept for the dispatcher's
    life. With a guard, every attempt is admitted by ``guard.admit`` before it
    starts (it may wait, or fail fast) and reported to ``guard.report`` after
    it; with none (the default), nothing is asked. Stops at the first
    non-``None`` result.

    :param settings: the Dispatcher's :class:`~dispatchkit.Settings`.
    """


@hookspec(firstresult=True)
def dispatchkit_executor(dispatcher: Dispatcher) -> Executor | None:
    """Return the :class:`~dispatchkit.Executor` that runs asynchronous calls, or ``None``.

    Called once, at the first ``submit()``; the executor runs each
    :class:`~dispatchkit.Call` through ``dispatcher.execute(call)``, here or in
    another process. Stops at the first non-``None`` result.

    :param dispatcher: the Dispatcher asking.
    """


# -- per call --------------------------------------------------------------------


@hookspec
def dispatchkit_submit_options(call: Call) -> Mapping[str, str] | None:
    """Called in the caller's thread when a call is handed to the executor: add options to it.

    Runs for ``submit``, ``apply_async``, ``submit_many``, ``submit_calls`` and ``map`` of the sync
    Dispatcher (the Celery executor's and the thread pool's calls alike), before
    the call is checked and queued, with the caller's context current: the place
    to capture what must travel with the call to where it runs (a trace context).
    Return plugin options (names to short strings, see ``Call.options``) to add
    to the call, or ``None``. They travel with the call (broker messages,
    delivery records), so they never hold a secret: they are checked as the
    caller's own are, and a value that looks like a signing secret is refused.
    The caller's own options win over a plugin's of the same name; between
    plugins, the first to answer a name wins. A plugin reads its options back
    where the call runs, as ``request.options``. When no plugin implements it,
    nothing is called.

    :param call: the call as the caller gave it (frozen): its url, method,
        task id, headers and options.
    """


@hookspec
def dispatchkit_prepare_request(request: Request) -> None:
    """Called before **each** attempt of a call: edit ``request.headers`` in place.

    For authentication, signing and tracing. ``request.attempt`` counts from 1;
    the ``Idempotency-Key`` header is already set and stays the same on every
    attempt. Raising a :class:`~dispatchkit.DispatchError` fails the call.

    :param request: the call about to be sent.
    """


@hookspec
def dispatchkit_attempt_done(request: Request, attempt: Attempt) -> None:
    """Called after **each** attempt of a call, retries included: observe what it got.

    For logging and metrics per attempt (what a retried call met on the way).
    Runs before the retry policy waits, and for the last attempt before
    :func:`dispatchkit_call_done`; an exception raised here is logged, not
    raised.

    :param request: the call; ``request.attempt`` is ``attempt.number``.
    :param attempt: the :class:`~dispatchkit.Attempt`: its number, start,
        duration, outcome (status or error type), error message and body excerpt.
    """


@hookspec
def dispatchkit_call_done(request: Request, outcome: Outcome) -> None:
    """Called after every call, successful or not: observe result, error and timing.

    For logging and metrics; an exception raised here is logged, not raised.

    :param request: the call as last sent.
    :param outcome: ``outcome.retval`` or ``outcome.error``, and ``outcome.duration``.
    """
