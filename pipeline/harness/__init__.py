"""The pipeline run as its users would, for demos, drills, benchmarks and end-to-end tests.

Product code never imports this package (a unit test holds that); only the ``modpipe demo``, ``chaos`` and
``bench`` commands and the tests do.

* :mod:`~pipeline.harness.workers`: worker processes by role;
* :mod:`~pipeline.harness.journey`: every item's journey read back from the output topics, and the run's report;
* :mod:`~pipeline.harness.demo`: ``modpipe demo`` and ``modpipe chaos``;
* :mod:`~pipeline.harness.traffic`: sample traffic and malformed messages;
* :mod:`~pipeline.harness.review`: sample review tasks and a topic reader for the review tests and bench;
* :mod:`~pipeline.harness.bench`: the benchmarks.
"""
