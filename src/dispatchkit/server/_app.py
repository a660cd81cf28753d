"""TaskApp: serves Python functions as callback tasks, as a WSGI and an ASGI application."""

from __future__ import annotations

import functools
import logging
import re
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar, overload
from urllib.parse import parse_qsl

import orjson

from dispatchkit._dispatcher import Dispatcher
from dispatchkit._models import Codec, Envelope
from dispatchkit.server._arguments import ArgumentError, FormValues, TaskSpec
from dispatchkit.server._asgi import ASGIApp
from dispatchkit.server._gateway import (
    RESULTS_MAX_BYTES,
    Gateway,
    forwarded,
    route,
    task_id_from,
)
from dispatchkit.server._http import (
    Answer,
    Awaiting,
    Blocking,
    BodyNeeded,
    Decision,
    HTTPRequest,
    announced_length,
    too_large,
    wsgi_request,
)
from dispatchkit.server._loop import LoopClosed, LoopThread
from dispatchkit.server._refused import Refused
from dispatchkit.server._serve import BACKLOG, TaskServer
from dispatchkit.server._signing import REPLAY_MAX, RequestVerifier
from dispatchkit.signing import signs_body

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from dispatchkit.signing import SecretInput

__all__ = ["TaskApp"]

logger = logging.getLogger("dispatchkit.server")

F = TypeVar("F", bound=Callable[..., Any])

_NAME = re.compile(r"[A-Za-z0-9._~-]+")
_TASK_METHODS = ("GET", "HEAD", "POST")
_INDEX_METHODS = ("GET", "HEAD")
_APPLY_METHODS = ("GET", "POST")
_RESULTS_MAX = 10_000
_RESULTS_MAX_AGE = 3600.0
_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"
# a bound on keys per query string or form body, so parsing cannot be made to run away
_MAX_FIELDS = 1000


