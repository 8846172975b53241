"""Policy reasoning with gpt-oss-safeguard: rendering, calling, checking and routing the model's answers.

* :mod:`~pipeline.reasoner.core`: :class:`SafeguardReasoner` judges an item against its policies, effort low
  first and higher when an answer is not good enough;
* :mod:`~pipeline.reasoner.assess`: the pure check of one answer; :func:`pipeline.router.route_reasoning` routes;
* :mod:`~pipeline.reasoner.backends`: Triton (harmony rendered here) and OpenAI-compatible chat endpoints;
* :mod:`~pipeline.reasoner.harmony`: the harmony format, rendered and parsed as text;
* :mod:`~pipeline.reasoner.breaker`, :mod:`~pipeline.reasoner.cache`: the circuit breaker and the verdict cache;
* :mod:`~pipeline.reasoner.fakes`: scripted doubles for tests.
"""

from pipeline.reasoner.core import ReasonerOutcome, SafeguardReasoner, build_reasoner

__all__ = ["ReasonerOutcome", "SafeguardReasoner", "build_reasoner"]
