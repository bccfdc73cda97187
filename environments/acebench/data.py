"""ACEBench agent tasks, read from a user-supplied ACEBench checkout (no package ships them).

The layout is the public repository's (github.com/ACEBench/ACEBench, read at commit e6db74b):

    data_all/data_{en,zh}/data_agent_multi_turn.json     30 tasks, one JSON object per line:
    data_all/data_{en,zh}/data_agent_multi_step.json     20 tasks  id, question, initial_config,
                                                                   involved_classes, function, path
    data_all/data_{en,zh}/possible_answer/<same names>   id, ground_truth (a list of
                                                          {ClassName: {attribute: value}}), mile_stone
    model_inference/multi_turn/multi_turn_utils.py       CLASS_FILE_PATH_MAPPING_{EN,ZH}: class -> module
    model_inference/multi_step/multi_step_utils.py       the same for multi-step
    model_inference/common_inference.py                  SAVED_CLASS: class -> attributes compared

The scenario classes (what the tools do, and the state they start from) are code of the checkout;
envtune runs them only in a child process (``worker_main.py``). The two mappings above are read from
the checkout's source as literals (``ast.literal_eval``), never imported here.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from envtune.environments.types import FunctionDoc

CATEGORIES: tuple[str, ...] = ("agent_multi_turn", "agent_multi_step")
LANGUAGES: tuple[str, ...] = ("en", "zh")
_UTILS = {
    "agent_multi_turn": "model_inference/multi_turn/multi_turn_utils.py",
    "agent_multi_step": "model_inference/multi_step/multi_step_utils.py",
}
_SAVED = "model_inference/common_inference.py"


class AceBenchDataError(ValueError):
    """The folder is not an ACEBench checkout in the expected layout."""


@dataclass(frozen=True, slots=True)
class AceTask:
    """One ACEBench agent task."""

    id: str
    category: str
    """``agent_multi_turn`` (a simulated user gives the goal over a conversation) or ``agent_multi_step``."""
    question: str
    """Multi-turn: the user simulator's instruction. Multi-step: the user's request to the agent."""
    initial_config: Mapping[str, Any]
    involved_classes: tuple[str, ...]
    functions: tuple[FunctionDoc, ...]
    ground_truth: tuple[Mapping[str, Any], ...]
    """The expected end state: one ``{ClassName: {attribute: value}}`` per involved class."""
    milestones: tuple[tuple[str, ...], ...]
    """Acceptable call sequences (one, or several alternatives), as ACEBench writes the calls."""

    def initial_config_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(_thaw(self.initial_config)))

    def ground_truth_json(self) -> list[dict[str, Any]]:
        """The expected end state as plain JSON values (what ACEBench's checker compares)."""
        return json.loads(json.dumps(_thaw(self.ground_truth)))


@dataclass(frozen=True, slots=True)
class Layout:
    """What the checkout says about its classes."""

    modules: Mapping[str, Mapping[str, str]]
    """Category -> class name -> dotted module path (inside the checkout)."""
    saved_attributes: Mapping[str, tuple[str, ...]]
    """Class name -> the attributes ACEBench compares with the ground truth."""


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _literal(root: Path, relative: str, name: str) -> Any:
    path = root / relative
    if not path.is_file():
        raise AceBenchDataError(f"{root} has no {relative} (is it an ACEBench checkout?)")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            try:
                return ast.literal_eval(node.value)
            except ValueError as exc:
                raise AceBenchDataError(f"{relative}: {name} is not a literal") from exc
    raise AceBenchDataError(f"{relative} defines no {name}")


def load_layout(root: Path, language: str = "en") -> Layout:
    if language not in LANGUAGES:
        raise AceBenchDataError(f"unknown language {language!r}; expected one of {LANGUAGES}")
    modules = {
        category: MappingProxyType(
            dict(_literal(root, relative, f"CLASS_FILE_PATH_MAPPING_{language.upper()}"))
        )
        for category, relative in _UTILS.items()
    }
    saved = {str(k): tuple(v) for k, v in _literal(root, _SAVED, "SAVED_CLASS").items()}
    return Layout(modules=MappingProxyType(modules), saved_attributes=MappingProxyType(saved))


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise AceBenchDataError(f"missing ACEBench data file {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AceBenchDataError(f"{path}:{number}: {exc}") from exc
    return rows


def load_tasks(root: Path, language: str = "en") -> Mapping[str, AceTask]:
    """Both agent categories of one language, by id."""
    folder = Path(root) / "data_all" / f"data_{language}"
    tasks: dict[str, AceTask] = {}
    for category in CATEGORIES:
        answers = {row["id"]: row for row in _rows(folder / "possible_answer" / f"data_{category}.json")}
        for row in _rows(folder / f"data_{category}.json"):
            answer = answers.get(row["id"])
            if answer is None:
                raise AceBenchDataError(f"{row['id']} has no possible answer")
            truth = answer["ground_truth"]
            milestones = answer.get("mile_stone") or []
            if milestones and isinstance(milestones[0], list):
                alternatives = tuple(tuple(str(m) for m in alt) for alt in milestones)
            else:
                alternatives = (tuple(str(m) for m in milestones),)
            tasks[row["id"]] = AceTask(
                id=row["id"],
                category=category,
                question=str(row["question"]),
                initial_config=_freeze(row.get("initial_config") or {}),
                involved_classes=tuple(row["involved_classes"]),
                functions=tuple(
                    FunctionDoc(
                        name=f["name"],
                        class_name="acebench",
                        description=f.get("description", ""),
                        parameters=f.get("parameters", {"type": "dict", "properties": {}}),
                    )
                    for f in row.get("function", ())
                ),
                ground_truth=tuple(_freeze(item) for item in (truth if isinstance(truth, list) else [truth])),
                milestones=alternatives,
            )
    return MappingProxyType(tasks)
