"""The policies a worker enforces and shadows right now, kept in step with the registry without a restart.

A worker starts from the folder (:class:`~pipeline.policies.PolicyLibrary`, every policy at its base version),
reads the registry once before it handles anything (a restarted worker enforces what was promoted, not the
base), then re-reads it every ``lifecycle.refresh_s``. When a pointer names another version, the new library is
built completely first (the version's text from the folder's candidates or the registry, checked to hash to the
version, linted, and checked by every subscriber, e.g. that its prompt fits the reasoner's context) and only then
swapped in, in one assignment: there is never a moment without an enforcing version, and an item that started
under the old library finishes under it. A version that cannot be loaded is refused (logged, counted) and the
policy keeps the version it has; so does everything when the registry cannot be read.

Shadow targets come from the registry's shadow registrations (a candidate compared with its policy's enforcing
version) and from the folder's policies with ``enforcing = false`` (judged and recorded, never enforced).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline import metrics
from pipeline.config import LifecycleSettings, ReasonerSettings
from pipeline.errors import PolicyError
from pipeline.lifecycle.registry import Enforcing, PolicyRegistry
from pipeline.policies import Policy, PolicyLibrary
from pipeline.policies.lint import errors, lint_policy
from pipeline.policies.model import content_hash
from pipeline.policies.versions import load_version, version_files

logger = logging.getLogger(__name__)

RETRY_REFUSED_S = 60.0  # a refused version (text missing, lint error) is tried again after this long


@dataclass(frozen=True)
class ShadowTarget:
    """A version judged in shadow: a candidate of ``candidate_of`` (compared with its enforcing version), or a
    policy that is not enforcing at all (``candidate_of`` None)."""

    policy: Policy
    sample: float
    candidate_of: str | None


def worker_id(role: str) -> str:
    """How a worker names itself in the registry: role, host and process."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


async def resolve_text(registry: PolicyRegistry, base: Policy, version: str) -> tuple[str, str] | None:
    """(text, file name) of ``version`` of ``base``'s policy: the folder's files first, then the registry; None
    when neither has a text that hashes to it."""
    if base.folder is not None:
        for file in version_files(base.folder):
            if file.version == version:
                return file.text, file.path.name
    stored = await registry.text(base.policy_id, version)
    if stored is None:
        return None
    if content_hash(stored.text) != version:
        raise PolicyError(f"the registry's text of {base.policy_id} {version} hashes to {content_hash(stored.text)}")
    return stored.text, stored.file_name


