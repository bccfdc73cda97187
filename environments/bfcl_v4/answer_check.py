"""BFCL V4's verdict on a final answer: is one of the possible answers in it?

BFCL judges memory and web-search entries on the last message that is not a function call: after
lower-casing, deleting whitespace-insensitive punctuation ``, . / - _ * ^ ( )`` and turning single
quotes into double quotes on both sides, one possible answer must occur in the response between
word boundaries. envtune implements that rule here (its own code; conformance tests compare it with
BFCL's checker on every task). A run with no such message (it only called tools until forced to stop)
fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PUNCTUATION = re.compile(r"[,./\-_*^()]")

NO_ANSWER = "agentic:no_last_message"
"""Failure reason: the run ended without a message that is not a function call."""
NOT_FOUND = "agentic:answer_not_found"
"""Failure reason: none of the possible answers occurs in the final message."""


def standardize(text: str) -> str:
    """Lower-case, drop the punctuation BFCL ignores, single quotes to double quotes."""
    return _PUNCTUATION.sub("", text).lower().replace("'", '"')


@dataclass(frozen=True, slots=True)
class AnswerVerdict:
    """The judgement of one final answer."""

    passed: bool
    """True when a possible answer was found."""
    reason: str
    """``valid``, or ``agentic:no_last_message`` / ``agentic:answer_not_found``."""
    matched: str | None = None
    """The possible answer that matched."""


def check_answer(response: str | None, possible_answers: tuple[str, ...]) -> AnswerVerdict:
    """BFCL's agentic rule on ``response`` (None when the run gave no final message).

    An empty message counts as none, as in BFCL (its runner tests the message for truth).
    """
    if not response:
        return AnswerVerdict(passed=False, reason=NO_ANSWER)
    haystack = standardize(response)
    for answer in possible_answers:
        if re.search(rf"\b{re.escape(standardize(answer))}\b", haystack):
            return AnswerVerdict(passed=True, reason="valid", matched=answer)
    return AnswerVerdict(passed=False, reason=NOT_FOUND)
