"""The HTTP gateway: a front door for platforms without a Kafka producer next to their web tier.

One more role of the same image (``modpipe gateway serve``), stateless, scaled on its own behind a load balancer:

* ``POST /v1/items`` takes one item or a batch, validates it with the wire schema (``ContentItem``), sets
  ``platform`` from the caller's platform token (never from the body), publishes to ``content.incoming`` keyed by
  ``content_id`` through the acknowledged publisher, and answers 202 with where to ask for the result
  (``GET /v1/items/{content_id}``). The same id and text twice is one item; the same id with another text is a
  409 unless the item says ``"edit": true`` (then it is a new revision, moderated again). When the triage consumer
  group lags more than ``gateway.max_triage_lag`` messages, new items get 429 with ``Retry-After``.
* ``POST /v1/moderate`` does the same for one item and waits up to a deadline for its verdict: allow, block or
  hidden_pending (with the provisional verdict), never blocking past the deadline.
* ``POST /v1/moderations`` speaks OpenAI's moderation API (:mod:`pipeline.gateway.moderations` has the mapping),
  so an application on the official ``openai`` SDK only changes its base URL and key.

Modules: :mod:`~pipeline.gateway.models` (request and answer bodies), :mod:`~pipeline.gateway.intake`
(idempotency records and publishing), :mod:`~pipeline.gateway.backpressure` (the triage lag),
:mod:`~pipeline.gateway.waiting` (waiting for a verdict), :mod:`~pipeline.gateway.moderations` (the OpenAI shape),
:mod:`~pipeline.gateway.service` (the pieces together), :mod:`~pipeline.gateway.api` (FastAPI),
:mod:`~pipeline.gateway.testing` (a triage worker stand-in for tests).
"""
