"""Every policy under one folder, by id."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import ReasonerSettings
from pipeline.errors import PolicyError
from pipeline.policies.lint import errors, lint_policy
from pipeline.policies.model import POLICY_FILES, Policy, load_policy

logger = logging.getLogger(__name__)


class PolicyLibrary:
    """Every policy under one folder, by id."""

    def __init__(self, policies: dict[str, Policy]):
        self._policies = dict(policies)

    @classmethod
    def load(
        cls,
        policies_dir: Path,
        *,
        strict: bool = True,
        default_first: str = "low",
        default_escalated: str = "high",
    ) -> PolicyLibrary:
        """Load every sub-folder that has a ``policy.md`` or ``policy.txt``; with ``strict``, a lint *error* (what
        breaks the prompt: empty text, control tokens) is a PolicyError. Warnings are logged, never refused.

        ``default_first`` / ``default_escalated`` (from ReasonerSettings) apply to policies whose metadata has
        no ``[effort]`` table; a policy's own metadata wins, because its author tuned it.
        """
        policies_dir = Path(policies_dir)
        if not policies_dir.is_dir():
            raise PolicyError(f"policies folder {policies_dir} does not exist")
        policies: dict[str, Policy] = {}
        folders = (p for p in policies_dir.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and any((p / n).exists() for n in POLICY_FILES))
        for folder in sorted(folders):
            policy = load_policy(folder, default_first=default_first, default_escalated=default_escalated)
            findings = lint_policy(policy)
            if strict and errors(findings):
                raise PolicyError(f"policy folder {folder}: " + "; ".join(map(str, errors(findings))))
            if findings:
                logger.info("policy %s: %d lint warnings (modpipe policy lint shows them)", policy.policy_id,
                            len(findings))
            policies[policy.policy_id] = policy
        if not policies:
            raise PolicyError(f"policies folder {policies_dir} holds no policy (no */policy.md or */policy.txt)")
        logger.info("loaded %d policies: %s", len(policies), ", ".join(sorted(policies)))
        return cls(policies)

    @classmethod
    def from_settings(cls, reasoner: ReasonerSettings, *, strict: bool = True) -> PolicyLibrary:
        """The library ``reasoner.policies_dir`` holds, with the configured effort defaults."""
        return cls.load(reasoner.policies_dir, strict=strict, default_first=reasoner.first_effort,
                        default_escalated=reasoner.escalated_effort)

    def get(self, policy_id: str) -> Policy:
        try:
            return self._policies[policy_id]
        except KeyError:
            raise PolicyError(f"unknown policy {policy_id!r}; known: {', '.join(sorted(self._policies))}") from None

    def ids(self) -> list[str]:
        return sorted(self._policies)

    def enforcing_ids(self) -> list[str]:
        """Every enforcing policy, including on-request ones (an item may name any of them)."""
        return sorted(pid for pid, p in self._policies.items() if p.enforcing)

    def default_ids(self) -> list[str]:
        """Enforcing policies judged when an item names none (``scope = "default"``)."""
        return sorted(pid for pid, p in self._policies.items() if p.enforcing and p.scope == "default")

    def shadow_ids(self) -> list[str]:
        return sorted(pid for pid, p in self._policies.items() if not p.enforcing)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._policies[pid] for pid in sorted(self._policies))

    def __len__(self) -> int:
        return len(self._policies)
