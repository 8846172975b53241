# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ITEMS ?= 200

.PHONY: install demo test test-unit chaos drills soak stress capacity bench stack-down clean

install: $(STAMP)

# torch first, pinned: pip takes the CPU build that lies on disk; anything unpinned would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || \
		echo "warning: redis-server not found; the local stack needs a Redis at MODPIPE_REDIS__URL"; }
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "warning: /usr/bin/chromium not found; the reviewer-page test (tests/e2e/test_review_page.py) needs it"; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/modpipe demo --items $(ITEMS) --json-out out/demo.json

test: install
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m unit

chaos: install
	$(BIN)/modpipe chaos --items 300 --malformed 10 --kill-worker --json-out out/chaos.json

# Every fault drill on the durable stack (docs/OPERATIONS.md, "Fault drills"); each writes out/drill-KIND.json.
drills: install
	for kind in worker redis broker triton; do \
		$(BIN)/modpipe chaos --durable --items 400 --malformed 20 --poison --kill $$kind \
			--json-out out/drill-$$kind.json || exit $$?; \
	done

soak: install
	$(BIN)/modpipe bench soak --rate 15 --minutes 10

# The stress gate as CI runs it (tests/e2e/test_stress_gate.py, part of `make test`); exit 2 on a breach.
stress: install
	$(BIN)/modpipe bench stress --rate 10 --seconds 20 --max-drop-rate 0.01 --max-p95-ms 3000 --json-out out/stress.json

# The knee of every stage: docs/BENCHMARKS.md "Capacity" and docs/capacity.png (about 10 minutes on 2 cores).
capacity: install
	$(BIN)/modpipe bench capacity --json-out out/bench-capacity.json

stack-down:
	$(BIN)/modpipe stack down

clean:
	rm -rf $(VENV) .modpipe out .pytest_cache