class TaskApp:
    """A WSGI application serving each registered function at ``/<name>``; :attr:`asgi`
    is the same app for ASGI servers.

    ``GET`` takes the arguments from the query string; ``POST`` from a
    form-encoded or JSON body, with the query string merged underneath (the
    body wins); ``HEAD`` runs the task like ``GET`` and sends no body. Every
    answer, success or not, is an envelope encoded by ``codec`` (the JSON
    codec by default) with Content-Type and Content-Length. ``GET /`` answers
    a success envelope whose ``retval`` is the sorted list of task names.

    A task may be a plain function or an ``async def`` one. Under WSGI a plain
    task runs in the request's thread and an async one on the app's own event
    loop, in a daemon thread started on first use and ended by :meth:`close`.
    Under ASGI (:attr:`asgi`) an async task is awaited on the server's loop and
    a plain one runs on a worker thread (``asyncio.to_thread``).

    ``gateway=True`` adds the HTTP gateway (``docs/gateway.md``):
    ``/apply/<name>`` runs a task asynchronously on ``dispatcher``'s executor
    (a Dispatcher made on first use and closed by :meth:`close` when none is
    given), calling the task at ``callback_url`` (by default the server the
    request reached, from the WSGI environ or the ASGI scope, never the Host
    header);
    ``/<id>/status`` and ``/<id>/done`` read the result, kept for at most
    ``results_max`` calls and ``results_max_age`` seconds, in at most
    ``results_max_bytes`` (the arguments of a call until it finishes, then its
    status; an apply that does not fit gets 503 with ``Retry-After``).

    ``signing_secret`` (``"whsec_<base64>"``, raw ``bytes``, or a list of them
    during a key rotation) makes every task request and every ``/apply`` carry
    a valid Standard Webhooks signature (``docs/security.md``): one that is
    missing, wrong, or whose timestamp is more than ``signing_tolerance``
    seconds off answers 401 and runs nothing, and so does a ``webhook-id``
    already accepted within that window (at most ``signing_replay_max`` ids
    are remembered; beyond that new requests get 503 until some expire). The
    gateway's own Dispatcher then signs its calls back to the app.
    """

    def __init__(
        self,
        codec: Codec | None = None,
        *,
        max_body_bytes: int = 1 << 20,
        gateway: bool = False,
        dispatcher: Dispatcher | None = None,
        callback_url: str | None = None,
        results_max: int = _RESULTS_MAX,
        results_max_age: float = _RESULTS_MAX_AGE,
        results_max_bytes: int = RESULTS_MAX_BYTES,
        signing_secret: SecretInput | None = None,
        signing_tolerance: float = 300.0,
        signing_replay_max: int = REPLAY_MAX,
    ) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        # async tasks called by WSGI requests run here (see _loop.py for why one loop
        # per app); its thread starts on first use and ends with close(), or when the
        # app is collected without being closed
        self._loop = LoopThread("dispatchkit-taskapp-loop")
        weakref.finalize(self, self._loop.close)
        self._verifier: RequestVerifier | None = None
        self._own_dispatcher: Dispatcher | None = None
        if signing_secret is not None:
            self._verifier = RequestVerifier(signing_secret, signing_tolerance, signing_replay_max)
            if gateway and dispatcher is None:
                # the gateway's calls back to this app must be signed too
                dispatcher = Dispatcher(signing_secret=self._verifier.keys)
                self._own_dispatcher = dispatcher
        elif (signing_tolerance, signing_replay_max) != (300.0, REPLAY_MAX):
            raise ValueError("signing_tolerance and signing_replay_max need signing_secret")
        self._gateway: Gateway | None = None
        if gateway:
            try:
                self._gateway = Gateway(
                    dispatcher=dispatcher,
                    callback_url=callback_url,
                    results_max=results_max,
                    results_max_age=results_max_age,
                    results_max_bytes=results_max_bytes,
                )
            except BaseException:
                self.close()  # the Dispatcher made above for signed callbacks
                raise
        elif (dispatcher, callback_url, results_max, results_max_age, results_max_bytes) != (
            None, None, _RESULTS_MAX, _RESULTS_MAX_AGE, RESULTS_MAX_BYTES,
        ):  # fmt: skip
            raise ValueError(
                "dispatcher, callback_url, results_max, results_max_age and results_max_bytes "
                "need gateway=True"
            )
        if codec is None:
            from dispatchkit.builtin.codec import JSONCodec

            codec = JSONCodec()
        self.codec = codec
        self.max_body_bytes = max_body_bytes
        self._specs: dict[str, TaskSpec] = {}
        self._funcs: dict[str, Callable[..., Any]] = {}
        self._tasks_view = types.MappingProxyType(self._funcs)
        self._asgi = ASGIApp(self)

    @property
    def tasks(self) -> Mapping[str, Callable[..., Any]]:
        """The registered tasks, name to function; a read-only, live view."""
        return self._tasks_view

    @property
    def asgi(self) -> ASGIApp:
        """This app as an ASGI 3 application, for uvicorn, hypercorn or any ASGI server.

        The same routes, arguments, envelopes, limits, gateway and signature
        checks as the WSGI app; plain tasks run on worker threads, async tasks
        on the server's loop. It answers the lifespan protocol: shutdown calls
        :meth:`close`. Always the same object: ``asgi = app.asgi`` at module
        level gives the server a ``module:asgi`` to load.
        """
        return self._asgi

    @overload
    def task(self, func: F, /, *, name: str | None = None) -> F: ...

    @overload
    def task(self, func: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def task(self, func: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
        """Register ``func`` as a task: ``@app.task``, ``@app.task(name=...)`` or a call.

        The name defaults to the function's ``__name__`` and must match
        ``[A-Za-z0-9._~-]+`` (it is a URL path segment). The function may be
        an ``async def`` one; it is returned unchanged. Raises
        :class:`ValueError` for a bad or taken name and :class:`TypeError` for
        a signature that cannot be served (an unsupported annotation, a
        positional-only parameter).
        """

        def register(target: F) -> F:
            task_name = name if name is not None else getattr(target, "__name__", "")
            if not _NAME.fullmatch(task_name):
                raise ValueError(
                    f"task name {task_name!r} is not a URL-safe path segment; pass name=..."
                )
            if task_name in self._specs:
                raise ValueError(f"a task named {task_name!r} is already registered")
            self._specs[task_name] = TaskSpec(task_name, target)
            self._funcs[task_name] = target
            return target

        return register if func is None else register(func)

    def server(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout: float = 30.0,
        request_timeout: float = 30.0,
        backlog: int = BACKLOG,
    ) -> TaskServer:
        """A :class:`TaskServer` for this app, not yet started; ``with`` starts it."""
        return TaskServer(
            self,
            host=host,
            port=port,
            idle_timeout=idle_timeout,
            request_timeout=request_timeout,
            backlog=backlog,
        )

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        idle_timeout: float = 30.0,
        request_timeout: float = 30.0,
        backlog: int = BACKLOG,
    ) -> None:
        """Serve until interrupted (Ctrl-C), on the keep-alive threaded server."""
        server = self.server(
            host=host,
            port=port,
            idle_timeout=idle_timeout,
            request_timeout=request_timeout,
            backlog=backlog,
        ).listen()
        print(f"Serving {len(self._specs)} tasks on {server.url}/", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
            self.close()

    def close(self) -> None:
        """Close the gateway and the event loop of async tasks under WSGI.

        The gateway refuses new applies and closes the Dispatcher the app made;
        its calls still queued or running finish first (each is bounded by its
        timeout). A Dispatcher given to the app is left open. Then the loop
        thread, if one was started, lets running async tasks finish for a
        few seconds, cancels the rest (their WSGI requests answer 503) and
        ends. Safe to call twice; tasks can still be called afterwards (an
        async one under WSGI starts a new loop, to be closed again).
        """
        if self._gateway is not None:
            self._gateway.close()
        if self._own_dispatcher is not None:
            self._own_dispatcher.close()
        self._loop.close()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        """The WSGI entry point."""
        request = wsgi_request(environ)
        try:
            decision = self._decide(request, None)
        except BodyNeeded:
            try:
                body = self._read_body(environ, request)
            except Refused as refused:
                decision = self._refusal(refused)
            else:
                decision = self._decide(request, body)
        answer = self._complete(decision)
        status = answer.status
        start_response(f"{status.value} {status.phrase}", answer.headers)
        return [b""] if request.method == "HEAD" else [answer.body]

    def _complete(self, decision: Decision) -> Answer:
        """Run what is left of a decision in this thread (the WSGI request's)."""
        if isinstance(decision, Blocking):
            return decision.run()
        if isinstance(decision, Awaiting):
            try:
                return self._loop.run(decision.run)
            except LoopClosed as exc:
                return self._refusal(Refused(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)))
        return decision

    def _read_body(self, environ: WSGIEnvironment, request: HTTPRequest) -> bytes:
        """The WSGI request body; over ``max_body_bytes`` is a 413, refused unread when
        Content-Length announces it."""
        limit = self.max_body_bytes
        stream = environ["wsgi.input"]
        length = announced_length(request.headers.get("content-length", ""), limit)
        if length is not None:
            body: bytes = stream.read(length)
            if len(body) < length:
                raise Refused(HTTPStatus.BAD_REQUEST, "request body shorter than Content-Length")
            return body
        if not environ.get("wsgi.input_terminated"):
            return b""  # no length and a stream that may never end: there is no body
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = stream.read(limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise too_large(limit)
        return b"".join(chunks)

    # -- deciding a request: the same for WSGI and ASGI ---------------------------------

    def _decide(self, request: HTTPRequest, body: bytes | None) -> Decision:
        """The answer to ``request``, or the work left before there is one.

        ``body`` is the request body, or ``None`` while it is unread: where it
        is first needed :class:`BodyNeeded` is raised, before anything with an
        effect has happened, and the caller asks again with the body.
        Refusals are answers (failure envelopes), never exceptions.
        """
        try:
            return self._route(request, body)
        except Refused as refused:
            return self._refusal(refused)

    def _route(self, request: HTTPRequest, body: bytes | None) -> Decision:
        path = request.path
        if self._gateway is not None:
            found = route(path)
            if found is not None:
                if found.action == "apply":
                    self._verify(request, body)
                    return self._apply(self._gateway, request, body, found.arg)
                _allow(request.method, _INDEX_METHODS)
                read = functools.partial(self._gateway_read, self._gateway, *found)
                return Blocking(read)
        if path not in ("", "/"):  # the index only lists the task names
            self._verify(request, body)
        return self._dispatch(request, body)

    def _verify(self, request: HTTPRequest, body: bytes | None) -> None:
        if self._verifier is None:
            return
        if body is None and signs_body(request.method):
            raise BodyNeeded
        self._verifier.verify(request.method, request.path, request.query, request.headers, body)

    def _apply(
        self, gateway: Gateway, request: HTTPRequest, body: bytes | None, name: str
    ) -> Decision:
        if name not in self._specs:
            raise Refused(HTTPStatus.NOT_FOUND, f"unknown task: {_shown(name)}")
        _allow(request.method, _APPLY_METHODS)
        received: dict[str, object] = dict(_query_arguments(request.query))
        post = request.method == "POST"
        if post:
            received.update(self._body_arguments(request, body))
        task_id = task_id_from(request.headers.get("idempotency-key"))
        json = post and _is_json(_media_type(request))
        # submitting may block (a Dispatcher made on first use, a Celery broker): a Blocking
        return Blocking(
            functools.partial(
                self._submit, gateway, request, name, forwarded(received), json, task_id
            )
        )

    def _submit(
        self,
        gateway: Gateway,
        request: HTTPRequest,
        name: str,
        kwargs: dict[str, object],
        json: bool,
        task_id: str,
    ) -> Answer:
        try:
            if self._verifier is not None:
                # the call back to the task may carry this apply's webhook-id
                self._verifier.replay.allow_follow_up(task_id, f"/{name}")
            answer = gateway.apply(
                name, request.method, kwargs, json=json, task_id=task_id, origin=request.origin
            )
            return self._gateway_json(answer, name)
        except Refused as refused:
            return self._refusal(refused)

    def _gateway_read(self, gateway: Gateway, action: str, task_id: str) -> Answer:
        # a look-up may block too: with the Celery executor a result is read from its backend
        try:
            answer = gateway.status(task_id) if action == "status" else gateway.done(task_id)
            return self._gateway_json(answer, task_id)
        except Refused as refused:
            return self._refusal(refused)

    def _gateway_json(self, answer: dict[str, Any], what: str) -> Answer:
        try:
            return self._answer(HTTPStatus.OK, orjson.dumps(answer))
        except TypeError as exc:
            logger.exception("gateway: cannot encode the answer for %r", what)
            raise Refused(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot encode the result: {exc}"
            ) from None

    def _dispatch(self, request: HTTPRequest, body: bytes | None) -> Decision:
        path, method = request.path, request.method
        if path in ("", "/"):
            _allow(method, _INDEX_METHODS)
            return self._answer(HTTPStatus.OK, Envelope.success(sorted(self._specs)))
        spec = self._specs.get(path[1:]) if path.startswith("/") else None
        if spec is None:
            raise Refused(HTTPStatus.NOT_FOUND, f"unknown task {_shown(path)}")
        _allow(method, _TASK_METHODS)
        received: dict[str, object] = dict(_query_arguments(request.query))
        if method == "POST":
            received.update(self._body_arguments(request, body))
        try:
            kwargs = spec.bind(received)
        except ArgumentError as exc:
            raise Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
        if spec.is_async:
            return Awaiting(functools.partial(self._await_task, spec, kwargs))
        return Blocking(functools.partial(self._call_task, spec, kwargs))

    def _call_task(self, spec: TaskSpec, kwargs: dict[str, object]) -> Answer:
        try:
            retval = spec.func(**kwargs)
        except Exception as exc:
            return self._task_failed(spec, exc)
        return self._answer(HTTPStatus.OK, Envelope.success(retval))

    async def _await_task(self, spec: TaskSpec, kwargs: dict[str, object]) -> Answer:
        try:
            retval = await spec.func(**kwargs)
        except Exception as exc:
            return self._task_failed(spec, exc)
        return self._answer(HTTPStatus.OK, Envelope.success(retval))

    def _task_failed(self, spec: TaskSpec, exc: Exception) -> Answer:
        logger.error("task %r failed", spec.name, exc_info=exc)
        reason = f"{type(exc).__name__}: {exc}"
        return self._refusal(Refused(HTTPStatus.INTERNAL_SERVER_ERROR, reason))

    def _body_arguments(self, request: HTTPRequest, body: bytes | None) -> Mapping[str, object]:
        if body is None:
            raise BodyNeeded
        if not body:
            return {}
        media_type = _media_type(request)
        if _is_json(media_type):
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise Refused(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise Refused(HTTPStatus.BAD_REQUEST, "the JSON body must be an object")
            return obj
        if media_type in (_FORM, ""):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused(HTTPStatus.BAD_REQUEST, "the form body is not UTF-8") from None
            return _parse_form(text, "form body")
        content_type = request.headers.get("content-type", "")
        raise Refused(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"unsupported Content-Type {content_type[:100]!r}; send {_FORM} or {_JSON}",
        )

    # -- answers ------------------------------------------------------------------------

    def _refusal(self, refused: Refused) -> Answer:
        return self._answer(refused.status, Envelope.failure(refused.reason), refused.headers)

    def _answer(
        self,
        status: HTTPStatus,
        answer: Envelope | bytes,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Answer:
        """An envelope encoded by the codec (or the gateway's JSON, ``bytes``), with
        Content-Type and Content-Length."""
        media_type = self.codec.media_type
        if isinstance(answer, bytes):  # the gateway's JSON, which is not an envelope
            body, media_type = answer, _JSON
        else:
            encoded = self._encode(status, answer)
            if isinstance(encoded, Refused):
                status = encoded.status
                body = self.codec.encode(Envelope.failure(encoded.reason))
            else:
                body = encoded
        all_headers = [*headers, ("Content-Type", media_type), ("Content-Length", str(len(body)))]
        return Answer(status, all_headers, body)

    def _encode(self, status: HTTPStatus, envelope: Envelope) -> bytes | Refused:
        try:
            return self.codec.encode(envelope)
        except Exception as exc:
            logger.exception("cannot encode the answer (%s)", status.value)
            return Refused(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"cannot encode the return value: {type(exc).__name__}: {exc}",
            )


def _media_type(request: HTTPRequest) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == _JSON or media_type.endswith("+json")


def _allow(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise Refused(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"method {method[:20]!r} not allowed",
            [("Allow", ", ".join(allowed))],
        )


def _shown(path: str) -> str:
    text = path.lstrip("/")
    return repr(text if len(text) <= 100 else text[:100] + "...")


def _query_arguments(query: bytes) -> Mapping[str, object]:
    if not query:
        return {}
    try:
        text = query.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(HTTPStatus.BAD_REQUEST, "the query string is not UTF-8") from None
    return _parse_form(text, "query string")


def _parse_form(text: str, what: str) -> dict[str, object]:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=_MAX_FIELDS)
    except UnicodeDecodeError:
        raise Refused(HTTPStatus.BAD_REQUEST, f"the {what} is not UTF-8") from None
    except ValueError:
        raise Refused(HTTPStatus.BAD_REQUEST, f"the {what} has too many fields") from None
    received: dict[str, FormValues] = {}
    for key, value in pairs:
        received.setdefault(key, FormValues()).append(value)
    return dict(received)
