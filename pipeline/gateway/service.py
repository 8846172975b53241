"""The gateway's work behind its routes: who calls, what they may submit, publishing, answering.

Authentication is the review service's (:class:`pipeline.review.auth.TokenStore`, tokens stored hashed): only
*platform* tokens are accepted, and the platform a token names is the platform of every item it submits, whatever
the body says (a body that names another platform is a 422). Failed authentications are counted per client
address (``MODPIPE_HTTP__AUTH_FAILURES_PER_MINUTE``, :mod:`pipeline.http.ratelimit`); past the budget a client
gets 429 whatever it sends, so guessing on learns nothing.

Items are checked before anything is written or published: the wire schema, then what a triage worker would
otherwise dead-letter (a text over ``MODPIPE_TRIAGE__MAX_TEXT_CHARS``, text that is not valid Unicode, policy ids
the library does not know or none that enforces), then the idempotency records (:mod:`pipeline.gateway.intake`),
then backpressure (only when something new would be published: duplicates are answered even under load).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

from pipeline import metrics
from pipeline.broker import Publisher
from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable, RetryableError
from pipeline.gateway.backpressure import TriageLag
from pipeline.gateway.errors import Conflict, Forbidden, Invalid, NotFound, TooManyRequests, Unauthorized, Unavailable
from pipeline.gateway.intake import Intake, Outcome, Sink, Submission
from pipeline.gateway.models import (
    ItemAccepted,
    ItemsAccepted,
    ItemState,
    ModerateAnswer,
    ModerationRequest,
    ModerationResponse,
    SubmitItem,
    TextInput,
)
from pipeline.gateway.moderations import moderation_content_id, result
from pipeline.gateway.waiting import current, wait_final
from pipeline.http.errors import MAX_FIELD_ERRORS
from pipeline.http.ratelimit import Allowance, Limit, RateLimiter, RedisRateLimiter
from pipeline.policies import PolicyLibrary
from pipeline.review.auth import Principal, Role, TokenStore
from pipeline.store.redis import RedisStore, redis_client

logger = logging.getLogger(__name__)

SERVICE = "gateway"  # the service label of the pipeline.http metrics


def status_url(content_id: str) -> str:
    return f"/v1/items/{content_id}"


def _unencodable(value: str | None) -> bool:
    if value is None:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class Gateway:
    """Everything a gateway replica holds: Redis, the acknowledged publisher, tokens, the lag, the policies."""

    def __init__(self, settings: Settings, *, store: RedisStore | None = None, sink: Sink | None = None,
                 limiter: RateLimiter | None = None, lag: TriageLag | None = None,
                 library: PolicyLibrary | None = None) -> None:
        self.settings = settings
        self.store = store or RedisStore(settings.redis, client=redis_client(settings.redis, max_connections=64))
        self._owns_sink = sink is None
        self.publisher: Sink | None = sink  # the owned one is made on start (aiokafka wants a running loop)
        # Platform tokens only: no bootstrap admin token (it is not a platform's).
        self.tokens = TokenStore(self.store, None)
        self.limiter = limiter or RedisRateLimiter(self.store)
        self.failure_limit = Limit("auth_failures", settings.http.auth_failures_per_minute)
        self.intake = Intake(settings, self.store, sink)
        self.lag = lag or TriageLag(settings, self.store)
        self.library = library or PolicyLibrary.from_settings(settings.reasoner, strict=False)
        self.known_policies = set(self.library.ids())
        self.enforcing = set(self.library.enforcing_ids())

    async def start(self) -> None:
        await self.store.ping()
        if self._owns_sink:
            publisher = Publisher(self.settings.kafka)
            await publisher.start()
            self.publisher = self.intake.sink = publisher

    async def stop(self) -> None:
        if self._owns_sink and isinstance(self.publisher, Publisher):
            await self.publisher.stop()
            self.publisher = None
        await self.store.close()

    # -- who calls ---------------------------------------------------------------------------------------------

    async def authenticate(self, bearer: str | None, client: str) -> Principal:
        """The platform principal of a bearer token; raises Unauthorized, Forbidden or TooManyRequests."""
        if bearer is None:
            raise Unauthorized()  # no credential at all: nothing was guessed
        # A client over its failure budget is refused whatever it sent, a valid token included.
        allowance, found = await asyncio.gather(self.limiter.check(self.failure_limit, client),
                                                self.tokens.authenticate(bearer))
        self._within(allowance, client)
        if found is None:
            metrics.auth_failures_total.labels(SERVICE, "token").inc()
            self._within(await self.limiter.hit(self.failure_limit, client), client)
            raise Unauthorized()
        if found.role is not Role.PLATFORM or found.platform is None:
            raise Forbidden("the gateway takes platform tokens (`modpipe review token add --id NAME --role platform`)")
        return found

    def _within(self, allowance: Allowance, client: str) -> None:
        if allowance.first_refusal:
            logger.warning("gateway: rate limit %s (%d per minute) reached by client %s; refusing it for %.0fs",
                           self.failure_limit.name, self.failure_limit.per_minute, client, allowance.retry_after_s)
        if not allowance.allowed:
            metrics.rate_limited_total.labels(SERVICE, self.failure_limit.name).inc()
            raise TooManyRequests(f"too many requests ({self.failure_limit.name}); retry later",
                                  allowance.retry_after_s)

    # -- what may be submitted -----------------------------------------------------------------------------------

    def check_items(self, principal: Principal, items: Sequence[SubmitItem], where: Sequence[str]) -> list[Submission]:
        """The submissions, or Invalid naming every field that is wrong (never its value)."""
        assert principal.platform is not None
        problems: list[dict[str, str]] = []
        max_chars = self.settings.triage.max_text_chars
        seen: dict[str, str] = {}
        submissions = []
        for index, (item, loc) in enumerate(zip(items, where, strict=True)):
            if item.platform is not None and item.platform != principal.platform:
                problems.append({"field": f"{loc}.platform", "problem": "must be your token's platform, or left out"})
            if len(item.text) > max_chars:
                problems.append({"field": f"{loc}.text", "problem": f"at most {max_chars} characters"})
            for name in ("text", "author_id", "language"):
                if _unencodable(getattr(item, name)):
                    problems.append({"field": f"{loc}.{name}", "problem": "invalid text (a lone UTF-16 surrogate)"})
            if item.policy_ids is not None:
                unknown = [j for j, pid in enumerate(item.policy_ids) if pid not in self.known_policies]
                problems += [{"field": f"{loc}.policy_ids.{j}", "problem": "unknown policy"} for j in unknown]
                if not unknown and not set(item.policy_ids) & self.enforcing:
                    problems.append({"field": f"{loc}.policy_ids", "problem": "names no enforcing policy"})
            earlier = seen.get(item.content_id)
            if earlier is not None and earlier != item.text:
                problems.append({"field": f"{loc}.content_id", "problem": "appears earlier in the batch with another "
                                 "text"})
            seen.setdefault(item.content_id, item.text)
            if not problems:
                submissions.append(Submission(index, item.content_item(principal.platform), item.edit))
        if problems:
            raise Invalid(problems[:MAX_FIELD_ERRORS])
        # The same item twice in one request is one item.
        first: dict[str, Submission] = {}
        for sub in submissions:
            first.setdefault(sub.item.content_id, sub)
        return list(first.values())

    # -- submitting ----------------------------------------------------------------------------------------------

    async def submit(self, route: str, principal: Principal, submissions: list[Submission]) -> dict[str, Outcome]:
        """Claim, check backpressure, publish; the outcome per content id. Raises Conflict, TooManyRequests,
        Unavailable (broker or Redis down: nothing was accepted)."""
        assert principal.platform is not None
        try:
            outcomes = await self.intake.claim(principal.platform, submissions)
        except RetryableError as exc:
            raise self._unavailable(route, exc) from None
        refused = [(s, o) for s, o in zip(submissions, outcomes, strict=True) if o.refused]
        if refused:
            for _, outcome in refused:
                metrics.gateway_items_total.labels(route, "conflict").inc()
            reason = refused[0][1].value
            message = ("content_id belongs to another platform" if reason == Outcome.ID_TAKEN.value else
                       "content_id was submitted before with another text; send \"edit\": true to submit a new "
                       "revision (it is moderated again)")
            raise Conflict(message, reason=reason,
                           conflicts=[{"index": s.index, "content_id": s.item.content_id, "reason": o.value}
                                      for s, o in refused])
        to_publish = [s for s, o in zip(submissions, outcomes, strict=True) if o.publishes]
        written = [s for s, o in zip(submissions, outcomes, strict=True) if o in (Outcome.ACCEPTED, Outcome.EDIT)]
        if to_publish:
            reading = await self.lag.over_bound()
            if reading is not None:
                await self._rollback(written)
                metrics.gateway_items_total.labels(route, "backpressure").inc(len(to_publish))
                raise TooManyRequests(
                    f"the pipeline is behind ({reading.lag} items waiting for triage, bound "
                    f"{self.lag.bound}); retry later", float(self.settings.gateway.retry_after_s),
                    triage_lag=reading.lag)
            try:
                await self.intake.publish(to_publish)
            except BrokerUnavailable as exc:
                await self._rollback(written)
                raise self._unavailable(route, exc) from None
            try:
                await self.intake.mark_published(to_publish)
            except RetryableError:
                logger.warning("gateway: %d items published but not marked so (Redis); a retry republishes them",
                               len(to_publish))
        by_id = {}
        for sub, outcome in zip(submissions, outcomes, strict=True):
            by_id[sub.item.content_id] = outcome
            metrics.gateway_items_total.labels(route, outcome.shown).inc()
        logger.info("gateway: %s from %s: %d items (%d published)", route, principal.platform, len(submissions),
                    len(to_publish))
        return by_id

    async def _rollback(self, written: list[Submission]) -> None:
        try:
            await self.intake.rollback(written)
        except RetryableError:
            logger.warning("gateway: could not roll back %d unpublished records (Redis); their ids may be refused "
                           "as edits until they expire", len(written))

    def _unavailable(self, route: str, exc: Exception) -> Unavailable:
        metrics.gateway_items_total.labels(route, "unavailable").inc()
        logger.warning("gateway: %s: %s", route, exc)
        what = "the broker" if isinstance(exc, BrokerUnavailable) else "the store"
        return Unavailable(f"{what} is unavailable; nothing was accepted, retry", self.settings.gateway.retry_after_s)

    async def accept(self, principal: Principal, items: Sequence[SubmitItem], where: Sequence[str]) -> ItemsAccepted:
        """``POST /v1/items``."""
        submissions = self.check_items(principal, items, where)
        outcomes = await self.submit("items", principal, submissions)
        answers = [ItemAccepted(content_id=cid, status=o.shown, status_url=status_url(cid))  # type: ignore[arg-type]
                   for cid, o in outcomes.items()]
        return ItemsAccepted(
            accepted=sum(o is Outcome.ACCEPTED for o in outcomes.values()),
            edits=sum(o is Outcome.EDIT for o in outcomes.values()),
            duplicates=sum(o in (Outcome.DUPLICATE, Outcome.RESEND) for o in outcomes.values()),
            items=answers,
        )

    # -- answering ------------------------------------------------------------------------------------------------

    async def item_state(self, principal: Principal, content_id: str) -> ItemState:
        """``GET /v1/items/{id}``: the caller's own items only (another's answers exactly as an unknown one)."""
        try:
            record = await self.intake.record(content_id)
            now = await current(self.store, content_id, record.text_hash)
        except RetryableError as exc:
            raise Unavailable(f"the store is unavailable ({type(exc).__name__}); retry",
                              self.settings.gateway.retry_after_s) from None
        owner = record.platform
        if owner is None and now.record.verdict is not None:
            owner = now.record.verdict.platform  # published over Kafka
        if owner is None or owner != principal.platform:
            raise NotFound(f"{content_id} is unknown to the pipeline", state="unknown")
        return now.state()

    def deadline_s(self, deadline_ms: int | None) -> float:
        gateway = self.settings.gateway
        wanted = gateway.moderate_deadline_ms if deadline_ms is None else deadline_ms
        return max(0, min(wanted, gateway.max_deadline_ms)) / 1000.0

    async def _wait(self, route: str, sub: Submission, deadline_s: float) -> tuple[ItemState, bool, float]:
        try:
            now, timed_out, waited = await wait_final(self.store, sub.item.content_id, sub.text_hash, deadline_s,
                                                      self.settings.gateway.poll_interval_ms / 1000.0)
        except RetryableError as exc:
            raise Unavailable(f"the store is unavailable ({type(exc).__name__}); retry",
                              self.settings.gateway.retry_after_s) from None
        state = now.state()
        metrics.gateway_waits_total.labels(
            route, "final" if state.final else "provisional" if state.verdict is not None else "none").inc()
        return state, timed_out, waited

    async def moderate(self, principal: Principal, item: SubmitItem, deadline_ms: int | None) -> ModerateAnswer:
        """``POST /v1/moderate``: submit, then wait up to the deadline for the final verdict."""
        (sub,) = self.check_items(principal, [item], ["body"])
        await self.submit("moderate", principal, [sub])
        state, timed_out, waited = await self._wait("moderate", sub, self.deadline_s(deadline_ms))
        return ModerateAnswer(**state.model_dump(exclude={"verdict"}), verdict=state.verdict, timed_out=timed_out,
                              waited_ms=round(waited * 1000, 1), status_url=status_url(sub.item.content_id))

    async def moderations(self, principal: Principal, request: ModerationRequest,
                          deadline_ms: int | None = None) -> ModerationResponse:
        """``POST /v1/moderations`` in OpenAI's shape (see :mod:`pipeline.gateway.moderations`)."""
        assert principal.platform is not None
        raw = request.input
        texts = [raw] if isinstance(raw, str) else [t.text if isinstance(t, TextInput) else t for t in raw]
        where = ["body.input"] if isinstance(raw, str) else [f"body.input.{i}" for i in range(len(texts))]
        limit = self.settings.gateway.max_batch_items
        if not texts or len(texts) > limit:
            raise Invalid([{"field": "body.input", "problem": f"1 to {limit} inputs"}])
        items = [SubmitItem(content_id=moderation_content_id(principal.platform, t), text=t) for t in texts]
        try:
            submissions = self.check_items(principal, items, where)
        except Invalid as exc:
            problems = [{**f, "field": f["field"].removesuffix(".text")} for f in exc.detail["fields"]]
            raise Invalid(problems) from None
        await self.submit("moderations", principal, submissions)
        deadline = self.deadline_s(deadline_ms)
        waited = await asyncio.gather(*(self._wait("moderations", s, deadline) for s in submissions))
        by_id = {s.item.content_id: w for s, w in zip(submissions, waited, strict=True)}
        results = [result(by_id[i.content_id][0], by_id[i.content_id][1]) for i in items]
        return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=request.model or "modpipe", results=results)
