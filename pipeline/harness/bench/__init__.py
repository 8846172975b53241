"""The ``modpipe bench`` benchmarks; each writes its own marked section of docs/BENCHMARKS.md (:mod:`.docs`)."""
