"""Human review: the queue, claims and decisions, the audit log, tokens, feedback and the reviewer's web page.

* :mod:`~pipeline.review.service`: what reviewers, admins and platforms can do (HTTP-free);
* :mod:`~pipeline.review.api`: the FastAPI app over it (the reviewer page lives in ``web/``);
* :mod:`~pipeline.review.queue`: queues, leases and the decision log as atomic Redis scripts;
* :mod:`~pipeline.review.relay`: the audit log relayed to ``moderation.decisions``;
* :mod:`~pipeline.review.auth`: tokens (stored hashed), roles and web sessions;
* :mod:`~pipeline.review.feedback`: overturn statistics and labelled examples for triage;
* :mod:`~pipeline.review.errors`: what the service refuses, with its HTTP status.
"""
