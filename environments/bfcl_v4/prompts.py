"""BFCL V4 instructions in envtune's words: memory settings, memory system, final-answer format.

BFCL adds three things to an agentic entry's system prompt: the scenario's assistant role, how the
memory system works together with the current core memory (memory entries), and the required shape
of the final answer (questions only). envtune says the same after its own tool-calling protocol
(``protocol.system_prompt``); the answer goes inside ``<answer>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

SCENARIO_ROLES: Mapping[str, str] = MappingProxyType(
    {
        "student": "You support a college student academically. Keep track of the personal and academic "
        "details they share across sessions and use them to answer questions and give advice.",
        "customer": "You are the customer-support assistant of an online shop. Keep track of what customers "
        "tell you about themselves, their orders and preferences across conversations, and help them "
        "consistently.",
        "finance": "You are the executive assistant of a senior finance professional. Keep track of personal "
        "and professional facts, goals, past decisions and family matters across sessions, and give "
        "well-informed, consistent guidance.",
        "healthcare": "You assist a patient across medical appointments. Keep track of their history, "
        "treatment plans and preferences, and give coherent reminders and guidance.",
        "notetaker": "You are a personal organizer. Capture tasks, deadlines and preferences from "
        "conversations and use them for reliable reminders and answers later.",
    }
)

_CORE_ARCHIVAL = """\
{role}

Your memory persists across conversations with this user and has two parts. Core memory is small and
always shown to you (below). Archival memory is much larger but stays outside this conversation until you
search or retrieve from it. Manage both with the memory tools: record what matters, keep it current, and
organise it so it is easy to find when the user comes back.

Core memory from earlier conversations:
{memory}"""

_UNIFIED = """\
{role}

Your memory persists across conversations with this user. Manage it with the memory tools: record what
matters, keep it current, and organise it so it is easy to find when the user comes back.

Memory from earlier conversations:
{memory}"""

ANSWER_FORMAT = """\
Final answer format: inside <answer></answer>, write {'answer': 'a short, precise answer', 'context': 'a
brief explanation of how you found it'}. If you do not know, write {'answer': 'I do not know', 'context':
'I do not know'}. If the question cannot be answered properly, write {'answer': 'I cannot answer this
question', 'context': 'the reason'}."""


def memory_instruction(backend: str, scenario: str, memory_dump: str) -> str:
    """The memory part of the system prompt (BFCL: core/archival backends vs the unified one)."""
    template = _UNIFIED if backend == "rec_sum" else _CORE_ARCHIVAL
    return template.format(role=SCENARIO_ROLES[scenario], memory=memory_dump)
