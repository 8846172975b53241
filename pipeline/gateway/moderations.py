"""OpenAI's moderation answer made from modpipe's verdicts: the mapping, in one place.

``POST /v1/moderations`` publishes each input as an item of the caller's platform (content id
``mod-<sha256(platform, normalised text)[:32]>``, so the same text is the same item and is answered from the store
the second time) and waits for the verdicts like ``POST /v1/moderate``. Each result then says:

* ``flagged``: true unless the item's decision is a *final allow*. An item still hidden pending at the deadline
  (escalated to the reasoner, or not triaged yet) is flagged: modpipe fails closed, and an OpenAI client treats
  flagged as "do not show". ``modpipe.decision`` / ``modpipe.final`` say which case it is.
* ``categories``: true for the categories of the policies a final *block* cites (table below; the reasoner's
  violating answers, else the verdict's policies for triage and review decisions). Sub-categories
  (``hate/threatening``, ``violence/graphic``) are flagged with their parent when their own triage head scores at
  least 0.5. A block under a policy without a mapping flags the result but no category.
* ``category_scores``: the triage classifier's calibrated probabilities, per head (table below); categories
  without a triage head score 0.0. Scores are triage's, decisions are the pipeline's: a reasoner can block an
  item triage scored low.

| modpipe policy | OpenAI categories flagged on a block | triage head -> OpenAI score |
|---|---|---|
| hate | hate (+ hate/threatening) | H -> hate, H2 -> hate/threatening |
| harassment | harassment | HR -> harassment |
| violence | violence (+ violence/graphic) | V -> violence, V2 -> violence/graphic |
| sexual | sexual | S -> sexual |
| sexual_minors | sexual/minors | S3 -> sexual/minors |
| self_harm | self-harm | SH -> self-harm |
| fraud_spam | illicit | - |

Never scored or flagged by modpipe: ``harassment/threatening``, ``illicit/violent``, ``self-harm/intent``,
``self-harm/instructions`` (always false and 0.0).
"""

from __future__ import annotations

import hashlib

from pipeline.gateway.models import ItemState, ModerationResult, ModpipeResult
from pipeline.schemas import Decision, Stage, Verdict
from pipeline.texts import text_hash

OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm",
    "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence", "violence/graphic",
)
HEAD_CATEGORIES = {"H": "hate", "H2": "hate/threatening", "HR": "harassment", "S": "sexual", "S3": "sexual/minors",
                   "SH": "self-harm", "V": "violence", "V2": "violence/graphic"}
POLICY_CATEGORIES = {"hate": "hate", "harassment": "harassment", "violence": "violence", "sexual": "sexual",
                     "sexual_minors": "sexual/minors", "self_harm": "self-harm", "fraud_spam": "illicit"}
# A sub-category is flagged with its parent when its own head scores at least this.
SUB_CATEGORIES = {"hate": ("hate/threatening", "H2"), "violence": ("violence/graphic", "V2")}
SUB_CATEGORY_SCORE = 0.5
CONTENT_ID_PREFIX = "mod-"


def moderation_content_id(platform: str, text: str) -> str:
    """The item id of a moderation input: the same text from the same platform is the same item."""
    digest = hashlib.sha256(f"{platform}\x00{text_hash(text)}".encode()).hexdigest()
    return CONTENT_ID_PREFIX + digest[:32]


def blocking_policies(verdict: Verdict) -> list[str]:
    """The policies a final block rests on: the reasoner's last usable answer per policy when it decided, else the
    verdict's policies (triage's categories above the floor, or the reviewer's policy)."""
    if verdict.decision is not Decision.BLOCK:
        return []
    if verdict.stage is Stage.REASONER and verdict.reasoner_calls:
        last: dict[str, bool] = {}
        for call in verdict.reasoner_calls:
            if call.violation is not None:
                last[call.policy.policy_id] = call.violation
        violated = [pid for pid, violation in last.items() if violation]
        if violated:
            return violated
    return [ref.policy_id for ref in verdict.policies]


def result(state: ItemState, timed_out: bool) -> ModerationResult:
    verdict = state.verdict
    scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
    head_scores = verdict.triage.categories if verdict is not None and verdict.triage is not None else {}
    for head, category in HEAD_CATEGORIES.items():
        if head in head_scores:
            scores[category] = round(float(head_scores[head]), 6)
    flags = dict.fromkeys(OPENAI_CATEGORIES, False)
    if state.final and verdict is not None:
        for policy in blocking_policies(verdict):
            category = POLICY_CATEGORIES.get(policy)
            if category is None:
                continue
            flags[category] = True
            sub = SUB_CATEGORIES.get(category)
            if sub is not None and head_scores.get(sub[1], 0.0) >= SUB_CATEGORY_SCORE:
                flags[sub[0]] = True
    return ModerationResult(
        flagged=state.decision != "allow",
        categories=flags,
        category_scores=scores,
        category_applied_input_types={c: ["text"] for c in OPENAI_CATEGORIES},
        modpipe=ModpipeResult(content_id=state.content_id, decision=state.decision, final=state.final,
                              verdict_id=verdict.verdict_id if verdict is not None else None, timed_out=timed_out),
    )
