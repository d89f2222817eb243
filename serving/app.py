"""The recommendation API (FastAPI, ASGI): ``GET /recommend`` and the operational endpoints.

- ``GET /recommend?user_id=U&k=K[&experiment=NAME]``: the user's top-K unseen items from their
  variant's model (:class:`RecommendResponse`). Bad input is a 4xx whose JSON ``detail`` names the
  field and the fix: 422 for a malformed, missing, repeated or unknown parameter or one out of
  range, 404 for an unknown experiment. Over ``settings.serve.max_inflight`` requests in progress,
  a request is refused at once with 503 and ``Retry-After`` (load shedding: the queue stays
  bounded); a feature-store outage is also a 503.
- ``GET /health/live`` (200 while the process runs), ``GET /health/ready`` (200 only when Feast
  answers, exposures are acknowledged and every served model has a version or the popularity
  fallback; 503 with the failing checks otherwise), ``GET /status`` (the versions in service, for
  the dashboard), ``GET /metrics`` (Prometheus text, ``serving.metrics``), ``GET /openapi.json``.

Ranking runs on a thread pool of about two threads per core (torch, Feast's SQLite reads and the
Kafka producer release the GIL), never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from abtest.experiments import MAX_USER_ID
from core.errors import FeatureStoreError
from core.settings_groups import ServeSettings
from serving.metrics import CONTENT_TYPE_LATEST
from serving.service import MAX_K, RecommendationService, UnknownExperiment

__all__ = ["DEFAULT_K", "RETRY_AFTER_S", "RecommendResponse", "create_app"]

log = logging.getLogger(__name__)

DEFAULT_K = 10
RETRY_AFTER_S = 1
_PARAMS = ("user_id", "k", "experiment")
_INTEGER = re.compile(r"-?[0-9]{1,40}")


def _bounded_int(name: str, low: int, high: int, example: str) -> BeforeValidator:
    """Only plain decimal integers (no '1.0', '1e3' or '1_000'), in ``[low, high]``."""

    def check(value: Any) -> Any:
        if isinstance(value, str):
            if not _INTEGER.fullmatch(value):
                raise ValueError(f"must be a decimal integer, e.g. {name}={example}")
            value = int(value)
        if isinstance(value, int) and not low <= value <= high:
            raise ValueError(f"must be in [{low}, {high}]; got {value}")
        return value

    return BeforeValidator(check)


UserIdParam = Annotated[
    int,
    _bounded_int("user_id", 0, MAX_USER_ID, "42"),
    Query(description="The user, an integer in [0, 2**63 - 1].", ge=0, le=MAX_USER_ID),
]
KParam = Annotated[
    int,
    _bounded_int("k", 1, MAX_K, "10"),
    Query(description=f"How many items, 1 to {MAX_K}.", ge=1, le=MAX_K),
]
ExperimentParam = Annotated[
    str | None,
    Query(
        description="Report the user's assignment in this experiment (404 if unknown).",
        max_length=200,
    ),
]


class RecommendResponse(BaseModel):
    """A served list. ``model``/``model_version`` ranked it: the variant's model, or
    ``popular`` when ``cold_start`` (no history online) or ``fallback`` says why."""

    model_config = ConfigDict(frozen=True)

    user_id: int
    items: list[int] = Field(description="Item ids, best first; none the user has seen.")
    experiment: str | None
    variant: str | None
    model: str
    model_version: str
    request_id: str
    cold_start: bool
    fallback: str | None = Field(description="cold_start, model_unavailable, or null")
    params: dict[str, Any]
    latency_ms: float


class ErrorResponse(BaseModel):
    detail: str
    errors: list[dict[str, Any]] = Field(default_factory=list)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("query", "body", "path")]
    return ".".join(parts) or "request"


def _validation_detail(exc: RequestValidationError) -> dict[str, Any]:
    errors = []
    for error in exc.errors():
        field = _field(tuple(error.get("loc", ())))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "missing":
            message = f"required; pass ?{field}=..."
        errors.append({"field": field, "message": message})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return {"detail": detail, "errors": errors}


def _check_query(request: Request) -> None:
    """422 for parameters the endpoint does not take, and for repeated ones."""
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = sorted({n for n in names if n not in _PARAMS})
    if unknown:
        shown = ", ".join(repr(n[:40]) for n in unknown[:5])
        raise HTTPException(
            422, f"unknown query parameter(s) {shown}; this endpoint takes {', '.join(_PARAMS)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise HTTPException(422, f"{repeated[0]}: given more than once; pass it once")


def ranking_threads(serve: ServeSettings) -> int:
    """How many threads rank requests (``serve_threads``, or one per CPU this process may use)."""
    return serve.threads or min(serve.max_inflight, len(os.sched_getaffinity(0)))


class _Serving:
    """What the routes share, kept on ``app.state.serving``: the service, the ranking threads and
    the requests in progress (changed on the event loop only: no lock needed)."""

    def __init__(self, service: RecommendationService, workers: int) -> None:
        self.service = service
        self.metrics = service.metrics
        self.limit = service.settings.serve.max_inflight
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hymirec-serve")
        self.inflight = 0

    def overloaded(self) -> str:
        return (
            f"overloaded: {self.inflight} requests in progress (limit {self.limit}); retry shortly"
        )

    async def run(self, func: Any, *args: Any) -> Any:
        """``func(*args)`` on the ranking threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)


