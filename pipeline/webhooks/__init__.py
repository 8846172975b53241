"""Webhooks: final and superseding verdicts POSTed to each platform's callback URL, signed, in order, at least once.

* :mod:`~pipeline.webhooks.registry`: registrations (one callback URL per platform, an operator action:
  ``modpipe webhooks add``), the per-platform secrets derived from ``webhooks.signing_key``, dead letters and the
  content ids parked behind them, in Redis.
* :mod:`~pipeline.webhooks.signing`: the ``X-Modpipe-Signature`` header (HMAC-SHA256 over timestamp and body)
  and how a receiver verifies it.
* :mod:`~pipeline.webhooks.sender`: one attempt over HTTP, and the backoff between attempts.
* :mod:`~pipeline.webhooks.deliverer`: the deliverer role (``modpipe webhooks deliver``): a plain aiokafka
  consumer of ``moderation.verdicts`` in its own group, one ordered lane per content id, offsets committed only up
  to what is delivered or dead-lettered.
* :mod:`~pipeline.webhooks.testing`: a scripted platform endpoint (a real local HTTP server) for tests.
"""
