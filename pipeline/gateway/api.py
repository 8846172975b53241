"""The gateway's HTTP face (FastAPI); its OpenAPI document is served at ``/openapi.json``.

Every ``/v1`` route takes a platform token as a bearer token (``Authorization: Bearer mpr_...``, the key an
OpenAI SDK client is given). Bounded before anything else runs (:mod:`pipeline.http`): bodies over their route's
limit get 413 unread (``gateway.max_batch_bytes`` for batches, one item's longest text for ``/v1/moderate``, the
ordinary ``MODPIPE_HTTP__MAX_BODY_BYTES`` elsewhere); a JSON body nested deeper than
``MODPIPE_LIMITS__MAX_JSON_DEPTH`` is a 422 before it is parsed; validation errors name the field and never echo it.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures (Caller is local to create_app).
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from pipeline import metrics
from pipeline.codec import check_depth
from pipeline.config import Settings
from pipeline.errors import SchemaError
from pipeline.gateway.errors import GatewayError, Invalid
from pipeline.gateway.models import (
    BODY_MODELS,
    ConflictAnswer,
    ErrorAnswer,
    ItemAccepted,
    ItemBatch,
    ItemsAccepted,
    ItemState,
    ModerateAnswer,
    ModerationRequest,
    ModerationResponse,
    SubmitItem,
    openapi_body,
)
from pipeline.gateway.service import SERVICE, Gateway, status_url
from pipeline.http.errors import field_errors, install_error_handlers
from pipeline.http.limits import BodyLimit, client_address, content_body_bytes
from pipeline.review.auth import Principal
from pipeline.schemas import CONTENT_ID_PATTERN

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)
ContentId = Annotated[str, PathParam(pattern=CONTENT_ID_PATTERN)]
_bearer = HTTPBearer(auto_error=False, description="A platform token (review service, role platform).")

# Refusals every authenticated route may answer, for the OpenAPI document.
_REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorAnswer, "description": "No or unknown token."},
    403: {"model": ErrorAnswer, "description": "Not a platform token."},
    422: {"model": ErrorAnswer, "description": "Invalid body: each wrong field named, never its value."},
    429: {"model": ErrorAnswer, "description": "Too many failed authentications, or the pipeline is behind "
          "(Retry-After)."},
    503: {"model": ErrorAnswer, "description": "Broker or Redis unavailable: nothing was accepted (Retry-After)."},
}
_SUBMITS: dict[int | str, dict[str, Any]] = {
    **_REFUSALS,
    409: {"model": ConflictAnswer, "description": "A content id known with another text (send edit: true), or "
          "another platform's id; nothing of the request was accepted."},
    413: {"model": ErrorAnswer, "description": "Body over the route's limit (refused unread)."},
}
# Route labels of the request-time metric (bounded).
_ROUTE_LABELS = {"/v1/items": "items", "/v1/moderate": "moderate", "/v1/moderations": "moderations"}


def load_json(raw: bytes, max_depth: int) -> Any:
    """A JSON body, depth-checked before it is parsed; raises Invalid."""
    if not raw.strip():
        raise Invalid([{"field": "body", "problem": "a JSON body is required"}])
    try:
        check_depth(raw, max_depth)
    except SchemaError:
        raise Invalid([{"field": "body", "problem": f"nests deeper than {max_depth} levels"}]) from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise Invalid([{"field": "body", "problem": "invalid JSON"}]) from None


def parse_body(raw: bytes, model: type[ModelT], max_depth: int) -> ModelT:
    """``model`` from a JSON body (see :func:`load_json`); raises Invalid naming the fields."""
    return validate(load_json(raw, max_depth), model)


def validate(data: Any, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_input=False, include_url=False)]
        raise Invalid(field_errors(errors)) from None  # type: ignore[arg-type]


class _Timing:
    """ASGI middleware: request time by route and status class (``modpipe_gateway_request_seconds``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = _ROUTE_LABELS.get(path) or ("item" if path.startswith("/v1/items/") else "other")
        status = 500
        start = time.perf_counter()

        async def timed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            metrics.gateway_request_seconds.labels(route, f"{status // 100}xx").observe(time.perf_counter() - start)


def create_app(settings: Settings, gateway: Gateway | None = None) -> FastAPI:
    """The app; with ``gateway`` given the caller owns its start/stop (tests, the bench), else the lifespan does."""
    owned = gateway is None
    gw = gateway or Gateway(settings)
    depth = settings.limits.max_json_depth
    one_item = content_body_bytes(settings.http.max_body_bytes, settings.triage.max_text_chars)
    batch_bytes = max(settings.gateway.max_batch_bytes, one_item)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned:
            await gw.start()
        try:
            yield
        finally:
            if owned:
                await gw.stop()

    app = FastAPI(
        title="modpipe gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Publish items to the moderation pipeline over HTTP, ask for their decisions, wait for a "
        "decision with a deadline, or use OpenAI's moderation API shape. Every /v1 route takes a platform token.",
    )
    app.state.gateway = gw
    app.add_middleware(BodyLimit, max_bytes=settings.http.max_body_bytes, service=SERVICE,
                       routes={"/v1/items": batch_bytes, "/v1/moderations": batch_bytes, "/v1/moderate": one_item})
    app.add_middleware(_Timing)
    install_error_handlers(app, SERVICE)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        if isinstance(exc, Invalid):
            metrics.http_refused_total.labels(SERVICE, "invalid_request").inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def caller(request: Request,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        return await gw.authenticate(credentials.credentials if credentials else None,
                                     client_address(request.scope))

    Caller = Annotated[Principal, Depends(caller)]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/items", status_code=202, response_model=None, responses={
        202: {"model": ItemAccepted | ItemsAccepted, "description": "Accepted: one answer per item (a single item "
              "answers with its own, and a Location header)."}, **_SUBMITS,
    }, openapi_extra=openapi_body("SubmitItem", "ItemBatch"))
    async def submit_items(request: Request, who: Caller) -> JSONResponse:
        """Publish one item or a batch (`{"items": [...]}`) to content.incoming, keyed by content_id."""
        data = load_json(await request.body(), depth)
        if isinstance(data, dict) and "items" in data:
            limit = settings.gateway.max_batch_items
            if isinstance(data["items"], list) and len(data["items"]) > limit:
                raise Invalid([{"field": "body.items", "problem": f"at most {limit} items"}])
            batch = validate(data, ItemBatch)
            answer = await gw.accept(who, batch.items, [f"body.items.{i}" for i in range(len(batch.items))])
            return JSONResponse(answer.model_dump(mode="json"), status_code=202)
        item = validate(data, SubmitItem)
        answer = await gw.accept(who, [item], ["body"])
        (one,) = answer.items
        return JSONResponse(one.model_dump(mode="json"), status_code=202, headers={"Location": one.status_url})

    @app.get("/v1/items/{content_id}", response_model=ItemState, responses={
        404: {"model": ErrorAnswer, "description": "Unknown, or another platform's item."}, **_REFUSALS})
    async def item_state(content_id: ContentId, who: Caller) -> JSONResponse:
        """The current decision about one of your items: allow, block or hidden_pending."""
        state = await gw.item_state(who, content_id)
        return JSONResponse(state.model_dump(mode="json"))

    @app.post("/v1/moderate", response_model=ModerateAnswer, responses=_SUBMITS,
              openapi_extra=openapi_body("SubmitItem"))
    async def moderate(request: Request, who: Caller,
                       deadline_ms: Annotated[int | None, Query(ge=0, description=(
                           "How long to wait for a final verdict (default gateway.moderate_deadline_ms, at most "
                           "gateway.max_deadline_ms)."))] = None) -> JSONResponse:
        """Submit one item and wait up to the deadline for its decision (never longer)."""
        item = parse_body(await request.body(), SubmitItem, depth)
        answer = await gw.moderate(who, item, deadline_ms)
        return JSONResponse(answer.model_dump(mode="json"), headers={"Location": status_url(answer.content_id)})

    @app.post("/v1/moderations", response_model=ModerationResponse, responses=_SUBMITS,
              openapi_extra=openapi_body("ModerationRequest"))
    async def moderations(request: Request, who: Caller,
                          deadline_ms: Annotated[int | None, Query(ge=0, description="As for /v1/moderate.")] = None
                          ) -> JSONResponse:
        """OpenAI's moderation API: `input` (a string or a list), `model`; `results[].flagged`, `categories`,
        `category_scores` (mapping: pipeline/gateway/moderations.py, README)."""
        body = parse_body(await request.body(), ModerationRequest, depth)
        answer = await gw.moderations(who, body, deadline_ms)
        return JSONResponse(answer.model_dump(mode="json"))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_MODELS:  # bodies the routes parse themselves (depth first)
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in found.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components.setdefault(model.__name__, found)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    """Run the gateway in the foreground (``modpipe gateway serve``)."""
    import uvicorn

    metrics.serve(settings.gateway.metrics_port)
    # proxy_headers: the client address (which the failed-authentication limit counts by) is taken from
    # X-Forwarded-For only when the peer is a trusted proxy.
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level.lower(), access_log=False,
                proxy_headers=True, forwarded_allow_ips=settings.http.trusted_proxies, server_header=False)
