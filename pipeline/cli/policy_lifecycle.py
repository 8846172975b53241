"""The policy lifecycle commands of ``modpipe policy``: versions, candidate, shadow, shadow-report, backtest,
promote, rollback, retroact (docs/POLICIES.md, "Lifecycle").

Every command that changes something names who (``--actor``, default: the login name) and why (``--reason``);
both go into the audit entry on ``moderation.decisions``. Commands that spend model calls say what they will cost
first and ask before spending (``--yes`` skips the question, ``--dry-run`` stops after the estimate).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.cli.common import console, fail, settings

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str | None) -> datetime | None:
    """``2026-12-01T10:00:00Z`` (any ISO 8601 with a zone; none means UTC), ``now``, or ``-30m`` / ``-2h`` / ``-7d``."""
    if value is None:
        return None
    value = value.strip()
    now = datetime.now(timezone.utc)
    if value == "now":
        return now
    relative = _RELATIVE.match(value)
    if relative:
        return now - timedelta(seconds=float(relative.group(1)) * _UNITS[relative.group(2)])
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a time (ISO 8601, 'now', or -30m / -2h / -7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _actor(actor: str | None) -> str:
    return actor or getpass.getuser()


@asynccontextmanager
async def _opened(ctx: typer.Context, publish: bool = True) -> AsyncIterator[Any]:
    """The store, the registry, the audit publisher and the lifecycle actions, closed afterwards."""
    from pipeline.broker import Publisher
    from pipeline.errors import PolicyError
    from pipeline.lifecycle.promote import Lifecycle
    from pipeline.lifecycle.registry import RedisPolicyRegistry
    from pipeline.policies import PolicyLibrary
    from pipeline.store import RedisStore

    cfg = settings(ctx)
    try:
        library = PolicyLibrary.from_settings(cfg.reasoner, strict=False)
    except PolicyError as exc:
        fail(str(exc))
    store = RedisStore(cfg.redis)
    publisher = Publisher(cfg.kafka) if publish else None
    try:
        await store.ping()
        if publisher is not None:
            await publisher.start()
        lifecycle = Lifecycle(cfg, RedisPolicyRegistry(store), publisher, library, store=store)
        if publisher is not None:
            await lifecycle.flush_audit()  # whatever an earlier command left unpublished goes first
        yield lifecycle
    finally:
        if publisher is not None:
            await publisher.stop()
        await store.close()


def _run(coro: Any) -> Any:
    """Run a lifecycle coroutine; lifecycle, policy and dependency errors end the command with one line."""
    from pipeline.errors import ModpipeError

    try:
        return asyncio.run(coro)
    except ModpipeError as exc:
        fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add the lifecycle commands to ``modpipe policy``."""
    for name, command in (("versions", versions), ("candidate", candidate), ("shadow", shadow),
                          ("shadow-report", shadow_report), ("backtest", backtest), ("promote", promote),
                          ("rollback", rollback), ("retroact", retroact)):
        app.command(name)(command)


# -- versions and candidates -------------------------------------------------------------------------------------


