"""The review service's HTTP face (FastAPI): the reviewers' API and page, the visibility API, appeals.

Every ``/v1`` request is authenticated (401 otherwise): a bearer token (CLI, platforms, scripts) or the web page's
session cookie. Cookie-authenticated writes must carry ``X-Modpipe-CSRF: 1``, which a cross-site form cannot send.
Public without a token: ``/healthz`` (for probes), ``/login`` and ``/static`` (the page shell and its code, no
data). ``/`` redirects to the login page until a session exists.

Bounded before anything else runs (:mod:`pipeline.http`): request bodies (``MODPIPE_HTTP__MAX_BODY_BYTES``; an
appeal may carry one item's longest text on top) get 413 unread; validation errors name the field and never echo
it; login attempts and failed authentications are counted per client address, and a client past its budget gets
429 whatever it sends, a valid token included.
"""


import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from pipeline import metrics
from pipeline.config import Settings
from pipeline.errors import RetryableError
from pipeline.broker import KafkaError
from pipeline.http.errors import install_error_handlers, too_many_requests
from pipeline.http.limits import BodyLimit, client_address, content_body_bytes
from pipeline.http.ratelimit import Allowance, Limit, RateLimiter, RedisRateLimiter
from pipeline.review.auth import InvalidPrincipal, Principal, Role
from pipeline.review.errors import Forbidden, Invalid, ReviewError
from pipeline.review.service import ReviewService
from pipeline.schemas import CONTENT_ID_PATTERN, AppealRequest

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
SESSION_COOKIE = "modpipe_session"
CSRF_HEADER = "x-modpipe-csrf"
SERVICE = "review"  # the service label of the pipeline.http metrics
PRINCIPAL_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"

