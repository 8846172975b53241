"""``modpipe bench abuse``'s attacks against a real ``modpipe review serve`` process on the test stack: every one holds.

Over real sockets, which the in-process tests cannot show: a declared or chunked 100 MiB body, four at once, is
refused without the server's peak memory growing; a spoofed ``X-Forwarded-For`` from an untrusted peer changes
nothing; raw paths with dot segments stay inside the static folder; the service's own log never holds content.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.harness.bench.abuse import BEGIN, END, Check, run_attacks, serve_target, write_markdown

pytestmark = pytest.mark.integration


def test_every_attack_of_the_abuse_bench_holds(kafka_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> list[Check]:
        async with serve_target(kafka_stack.kafka_bootstrap, kafka_stack.redis_url, tmp_path) as target:
            return await run_attacks(target)

    checks = asyncio.run(scenario())
    failed = [f"{c.attack}: {c.tried}: {c.observed}" for c in checks if not c.held]
    assert not failed, "\n".join(failed)
    assert {c.attack for c in checks} >= {
        "oversized body", "validation errors echo input", "appeal past the text limit", "login brute force",
        "token guessing", "rate-limit evasion", "platform reads another platform's item",
        "platform appeals another platform's item", "platform reads queues, stats, exports",
        "session outlives its token", "authentication", "admin routes", "decide what you do not hold",
        "expired lease", "decision on an edited item", "CSRF and cookie flags", "path traversal", "hostile ids",
        "content in logs", "harmony control tokens"}
    bodies = [c for c in checks if c.attack == "oversized body"]
    assert all(c.numbers["peak_rss_after_mib"] - c.numbers["peak_rss_before_mib"] < 50 for c in bodies)


@pytest.mark.unit
def test_the_report_section_lists_every_check(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- bench:review:begin -->\nkept\n<!-- bench:review:end -->\n")
    checks = [{"attack": "a", "tried": "t | x", "expected": "e", "observed": "o | p", "held": True, "numbers": {}},
              {"attack": "b", "tried": "t", "expected": "e", "observed": "o", "held": False, "numbers": {}}]
    report = {"measured_at": "now", "machine": "m", "limits": {"max_body_bytes": 1, "login_per_minute": 2,
              "auth_failures_per_minute": 3}, "wall_s": 1.0, "checks": checks, "held": 1, "failed": ["b: t"]}
    write_markdown(report, path)
    text = path.read_text()
    assert "kept" in text and BEGIN in text and END in text
    assert "| a | t / x | e | o / p | held |" in text and "| b | t | e | o | **failed** |" in text
