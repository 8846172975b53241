"""``python -m pipeline.cli``: how the harness starts worker processes (the same as the ``modpipe`` script)."""

from pipeline.cli import main

main()
