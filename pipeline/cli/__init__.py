"""``modpipe``: one CLI for every role and operation. Each command group lives in its own module here."""

from __future__ import annotations

import typer

from pipeline.cli.bench import bench_app
from pipeline.cli.deploy import deploy_app
from pipeline.cli.gateway import gateway_app, webhooks_app
from pipeline.cli.ops import config_app, status, topics_app, visibility_app
from pipeline.cli.policy import policy_app
from pipeline.cli.publish import publish, watch
from pipeline.cli.review import review_app
from pipeline.cli.run import chaos, demo, worker
from pipeline.cli.stack import stack_app
from pipeline.cli.triage import triage_app

app = typer.Typer(help="modpipe: policy-driven, explainable content moderation.", no_args_is_help=True)
for command in (worker, demo, chaos, status, publish, watch):
    app.command()(command)
for group, name in (
    (stack_app, "stack"),
    (config_app, "config"),
    (topics_app, "topics"),
    (visibility_app, "visibility"),
    (triage_app, "triage"),
    (policy_app, "policy"),
    (review_app, "review"),
    (deploy_app, "deploy"),
    (gateway_app, "gateway"),
    (webhooks_app, "webhooks"),
    (bench_app, "bench"),
):
    app.add_typer(group, name=name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
