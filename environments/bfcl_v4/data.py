"""BFCL V4 memory and web-search tasks, read from the pinned ``bfcl-eval==2026.3.23`` wheel.

What BFCL's own loader does to these files is reproduced here in plain data: memory questions and
their prerequisite conversations get the backend's category in their ids (``memory_kv_0-customer-0``,
``memory_kv_prereq_0-customer-0``), each question depends on every prerequisite conversation of its
scenario, and web-search ids get the variant (``web_search_base_0``, ``web_search_no_snippet_0``).
Nothing of the wheel is imported; see ``environments/assets.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from envtune.environments.assets import BFCL_V4, AssetError, read_json_lines
from envtune.environments.types import FunctionDoc

DATA = "bfcl_eval/data/"
MEMORY_BACKENDS: tuple[str, ...] = ("kv", "vector", "rec_sum")
"""BFCL's three memory backends (category ``memory_<backend>``)."""
MEMORY_SCENARIOS: tuple[str, ...] = ("customer", "healthcare", "finance", "student", "notetaker")
"""The five memory scenarios, each with its chain of prerequisite conversations."""
WEB_SEARCH_VARIANTS: tuple[str, ...] = ("base", "no_snippet")
"""The two web-search categories: snippets shown, or hidden."""

BACKEND_CLASSES: Mapping[str, str] = MappingProxyType(
    {"kv": "MemoryAPI_kv", "vector": "MemoryAPI_vector", "rec_sum": "MemoryAPI_rec_sum"}
)
"""Backend -> BFCL's class name (the ``class_name`` of its function docs)."""
WEB_SEARCH_CLASS = "WebSearchAPI"

_DOC_FILES: Mapping[str, str] = MappingProxyType(
    {
        "MemoryAPI_kv": "memory_kv.json",
        "MemoryAPI_vector": "memory_vector.json",
        "MemoryAPI_rec_sum": "memory_rec_sum.json",
        WEB_SEARCH_CLASS: "web_search.json",
    }
)
EXPECTED_COUNTS: Mapping[str, int] = MappingProxyType({"memory": 155, "web_search": 100})


@dataclass(frozen=True, slots=True)
class AgenticTask:
    """One BFCL V4 entry: a scored question, or an unscored memory prerequisite conversation."""

    id: str
    """BFCL's id with the category spliced in, e.g. ``memory_kv_3-customer-3``."""
    category: str
    """``memory_kv``/``memory_vector``/``memory_rec_sum`` or ``web_search_base``/``web_search_no_snippet``."""
    kind: Literal["question", "prereq"]
    """A question is judged on its final answer; a prerequisite conversation only fills memory."""
    turns: tuple[tuple[str, ...], ...]
    """User messages per turn (questions have exactly one turn)."""
    answers: tuple[str, ...]
    """BFCL's possible answers (any one found in the final answer passes); empty for prerequisites."""
    scenario: str | None = None
    """Memory scenario (``customer`` …); None for web search."""
    depends_on: tuple[str, ...] = ()
    """Ids that must have run to completion first (BFCL's ``depends_on``)."""
    chain_index: int = 0
    """Position of a prerequisite conversation in its scenario's chain."""
    sources: tuple[Mapping[str, Any], ...] = ()
    """Web search: BFCL's per-hop annotations (subquestion, answer, source URL)."""

    @property
    def scored(self) -> bool:
        return self.kind == "question"


def _user_turns(raw_turns: list[list[dict[str, Any]]], task_id: str) -> tuple[tuple[str, ...], ...]:
    turns = []
    for turn in raw_turns:
        messages = tuple(m["content"] for m in turn if m.get("role") == "user")
        if not messages:
            raise AssetError(f"{task_id}: a turn without a user message")
        turns.append(messages)
    return tuple(turns)


@functools.cache
def _memory_answers() -> Mapping[str, tuple[str, ...]]:
    rows = read_json_lines(BFCL_V4, DATA + "possible_answer/BFCL_v4_memory.json")
    return MappingProxyType({row["id"]: tuple(str(a) for a in row["ground_truth"]) for row in rows})