def versions(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write what is shown as JSON here."),
) -> None:
    """A policy's versions (base, candidates, what the registry holds), which one enforces, what is shadowed, the
    reports each has, what every live worker runs, and the lifecycle history."""
    from pipeline.policies.lint import ERROR, lint_policy
    from pipeline.policies.versions import version_files, load_version

    async def gather() -> dict[str, Any]:
        async with _opened(ctx, publish=False) as lc:
            base = lc.library.get(policy)
            enforcing, pointer = await lc.enforcing(policy)
            shadows = {r.version: r for r in await lc.registry.shadows() if r.policy_id == policy}
            rows = []
            known = set()
            for file in version_files(base.folder):
                loaded = load_version(base.folder, file.text, file.path.name, lc.settings.reasoner)
                known.add(file.version)
                rows.append({"name": file.name, "version": file.version, "file": str(file.path),
                             "lint_errors": sum(f.level == ERROR for f in lint_policy(loaded)),
                             "reports": await lc.registry.reports(policy, file.version)})
            for version in ([pointer.version, *pointer.previous] if pointer else []):
                if version not in known:
                    known.add(version)
                    rows.append({"name": "(registry)", "version": version, "file": None, "lint_errors": None,
                                 "reports": await lc.registry.reports(policy, version)})
            for row in rows:
                row["enforcing"] = row["version"] == enforcing.version
                reg = shadows.get(row["version"])
                row["shadow_sample"] = (reg.sample if reg.sample is not None else lc.settings.lifecycle.shadow_sample
                                        ) if reg else None
            loaded = await lc.registry.loaded(3 * lc.settings.lifecycle.refresh_s + 5)
            return {
                "policy": policy, "enforcing": enforcing.version,
                "pointer": {"version": pointer.version, "previous": list(pointer.previous), "actor": pointer.actor,
                            "changed_at": pointer.changed_at} if pointer else None,
                "versions": rows,
                "workers": {w: v.get("enforcing", {}).get(policy) for w, v in sorted(loaded.items())},
                "history": [h.model_dump(mode="json") for h in await lc.registry.history(policy)
                            if h.action.value not in ("retroact_item",)][-20:],
            }

    view = _run(gather())
    table = Table("name", "version", "enforcing", "shadow", "lint errors", "reports", title=f"{policy} versions")
    for row in view["versions"]:
        reports = ", ".join(f"{k} ({r.get('compared', r.get('rows', '?'))})" for k, r in sorted(row["reports"].items()))
        table.add_row(row["name"], row["version"], "yes" if row["enforcing"] else "",
                      f"{row['shadow_sample']:.0%}" if row["shadow_sample"] is not None else "",
                      "" if row["lint_errors"] is None else str(row["lint_errors"]), reports or "-")
    console.print(table)
    workers = view["workers"]
    console.print(f"enforcing {view['enforcing']}" + (" (base: never promoted)" if view["pointer"] is None else
                                                      f", promoted by {view['pointer']['actor']}")
                  + (f"; workers: {', '.join(f'{w}={v}' for w, v in workers.items())}" if workers else
                     "; no worker reported in the last refreshes"))
    for entry in view["history"][-8:]:
        console.print(f"  {entry['occurred_at'][:19]} {entry['action']} {entry['version']} by {entry['actor_id']}: "
                      f"{escape(entry['reason'])}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(view, indent=2, sort_keys=True) + "\n")


def candidate(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id."),
    source: Path = typer.Argument(..., help="The candidate's text (.md or .txt), copied byte for byte."),
    name: Optional[str] = typer.Option(None, "--name", help="File name in candidates/ (default: the source's stem)."),
    force: bool = typer.Option(False, "--force", help="Replace a candidate file of that name."),
) -> None:
    """Add a candidate version to the policy's folder (candidates/<name>.md) and show its version and lint."""
    from pipeline.errors import PolicyError
    from pipeline.policies import PolicyLibrary
    from pipeline.policies.lint import ERROR, lint_policy
    from pipeline.policies.versions import add_candidate, load_version

    cfg = settings(ctx)
    try:
        base = PolicyLibrary.from_settings(cfg.reasoner, strict=False).get(policy)
        assert base.folder is not None
        file = add_candidate(base.folder, source, name, force=force)
        loaded = load_version(base.folder, file.text, file.path.name, cfg.reasoner)
    except PolicyError as exc:
        fail(str(exc))
    found = lint_policy(loaded)
    console.print(f"candidate [bold]{file.name}[/] of {policy}: version {file.version} ({file.path}); "
                  f"{len(loaded.rules)} rules, {len(loaded.examples)} examples")
    for finding in found:
        colour = "red" if finding.level == ERROR else "yellow"
        console.print(f"  [{colour}]{finding.level}[/] {escape(finding.message)}")
    if any(f.level == ERROR for f in found):
        raise typer.Exit(1)


# -- shadow ------------------------------------------------------------------------------------------------------


def shadow(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id."),
    version: str = typer.Argument(..., help="The version: its hash (or a unique prefix) or its candidate name."),
    sample: Optional[float] = typer.Option(None, "--sample", min=0.0, max=1.0,
                                           help="Share of eligible items to judge (default lifecycle.shadow_sample)."),
    stop: bool = typer.Option(False, "--stop", help="Stop shadowing this version."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)."),
    actor: Optional[str] = typer.Option(None, "--actor", help="Who (default: your login name)."),
) -> None:
    """Judge a candidate on live traffic in the reasoning role, never enforced; results go to moderation.shadow."""

    async def go() -> str:
        async with _opened(ctx) as lc:
            if stop:
                stopped = await lc.shadow_stop(policy, version, _actor(actor), reason)
                return "stopped" if stopped else "was not shadowed"
            chosen = await lc.shadow_start(policy, version, _actor(actor), reason, sample)
            share = sample if sample is not None else lc.settings.lifecycle.shadow_sample
            return (f"shadowing {policy} {chosen.version} on {share:.0%} of eligible items (workers pick it up within "
                    f"{lc.settings.lifecycle.refresh_s:g} s; budget {lc.settings.lifecycle.shadow_calls_per_s:g} "
                    "model calls/s per reasoning worker)")

    console.print(_run(go()))


def _shadow_pairs(records: list, policy: str) -> dict[str, list]:  # type: ignore[type-arg]
    """Per shadowed version, the (candidate, enforced) pairs of the shadow results (the last copy of each)."""
    from pipeline.lifecycle.compare import Answer, Pair
    from pipeline.schemas import Decision, ShadowResult, parse_wire

    latest: dict[str, ShadowResult] = {}
    for record in records:
        try:
            result = parse_wire(ShadowResult, record.value or b"")
        except ValueError:
            continue
        if result.policy.policy_id == policy:
            latest[result.shadow_id] = result
    pairs: dict[str, list] = {}  # type: ignore[type-arg]
    for r in latest.values():
        if r.enforced_policy is not None:
            enforced = Answer(r.enforced_violation, tuple(r.enforced_rule_ids), "reasoner", r.enforced_policy.version)
        else:  # a policy that does not enforce: compare with what was done to the item
            decided = {Decision.BLOCK: True, Decision.ALLOW: False}.get(r.enforced_decision) \
                if r.enforced_decision else None
            enforced = Answer(decided, (), "verdict", None)
        pairs.setdefault(r.policy.version, []).append(
            Pair(r.content_id, r.revision, Answer(r.violation, tuple(r.rule_ids), "candidate", r.policy.version),
                 enforced, tuple(r.reasoner_calls)))
    return pairs


def shadow_report(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id."),
    version: Optional[str] = typer.Option(None, "--candidate", help="Only this shadowed version (default: all)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only shadow results since (ISO time, -2h, -7d)."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the report(s) as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the plot (PNG) here (one version)."),
) -> None:
    """Compare what shadowed versions said with what was enforced on the same items: agreement, flips each way
    with examples, per-rule counts, cost. Records the summary in the registry (promotion requires a report)."""
    from pipeline.lifecycle.compare import compare, summary, summary_text
    from pipeline.lifecycle.compare import plot as draw
    from pipeline.lifecycle.history import read_all

    async def go() -> list[dict[str, Any]]:
        async with _opened(ctx, publish=False) as lc:
            kafka = lc.settings.kafka
            records = await read_all(kafka, kafka.topic(kafka.shadow_topic), parse_time(since))
            pairs = _shadow_pairs(records, policy)
            wanted = (await lc.version(policy, version)).version if version else None
            reports = []
            for shadowed, items in sorted(pairs.items()):
                if wanted and shadowed != wanted:
                    continue
                report = compare(policy, shadowed, items, kind="shadow")
                await lc.registry.put_report(policy, shadowed, "shadow", summary(report))
                reports.append(report)
            return reports

    reports = _run(go())
    if not reports:
        fail(f"no shadow results for {policy}" + (f" {version}" if version else "") + " on the shadow topic", code=1)
    for report in reports:
        console.print(escape(summary_text(report)))
    if plot is not None:
        console.print(f"plot: {draw(reports[0], plot)}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2, sort_keys=True) + "\n")


# -- backtest ----------------------------------------------------------------------------------------------------


def _bar(description: str) -> Progress:
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                    TimeRemainingColumn(), console=console, transient=False)


def _confirm(estimate_lines: str, yes: bool) -> None:
    """Show what the run will cost, then ask (unless ``yes``) before any model call is spent."""
    console.print(estimate_lines)
    if not yes and not typer.confirm("spend these model calls?", default=False):
        raise typer.Exit(1)


def backtest(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id."),
    version: str = typer.Option(..., "--candidate", help="The version: its hash, a unique prefix, or its name."),
    since: Optional[str] = typer.Option(None, "--from", help="Items on content.incoming from (ISO time, -2h, -7d)."),
    until: Optional[str] = typer.Option(None, "--to", help="... up to (default: the log's end now)."),
    file: Optional[Path] = typer.Option(None, "--file", help="Or: a JSON-lines file of ContentItems."),
    out: Optional[Path] = typer.Option(None, "--out", help="The run's folder (default out/backtest/POLICY-VERSION)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Items judged at once."),
    max_calls: Optional[int] = typer.Option(None, "--max-calls", min=1, help="Stop after this many model calls."),
    all_items: bool = typer.Option(False, "--all-items", help="Judge every item, not only those triage escalates."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only estimate the cost."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before spending model calls."),
    restart: bool = typer.Option(False, "--restart", help="Discard a previous run in the folder."),
) -> None:
    """Replay past items through triage and the candidate (never publishing) and compare with what was enforced:
    JSON, a readable summary and a plot. Resumable: run it again to continue."""
    from pipeline.lifecycle import backtest as bt
    from pipeline.lifecycle.compare import summary_text
    from pipeline.lifecycle.live import open_live
    from pipeline.reasoner import build_reasoner
    from pipeline.reasoner.cache import RedisVerdictCache
    from pipeline.triage import TriageModel

    if (file is None) == (since is None):
        fail("give --from TIME [--to TIME] or --file FILE.jsonl", code=2)
    source = bt.Source(parse_time(since), parse_time(until), file)

    async def go() -> dict[str, Any] | None:
        async with _opened(ctx, publish=False) as lc:
            cfg = lc.settings
            chosen = await lc.version(policy, version)
            folder = out or Path("out") / "backtest" / f"{policy}-{chosen.version}"
            plan = {"policy": policy, "candidate": chosen.version, "source": source.describe(), "all_items": all_items}
            done = bt.prepare(folder, plan, restart=restart, dry_run=dry_run)
            loaded = await bt.load_items(cfg, source)
            console.print(f"{len(loaded.items)} items from {plan['source']}"
                          + (f" ({loaded.unreadable} unreadable, left out)" if loaded.unreadable else ""))
            live = await open_live(lc.library, lc.registry, cfg.lifecycle, cfg.reasoner)
            model = await asyncio.to_thread(TriageModel.load, cfg.triage.model_dir, settings=cfg.triage,
                                            triton_grpc_url=cfg.triton.grpc_url)
            await asyncio.to_thread(bt.route_items, loaded.items, model, live.library, chosen, all_items=all_items)
            reasoner = build_reasoner(cfg, live.library)
            reasoner.check_policy(chosen)
            cache = RedisVerdictCache(cfg.redis, cfg.reasoner.cache_ttl_s) if cfg.reasoner.cache_enabled else None
            try:
                estimate = await bt.estimate(loaded.items, chosen, reasoner, cfg, done, cache)
            finally:
                if cache is not None:
                    await cache.close()
            calls = estimate["model_calls"]
            lines = (f"estimate: {estimate['candidate_judges']} items for the candidate ({estimate['already_done']} "
                     f"done before; triage routes {estimate['triage_routes']}); model calls {calls['at_least']}"
                     f"..{calls['at_most']} ({calls['first_effort_cached']} already cached), input tokens "
                     f"{estimate['input_tokens']['at_least']}..{estimate['input_tokens']['at_most']}, output tokens "
                     f"at most {estimate['output_tokens_at_most']}, efforts {'/'.join(estimate['efforts'])}, model "
                     f"{estimate['model']}")
            if dry_run:
                console.print(lines)
                return None
            (folder / "estimate.json").write_text(json.dumps(estimate, indent=2, sort_keys=True) + "\n")
            _confirm(lines, yes or estimate["candidate_judges"] == 0)
            await reasoner.start()
            try:
                with _bar("backtest") as bar:
                    task = bar.add_task("backtest", total=estimate["items"] - estimate["already_done"], note="")
                    progress = bt.Progress(callback=lambda p: bar.update(
                        task, completed=p.done, note=f"{p.model_calls} model calls"))
                    results = await bt.judge_items(loaded.items, chosen, reasoner, folder, done,
                                                   concurrency=concurrency, max_calls=max_calls, progress=progress)
            finally:
                await reasoner.close()
            left = len(loaded.items) - len(results)
            verdicts, escalations = await bt.enforced(cfg, source.since)
            base = lc.library.get(policy)
            report = bt.build_report(chosen, results, verdicts, escalations, base_rules=base.rule_ids,
                                     extra={"source": plan["source"], "estimate": estimate, "left": left,
                                            "triage_routes": estimate["triage_routes"]})
            paths = bt.write_outputs(folder, report)
            await lc.registry.put_report(policy, chosen.version, "backtest", bt.registry_summary(report, folder))
            console.print(escape(summary_text(report)))
            console.print(f"written: {', '.join(str(p) for p in paths.values())}"
                          + (f"; {left} items left (budget reached): run again to continue" if left else ""))
            return report

    _run(go())


# -- promote and roll back ---------------------------------------------------------------------------------------


def _golden(ctx: typer.Context, candidate_policy: Any, reasoner_url: str | None, model: str | None,
            concurrency: int) -> dict[str, Any]:
    """The candidate's golden-set report against the given endpoint, or the one the workers use."""
    from pipeline.policies import PolicyLibrary
    from pipeline.policies.golden import backend_for, configured_endpoint, parse_endpoint, run_golden

    cfg = settings(ctx)
    endpoint = parse_endpoint(reasoner_url, model or cfg.reasoner.openai_model) if reasoner_url else \
        configured_endpoint(cfg)
    api_key = cfg.reasoner.openai_api_key.get_secret_value() if cfg.reasoner.openai_api_key else None
    backend = backend_for(endpoint, cfg.triton.request_timeout_s, api_key, cfg.reasoner)
    library = PolicyLibrary({candidate_policy.policy_id: candidate_policy})
    return asyncio.run(run_golden(library, candidate_policy.policy_id, backend, datasets_dir=cfg.datasets_dir,
                                  concurrency=concurrency, timeout_s=cfg.triton.request_timeout_s,
                                  reasoner_settings=cfg.reasoner))


def promote(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id."),
    version: str = typer.Argument(..., help="The candidate: its hash, a unique prefix, or its name."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)."),
    actor: Optional[str] = typer.Option(None, "--actor", help="Who (default: your login name)."),
    reasoner_url: Optional[str] = typer.Option(
        None, "--reasoner", help="Run the golden set here (triton://, http(s)://, ollama://); default: the "
        "reasoner the workers use."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name for an OpenAI-compatible endpoint."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Golden rows judged at once."),
    wait_s: float = typer.Option(0.0, "--wait", min=0.0, help="Wait this long for every live worker to enforce it."),
) -> None:
    """Make a candidate enforcing: it must lint, pass its golden set at the policy's bar and have a backtest or
    shadow report; recorded on moderation.decisions. Workers switch within lifecycle.refresh_s, no restart."""
    from pipeline.errors import ModpipeError

    async def pick() -> Any:
        async with _opened(ctx, publish=False) as lc:
            return await lc.version(policy, version)

    chosen = _run(pick())
    console.print(f"golden set of {policy} {chosen.version} ({len(chosen.golden)} rows) ...")
    try:
        golden = _golden(ctx, chosen, reasoner_url, model, concurrency)
    except (ModpipeError, ValueError) as exc:
        fail(f"golden set did not run: {exc}")

    async def go() -> tuple[Any, dict[str, str]]:
        async with _opened(ctx) as lc:
            await lc.registry.put_report(policy, chosen.version, "golden", {
                "accuracy": golden["accuracy"], "rows": golden["rows"], "model": golden["model"],
                "effort": golden["effort"], "f1": golden["f1"]})
            for gate in await lc.gates(chosen, golden):
                mark = "[green]pass[/]" if gate.passed else "[red]fail[/]"
                console.print(f"  {mark} {gate.name}: {escape(gate.detail)}")
            entry = await lc.promote(policy, chosen.version, _actor(actor), reason, golden)
            fleet = await lc.wait_for_fleet(policy, chosen.version, wait_s) if wait_s else {}
            return entry, fleet

    entry, fleet = _run(go())
    console.print(f"[bold]{policy}[/] now enforces {entry.version} (was {entry.previous_version}); audit "
                  f"{entry.audit_id}")
    _report_fleet(fleet, entry.version, wait_s)


def _report_fleet(fleet: dict[str, str], version: str, wait_s: float) -> None:
    if not wait_s:
        console.print("workers switch within lifecycle.refresh_s (`modpipe policy versions` shows what each runs)")
        return
    behind = {w: v for w, v in fleet.items() if v != version}
    if not fleet:
        console.print("[yellow]no worker reported its versions[/] (none running?)")
    elif behind:
        console.print(f"[yellow]{len(behind)} of {len(fleet)} workers not on {version} yet[/]: {behind}")
        raise typer.Exit(3)
    else:
        console.print(f"all {len(fleet)} live workers enforce {version}")


def rollback(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)."),
    actor: Optional[str] = typer.Option(None, "--actor", help="Who (default: your login name)."),
    wait_s: float = typer.Option(0.0, "--wait", min=0.0, help="Wait this long for every live worker to switch."),
) -> None:
    """Return to the version that enforced before the last promotion (no gates; audited)."""

    async def go() -> tuple[Any, dict[str, str]]:
        async with _opened(ctx) as lc:
            entry = await lc.rollback(policy, _actor(actor), reason)
            fleet = await lc.wait_for_fleet(policy, entry.version, wait_s) if wait_s else {}
            return entry, fleet

    entry, fleet = _run(go())
    console.print(f"[bold]{policy}[/] rolled back to {entry.version} (was {entry.previous_version}); audit "
                  f"{entry.audit_id}")
    _report_fleet(fleet, entry.version, wait_s)


# -- retroaction -------------------------------------------------------------------------------------------------


def retroact(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id."),
    since: str = typer.Option(..., "--since", help="Items with final verdicts since (ISO time, -2h, -7d)."),
    until: Optional[str] = typer.Option(None, "--until", help="... up to (default: now)."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)."),
    actor: Optional[str] = typer.Option(None, "--actor", help="Who (default: your login name)."),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, help="Most model calls this run may spend."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Items re-judged at once."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say which items and what it may cost."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before spending model calls."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the run's counts here."),
) -> None:
    """Re-judge items older versions decided, under the enforcing version; publish superseding final verdicts
    where the decision changes (never over a reviewer's); idempotent; every step audited."""
    from pipeline.lifecycle.live import open_live
    from pipeline.lifecycle.retro import Retroaction
    from pipeline.reasoner import build_reasoner
    from pipeline.review.queue import ReviewQueue

    window = (parse_time(since), parse_time(until))

    async def go() -> dict[str, Any] | None:
        async with _opened(ctx) as lc:
            cfg = lc.settings
            live = await open_live(lc.library, lc.registry, cfg.lifecycle, cfg.reasoner)
            enforcing = live.library.get(policy)
            pointer = live.pointers.get(policy)
            if pointer is not None and pointer.version != enforcing.version:
                fail(f"the enforcing version {pointer.version} of {policy} cannot be loaded here; fix that first")
            store = lc.store
            queue = ReviewQueue(store)

            async def in_review(content_id: str) -> bool:
                state = await queue.get(content_id)
                return state is not None and (state.state in ("pending", "claimed") or not state.done)

            reasoner = build_reasoner(cfg, live.library)
            retro = Retroaction(cfg, store, lc.sink, lc, reasoner, enforcing, actor=_actor(actor), reason=reason,
                                in_review=in_review)
            assert window[0] is not None
            found = await retro.find(window[0], window[1])
            calls = sum(len(t.escalation.policy_ids) for t in found.targets)
            lines = (f"{len(found.targets)} items decided under older versions of {policy} than {enforcing.version}"
                     f" (left out: {dict(found.skipped) or 'none'}); model calls up to {2 * calls} (at least "
                     f"{calls} before the verdict cache), budget {budget or 'none'}")
            if dry_run:
                console.print(lines)
                return None
            _confirm(lines, yes or not found.targets)
            await reasoner.start()
            try:
                with _bar("retroaction") as bar:
                    task = bar.add_task("retroaction", total=len(found.targets), note="")
                    counts: dict[str, int] = {}

                    def step(outcome: str) -> None:
                        counts[outcome] = counts.get(outcome, 0) + 1
                        bar.update(task, advance=1, note=", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

                    result = await retro.run(found.targets, budget=budget, concurrency=concurrency, on_item=step,
                                             since=window[0])
            finally:
                await reasoner.close()
            result["left_out"] = dict(found.skipped)
            return result

    result = _run(go())
    if result is None:
        return
    console.print_json(json.dumps(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
