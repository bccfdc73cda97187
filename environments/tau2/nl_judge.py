"""Natural-language assertions judged by a model behind an OpenAI-compatible endpoint (optional).

tau2 can score a task's ``nl_assertions`` with an LLM reading the conversation. envtune does so only
when the user configures a judge endpoint, and the verdict then names that judge; without one, a task
whose reward needs NL assertions is reported as unscorable (none of the base splits needs them). The
prompt is envtune's: the transcript, the assertions, and a request for one JSON verdict per assertion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from envtune.environments.tau2.judge import NlResult
from envtune.environments.tau2.user import EndpointConfig, UserSimulatorError, chat_completion

_INSTRUCTIONS = """\
You grade a customer-service conversation against expected outcomes. For each numbered expectation,
decide whether the conversation shows it was met. Answer with JSON only:
{"results": [{"index": 1, "met": true, "reason": "..."}, ...]} with one entry per expectation."""


def transcript(messages: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for message in messages:
        role = message.get("role")
        if message.get("content"):
            lines.append(f"{role}: {message['content']}")
        for call in message.get("tool_calls") or ():
            lines.append(f"{role} calls {call.get('name')}({json.dumps(call.get('arguments'))})")
    return "\n".join(lines)


def judge_nl_assertions(
    config: EndpointConfig, messages: Sequence[Mapping[str, Any]], assertions: Sequence[str]
) -> NlResult:
    """One verdict per assertion; an unusable answer counts as not met."""
    expectations = "\n".join(f"{i}. {text}" for i, text in enumerate(assertions, start=1))
    prompt = [
        {"role": "system", "content": _INSTRUCTIONS},
        {
            "role": "user",
            "content": f"Conversation:\n{transcript(messages)}\n\nExpectations:\n{expectations}",
        },
    ]
    met = [False] * len(assertions)
    try:
        content = chat_completion(config, prompt).get("content") or ""
        start, end = content.find("{"), content.rfind("}")
        results = json.loads(content[start : end + 1]).get("results", []) if start >= 0 else []
        for item in results:
            index = int(item.get("index", 0)) - 1
            if 0 <= index < len(met):
                met[index] = item.get("met") is True
    except (UserSimulatorError, ValueError, AttributeError, TypeError):
        pass
    return NlResult(met=tuple(met), judge=f"{config.model} at {config.base_url}")
