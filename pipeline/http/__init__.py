"""What every modpipe HTTP service puts between the network and its handlers (the review service, the gateway).

* :mod:`pipeline.http.limits`: :class:`~pipeline.http.limits.BodyLimit`, an ASGI middleware that refuses a request
  body over its route's limit with 413 before the application reads or parses a byte of it.
* :mod:`pipeline.http.errors`: validation errors that name the field and never echo the input, and the JSON
  answers for 413 and 429.
* :mod:`pipeline.http.ratelimit`: per-client token buckets in Redis (keys under ``ratelimit:``), for login attempts
  and failed authentications; an in-memory twin for tests.

A service wires them in ``create_app``: ``app.add_middleware(BodyLimit, max_bytes=..., routes={...},
service=...)``, ``install_error_handlers(app, service)``, and a :class:`~pipeline.http.ratelimit.RedisRateLimiter`
checked before credentials are. Limits come from ``Settings.http`` (``MODPIPE_HTTP__*``).
"""
