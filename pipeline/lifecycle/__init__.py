"""The policy lifecycle: shadow, backtest, promote, roll back, retroact (docs/POLICIES.md, "Lifecycle").

* :mod:`~pipeline.lifecycle.registry`: which version of each policy enforces, which are shadowed, the texts,
  reports and audit history (Redis, and an in-memory twin);
* :mod:`~pipeline.lifecycle.live`: what a worker enforces and shadows now, swapped without a restart;
* :mod:`~pipeline.lifecycle.shadow`: live shadow judgements in the reasoning role, under a model-call budget;
* :mod:`~pipeline.lifecycle.history`: reading topics between broker timestamps; what was enforced on an item;
* :mod:`~pipeline.lifecycle.compare`: the comparison report of a version against what was enforced;
* :mod:`~pipeline.lifecycle.backtest`: past items replayed through triage and a candidate, never published;
* :mod:`~pipeline.lifecycle.promote`: promotion gates, promotion and rollback, the audit entries;
* :mod:`~pipeline.lifecycle.retro`: re-judging what older versions decided, with superseding verdicts;
* :mod:`~pipeline.lifecycle.wiring`: how workers follow the registry.

The versions themselves are files in the policy's folder (:mod:`pipeline.policies.versions`).
"""
