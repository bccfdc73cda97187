"""BFCL V3 multi-turn tasks, their function docs, and envtune's fixed train/test split.

Data comes from the ``bfcl-eval==2025.6.13`` package (BFCL V3: the data the paper used). The split
is written once to ``environments/data/split_v1.json`` and read from there, so it never drifts; the
validation subset that drives curriculum decisions is carved out of the *training* side only.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from envtune.environments.types import FunctionDoc

CATEGORIES: tuple[str, ...] = ("base", "miss_func", "miss_param", "long_context")
"""The four BFCL V3 multi-turn categories, 200 tasks each."""

CLASS_DOC_FILES: Mapping[str, str] = MappingProxyType(
    {
        "GorillaFileSystem": "gorilla_file_system.json",
        "MathAPI": "math_api.json",
        "MessageAPI": "message_api.json",
        "TwitterAPI": "posting_api.json",
        "TicketAPI": "ticket_api.json",
        "TradingBot": "trading_bot.json",
        "TravelAPI": "travel_booking.json",
        "VehicleControlAPI": "vehicle_control.json",
    }
)
"""BFCL class name -> its function-doc file in the package data."""

SPLIT_MANIFEST = Path(__file__).parent / "data" / "split_v1.json"
SPLIT_SEED = "envtune-split-v1"
TRAIN_PER_CATEGORY = 100
VALIDATION_PER_CATEGORY = 10


class TaskDataError(RuntimeError):
    """The BFCL data is missing or not the V3 release envtune expects."""


@dataclass(frozen=True, slots=True)
class Task:
    """One BFCL multi-turn task with its ground truth."""

    id: str
    """BFCL id, e.g. ``multi_turn_base_0``."""
    category: str
    """One of ``CATEGORIES``."""
    questions: tuple[tuple[str, ...], ...]
    """User messages per turn; an empty tuple is a turn that only reveals missed functions."""
    initial_config: Mapping[str, Any]
    """Per-class scenario, loaded with ``_load_scenario`` (never mutated: episodes deep-copy it)."""
    involved_classes: tuple[str, ...]
    """BFCL classes the task uses."""
    ground_truth: tuple[tuple[str, ...], ...]
    """Ground-truth calls per turn, in BFCL's pythonic form; an empty turn must not call."""
    missed_function: Mapping[int, tuple[str, ...]]
    """Turn index -> functions hidden until that turn (miss_func tasks)."""
    excluded_function: tuple[str, ...] = ()
    """Functions never visible nor callable in this task."""
    config_json: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Class name -> its scenario as JSON text: ``json.loads`` of it is a fresh private copy, made in C
    (several times faster than a deep copy of nested Python objects, paid by every episode)."""

    def fresh_config(self, class_name: str) -> dict[str, Any]:
        """A new, mutable copy of one class's scenario (what ``_load_scenario`` may mutate)."""
        text = self.config_json.get(class_name)
        return json.loads(text) if text is not None else {}

    @property
    def num_turns(self) -> int:
        return len(self.ground_truth)

    def hidden_functions(self, turn: int) -> frozenset[str]:
        """Functions invisible and uncallable during ``turn``: excluded ones, and missed ones not
        yet revealed. One V3 data defect is corrected from the data itself: a missed function that
        the ground truth calls *before* its reveal turn (``multi_turn_miss_func_49`` calls ``tail``
        at turn 1, revealed at turn 3) cannot be missing, so it is visible from the start."""
        hidden = set(self.excluded_function)
        for reveal_turn, names in self.missed_function.items():
            if reveal_turn <= turn:
                continue
            used_before = {
                call.split("(", 1)[0].strip()
                for gt_turn in self.ground_truth[:reveal_turn]
                for call in gt_turn
            }
            hidden.update(name for name in names if name not in used_before)
        return frozenset(hidden)

    @property
    def long_context(self) -> bool:
        """BFCL loads long-context scenarios for this category (and only this one)."""
        return self.category == "long_context"


