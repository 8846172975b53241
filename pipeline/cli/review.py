"""``modpipe review ...``: run the review service, review from a terminal, manage tokens, export feedback.

``next``, ``decide``, ``skip``, ``escalate``, ``stats``, ``export`` and ``appeal`` are clients of the review service
over HTTP (``MODPIPE_REVIEW__URL``, token from ``--token`` or ``MODPIPE_REVIEW__TOKEN``), so a reviewer needs no
access to Redis or Kafka. ``serve``, ``token`` and ``list`` are operator commands that talk to Redis directly.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from pipeline.cli.common import console, fail, settings, setup_logging
from pipeline.config import Settings

review_app = typer.Typer(help="Human review: the service, the reviewer's CLI, tokens, feedback.", no_args_is_help=True)
token_app = typer.Typer(help="Access tokens (stored hashed; shown once).", no_args_is_help=True)
review_app.add_typer(token_app, name="token")

class _Client:
    """A small HTTP client for the review API that turns error answers into CLI errors."""

    def __init__(self, config: Settings, url: str | None, token: str | None) -> None:
        import httpx

        token = token or (config.review.token.get_secret_value() if config.review.token else None)
        if not token:
            fail("no token: pass --token or set MODPIPE_REVIEW__TOKEN")
        self._http = httpx.Client(base_url=url or config.review.url, timeout=30.0,
                                  headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            fail(f"review service unreachable at {self._http.base_url}: {exc}")
        if response.status_code == 204:
            return None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            fail(f"{response.status_code}: {message}", code=2 if response.status_code == 409 else 1)
        return response

    def json(self, method: str, path: str, body: Any = None) -> Any:
        response = self.call(method, path, body)
        return None if response is None else response.json()


_URL = typer.Option(None, "--url", help="Review service base URL (default MODPIPE_REVIEW__URL).")
_TOKEN = typer.Option(None, "--token", help="Access token (default MODPIPE_REVIEW__TOKEN).", envvar="MODPIPE_REVIEW_TOKEN")


# -- the service ------------------------------------------------------------------------------------------------


@review_app.command("serve")
def serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, help="Bind address (default MODPIPE_REVIEW__HOST)."),
    port: Optional[int] = typer.Option(None, help="Port (default MODPIPE_REVIEW__PORT)."),
) -> None:
    """Run the review service (API + reviewer page) in the foreground."""
    from pipeline.review.api import serve as run

    config = settings(ctx)
    setup_logging(config.worker.log_level)
    run(config, host or config.review.host, port if port is not None else config.review.port,
        config.worker.log_level)


# -- reviewing from a terminal --------------------------------------------------------------------------------------


def _print_item(view: dict[str, Any], text: str | None) -> None:
    console.print(f"[bold]{view['content_id']}[/] ({view['reason']}, queue {view['queue']}, "
                  f"{view['age_s']:.0f}s old{', appeal #' + str(view['appeal_round']) if view['appeal_round'] else ''})")
    triage = view["triage"]
    cats = ", ".join(f"{k} {v:.2f}" for k, v in sorted(triage["categories"].items(), key=lambda kv: -kv[1])[:4])
    console.print(f"triage: violation {triage['violation']:.3f} ({cats})")
    for call in view["model"]["calls"]:
        answer = "no usable answer" if call["violation"] is None else ("violates" if call["violation"] else "safe")
        console.print(f"[magenta]model-generated[/] {call['policy']['policy_id']} ({call['effort']}): {answer} "
                      f"{' '.join(call['rule_ids'])} {call['rationale'] or call['error'] or ''}", markup=True,
                      highlight=False)
    for policy in view["policies"]:
        if policy.get("cited_rule_ids"):
            for rule in policy["rules"]:
                if rule["cited"]:
                    console.print(f"  cited {rule['rule_id']}: {rule['text']}", highlight=False)
    if text is not None:
        console.print("[bold]content:[/]")
        console.print(text, markup=False, highlight=False)
    else:
        console.print("(content hidden: --show-content reveals it)")


@review_app.command("next")
def next_item(
    ctx: typer.Context,
    policy: Optional[str] = typer.Option(None, help="Only this policy's queue."),
    show_content: bool = typer.Option(False, "--show-content", help="Print the content text too."),
    as_json: bool = typer.Option(False, "--json", help="Print the item view as JSON."),
    url: Optional[str] = _URL,
    token: Optional[str] = _TOKEN,
) -> None:
    """Claim the next item (exit 3 when every queue is empty)."""
    client = _Client(settings(ctx), url, token)
    view = client.json("POST", "/v1/claims", {"policy_id": policy} if policy else {})
    if view is None:
        console.print("nothing to review")
        raise typer.Exit(3)
    text = client.json("GET", f"/v1/items/{view['content_id']}/content")["text"] if show_content else None
    if as_json:
        console.print_json(json.dumps({**view, **({"text": text} if text is not None else {})}))
    else:
        _print_item(view, text)


@review_app.command("decide")
def decide(
    ctx: typer.Context,
    content_id: str,
    decision: str = typer.Argument(..., help="allow | remove"),
    policy: str = typer.Option(..., "--policy", help="Policy the decision is made under."),
    rule: Optional[str] = typer.Option(None, "--rule", help="Rule id (required for remove)."),
    note: str = typer.Option("", "--note", help="Why (never paste the content)."),
    url: Optional[str] = _URL,
    token: Optional[str] = _TOKEN,
) -> None:
    """Decide an item you hold: publishes the final verdict (exit 2 if you do not hold it)."""
    verdict = _Client(settings(ctx), url, token).json("POST", f"/v1/items/{content_id}/decision",
                                       {"decision": decision, "policy_id": policy, "rule_id": rule, "note": note})
    console.print(f"{content_id}: {verdict['decision']} (verdict {verdict['verdict_id']})")


@review_app.command("skip")
def skip(ctx: typer.Context, content_id: str, url: Optional[str] = _URL, token: Optional[str] = _TOKEN) -> None:
    """Give an item back; you will not be offered it again."""
    _Client(settings(ctx), url, token).json("POST", f"/v1/items/{content_id}/skip")
    console.print(f"{content_id}: skipped")


@review_app.command("escalate")
def escalate(ctx: typer.Context, content_id: str, note: str = typer.Option("", "--note"), url: Optional[str] = _URL,
             token: Optional[str] = _TOKEN) -> None:
    """Hand an item you hold to the admin queue."""
    _Client(settings(ctx), url, token).json("POST", f"/v1/items/{content_id}/escalate", {"note": note})
    console.print(f"{content_id}: escalated")


@review_app.command("appeal")
def appeal(ctx: typer.Context, content_id: str, reason: str = typer.Option("", "--reason"), url: Optional[str] = _URL,
           token: Optional[str] = _TOKEN) -> None:
    """Re-queue a decided item for another reviewer (platform or admin token)."""
    result = _Client(settings(ctx), url, token).json("POST", "/v1/appeals", {"content_id": content_id, "reason": reason})
    console.print_json(json.dumps(result))


@review_app.command("stats")
def stats(ctx: typer.Context, as_json: bool = typer.Option(False, "--json"), url: Optional[str] = _URL,
          token: Optional[str] = _TOKEN) -> None:
    """Queue counts, overturn rate of machine verdicts and model/human agreement per policy."""
    data = _Client(settings(ctx), url, token).json("GET", "/v1/stats")
    if as_json:
        console.print_json(json.dumps(data))
        return
    queues = Table("queue", "pending", "oldest (s)", title=f"{data['queues']['pending']} pending, "
                                                          f"{data['queues']['claimed']} claimed")
    for q in data["queues"]["queues"]:
        queues.add_row(q["queue"], str(q["pending"]), str(q["oldest_age_s"] or ""))
    console.print(queues)
    mv = data["model_verdicts"]
    console.print(f"decisions {data['decisions']} {data['by_decision']}; machine verdicts compared {mv['compared']}, "
                  f"overturned {mv['overturned']} (rate {mv['overturn_rate']})")
    agreement = Table("policy", "compared", "agreed", "agreement", title="model vs people, per policy")
    for pid, a in data["agreement_per_policy"].items():
        agreement.add_row(pid, str(a["compared"]), str(a["agreed"]), str(a["rate"]))
    console.print(agreement)


@review_app.command("export")
def export(
    ctx: typer.Context,
    json_out: Path = typer.Option(..., "--json-out", help="JSON-lines file of labelled examples to write."),
    url: Optional[str] = _URL,
    token: Optional[str] = _TOKEN,
) -> None:
    """Write reviewers' decisions as labelled examples for `modpipe triage train --feedback` (admin token)."""
    from pipeline.review.feedback import validate_example

    response = _Client(settings(ctx), url, token).call("GET", "/v1/export")
    lines = [line for line in response.text.splitlines() if line.strip()]
    for line in lines:
        validate_example(json.loads(line))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    console.print(f"wrote {len(lines)} examples to {json_out}")