@functools.cache
def memory_tasks(backend: str) -> Mapping[str, AgenticTask]:
    """Prerequisite conversations (chain order per scenario) then the 155 questions, by id."""
    if backend not in MEMORY_BACKENDS:
        raise ValueError(f"unknown memory backend {backend!r}; expected one of {MEMORY_BACKENDS}")
    category = f"memory_{backend}"
    answers = _memory_answers()
    tasks: dict[str, AgenticTask] = {}
    chains: dict[str, tuple[str, ...]] = {}
    for scenario in MEMORY_SCENARIOS:
        chain: list[str] = []
        rows = read_json_lines(BFCL_V4, DATA + f"memory_prereq_conversation/memory_{scenario}.json")
        for index, row in enumerate(rows):
            task_id = row["id"].replace("memory", category, 1)
            tasks[task_id] = AgenticTask(
                id=task_id,
                category=category,
                kind="prereq",
                turns=_user_turns(row["question"], task_id),
                answers=(),
                scenario=scenario,
                depends_on=tuple(chain),
                chain_index=index,
            )
            chain.append(task_id)
        chains[scenario] = tuple(chain)
    questions = read_json_lines(BFCL_V4, DATA + "BFCL_v4_memory.json")
    if len(questions) != EXPECTED_COUNTS["memory"]:
        raise AssetError(f"expected {EXPECTED_COUNTS['memory']} memory questions, found {len(questions)}")
    for row in questions:
        scenario = row["scenario"]
        if scenario not in chains:
            raise AssetError(f"{row['id']}: unknown memory scenario {scenario!r}")
        if row["id"] not in answers:
            raise AssetError(f"{row['id']} has no possible answer")
        task_id = row["id"].replace("memory", category, 1)
        tasks[task_id] = AgenticTask(
            id=task_id,
            category=category,
            kind="question",
            turns=_user_turns(row["question"], task_id),
            answers=answers[row["id"]],
            scenario=scenario,
            depends_on=chains[scenario],
        )
    return MappingProxyType(tasks)


@functools.cache
def web_search_tasks(variant: str) -> Mapping[str, AgenticTask]:
    """The 100 web-search questions of one variant, by id."""
    if variant not in WEB_SEARCH_VARIANTS:
        raise ValueError(f"unknown web-search variant {variant!r}; expected one of {WEB_SEARCH_VARIANTS}")
    category = f"web_search_{variant}"
    answers = {
        row["id"]: row for row in read_json_lines(BFCL_V4, DATA + "possible_answer/BFCL_v4_web_search.json")
    }
    rows = read_json_lines(BFCL_V4, DATA + "BFCL_v4_web_search.json")
    if len(rows) != EXPECTED_COUNTS["web_search"]:
        raise AssetError(f"expected {EXPECTED_COUNTS['web_search']} web-search tasks, found {len(rows)}")
    tasks: dict[str, AgenticTask] = {}
    for row in rows:
        answer = answers.get(row["id"])
        if answer is None:
            raise AssetError(f"{row['id']} has no possible answer")
        task_id = row["id"].replace("web_search", category, 1)
        tasks[task_id] = AgenticTask(
            id=task_id,
            category=category,
            kind="question",
            turns=_user_turns(row["question"], task_id),
            answers=tuple(str(a) for a in answer["ground_truth"]),
            sources=tuple(MappingProxyType(dict(hop)) for hop in answer.get("source", ())),
        )
    return MappingProxyType(tasks)


@functools.cache
def class_docs(class_name: str) -> tuple[FunctionDoc, ...]:
    """BFCL's function docs of one V4 class, in file order."""
    if class_name not in _DOC_FILES:
        raise KeyError(f"unknown BFCL V4 class {class_name!r}")
    rows = read_json_lines(BFCL_V4, DATA + "multi_turn_func_doc/" + _DOC_FILES[class_name])
    return tuple(
        FunctionDoc(
            name=row["name"],
            class_name=class_name,
            description=row.get("description", ""),
            parameters=row.get("parameters", {"type": "dict", "properties": {}, "required": []}),
        )
        for row in rows
    )