def _data_dir() -> Path:
    try:
        root = importlib.resources.files("bfcl_eval") / "data"
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise TaskDataError(
            "bfcl-eval is not installed; run `make setup` (it installs bfcl-eval==2025.6.13 --no-deps)"
        ) from exc
    return Path(str(root))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise TaskDataError(f"missing BFCL data file {path}; is bfcl-eval==2025.6.13 installed?")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _freeze(value: Any) -> Any:
    """Read-only view of nested JSON (dicts become mapping proxies, lists tuples)."""
    if isinstance(value, dict):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """A fresh mutable deep copy of a frozen JSON value (what ``_load_scenario`` is given)."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


@functools.cache
def load_tasks() -> Mapping[str, Task]:
    """All 800 V3 multi-turn tasks by id, in the package's order (loaded once per process)."""
    data_dir = _data_dir()
    tasks: dict[str, Task] = {}
    for category in CATEGORIES:
        entries = _read_jsonl(data_dir / f"BFCL_v3_multi_turn_{category}.json")
        answers = {
            row["id"]: row["ground_truth"]
            for row in _read_jsonl(data_dir / "possible_answer" / f"BFCL_v3_multi_turn_{category}.json")
        }
        for entry in entries:
            task_id = entry["id"]
            if task_id not in answers:
                raise TaskDataError(f"{task_id} has no ground truth in the package data")
            ground_truth = answers[task_id]
            questions = entry["question"]
            if len(questions) != len(ground_truth):
                raise TaskDataError(f"{task_id}: {len(questions)} turns but {len(ground_truth)} GT turns")
            tasks[task_id] = Task(
                id=task_id,
                category=category,
                questions=tuple(
                    tuple(message["content"] for message in turn if message.get("role") == "user")
                    for turn in questions
                ),
                initial_config=_freeze(entry["initial_config"]),
                involved_classes=tuple(entry["involved_classes"]),
                ground_truth=tuple(tuple(turn) for turn in ground_truth),
                missed_function=MappingProxyType(
                    {int(turn): tuple(names) for turn, names in entry.get("missed_function", {}).items()}
                ),
                excluded_function=tuple(entry.get("excluded_function", ())),
                config_json=MappingProxyType(
                    {name: json.dumps(config) for name, config in entry["initial_config"].items()}
                ),
            )
    if len(tasks) != 800:
        raise TaskDataError(f"expected 800 BFCL V3 multi-turn tasks, found {len(tasks)}")
    return MappingProxyType(tasks)


@functools.cache
def load_function_docs() -> Mapping[str, FunctionDoc]:
    """Every BFCL multi-turn function doc by function name (129 functions, names are unique)."""
    docs: dict[str, FunctionDoc] = {}
    for class_name, file_name in CLASS_DOC_FILES.items():
        for raw in _read_jsonl(_data_dir() / "multi_turn_func_doc" / file_name):
            name = raw["name"]
            if name in docs:
                raise TaskDataError(
                    f"function {name} documented twice ({docs[name].class_name}, {class_name})"
                )
            docs[name] = FunctionDoc(
                name=name,
                class_name=class_name,
                description=raw.get("description", ""),
                parameters=raw.get("parameters", {"type": "dict", "properties": {}, "required": []}),
            )
    return MappingProxyType(docs)


def class_function_docs(class_names: Iterable[str]) -> tuple[FunctionDoc, ...]:
    """The docs of every function of the given classes, in BFCL's file order."""
    wanted = set(class_names)
    unknown = wanted - set(CLASS_DOC_FILES)
    if unknown:
        raise TaskDataError(f"unknown BFCL classes {sorted(unknown)}")
    return tuple(doc for doc in load_function_docs().values() if doc.class_name in wanted)


@functools.cache
def visible_docs(class_names: tuple[str, ...], hidden: frozenset[str]) -> Mapping[str, FunctionDoc]:
    """Name -> doc of every function of the classes that is not hidden (cached: episodes share it)."""
    return MappingProxyType(
        {doc.name: doc for doc in class_function_docs(class_names) if doc.name not in hidden}
    )