# -- operator commands (Redis) ------------------------------------------------------------------------------------


def _with_store(ctx: typer.Context, work):  # type: ignore[no-untyped-def]
    from pipeline.store import RedisStore

    async def run():  # type: ignore[no-untyped-def]
        store = RedisStore(settings(ctx).redis)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


@review_app.command("list")
def review_list(ctx: typer.Context, limit: int = typer.Option(20)) -> None:
    """List pending review tasks, oldest first, and the queue counts."""
    from pipeline.review.queue import ReviewQueue

    async def work(store):  # type: ignore[no-untyped-def]
        queue = ReviewQueue(store)
        return await queue.pending(limit), await queue.counts()

    tasks, (counts, claimed) = _with_store(ctx, work)
    console.print(f"{sum(c.pending for c in counts)} pending, {claimed} claimed")
    for c in counts:
        console.print(f"  {c.queue:28} {c.pending:6}  oldest {c.oldest_age_s or 0:.0f}s")
    for task in tasks:
        console.print(f"{task.created_at:%Y-%m-%d %H:%M:%S} {task.item.content_id} {task.reason.value} "
                      f"{','.join(task.policy_ids)}")


@token_app.command("add")
def token_add(
    ctx: typer.Context,
    principal_id: str = typer.Option(..., "--id", help="Who the token is for (attributed on every decision)."),
    role: str = typer.Option("reviewer", "--role", help="reviewer | admin | platform"),
    platform: Optional[str] = typer.Option(
        None, "--platform", help="Platform tokens: the platform whose items it reads and appeals (ContentItem."
        "platform; default the --id)."),
) -> None:
    """Create a token and print it once (only its hash is stored). A platform token sees only its platform's items."""
    from pipeline.review.auth import Role, TokenStore

    try:
        chosen = Role(role)
    except ValueError:
        fail(f"unknown role {role!r}; choose reviewer, admin or platform")
        return

    async def work(store):  # type: ignore[no-untyped-def]
        return await TokenStore(store).create(principal_id, chosen, platform=platform)

    try:
        token = _with_store(ctx, work)
    except ValueError as exc:
        fail(str(exc))
        return
    console.print(token, markup=False, highlight=False)


@token_app.command("list")
def token_list(ctx: typer.Context) -> None:
    """Principals that hold tokens (never the tokens)."""
    from pipeline.review.auth import TokenStore

    for row in _with_store(ctx, lambda store: TokenStore(store).list()):
        scope = f" platform {row.get('platform') or row['id']}" if row["role"] == "platform" else ""
        console.print(f"{row['id']:24} {row['role']}{scope}", markup=False, highlight=False)


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, principal_id: str = typer.Option(..., "--id")) -> None:
    """Revoke every token of a principal; the web sessions opened with them end at their next request."""
    from pipeline.review.auth import TokenStore

    count = _with_store(ctx, lambda store: TokenStore(store).revoke(principal_id))
    console.print(f"revoked {count} token(s) of {principal_id}; their web sessions end", markup=False,
                  highlight=False)