class LivePolicies:
    """See the module docstring. ``subscribers`` get every new library (the reasoner, the handler)."""

    def __init__(self, base: PolicyLibrary, registry: PolicyRegistry, lifecycle: LifecycleSettings,
                 reasoner: ReasonerSettings, *, worker: str = "", shadowing: bool = False) -> None:
        self._base = base
        self._registry = registry
        self._lifecycle = lifecycle
        self._reasoner = reasoner
        self._worker = worker
        self._shadowing = shadowing  # only the reasoning role judges in shadow; others need no shadow texts
        self._library = base
        self._shadow: tuple[ShadowTarget, ...] = self._inactive_targets()
        self._versions: dict[tuple[str, str], Policy] = {(p.policy_id, p.version): p for p in base}
        self._refused: dict[tuple[str, str], float] = {}  # version -> when it was refused (tried again later)
        self._subscribers: list[Callable[[PolicyLibrary], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._registry_down = False
        self.pointers: dict[str, Enforcing] = {}

    @property
    def library(self) -> PolicyLibrary:
        return self._library

    @property
    def shadow_targets(self) -> tuple[ShadowTarget, ...]:
        return self._shadow

    def subscribe(self, callback: Callable[[PolicyLibrary], None]) -> None:
        """``callback(library)`` on every swap; one that raises PolicyError refuses the new library."""
        self._subscribers.append(callback)

    def versions(self) -> dict[str, object]:
        """What this worker enforces and shadows (reported to the registry)."""
        return {"enforcing": {p.policy_id: p.version for p in self._library},
                "shadow": sorted(f"{t.policy.policy_id}:{t.policy.version}" for t in self._shadow)}

    def _inactive_targets(self) -> tuple[ShadowTarget, ...]:
        if not self._shadowing:
            return ()
        return tuple(ShadowTarget(p, self._lifecycle.shadow_sample, None) for p in self._base if not p.enforcing)

    async def _version(self, base: Policy, version: str) -> Policy | None:
        """``version`` of ``base``'s policy, loaded and checked once; None (logged, counted once) if it cannot be."""
        key = (base.policy_id, version)
        if key in self._versions:
            return self._versions[key]
        if time.monotonic() - self._refused.get(key, -RETRY_REFUSED_S) < RETRY_REFUSED_S:
            return None
        try:
            found = await resolve_text(self._registry, base, version)
            if found is None:
                raise PolicyError("no text of it in the policy folder or the registry")
            policy = load_version(base.folder, found[0], found[1], self._reasoner) if base.folder else None
            if policy is None:
                raise PolicyError("the policy has no folder to load a version into")
            problems = errors(lint_policy(policy))
            if problems:
                raise PolicyError("; ".join(map(str, problems)))
        except PolicyError as exc:
            logger.error("policy %s version %s cannot be loaded (%s); keeping the version in use", base.policy_id,
                         version, exc)
            metrics.policy_version_changes_total.labels(base.policy_id, "refused").inc()
            self._refused[key] = time.monotonic()
            return None
        self._versions[key] = policy
        return policy

    async def refresh(self, *, strict: bool = False) -> bool:
        """Read the registry and swap in what it says; True when the enforcing library changed. A registry outage
        keeps the current versions (``strict``: raises instead, for start-up)."""
        try:
            pointers = await self._registry.enforcing()
            registrations = await self._registry.shadows() if self._shadowing else []
        except Exception as exc:  # noqa: BLE001 - an outage must not stop enforcement: keep what we have
            if strict:
                raise
            metrics.policy_registry_errors_total.inc()
            if not self._registry_down:
                logger.warning("policy registry unreadable (%s: %s); keeping the versions in use",
                               type(exc).__name__, exc)
            self._registry_down = True
            return False
        self._registry_down = False
        self.pointers = pointers
        chosen: dict[str, Policy] = {}
        for base in self._base:
            current = self._library.get(base.policy_id)
            pointer = pointers.get(base.policy_id)
            wanted = pointer.version if pointer is not None else base.version
            if wanted == current.version:
                chosen[base.policy_id] = current
                continue
            policy = await self._version(base, wanted)
            chosen[base.policy_id] = policy if policy is not None else current
        changed = any(chosen[p.policy_id] is not p for p in self._library)
        if changed:
            library = PolicyLibrary(chosen)
            try:
                for callback in self._subscribers:
                    callback(library)
            except PolicyError as exc:
                logger.error("new policy versions refused (%s); keeping the versions in use", exc)
                for pid, policy in chosen.items():
                    if policy is not self._library.get(pid):
                        metrics.policy_version_changes_total.labels(pid, "refused").inc()
                        self._refused[(pid, policy.version)] = time.monotonic()
                        self._versions.pop((pid, policy.version), None)
                changed = False
            else:
                for pid, policy in chosen.items():
                    old = self._library.get(pid)
                    if policy is not old:
                        logger.warning("policy %s now enforces %s (was %s)", pid, policy.version, old.version)
                        metrics.policy_version_changes_total.labels(pid, "applied").inc()
                self._library = library
        await self._refresh_shadow(registrations)
        if self._worker:
            try:
                await self._registry.report_loaded(self._worker, self.versions())
            except Exception:  # noqa: BLE001 - a missed report only delays `promote --wait`
                logger.debug("could not report loaded policy versions", exc_info=True)
        return changed

    async def _refresh_shadow(self, registrations: list) -> None:  # type: ignore[type-arg]
        if not self._shadowing:
            return
        targets = list(self._inactive_targets())
        for reg in registrations:
            try:
                base = self._base.get(reg.policy_id)
            except PolicyError:
                continue  # a registration for a policy this worker does not have
            enforcing = self._library.get(reg.policy_id)
            if reg.version == enforcing.version:
                continue  # promoted meanwhile: nothing to compare it with
            policy = await self._version(base, reg.version)
            if policy is not None:
                sample = reg.sample if reg.sample is not None else self._lifecycle.shadow_sample
                targets.append(ShadowTarget(policy, sample, reg.policy_id if base.enforcing else None))
        self._shadow = tuple(targets)

    async def run(self) -> None:
        """Refresh every ``lifecycle.refresh_s`` until closed."""
        while not self._closing.is_set():
            try:
                await asyncio.wait_for(self._closing.wait(), self._lifecycle.refresh_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a bug in one refresh must not end the refreshing
                logger.exception("policy refresh failed")

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name="policy-refresh")
        return self._task

    async def close(self) -> None:
        # A flag as well as cancel(): a cancellation that lands inside the Redis client can be swallowed there,
        # and a loop that only waits for cancellation would then refresh forever and hold the worker's shutdown.
        self._closing.set()
        if self._task is not None:
            self._task.cancel()
            _, pending = await asyncio.wait({self._task}, timeout=5.0)
            if pending:
                logger.warning("policy refresh did not stop within 5 s; leaving it")
            self._task = None


async def open_live(base: PolicyLibrary, registry: PolicyRegistry, lifecycle: LifecycleSettings,
                    reasoner: ReasonerSettings, *, worker: str = "", shadowing: bool = False) -> LivePolicies:
    """A :class:`LivePolicies` that has read the registry once (raising if it cannot: a worker must not start
    enforcing the base version of a policy that was promoted away from; start-up retries)."""
    live = LivePolicies(base, registry, lifecycle, reasoner, worker=worker, shadowing=shadowing)
    await live.refresh(strict=True)
    return live
