"""The review service's HTTP face (FastAPI): the reviewers' API and page, the visibility API, appeals.

Every ``/v1`` request is authenticated (401 otherwise): a bearer token (CLI, platforms, scripts) or the web page's
session cookie. Cookie-authenticated writes must carry ``X-Modpipe-CSRF: 1``, which a cross-site form cannot send.
Public without a token: ``/healthz`` (for probes), ``/login`` and ``/static`` (the page shell and its code, no
data). ``/`` redirects to the login page until a session exists.
"""


import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import Settings
from pipeline.errors import RetryableError
from pipeline.broker import KafkaError
from pipeline.review.auth import Principal, Role
from pipeline.review.errors import Forbidden, ReviewError
from pipeline.review.service import ReviewService
from pipeline.schemas import AppealRequest

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
SESSION_COOKIE = "modpipe_session"
CSRF_HEADER = "x-modpipe-csrf"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(_Body):
    token: str = Field(..., min_length=1, max_length=256)


class ClaimBody(_Body):
    policy_id: str | None = Field(None, description="Only this policy's queue; any queue when omitted.")


class DecisionBody(_Body):
    decision: Literal["allow", "remove"]
    policy_id: str
    rule_id: str | None = None
    note: str = Field("", max_length=2000)
    revision: int | None = Field(
        None, ge=1, description="The revision the reviewer judged (the item view's `revision`); an edit since is a 409."
    )


class EscalateBody(_Body):
    note: str = Field("", max_length=2000)


class TokenBody(_Body):
    principal_id: str = Field(..., min_length=1, max_length=64)
    role: Role


class Unauthorized(Exception):
    pass


def create_app(settings: Settings, service: ReviewService | None = None) -> FastAPI:
    """The app; with ``service`` given the caller owns its start/stop (tests), else the app's lifespan does."""
    owned = service is None
    svc = service or ReviewService(settings)

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

    @app.exception_handler(ReviewError)
    async def _review_error(_: Request, exc: ReviewError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **exc.detail}, status_code=exc.status)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, __: Unauthorized) -> JSONResponse:
        return JSONResponse({"error": "authentication required"}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="modpipe-review"'})

    @app.exception_handler(RetryableError)
    async def _unavailable(_: Request, exc: RetryableError) -> JSONResponse:
        logger.warning("review: dependency unavailable: %s", exc)
        return JSONResponse({"error": "a dependency is unavailable; retry"}, status_code=503)

    @app.exception_handler(KafkaError)
    async def _kafka_unavailable(_: Request, exc: KafkaError) -> JSONResponse:
        logger.warning("review: broker unavailable: %s", type(exc).__name__)
        return JSONResponse({"error": "the broker is unavailable; retry"}, status_code=503)

    async def principal(request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            found = await svc.tokens.authenticate(auth[7:].strip())
        else:
            found = await svc.tokens.session(request.cookies.get(SESSION_COOKIE))
            if found is not None and request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
                raise Forbidden("missing X-Modpipe-CSRF header")
        if found is None:
            raise Unauthorized()
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
    async def login(body: LoginBody, response: Response) -> dict[str, str]:
        found = await svc.tokens.authenticate(body.token)
        if found is None:
            raise Unauthorized()
        session = await svc.tokens.open_session(found, settings.review.session_ttl_s)
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
        return {"principal_id": who.principal_id, "role": who.role.value}

    @app.get("/v1/queues")
    async def queues(who: Caller) -> dict[str, Any]:
        return await svc.queue_counts()

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
    async def item(content_id: str, who: Caller) -> dict[str, Any]:
        return await svc.item_view(who, content_id)

    @app.get("/v1/items/{content_id}/content")
    async def item_content(content_id: str, who: Caller) -> JSONResponse:
        text = await svc.content(who, content_id)
        return JSONResponse({"content_id": content_id, "text": text}, headers={"Cache-Control": "no-store"})

    @app.post("/v1/items/{content_id}/decision")
    async def decide(content_id: str, body: DecisionBody, who: Caller) -> dict[str, Any]:
        verdict = await svc.decide(who, content_id, body.decision, body.policy_id, body.rule_id, body.note,
                                   body.revision)
        return verdict.model_dump(mode="json")

    @app.post("/v1/items/{content_id}/skip")
    async def skip(content_id: str, who: Caller) -> dict[str, bool]:
        await svc.skip(who, content_id)
        return {"ok": True}

    @app.post("/v1/items/{content_id}/release")
    async def release(content_id: str, who: Caller) -> dict[str, bool]:
        await svc.release(who, content_id)
        return {"ok": True}

    @app.post("/v1/items/{content_id}/escalate")
    async def escalate(content_id: str, who: Caller, body: EscalateBody | None = None) -> dict[str, bool]:
        await svc.escalate(who, content_id, body.note if body else "")
        return {"ok": True}

    @app.get("/v1/content/{content_id}")
    async def visibility(content_id: str, who: Caller) -> dict[str, Any]:
        return await svc.visibility(content_id)

    @app.post("/v1/appeals", status_code=202)
    async def appeal(body: AppealRequest, who: Caller) -> dict[str, Any]:
        return await svc.appeal(who, body)

    @app.get("/v1/stats")
    async def stats(who: Caller) -> dict[str, Any]:
        return await svc.stats()

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
        token = await svc.tokens.create(body.principal_id, body.role)
        logger.info("review: %s created a %s token for %s", who.principal_id, body.role.value, body.principal_id)
        return {"principal_id": body.principal_id, "role": body.role.value, "token": token}

    return app


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    """Run the service in the foreground (``modpipe review serve``)."""
    import uvicorn

    from pipeline import metrics

    metrics.serve(settings.review.metrics_port)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level.lower(), access_log=True)