def _serving(app: FastAPI) -> _Serving:
    serving: _Serving = app.state.serving
    return serving


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    serving = _serving(app)
    serving.service.start()
    try:
        yield
    finally:
        serving.service.close()
        serving.executor.shutdown(wait=True, cancel_futures=True)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    _serving(request.app).metrics.observe(None, None, 422, None)
    return JSONResponse(_validation_detail(exc), status_code=422)


async def _crashed(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s: %s", request.url.path, exc, exc_info=exc)
    return JSONResponse({"detail": "internal error; see the service log"}, status_code=500)


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (404, "unknown experiment"),
        (422, "invalid parameter"),
        (503, "overloaded (Retry-After) or the feature store is unavailable"),
    )
}


async def recommend(
    request: Request,
    user_id: UserIdParam,
    k: KParam = DEFAULT_K,
    experiment: ExperimentParam = None,
) -> Response:
    serving = _serving(request.app)
    metrics = serving.metrics
    started = time.perf_counter()
    try:
        _check_query(request)
        if experiment is not None:
            serving.service.check_experiment(experiment)
    except HTTPException as exc:
        metrics.observe(None, None, exc.status_code, None)
        raise
    except UnknownExperiment as exc:
        metrics.observe(None, None, 404, None)
        raise HTTPException(404, f"experiment: {exc}") from None
    if serving.inflight >= serving.limit:  # most are shed earlier, by ShedEarly
        metrics.shed()
        metrics.observe(None, None, 503, None)
        raise HTTPException(503, serving.overloaded(), headers={"Retry-After": str(RETRY_AFTER_S)})
    serving.inflight += 1
    metrics.inflight(+1)
    try:
        result = await serving.run(serving.service.recommend, user_id, k, experiment, started)
    except FeatureStoreError as exc:
        metrics.observe(None, None, 503, None)
        raise HTTPException(
            503, f"feature store unavailable: {exc}", headers={"Retry-After": "5"}
        ) from None
    finally:
        serving.inflight -= 1
        metrics.inflight(-1)
    metrics.observe(result.experiment, result.variant, 200, time.perf_counter() - started)
    # Serialised here: a Response is sent as it is, where a model would be validated again
    # against ``response_model`` (which still documents the schema).
    body = RecommendResponse(**vars(result)).model_dump_json()
    return Response(body, media_type="application/json")


async def live() -> dict[str, str]:
    return {"status": "alive"}


async def ready(request: Request) -> JSONResponse:
    serving = _serving(request.app)
    ok, checks = await serving.run(serving.service.readiness)
    return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)


async def status(request: Request) -> dict[str, Any]:
    return _serving(request.app).service.status()


async def prometheus(request: Request) -> Response:
    return Response(_serving(request.app).metrics.render(), media_type=CONTENT_TYPE_LATEST)


class ShedEarly:
    """Pure ASGI: a /recommend request beyond the limit gets its 503 before FastAPI parses,
    validates or routes it, so that shedding stays cheap when the event loop is saturated."""

    def __init__(self, inner: Any, serving: _Serving) -> None:
        self.inner = inner
        self.serving = serving

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        serving = self.serving
        if (
            scope["type"] != "http"
            or scope["path"] != "/recommend"
            or serving.inflight < serving.limit
        ):
            await self.inner(scope, receive, send)
            return
        serving.metrics.shed()
        serving.metrics.observe(None, None, 503, None)
        body = json.dumps({"detail": serving.overloaded()}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(service: RecommendationService, workers: int | None = None) -> FastAPI:
    """The ASGI app over a built service; its lifespan starts registry polling and, at
    shutdown, stops it and flushes the exposure producer."""
    serving = _Serving(service, workers or ranking_threads(service.settings.serve))
    app = FastAPI(
        title="hymirec recommendation service",
        version="1",
        description=__doc__,
        lifespan=_lifespan,
    )
    app.state.serving = serving
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(Exception)(_crashed)
    app.get("/recommend", response_model=RecommendResponse, responses=_ERROR_RESPONSES)(recommend)
    app.get("/health/live")(live)
    app.get("/health/ready")(ready)
    app.get("/status")(status)
    app.get("/metrics")(prometheus)
    app.add_middleware(ShedEarly, serving=serving)
    return app