ContentId = Annotated[str, PathParam(pattern=CONTENT_ID_PATTERN)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(_Body):
    token: str = Field(..., min_length=1, max_length=256)


class ClaimBody(_Body):
    policy_id: str | None = Field(None, max_length=128, description="Only this policy's queue; any queue when omitted.")


class DecisionBody(_Body):
    decision: Literal["allow", "remove"]
    policy_id: str = Field(..., max_length=128)
    rule_id: str | None = Field(None, max_length=64)
    note: str = Field("", max_length=2000)
    revision: int | None = Field(
        None, ge=1, description="The revision the reviewer judged (the item view's `revision`); an edit since is a 409."
    )


class EscalateBody(_Body):
    note: str = Field("", max_length=2000)


class TokenBody(_Body):
    principal_id: str = Field(..., min_length=1, max_length=64)
    role: Role
    platform: str | None = Field(
        None, min_length=1, max_length=64, description="Platform tokens: whose items it reads (default principal_id)."
    )


class Unauthorized(Exception):
    pass


class RateLimited(Exception):
    def __init__(self, limit: Limit, allowance: Allowance) -> None:
        super().__init__(limit.name)
        self.limit = limit
        self.allowance = allowance


def create_app(settings: Settings, service: ReviewService | None = None, *,
               limiter: RateLimiter | None = None) -> FastAPI:
    """The app; with ``service`` given the caller owns its start/stop (tests), else the app's lifespan does.

    ``limiter`` defaults to per-client buckets in the service's Redis (tests pass one with their own clock)."""
    owned = service is None
    svc = service or ReviewService(settings)
    limits = limiter or RedisRateLimiter(svc.store)
    login_limit = Limit("login", settings.http.login_per_minute)
    failure_limit = Limit("auth_failures", settings.http.auth_failures_per_minute)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned:
            await svc.start()
        try:
            yield
        finally:
            if owned:
                await svc.stop()

    app = FastAPI(title="modpipe review", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.review = svc
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    app.add_middleware(
        BodyLimit, max_bytes=settings.http.max_body_bytes, service=SERVICE,
        routes={"/v1/appeals": content_body_bytes(settings.http.max_body_bytes, settings.triage.max_text_chars)},
    )
    install_error_handlers(app, SERVICE)

    @app.exception_handler(ReviewError)
    async def _review_error(_: Request, exc: ReviewError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **exc.detail}, status_code=exc.status)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, __: Unauthorized) -> JSONResponse:
        return JSONResponse({"error": "authentication required"}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="modpipe-review"'})

    @app.exception_handler(RateLimited)
    async def _rate_limited(_: Request, exc: RateLimited) -> JSONResponse:
        body, headers = too_many_requests(exc.limit.name, exc.allowance.retry_after_s)
        return JSONResponse(body, status_code=429, headers=headers)

    @app.exception_handler(RetryableError)
    async def _unavailable(_: Request, exc: RetryableError) -> JSONResponse:
        logger.warning("review: dependency unavailable: %s", exc)
        return JSONResponse({"error": "a dependency is unavailable; retry"}, status_code=503)

    @app.exception_handler(KafkaError)
    async def _kafka_unavailable(_: Request, exc: KafkaError) -> JSONResponse:
        logger.warning("review: broker unavailable: %s", type(exc).__name__)
        return JSONResponse({"error": "the broker is unavailable; retry"}, status_code=503)

    def noted(limit: Limit, client: str, allowance: Allowance) -> None:
        if allowance.first_refusal:  # once per episode: a flood of refusals is one line, and never the credential
            logger.warning("review: rate limit %s (%d per minute) reached by client %s; refusing it for %.0fs",
                           limit.name, limit.per_minute, client, allowance.retry_after_s)

    def within(limit: Limit, client: str, allowance: Allowance) -> None:
        noted(limit, client, allowance)
        if not allowance.allowed:
            metrics.rate_limited_total.labels(SERVICE, limit.name).inc()
            raise RateLimited(limit, allowance)

    async def failed(credential: str, client: str) -> None:
        """Count a failed authentication; the one past the budget is answered 429, not 401: requests in flight at
        once all pass the budget check, but each failure is spent atomically, so no more than the budget of wrong
        credentials per client is ever answered as wrong."""
        metrics.auth_failures_total.labels(SERVICE, credential).inc()
        logger.debug("review: failed %s authentication from client %s", credential, client)
        within(failure_limit, client, await limits.hit(failure_limit, client))

    async def principal(request: Request) -> Principal:
        client = client_address(request.scope)
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        cookie = request.cookies.get(SESSION_COOKIE)
        if bearer is None and not cookie:
            raise Unauthorized()  # no credential at all: nothing was guessed
        lookup = svc.tokens.authenticate(bearer) if bearer is not None else svc.tokens.session(cookie)
        # The budget check and the lookup run side by side; a client over its budget is refused whatever it sent,
        # a valid credential included (else it could go on guessing and learn which guess was right).
        allowance, found = await asyncio.gather(limits.check(failure_limit, client), lookup)
        within(failure_limit, client, allowance)
        if found is None:
            await failed("token" if bearer is not None else "session", client)
            raise Unauthorized()
        if bearer is None and request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
            raise Forbidden("missing X-Modpipe-CSRF header")
        return found

    Caller = Annotated[Principal, Depends(principal)]

    # -- public ---------------------------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/login", include_in_schema=False)
    async def login_page() -> FileResponse:
        return FileResponse(WEB_DIR / "login.html")

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        if await svc.tokens.session(request.cookies.get(SESSION_COOKIE)) is None:
            return RedirectResponse("/login", status_code=303)
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-store"})

    @app.post("/v1/login")
    async def login(body: LoginBody, request: Request, response: Response) -> dict[str, str]:
        client = client_address(request.scope)
        within(login_limit, client, await limits.hit(login_limit, client))
        within(failure_limit, client, await limits.check(failure_limit, client))
        found = await svc.tokens.authenticate(body.token)
        if found is None:
            await failed("login", client)
            raise Unauthorized()
        session = await svc.tokens.open_session(body.token, settings.review.session_ttl_s)
        response.set_cookie(SESSION_COOKIE, session, max_age=settings.review.session_ttl_s, httponly=True,
                            samesite="strict", secure=False, path="/")
        logger.info("review: %s (%s) logged in", found.principal_id, found.role.value)
        return {"principal_id": found.principal_id, "role": found.role.value}

    # -- authenticated -------------------------------------------------------------------------------------------

    @app.post("/v1/logout")
    async def logout(request: Request, response: Response, who: Caller) -> dict[str, bool]:
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            await svc.tokens.close_session(session)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return {"ok": True}

    @app.get("/v1/me")
    async def me(who: Caller) -> dict[str, str]:
        found = {"principal_id": who.principal_id, "role": who.role.value}
        return {**found, "platform": who.platform} if who.platform is not None else found

    @app.get("/v1/queues")
    async def queues(who: Caller) -> dict[str, Any]:
        return await svc.queues(who)

    @app.get("/v1/policies")
    async def policies(who: Caller) -> list[dict[str, Any]]:
        return svc.policy_catalogue()

    @app.post("/v1/claims", response_model=None)
    async def claim(who: Caller, body: ClaimBody | None = None) -> Any:
        view = await svc.claim(who, body.policy_id if body else None)
        if view is None:
            return Response(status_code=204)
        return view

    @app.get("/v1/items/{content_id}")
    async def item(content_id: ContentId, who: Caller) -> dict[str, Any]:
        return await svc.item_view(who, content_id)

    @app.get("/v1/items/{content_id}/content")
    async def item_content(content_id: ContentId, who: Caller) -> JSONResponse:
        text = await svc.content(who, content_id)
        return JSONResponse({"content_id": content_id, "text": text}, headers={"Cache-Control": "no-store"})

    @app.post("/v1/items/{content_id}/decision")
    async def decide(content_id: ContentId, body: DecisionBody, who: Caller) -> dict[str, Any]:
        verdict = await svc.decide(who, content_id, body.decision, body.policy_id, body.rule_id, body.note,
                                   body.revision)
        return verdict.model_dump(mode="json")

    @app.post("/v1/items/{content_id}/skip")
    async def skip(content_id: ContentId, who: Caller) -> dict[str, bool]:
        await svc.skip(who, content_id)
        return {"ok": True}

    @app.post("/v1/items/{content_id}/release")
    async def release(content_id: ContentId, who: Caller) -> dict[str, bool]:
        await svc.release(who, content_id)
        return {"ok": True}

    @app.post("/v1/items/{content_id}/escalate")
    async def escalate(content_id: ContentId, who: Caller, body: EscalateBody | None = None) -> dict[str, bool]:
        await svc.escalate(who, content_id, body.note if body else "")
        return {"ok": True}

    @app.get("/v1/content/{content_id}")
    async def visibility(content_id: ContentId, who: Caller) -> dict[str, Any]:
        return await svc.visibility(who, content_id)

    @app.post("/v1/appeals", status_code=202)
    async def appeal(body: AppealRequest, who: Caller) -> dict[str, Any]:
        return await svc.appeal(who, body)

    @app.get("/v1/stats")
    async def stats(who: Caller) -> dict[str, Any]:
        return await svc.stats(who)

    @app.get("/v1/export")
    async def export(who: Caller) -> StreamingResponse:
        if not who.is_admin:
            raise Forbidden("exports are for admins")

        async def lines() -> AsyncIterator[bytes]:
            async for example in svc.export_examples():
                yield (json.dumps(example, ensure_ascii=False) + "\n").encode("utf-8")

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/v1/tokens", status_code=201)
    async def create_token(body: TokenBody, who: Caller) -> dict[str, str]:
        if not who.is_admin:
            raise Forbidden("tokens are managed by admins")
        try:
            token = await svc.tokens.create(body.principal_id, body.role, platform=body.platform)
        except InvalidPrincipal as exc:
            field = f"body.{exc.field}"
            raise Invalid(f"invalid request: {field}: {exc}", fields=[{"field": field, "problem": str(exc)}]) from None
        logger.info("review: %s created a %s token for %s", who.principal_id, body.role.value, body.principal_id)
        made = {"principal_id": body.principal_id, "role": body.role.value, "token": token}
        if body.role is Role.PLATFORM:
            made["platform"] = body.platform or body.principal_id
        return made

    @app.delete("/v1/tokens/{principal_id}")
    async def revoke_tokens(principal_id: Annotated[str, PathParam(pattern=PRINCIPAL_PATTERN)],
                            who: Caller) -> dict[str, Any]:
        if not who.is_admin:
            raise Forbidden("tokens are managed by admins")
        revoked = await svc.tokens.revoke(principal_id)
        logger.info("review: %s revoked %d token(s) of %s (their sessions end)", who.principal_id, revoked,
                    principal_id)
        return {"principal_id": principal_id, "revoked": revoked}

    return app


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    """Run the service in the foreground (``modpipe review serve``)."""
    import uvicorn

    metrics.serve(settings.review.metrics_port)
    # proxy_headers: the client address (which the rate limits count by) is taken from X-Forwarded-For only when
    # the peer is a trusted proxy.
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level.lower(), access_log=True,
                proxy_headers=True, forwarded_allow_ips=settings.http.trusted_proxies, server_header=False)
