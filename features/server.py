"""Feast's own HTTP feature server over the project's store, behind a thin validating layer.

``serve`` runs the app of ``feast.feature_server.get_app`` (the one ``feast serve`` runs) under
gunicorn with uvicorn workers, as ``feast serve`` does, with the same defaults. In front of it sits
:class:`RequestGuard`, because Feast 0.67 answers many malformed reads with a 500 (a feature not
in its view, a bad reference, an entity value of the wrong type, a missing or extra join key, no
features, no rows) and sets no limit on a request's size. The guard checks ``POST
/get-online-features`` against the registry and answers what it refuses as Feast does (a
``FeastError``'s status and ``to_error_detail()`` body): 404 for an unknown feature view, service
or feature, 413 for an oversize body or too many rows, 422 for any other malformed request. A
request it passes goes to Feast unchanged. The server is read-only: Feast's write and
administration routes (``/push``, ``/materialize``, ``/chat``, ...) answer 403; the stream worker
writes through the Python SDK, not over HTTP.

Feast's app, its error body and its gunicorn set-up are not a stable API: checked on the Feast
version in ``FEAST_SERVER_VERSION`` (``tests/features/test_request_guard.py`` fails on another).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import feast
from feast import FeatureStore
from feast.errors import FeastError, FeatureServiceNotFoundException, FeatureViewNotFoundException
from feast.value_type import ValueType

__all__ = [
    "FEAST_SERVER_VERSION",
    "RequestGuard",
    "ServeOptions",
    "ServerLimits",
    "guarded_app",
    "serve",
]

log = logging.getLogger(__name__)

FEAST_SERVER_VERSION = "0.67."

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

READ_ROUTE = "/get-online-features"
# GET routes of Feast's app that only describe it or report health.
_OPEN_ROUTES = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_REQUEST_FIELDS = frozenset(
    {"entities", "features", "feature_service", "full_feature_names",
     "include_feature_view_version_metadata"}
)  # fmt: skip
_INT_RANGES = {ValueType.INT64: 63, ValueType.INT32: 31}


@dataclass(frozen=True)
class ServerLimits:
    """What one read may ask for; larger requests get a 413."""

    max_body_bytes: int = 1 << 20
    max_rows: int = 1000  # entity rows per request (a codebook version is 3 x 256 rows)
    max_features: int = 100


class InvalidFeatureRequest(FeastError):
    """A read Feast would misread or answer with a 500: 422."""

    def http_status_code(self) -> int:
        return 422


class FeatureNotInView(FeastError):
    """A feature reference whose view exists but has no such feature: 404."""

    def http_status_code(self) -> int:
        return 404


class FeatureRequestTooLarge(FeastError):
    """A body or row count above :class:`ServerLimits`: 413."""

    def http_status_code(self) -> int:
        return 413


class ReadOnlyFeatureServer(FeastError):
    """A write or administration route on this read-only server: 403."""

    def http_status_code(self) -> int:
        return 403


@dataclass(frozen=True)
class _View:
    features: frozenset[str]
    join_keys: dict[str, ValueType]


class _Registry:
    """Views, their features and join-key types, and feature services, from the cached registry.

    Rebuilt every ``ttl_s`` (Feast refreshes its cache on the same period) and, at most once a
    second, when a request names something it does not know (a view applied since).
    """

    def __init__(self, store: FeatureStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.views: dict[str, _View] = {}
        self.services: dict[str, list[str]] = {}
        self.built_at = -float("inf")

    def _rebuild(self) -> None:
        views = {}
        for view in self.store.list_feature_views(allow_cache=True):
            keys = {col.name: col.dtype.to_value_type() for col in view.entity_columns}
            views[view.name] = _View(frozenset(f.name for f in view.features), keys)
        services = {
            service.name: [
                f"{proj.name_to_use()}:{feature.name}"  # type: ignore[no-untyped-call]
                for proj in service.feature_view_projections
                for feature in proj.features
            ]
            for service in self.store.list_feature_services()
        }
        self.views, self.services, self.built_at = views, services, time.monotonic()

    def fresh(self, missing: bool = False) -> _Registry:
        age = time.monotonic() - self.built_at
        if age > self.ttl_s or (missing and age > 1.0):
            self._rebuild()
        return self


def _check_value(key: str, kind: ValueType, value: Any) -> None:
    if kind in _INT_RANGES:
        bits = _INT_RANGES[kind]
        if type(value) is not int or not -(2**bits) <= value < 2**bits:
            raise InvalidFeatureRequest(
                f"entity key {key!r} takes {kind.name} integers; got {value!r}"
            )
    elif kind == ValueType.STRING and not isinstance(value, str):
        raise InvalidFeatureRequest(f"entity key {key!r} takes strings; got {value!r}")


def _resolve_features(body: dict[str, Any], registry: _Registry, limits: ServerLimits) -> list[str]:
    """The ``view:feature`` references the request asks for, each checked against the registry."""
    service, refs = body.get("feature_service"), body.get("features", [])
    if service is not None:
        if refs or not isinstance(service, str):
            raise InvalidFeatureRequest("give either 'features' (a list) or 'feature_service'")
        if service not in registry.fresh(missing=service not in registry.services).services:
            raise FeatureServiceNotFoundException(service, registry.store.project)  # type: ignore[no-untyped-call]
        return registry.services[service]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise InvalidFeatureRequest("'features' must be a non-empty list of 'view:feature' strings")
    if len(refs) > limits.max_features:
        raise FeatureRequestTooLarge(f"{len(refs)} features; at most {limits.max_features}")
    for ref in refs:
        view_name, sep, feature = ref.partition(":")
        if not sep or not view_name or not feature or ":" in feature or "@" in view_name:
            raise InvalidFeatureRequest(f"feature reference {ref!r} is not 'view:feature'")
        view = registry.fresh(view_name not in registry.views).views.get(view_name)
        if view is None:
            raise FeatureViewNotFoundException(view_name, registry.store.project)  # type: ignore[no-untyped-call]
        if feature not in view.features:
            raise FeatureNotInView(
                f"feature view {view_name!r} has no feature {feature!r}; "
                f"it has {sorted(view.features)}"
            )
    return refs


def validate_read(body: Any, registry: _Registry, limits: ServerLimits) -> None:
    """Raise the FeastError to answer for a malformed ``/get-online-features`` body."""
    if not isinstance(body, dict):
        raise InvalidFeatureRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _REQUEST_FIELDS)
    if unknown:
        raise InvalidFeatureRequest(f"unknown fields {unknown}; allowed: {sorted(_REQUEST_FIELDS)}")
    for flag in ("full_feature_names", "include_feature_view_version_metadata"):
        if not isinstance(body.get(flag, False), bool):
            raise InvalidFeatureRequest(f"{flag!r} must be true or false")
    refs = _resolve_features(body, registry, limits)
    wanted: dict[str, ValueType] = {}
    for ref in refs:
        wanted.update(registry.views[ref.partition(":")[0]].join_keys)
    entities = body.get("entities")
    if not isinstance(entities, dict) or set(entities) != set(wanted):
        got = sorted(entities) if isinstance(entities, dict) else entities
        raise InvalidFeatureRequest(
            f"'entities' must map exactly the join keys {sorted(wanted)} to lists; got {got}"
        )
    columns = list(entities.values())
    if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
        raise InvalidFeatureRequest("every entity key needs a list of values, all of one length")
    rows = len(columns[0])
    if rows == 0:
        raise InvalidFeatureRequest("the request has no entity rows")
    if rows > limits.max_rows:
        raise FeatureRequestTooLarge(f"{rows} entity rows; at most {limits.max_rows} a request")
    for key, values in entities.items():
        for value in values:
            _check_value(key, wanted[key], value)


async def _answer(send: Send, error: FeastError) -> None:
    """Answer as Feast's exception handler does: the error's status, its detail as the body."""
    body = json.dumps(error.to_error_detail()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    status = error.http_status_code()
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: validate reads, refuse writes, pass valid reads to Feast's app unchanged."""

    def __init__(
        self, app: ASGIApp, store: FeatureStore, limits: ServerLimits, registry_ttl_s: float
    ) -> None:
        self.app = app
        self.limits = limits
        self.registry = _Registry(store, registry_ttl_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        if scope["type"] == "http" and method == "POST" and path == READ_ROUTE:
            return await self._read(scope, receive, send)
        if scope["type"] == "http" and method in ("GET", "HEAD") and path in _OPEN_ROUTES:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return None
        routes = f"POST {READ_ROUTE} and GET {', '.join(sorted(_OPEN_ROUTES))}"
        await _answer(send, ReadOnlyFeatureServer(f"{method} {path}: this server answers {routes}"))
        return None

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.max_body_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            return await _answer(send, FeatureRequestTooLarge(f"body over {limit} bytes"))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await _answer(send, FeatureRequestTooLarge(f"body over {limit} bytes"))
        raw = b"".join(chunks)
        try:
            validate_read(json.loads(raw), self.registry.fresh(), self.limits)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
            return await _answer(send, InvalidFeatureRequest(f"the body is not JSON: {exc}"))
        except FeastError as exc:
            return await _answer(send, exc)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        return await self.app(scope, replay, send)


def guarded_app(
    store: FeatureStore, limits: ServerLimits | None = None, registry_ttl_s: int = 60
) -> RequestGuard:
    """Feast's feature-server app for ``store`` behind :class:`RequestGuard`."""
    from feast.feature_server import get_app

    if not feast.__version__.startswith(FEAST_SERVER_VERSION):
        log.warning(
            "features.server was checked on Feast %sx; this is %s: check which bad requests "
            "its server answers with a 5xx", FEAST_SERVER_VERSION, feast.__version__,
        )  # fmt: skip
    app = get_app(store, registry_ttl_sec=registry_ttl_s)
    return RequestGuard(app, store, limits or ServerLimits(), registry_ttl_s)


@dataclass(frozen=True)
class ServeOptions:
    """``feast serve``'s options, with its defaults (``feast serve --help``) but for worker
    recycling, and the guard's."""

    host: str = "127.0.0.1"
    port: int = 6566
    workers: int = 1
    worker_connections: int = 1000
    # `feast serve` recycles a worker after 1,000 +- 50 requests; with one worker that drops
    # every kept-alive connection at once (clients saw "connection reset by peer" mid-read).
    # The app holds no per-request state to leak, so workers are not recycled (0: never).
    max_requests: int = 0
    max_requests_jitter: int = 0
    keep_alive_s: int = 30
    registry_ttl_s: int = 60
    access_log: bool = False
    limits: ServerLimits = ServerLimits()


def serve(store: FeatureStore, options: ServeOptions) -> None:
    """Run the guarded feature server in the foreground (gunicorn + uvicorn workers, as
    ``feast serve``); SIGTERM or SIGINT stops it."""
    import gunicorn.app.base
    from feast.permissions.server.utils import (
        ServerType,
        init_auth_manager,
        init_security_manager,
        str_to_auth_manager_type,
    )

    # As feast.feature_server.start_server does before it builds the app.
    auth_type = str_to_auth_manager_type(store.config.auth_config.type)
    init_security_manager(auth_type=auth_type, fs=store)
    init_auth_manager(
        auth_type=auth_type, server_type=ServerType.REST, auth_config=store.config.auth_config
    )
    app = guarded_app(store, options.limits, options.registry_ttl_s)
    settings = {
        "bind": f"{options.host}:{options.port}",
        "workers": options.workers,
        "worker_class": "uvicorn_worker.UvicornWorker",
        "worker_connections": options.worker_connections,
        "max_requests": options.max_requests,
        "max_requests_jitter": options.max_requests_jitter,
        "keepalive": options.keep_alive_s,
        "accesslog": "-" if options.access_log else None,
        "control_socket_disable": True,  # gunicorn 27: one fixed socket path per user otherwise
    }

    class _Server(gunicorn.app.base.BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> RequestGuard:
            return app

    log.info("Feast feature server on http://%s:%d (read-only)", options.host, options.port)
    _Server().run()
