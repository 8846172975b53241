"""How a worker follows the policy registry: its live policies, and for the reasoning role, shadow judgements.

Kept out of :mod:`pipeline.app` so the Faust wiring stays thin: a role's ``build`` calls one function here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pipeline.config import Settings
from pipeline.lifecycle.live import LivePolicies, open_live, worker_id
from pipeline.lifecycle.registry import RedisPolicyRegistry
from pipeline.policies import PolicyLibrary

if TYPE_CHECKING:
    from pipeline.effects import Effects
    from pipeline.handlers import ReasoningHandler
    from pipeline.store.redis import RedisStore

logger = logging.getLogger(__name__)

Closers = list[Callable[[], Awaitable[object]]]


async def live_policies(settings: Settings, store: RedisStore, role: str, closers: Closers, *,
                        strict: bool = True, shadowing: bool = False, start: bool = True) -> LivePolicies:
    """The folder's policies at the versions the registry says enforce, refreshed every ``lifecycle.refresh_s``
    until the worker closes. Subscribe before the refreshing starts (``start=False``, then ``live.start()``), or a
    swap in between is missed."""
    base = PolicyLibrary.from_settings(settings.reasoner, strict=strict)
    live = await open_live(base, RedisPolicyRegistry(store), settings.lifecycle, settings.reasoner,
                           worker=worker_id(role), shadowing=shadowing)
    closers.append(live.close)
    if start:
        live.start()
    return live


async def reasoning_handler(settings: Settings, store: RedisStore, effects: Effects, closers: Closers
                            ) -> ReasoningHandler:
    """The reasoning role's handler: the reasoner on the enforcing versions (swapped on a promotion or rollback
    without a restart) and the shadow runner for candidates and non-enforcing policies."""
    from pipeline.handlers import ReasoningHandler
    from pipeline.lifecycle.shadow import ShadowRunner
    from pipeline.reasoner import build_reasoner

    opened: Closers = []
    live = await live_policies(settings, store, "reasoning", opened, shadowing=True, start=False)
    reasoner = build_reasoner(settings, live.library)
    await reasoner.start()
    closers.append(reasoner.close)
    if settings.reasoner.backend == "triton":
        from pipeline.reasoner.backends.triton import http_ready

        # Not a gate: an unready model fails closed to review until it comes up.
        if not await http_ready(settings.triton):
            logger.warning("triton at %s does not report %s ready yet; its items go to review until it does",
                           settings.triton.http_url, settings.triton.reasoner_model)
    # Shadow judgements get a reasoner of their own: their own in-flight slots and circuit breaker, so a shadow call
    # never holds a slot enforcement waits for, and a failing candidate never opens enforcement's breaker.
    triton = settings.triton.model_copy(update={"max_in_flight": settings.lifecycle.shadow_max_in_flight})
    shadow_reasoner = build_reasoner(settings.model_copy(update={"triton": triton}), live.library)
    await shadow_reasoner.start()
    closers.append(shadow_reasoner.close)
    shadow = ShadowRunner(shadow_reasoner, live, effects.publisher,
                          settings.kafka.topic(settings.kafka.shadow_topic), settings.lifecycle)
    closers.append(shadow.close)
    handler = ReasoningHandler(reasoner, live.library, effects, shadow=shadow)
    live.subscribe(reasoner.use_library)  # first: it refuses a version whose prompt does not fit
    live.subscribe(lambda library: setattr(handler, "library", library))
    live.start()
    closers.extend(opened)  # closed first (reverse order): no swap after the reasoner is gone
    logger.info("reasoning worker ready: model %s; enforcing %s", reasoner.model,
                ", ".join(f"{p.policy_id}@{p.version}" for p in live.library))
    return handler
