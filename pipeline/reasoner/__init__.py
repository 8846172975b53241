"""Policy reasoning with gpt-oss-safeguard: rendering, calling, checking and routing the model's answers.

* :mod:`~pipeline.reasoner.core`: :class:`SafeguardReasoner` judges an item against its policies, effort low
  first and higher when an answer is not good enough; a truncated answer is asked once more with a larger budget;
* :mod:`~pipeline.reasoner.assess`: the pure check of one answer; :func:`pipeline.router.route_reasoning` routes;
* :mod:`~pipeline.reasoner.backends`: Triton (harmony rendered here), OpenAI-compatible chat endpoints and Ollama;
* :mod:`~pipeline.reasoner.harmony`: the harmony format, rendered and parsed as text;
* :mod:`~pipeline.reasoner.answers`: the final answer read in each policy's own format;
* :mod:`~pipeline.reasoner.logprobs`: the verdict's probability from token log-probabilities;
* :mod:`~pipeline.reasoner.budget`: output budgets and content fitted into the model's context;
* :mod:`~pipeline.reasoner.breaker`, :mod:`~pipeline.reasoner.cache`: the circuit breaker and the verdict cache;
* :mod:`~pipeline.reasoner.fakes`: scripted doubles for tests; :mod:`~pipeline.reasoner.fake_servers`: real HTTP
  fakes of ``vllm serve`` and Ollama; :mod:`~pipeline.reasoner.standin` and :mod:`~pipeline.reasoner.vllm_engine`:
  the CPU stand-in's judge and the vLLM engine behaviour the stand-ins imitate.
"""

from pipeline.reasoner.core import ReasonerOutcome, SafeguardReasoner, build_reasoner

__all__ = ["ReasonerOutcome", "SafeguardReasoner", "build_reasoner"]