@functools.cache
def visible_function_classes(class_names: tuple[str, ...], hidden: frozenset[str]) -> Mapping[str, str]:
    """Name -> class name of every visible function (the episode's dispatch whitelist, shared)."""
    return MappingProxyType({name: doc.class_name for name, doc in visible_docs(class_names, hidden).items()})


# --- the split --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Split:
    """envtune's fixed split of the 800 tasks."""

    train: tuple[str, ...]
    """400 ids, 100 per category (the paper's training size)."""
    test: tuple[str, ...]
    """The other 400 ids: only for final evaluation, never for curriculum decisions."""
    validation: tuple[str, ...]
    """40 ids, 10 per category, taken from ``train``: what promotion rules look at."""

    def ids(self, name: str) -> tuple[str, ...]:
        """Ids of a named part: ``train``, ``test``, ``validation`` or ``train_minus_validation``."""
        if name == "train_minus_validation":
            held_out = set(self.validation)
            return tuple(task_id for task_id in self.train if task_id not in held_out)
        if name not in ("train", "test", "validation"):
            raise ValueError(
                f"unknown split part {name!r}; expected train, test, validation or train_minus_validation"
            )
        ids: tuple[str, ...] = getattr(self, name)
        return ids


def _rank(task_id: str, salt: str) -> str:
    return hashlib.sha256(f"{SPLIT_SEED}:{salt}:{task_id}".encode()).hexdigest()


def compute_split(tasks: Mapping[str, Task]) -> Split:
    """The deterministic split: per category, ids ranked by a salted SHA-256, first 100 train."""
    train: list[str] = []
    test: list[str] = []
    validation: list[str] = []
    for category in CATEGORIES:
        ids = sorted(
            (t.id for t in tasks.values() if t.category == category), key=lambda i: _rank(i, "split")
        )
        if len(ids) < 2 * TRAIN_PER_CATEGORY:
            raise TaskDataError(f"category {category} has {len(ids)} tasks, expected 200")
        category_train = ids[:TRAIN_PER_CATEGORY]
        train.extend(category_train)
        test.extend(ids[TRAIN_PER_CATEGORY:])
        validation.extend(
            sorted(category_train, key=lambda i: _rank(i, "validation"))[:VALIDATION_PER_CATEGORY]
        )
    return Split(train=tuple(train), test=tuple(test), validation=tuple(validation))


def write_split_manifest(split: Split, path: Path = SPLIT_MANIFEST) -> None:
    """Write the manifest (used once, by ``python -m envtune.environments.tasks --write-split``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "seed": SPLIT_SEED,
        "source": "bfcl-eval==2025.6.13 BFCL_v3_multi_turn_{base,miss_func,miss_param,long_context}",
        "train": list(split.train),
        "validation": list(split.validation),
        "test": list(split.test),
    }
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


@functools.cache
def load_split(path: Path = SPLIT_MANIFEST) -> Split:
    """The committed split manifest, checked for sizes and disjointness."""
    if not path.exists():
        raise TaskDataError(f"split manifest {path} is missing")
    raw = json.loads(path.read_text(encoding="utf-8"))
    split = Split(train=tuple(raw["train"]), test=tuple(raw["test"]), validation=tuple(raw["validation"]))
    if set(split.train) & set(split.test):
        raise TaskDataError("split manifest: train and test overlap")
    if not set(split.validation) <= set(split.train):
        raise TaskDataError("split manifest: validation must come from the training side")
    if len(split.train) != 4 * TRAIN_PER_CATEGORY or len(split.test) != 4 * TRAIN_PER_CATEGORY:
        raise TaskDataError("split manifest: expected 400 train and 400 test ids")
    return split


def main() -> None:  # pragma: no cover - maintenance entry point
    import argparse

    parser = argparse.ArgumentParser(description="Write or check envtune's split manifest.")
    parser.add_argument("--write-split", action="store_true", help="(re)write the manifest from the data")
    args = parser.parse_args()
    split = compute_split(load_tasks())
    if args.write_split:
        write_split_manifest(split)
        print(f"wrote {SPLIT_MANIFEST}")
    else:
        print("manifest matches the data" if load_split() == split else "manifest differs from the data")


if __name__ == "__main__":  # pragma: no cover
    main()
