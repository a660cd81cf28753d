"""TaskApp: a WSGI application that serves Python functions as callback tasks."""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar, overload
from urllib.parse import parse_qsl

import orjson

from dispatchkit._dispatcher import Dispatcher
from dispatchkit._models import Codec, Envelope
from dispatchkit.server._arguments import ArgumentError, FormValues, TaskSpec
from dispatchkit.server._gateway import (
    RESULTS_MAX_BYTES,
    Gateway,
    forwarded,
    route,
    task_id_from,
)
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
# the body, once read for the signature check, for the arguments to reuse
_BODY_KEY = "dispatchkit.body"


class TaskApp:
    """A WSGI application serving each registered function at ``/<name>``.

    ``GET`` takes the arguments from the query string; ``POST`` from a
    form-encoded or JSON body, with the query string merged underneath (the
    body wins); ``HEAD`` runs the task like ``GET`` and sends no body. Every
    answer, success or not, is an envelope encoded by ``codec`` (the JSON
    codec by default) with Content-Type and Content-Length. ``GET /`` answers
    a success envelope whose ``retval`` is the sorted list of task names.

    ``gateway=True`` adds the HTTP gateway (``docs/gateway.md``):
    ``/apply/<name>`` runs a task asynchronously on ``dispatcher``'s executor
    (a Dispatcher made on first use and closed by :meth:`close` when none is
    given), calling the task at ``callback_url`` (by default the server the
    request reached, from the WSGI environ, never the Host header);
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

    @property
    def tasks(self) -> Mapping[str, Callable[..., Any]]:
        """The registered tasks, name to function; a read-only, live view."""
        return self._tasks_view

    @overload
    def task(self, func: F, /, *, name: str | None = None) -> F: ...

    @overload
    def task(self, func: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def task(self, func: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
        """Register ``func`` as a task: ``@app.task``, ``@app.task(name=...)`` or a call.

        The name defaults to the function's ``__name__`` and must match
        ``[A-Za-z0-9._~-]+`` (it is a URL path segment). The function is
        returned unchanged. Raises :class:`ValueError` for a bad or taken name
        and :class:`TypeError` for a signature that cannot be served (an
        unsupported annotation, a positional-only parameter, an async function).
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
        """Close the gateway: refuse new applies, close the Dispatcher the app made.

        Its calls still queued or running finish first (each is bounded by its
        timeout). A Dispatcher given to the app is left open. Safe to call
        twice; a TaskApp without the gateway has nothing to close.
        """
        if self._gateway is not None:
            self._gateway.close()
        if self._own_dispatcher is not None:
            self._own_dispatcher.close()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        """The WSGI entry point."""
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        headers: list[tuple[str, str]] = []
        media_type = self.codec.media_type
        try:
            status, answer = HTTPStatus.OK, self._route(method, environ)
        except Refused as failure:
            status, answer = failure.status, Envelope.failure(failure.reason)
            headers = failure.headers
        body: bytes | Refused
        if isinstance(answer, bytes):  # the gateway's JSON, which is not an envelope
            body, media_type = answer, _JSON
        else:
            body = self._encode(status, answer)
        if isinstance(body, Refused):
            status, body = body.status, self.codec.encode(Envelope.failure(body.reason))
            media_type = self.codec.media_type
        headers += [("Content-Type", media_type), ("Content-Length", str(len(body)))]
        start_response(f"{status.value} {status.phrase}", headers)
        return [b""] if method == "HEAD" else [body]

    def _encode(self, status: HTTPStatus, envelope: Envelope) -> bytes | Refused:
        try:
            return self.codec.encode(envelope)
        except Exception as exc:
            logger.exception("cannot encode the answer (%s)", status.value)
            return Refused(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"cannot encode the return value: {type(exc).__name__}: {exc}",
            )

    def _route(self, method: str, environ: WSGIEnvironment) -> Envelope | bytes:
        path = str(environ.get("PATH_INFO", ""))
        if self._gateway is not None:
            found = route(path)
            if found is not None:
                if found.action == "apply":
                    self._verify(method, environ)
                return self._gateway_answer(self._gateway, method, environ, *found)
        if path not in ("", "/"):  # the index only lists the task names
            self._verify(method, environ)
        return self._dispatch(method, environ)

    def _verify(self, method: str, environ: WSGIEnvironment) -> None:
        if self._verifier is None:
            return
        body = None
        if signs_body(method):
            body = environ[_BODY_KEY] = self._read_body(environ)
        self._verifier.verify(method, environ, body)

    def _gateway_answer(
        self, gateway: Gateway, method: str, environ: WSGIEnvironment, action: str, arg: str
    ) -> bytes:
        if action == "apply":
            if arg not in self._specs:
                raise Refused(HTTPStatus.NOT_FOUND, f"unknown task: {_shown_path(arg)}")
            _allow(method, _APPLY_METHODS)
            received: dict[str, object] = dict(_query_arguments(environ))
            if method == "POST":
                received.update(self._body_arguments(environ))
            task_id = task_id_from(environ.get("HTTP_IDEMPOTENCY_KEY"))
            if self._verifier is not None:
                # the call back to the task may carry this apply's webhook-id
                self._verifier.replay.allow_follow_up(task_id, f"/{arg}")
            answer = gateway.apply(
                arg,
                method,
                forwarded(received),
                json=method == "POST" and _is_json(_media_type(environ)),
                task_id=task_id,
                environ=environ,
            )
        else:
            _allow(method, _INDEX_METHODS)
            task_id = _from_latin1(arg)
            answer = gateway.status(task_id) if action == "status" else gateway.done(task_id)
        try:
            return orjson.dumps(answer)
        except TypeError as exc:
            logger.exception("gateway: cannot encode the answer for %r", arg)
            raise Refused(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot encode the result: {exc}"
            ) from None

    def _dispatch(self, method: str, environ: WSGIEnvironment) -> Envelope:
        path = str(environ.get("PATH_INFO", ""))
        if path in ("", "/"):
            _allow(method, _INDEX_METHODS)
            return Envelope.success(sorted(self._specs))
        spec = self._specs.get(path[1:]) if path.startswith("/") else None
        if spec is None:
            raise Refused(HTTPStatus.NOT_FOUND, f"unknown task {_shown_path(path)}")
        _allow(method, _TASK_METHODS)
        received: dict[str, object] = dict(_query_arguments(environ))
        if method == "POST":
            received.update(self._body_arguments(environ))
        try:
            kwargs = spec.bind(received)
        except ArgumentError as exc:
            raise Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
        try:
            retval = spec.func(**kwargs)
        except Exception as exc:
            logger.exception("task %r failed", spec.name)
            raise Refused(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}"
            ) from None
        return Envelope.success(retval)

    def _body_arguments(self, environ: WSGIEnvironment) -> Mapping[str, object]:
        body = self._read_body(environ)
        if not body:
            return {}
        content_type = str(environ.get("CONTENT_TYPE", ""))
        media_type = _media_type(environ)
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
        raise Refused(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"unsupported Content-Type {content_type[:100]!r}; send {_FORM} or {_JSON}",
        )

    def _read_body(self, environ: WSGIEnvironment) -> bytes:
        read: bytes | None = environ.get(_BODY_KEY)
        if read is not None:
            return read
        limit = self.max_body_bytes
        too_large = Refused(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body exceeds {limit} bytes"
        )
        stream = environ["wsgi.input"]
        length_text = str(environ.get("CONTENT_LENGTH") or "").strip()
        if length_text:
            if not (length_text.isascii() and length_text.isdigit()):
                raise Refused(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length_text!r}")
            length = int(length_text)
            if length > limit:
                raise too_large
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
            raise too_large
        return b"".join(chunks)


def _media_type(environ: WSGIEnvironment) -> str:
    return str(environ.get("CONTENT_TYPE", "")).partition(";")[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == _JSON or media_type.endswith("+json")


def _allow(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise Refused(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"method {method[:20]!r} not allowed",
            [("Allow", ", ".join(allowed))],
        )


def _from_latin1(path: str) -> str:
    # PEP 3333 hands the path over as latin-1; return what the client meant
    try:
        return path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return path


def _shown_path(path: str) -> str:
    text = _from_latin1(path).lstrip("/")
    return repr(text if len(text) <= 100 else text[:100] + "...")


def _query_arguments(environ: WSGIEnvironment) -> Mapping[str, object]:
    query = str(environ.get("QUERY_STRING", ""))
    if not query:
        return {}
    try:
        # raw bytes of the URL arrive as latin-1 characters (PEP 3333); they are UTF-8
        query = query.encode("latin-1").decode("utf-8")
    except UnicodeEncodeError:
        pass  # a server that already decoded it
    except UnicodeDecodeError:
        raise Refused(HTTPStatus.BAD_REQUEST, "the query string is not UTF-8") from None
    return _parse_form(query, "query string")


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
