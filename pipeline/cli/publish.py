"""``modpipe publish FILE`` and ``modpipe watch``: try modpipe on your own data, and follow what it decides.

``publish`` reads JSON lines (one object per line) or CSV, makes one ``ContentItem`` per row and publishes it to
``content.incoming`` (acknowledged, keyed by content id), or posts it to the gateway with ``--gateway`` (the
platform token's platform; 429s are waited out). Ids come from ``--id-column`` or, without one, from a stable hash
of the normalised text (``h-<sha256[:32]>``), so publishing the same file twice publishes the same items and the
pipeline treats the second time as redeliveries. Rows that would be dead letters are skipped and counted by reason
(never shown): no text, a text over ``MODPIPE_TRIAGE__MAX_TEXT_CHARS``, an invalid id or field, text that is not
valid Unicode, an id repeated with another text. JSON lines may carry any ``ContentItem`` field (``author_id``,
``platform``, ``language``, ``policy_ids``, ``created_at``); other fields are ignored.

``watch`` follows ``moderation.verdicts`` from now (or ``--from-beginning``) as one readable line per verdict.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from pipeline.cli.common import console, fail, settings
from pipeline.config import Settings
from pipeline.schemas import CONTENT_ID_PATTERN, ContentItem, Verdict
from pipeline.texts import text_hash

ITEM_FIELDS = ("author_id", "platform", "language", "policy_ids", "created_at")
BATCH = 100
_ID = re.compile(CONTENT_ID_PATTERN)


@dataclass(frozen=True)
class Row:
    line: int
    item: ContentItem | None
    problem: str | None = None  # why the row is skipped (never its content)


def stable_id(text: str) -> str:
    """The id of a text without an id column: the same (normalised) text, the same id."""
    return "h-" + text_hash(text)[:32]


def _row(line: int, data: dict[str, Any], text_column: str, id_column: str | None, platform: str | None,
         max_chars: int) -> Row:
    text = data.get(text_column)
    if not isinstance(text, str) or not text.strip():
        return Row(line, None, f"no text in {text_column!r}")
    if len(text) > max_chars:
        return Row(line, None, f"text over {max_chars} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Row(line, None, "text is not valid Unicode (a lone surrogate)")
    if id_column is not None:
        raw_id = data.get(id_column)
        cid = str(raw_id) if raw_id not in (None, "") else None
        if cid is None or not _ID.match(cid):
            return Row(line, None, f"invalid id in {id_column!r}")
    else:
        cid = stable_id(text)
    fields = {k: data[k] for k in ITEM_FIELDS if data.get(k) not in (None, "")}
    if platform is not None:
        fields["platform"] = platform
    try:
        return Row(line, ContentItem(content_id=cid, text=text, **fields))
    except ValidationError as exc:
        names = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors(include_input=False)})
        return Row(line, None, f"invalid {', '.join(names)}")


def read_rows(path: Path, fmt: str, text_column: str, id_column: str | None, platform: str | None,
              max_chars: int) -> Iterator[Row]:
    """One :class:`Row` per record of ``path`` (``fmt``: jsonl or csv)."""
    from pipeline.codec import check_depth
    from pipeline.errors import SchemaError

    with path.open(encoding="utf-8", newline="") as handle:
        if fmt == "csv":
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or text_column not in reader.fieldnames:
                raise ValueError(f"{path} has no {text_column!r} column (use --text-column)")
            if id_column is not None and id_column not in reader.fieldnames:
                raise ValueError(f"{path} has no {id_column!r} column")
            for number, record in enumerate(reader, start=2):
                yield _row(number, record, text_column, id_column, platform, max_chars)
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                check_depth(line.encode("utf-8", "surrogatepass"), 32)
                data = json.loads(line)
            except (ValueError, SchemaError, RecursionError):
                yield Row(number, None, "not a JSON object")
                continue
            if not isinstance(data, dict):
                yield Row(number, None, "not a JSON object")
                continue
            default_id = "content_id" if id_column is None and "content_id" in data else id_column
            yield _row(number, data, text_column, default_id, platform, max_chars)


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl"


class _Summary:
    def __init__(self) -> None:
        self.read = self.published = self.duplicates = 0
        self.skipped: Counter[str] = Counter()
        self.start = time.monotonic()

    def report(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.start
        return {"read": self.read, "published": self.published, "duplicates": self.duplicates,
                "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped),
                "elapsed_s": round(elapsed, 2), "items_per_s": round(self.published / elapsed, 1) if elapsed else None}


async def _publish(config: Settings, rows: Iterator[Row], rate: float, gateway: bool, summary: _Summary,
                   advance: Any) -> None:
    seen: dict[str, str] = {}
    batch: list[ContentItem] = []
    send = _GatewaySender(config) if gateway else _KafkaSender(config)
    await send.start()
    interval = 1.0 / rate if rate > 0 else 0.0
    size = max(1, min(BATCH, int(rate / 10))) if rate > 0 else BATCH
    try:
        for row in rows:
            summary.read += 1
            advance()
            if row.item is None:
                summary.skipped[row.problem or "invalid"] += 1
                continue
            hashed = text_hash(row.item.text)
            earlier = seen.get(row.item.content_id)
            if earlier is not None:
                if earlier == hashed:
                    summary.duplicates += 1
                else:
                    summary.skipped["id repeated with another text"] += 1
                continue
            seen[row.item.content_id] = hashed
            batch.append(row.item)
            if len(batch) >= size:
                await _paced(send, batch, summary, interval)
                batch = []
        if batch:
            await _paced(send, batch, summary, interval)
    finally:
        await send.stop()


async def _paced(send: Any, batch: list[ContentItem], summary: _Summary, interval: float) -> None:
    if interval:
        due = summary.start + (summary.published + len(batch)) * interval
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    published, skipped = await send.send(batch)
    summary.published += published
    for reason, count in skipped.items():
        summary.skipped[reason] += count


class _KafkaSender:
    def __init__(self, config: Settings) -> None:
        self.config = config
        self.topic = config.kafka.topic(config.kafka.incoming_topic)

    async def start(self) -> None:
        from pipeline.broker import Publisher

        self.publisher = Publisher(self.config.kafka)
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()

    async def send(self, batch: list[ContentItem]) -> tuple[int, Counter[str]]:
        await self.publisher.send_many([(self.topic, i.content_id, i.to_bytes()) for i in batch])
        return len(batch), Counter()


class _GatewaySender:
    """Posts batches to the gateway; waits out 429s; drops what it refuses (counted) and sends the rest again."""

    def __init__(self, config: Settings) -> None:
        token = config.gateway.token.get_secret_value() if config.gateway.token else None
        if not token:
            fail("no platform token: set MODPIPE_GATEWAY__TOKEN")
        self.url = config.gateway.url
        self.token = token

    async def start(self) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=self.url, timeout=60.0,
                                      headers={"Authorization": f"Bearer {self.token}"})

    async def stop(self) -> None:
        await self.http.aclose()

    async def send(self, batch: list[ContentItem]) -> tuple[int, Counter[str]]:
        import httpx

        skipped: Counter[str] = Counter()
        items = [i.model_dump(mode="json", exclude={"schema_version", "platform"}) for i in batch]
        while items:
            try:
                answer = await self.http.post("/v1/items", json={"items": items})
            except httpx.HTTPError as exc:
                fail(f"gateway unreachable at {self.url}: {type(exc).__name__}")
            if answer.status_code == 202:
                body = answer.json()
                skipped["duplicate at the gateway"] += body["duplicates"]
                return body["accepted"] + body["edits"], skipped
            if answer.status_code in (429, 503):
                await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
                continue
            refused = _refused_indexes(answer)
            if not refused:
                fail(f"gateway answered {answer.status_code}: {answer.text[:300]}")
            for reason, index in refused:
                skipped[reason] += 1
            drop = {index for _, index in refused}
            items = [item for j, item in enumerate(items) if j not in drop]
        return 0, skipped


def _refused_indexes(answer: Any) -> list[tuple[str, int]]:
    """(reason, index) of the items a 409 or 422 refused."""
    try:
        body = answer.json()
    except ValueError:
        return []
    if answer.status_code == 409:
        return [(f"refused by the gateway: {c['reason']}", int(c["index"])) for c in body.get("conflicts", [])]
    if answer.status_code == 422:
        found = []
        for field in body.get("fields", []):
            match = re.match(r"body\.items\.(\d+)", field.get("field", ""))
            if match:
                found.append((f"refused by the gateway: {field.get('problem', 'invalid')}", int(match.group(1))))
        return found
    return []


def publish(
    ctx: typer.Context,
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON lines or CSV."),
    fmt: str = typer.Option("auto", "--format", help="auto (by extension: .csv is CSV), jsonl or csv."),
    text_column: str = typer.Option("text", "--text-column", help="Field or column holding the text."),
    id_column: Optional[str] = typer.Option(
        None, "--id-column", help="Field or column holding the content id (default: `content_id` in JSON lines, "
        "else a stable hash of the text)."),
    platform: Optional[str] = typer.Option(None, "--platform", help="Set ContentItem.platform on every item."),
    rate: float = typer.Option(0.0, "--rate", min=0.0, help="Items per second (0: as fast as acknowledged)."),
    gateway: bool = typer.Option(False, "--gateway", help="Post to the gateway (MODPIPE_GATEWAY__URL, "
                                 "MODPIPE_GATEWAY__TOKEN) instead of publishing to Kafka."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Publish a file of texts to the pipeline, with a progress bar, a rate limit and a summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    config = settings(ctx)
    chosen = detect_format(file, fmt)
    if chosen not in ("jsonl", "csv"):
        fail(f"unknown format {fmt!r}: jsonl or csv")
    with file.open(encoding="utf-8", newline="") as handle:
        total = sum(1 for line in handle if line.strip()) - (1 if chosen == "csv" else 0)
    summary = _Summary()
    try:
        rows = read_rows(file, chosen, text_column, id_column, platform, config.triage.max_text_chars)
        bar = Progress(TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, disable=not progress, transient=True)
        with bar:
            task = bar.add_task("publish", total=max(total, 0))
            asyncio.run(_publish(config, rows, rate, gateway, summary, lambda: bar.advance(task)))
    except ValueError as exc:
        fail(str(exc))
    report = summary.report()
    if json_out:
        console.print_json(json.dumps(report))
        return
    console.print(f"read {report['read']}, published {report['published']}, duplicates {report['duplicates']}, "
                  f"skipped {report['skipped']} in {report['elapsed_s']}s"
                  + (f" ({report['items_per_s']} items/s)" if report["items_per_s"] else ""))
    for reason, count in sorted(report["skipped_by_reason"].items()):
        console.print(f"  skipped {count}: {reason}")


# -- watch ------------------------------------------------------------------------------------------------------


def describe(verdict: Verdict) -> str:
    """One readable line per verdict (no content: ids, decision, evidence summary)."""
    when = verdict.decided_at.astimezone().strftime("%H:%M:%S")
    parts = [when, f"{verdict.status.value:11}", f"{verdict.decision.value:12}", f"{verdict.stage.value:8}",
             f"{verdict.content_id} r{verdict.revision}"]
    if verdict.platform:
        parts.append(f"[{verdict.platform}]")
    policies = ",".join(p.policy_id for p in verdict.policies)
    if policies:
        parts.append(policies + (f"({','.join(verdict.rule_ids)})" if verdict.rule_ids else ""))
    if verdict.triage is not None:
        parts.append(f"triage {verdict.triage.violation:.2f}")
    if verdict.latency.since_ingest_ms is not None:
        parts.append(f"{verdict.latency.since_ingest_ms:.0f} ms")
    if verdict.supersedes:
        parts.append(f"supersedes {verdict.supersedes[:8]}")
    if verdict.reviewer_id:
        parts.append(f"by {verdict.reviewer_id}")
    return "  ".join(parts)


def watch(
    ctx: typer.Context,
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Start at the oldest retained verdict."),
    content_id: Optional[str] = typer.Option(None, "--content-id", help="Only this item."),
    platform: Optional[str] = typer.Option(None, "--platform", help="Only this platform's items."),
    final_only: bool = typer.Option(False, "--final-only", help="Only final verdicts."),
    json_out: bool = typer.Option(False, "--json", help="One verdict JSON per line instead of a readable line."),
    count: Optional[int] = typer.Option(None, "--count", min=1, help="Stop after this many verdicts."),
    idle_exit: Optional[float] = typer.Option(None, "--idle-exit", help="Stop after this many seconds without one."),
) -> None:
    """Follow moderation.verdicts as a readable stream (Ctrl-C to stop)."""
    config = settings(ctx)

    async def run() -> int:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from pipeline.schemas import VerdictStatus, validate_wire

        topic = config.kafka.topic(config.kafka.verdicts_topic)
        consumer = AIOKafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        shown = 0
        try:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await consumer.topics()
                partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                fail(f"no topic {topic} (is the pipeline running? `modpipe topics create`)")
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            if from_beginning:
                await consumer.seek_to_beginning(*tps)
            else:
                await consumer.seek_to_end(*tps)
            last = time.monotonic()
            while count is None or shown < count:
                batches = await consumer.getmany(timeout_ms=500)
                if not batches and idle_exit is not None and time.monotonic() - last > idle_exit:
                    break
                for messages in batches.values():
                    for message in messages:
                        last = time.monotonic()
                        try:
                            verdict = validate_wire(Verdict, json.loads(message.value or b""))
                        except (ValueError, ValidationError):
                            continue
                        if content_id and verdict.content_id != content_id:
                            continue
                        if platform and verdict.platform != platform:
                            continue
                        if final_only and verdict.status is not VerdictStatus.FINAL:
                            continue
                        print(verdict.model_dump_json() if json_out else describe(verdict), flush=True)
                        shown += 1
                        if count is not None and shown >= count:
                            break
                    if count is not None and shown >= count:
                        break
        finally:
            await consumer.stop()
        return shown

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
