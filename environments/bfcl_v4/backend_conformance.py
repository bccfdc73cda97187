"""Do envtune's memory backends behave like BFCL's classes? Random call sequences, both sides.

``random_calls`` draws schema-valid calls (what reaches a backend after ``schemas.validate_call``):
valid and invalid keys, values around the length limits, duplicates, missing keys and ids, searches
with various ``k``/``top_k``, clears. ``compare`` plays a sequence on envtune's backend and, through
``reference_backends_main.py`` in the OOD extra environment, on BFCL's own class, then compares every
rendered result, the final memory and the core-memory text of the system prompt. Vector scores are
compared to 1e-5 (BFCL's FAISS index computes in float32, envtune in float64); the vector backends run
on the same embeddings (envtune's hashing embedder), since BFCL's MiniLM model is a hub download.

Not covered here, on purpose: ``memory_replace`` floods beyond ``MAX_REPLACED_MEMORY_CHARS`` (envtune
refuses what BFCL would do) and ``top_k < 1`` (FAISS's own error text).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envtune.environments.bfcl_v4.embeddings import HashingEmbedder
from envtune.environments.bfcl_v4.memory_kv import KeyValueMemory
from envtune.environments.bfcl_v4.memory_rec_sum import RecursiveSummaryMemory
from envtune.environments.bfcl_v4.memory_vector import VectorMemory
from envtune.environments.instances import ERROR_PREFIX, result_to_string

REFERENCE_SCRIPT = Path(__file__).with_name("reference_backends_main.py")
_WORDS = (
    "coffee",
    "machine",
    "espresso",
    "seattle",
    "designer",
    "budget",
    "discount",
    "steel",
    "order",
    "refund",
    "warranty",
    "delivery",
    "student",
    "exam",
    "physics",
    "deadline",
    "reminder",
    "doctor",
    "allergy",
    "insulin",
    "portfolio",
    "bond",
    "dividend",
    "family",
)


def _text(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 12))]
    text = " ".join(words)
    target = rng.randint(low, high)
    return (
        (text + " ") * (target // (len(text) + 1)) + text[: target % (len(text) + 1)]
        if target > len(text)
        else text
    )


_KEYS = (
    "user_name",
    "favorite_drink",
    "order_42",
    "city",
    "Bad Key",
    "a-b",
    "x",
    "key_",
    "_k",
    "k9_z",
    "n\n",
)
"""Valid snake_case keys, and keys BFCL refuses (spaces, hyphens, edges, a trailing newline it accepts)."""


def _key(rng: random.Random) -> str:
    return rng.choice([*_KEYS, f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}"])


def random_calls(backend: str, rng: random.Random, count: int) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for _ in range(count):
        if backend == "kv":
            store = rng.choice(["core", "archival"])
            limit = 300 if store == "core" else 2000
            op = rng.choice(
                ["add", "add", "add", "remove", "replace", "retrieve", "list_keys", "key_search", "clear"]
            )
            args: dict[str, Any]
            if op == "add" or op == "replace":
                args = {"key": _key(rng), "value": _text(rng, 1, limit + 20)}
            elif op in ("remove", "retrieve"):
                args = {"key": _key(rng)}
            elif op == "key_search":
                args = {"query": _text(rng, 3, 40), "k": rng.choice([1, 3, 5, 0, -1, 100])}
            else:
                args = {}
            if op == "clear" and rng.random() < 0.7:
                op, args = "list_keys", {}
            calls.append({"name": f"{store}_memory_{op}", "arguments": args})
            if store == "core" and rng.random() < 0.1:
                calls.append({"name": "core_memory_retrieve_all", "arguments": {}})
        elif backend == "rec_sum":
            op = rng.choice(["append", "append", "update", "replace", "retrieve", "clear"])
            if op == "append":
                args = {"text": _text(rng, 1, 3000)}
            elif op == "update":
                args = {"text": _text(rng, 1, 10_050)}
            elif op == "replace":
                # one word for another: growth stays far below envtune's flood bound (see the docstring)
                args = {"old_text": rng.choice([*_WORDS, "missing words"]), "new_text": rng.choice(_WORDS)}
            else:
                args = {}
            if op == "clear" and rng.random() < 0.7:
                op, args = "retrieve", {}
            calls.append({"name": f"memory_{op}", "arguments": args})
        else:
            store = rng.choice(["core", "archival"])
            limit = 300 if store == "core" else 2000
            op = rng.choice(["add", "add", "add", "remove", "update", "retrieve", "retrieve_all", "clear"])
            if op == "add":
                args = {"text": _text(rng, 5, limit + 20) + f" #{len(calls)}"}
            elif op == "remove":
                args = {"vec_id": rng.randint(0, 12)}
            elif op == "update":
                args = {
                    "vec_id": rng.randint(0, 12),
                    "new_text": _text(rng, 5, limit + 20) + f" #{len(calls)}",
                }
            elif op == "retrieve":
                args = {"query": _text(rng, 3, 40), "top_k": rng.randint(1, 8)}
            else:
                args = {}
            if op == "clear" and rng.random() < 0.8:
                op, args = "retrieve_all", {}
            calls.append({"name": f"{store}_memory_{op}", "arguments": args})
    return calls


def _play_envtune(backend: str, calls: Sequence[dict[str, Any]], embedder: HashingEmbedder) -> dict[str, Any]:
    memory: Any = {"kv": KeyValueMemory, "rec_sum": RecursiveSummaryMemory}.get(backend)
    memory = memory() if memory is not None else VectorMemory(embedder)
    results = []
    for call in calls:
        try:
            results.append(result_to_string(getattr(memory, call["name"])(**call["arguments"])))
        except Exception as exc:
            results.append(f"{ERROR_PREFIX}{exc}")
    return {
        "results": results,
        "state": json.loads(json.dumps(memory._export())),
        "context": memory._context_dump(),
    }


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, abs_tol=1e-5)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def _same_ranking(ours: list[Any], theirs: list[Any]) -> bool:
    """Vector search results equal up to FAISS's order among equal scores.

    Entries are grouped by score (to 1e-5); every group must hold the same ids, except the lowest one,
    which may be cut by ``top_k`` at a different member of the tie and must only have the same size.
    """
    if len(ours) != len(theirs):
        return False

    def groups(items: list[Any]) -> list[tuple[float, set[Any]]]:
        result: list[tuple[float, set[Any]]] = []
        for item in sorted(items, key=lambda entry: -entry["similarity_score"]):
            if result and math.isclose(result[-1][0], item["similarity_score"], abs_tol=1e-5):
                result[-1][1].add((item["id"], item["text"]))
            else:
                result.append((item["similarity_score"], {(item["id"], item["text"])}))
        return result

    a, b = groups(ours), groups(theirs)
    if len(a) != len(b):
        return False
    for index, ((score_a, ids_a), (score_b, ids_b)) in enumerate(zip(a, b, strict=True)):
        if not math.isclose(score_a, score_b, abs_tol=1e-5):
            return False
        if (index < len(a) - 1 and ids_a != ids_b) or len(ids_a) != len(ids_b):
            return False
    return True


def same_result(ours: str, theirs: str, tolerant: bool) -> bool:
    if ours == theirs:
        return True
    if not tolerant:
        return False
    try:
        a, b = json.loads(ours), json.loads(theirs)
    except ValueError:
        return False
    if (
        isinstance(a, dict)
        and isinstance(b, dict)
        and isinstance(a.get("result"), list)
        and isinstance(b.get("result"), list)
        and all(isinstance(e, dict) and "similarity_score" in e for e in a["result"] + b["result"])
    ):
        return a.keys() == b.keys() and _same_ranking(a["result"], b["result"])
    return _close(a, b)


@dataclass(frozen=True, slots=True)
class BackendComparison:
    backend: str
    calls: int
    mismatches: tuple[tuple[int, str, str, str], ...]
    """(index, call name, envtune result, BFCL result) of every differing call."""
    state_equal: bool
    context_equal: bool

    @property
    def agree(self) -> bool:
        return not self.mismatches and self.state_equal and self.context_equal


class ReferenceBackends:
    """BFCL's memory classes in the OOD extra environment (one process, many sequences)."""

    def __init__(self, python: Path, dimension: int = 384) -> None:
        self._process = subprocess.Popen(
            [str(python), str(REFERENCE_SCRIPT), str(dimension)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def run(
        self, backend: str, calls: Sequence[dict[str, Any]], embeddings: dict[str, list[float]]
    ) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(
            json.dumps({"backend": backend, "calls": list(calls), "embeddings": embeddings}) + "\n"
        )
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the BFCL reference runner exited")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        return reply["result"]

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(timeout=30)


def compare(reference: ReferenceBackends, backend: str, calls: Sequence[dict[str, Any]]) -> BackendComparison:
    embedder = HashingEmbedder()
    embeddings: dict[str, list[float]] = {}
    if backend == "vector":
        for call in calls:
            for key in ("text", "new_text", "query"):
                text = call["arguments"].get(key)
                if isinstance(text, str):
                    embeddings[text] = embedder.embed([text])[0]
    ours = _play_envtune(backend, calls, embedder)
    theirs = reference.run(backend, calls, embeddings)
    tolerant = backend == "vector"
    mismatches = tuple(
        (i, call["name"], a, b)
        for i, (call, a, b) in enumerate(zip(calls, ours["results"], theirs["results"], strict=True))
        if not same_result(a, b, tolerant)
    )
    return BackendComparison(
        backend=backend,
        calls=len(calls),
        mismatches=mismatches,
        state_equal=_close(ours["state"], theirs["state"]),
        context_equal=ours["context"] == theirs["context"],
    )
