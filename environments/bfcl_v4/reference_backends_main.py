"""Reference runner for BFCL V4's own memory classes: runs *inside the OOD extra environment* only.

Conformance checks compare envtune's memory backends with BFCL's ``MemoryAPI_kv``, ``MemoryAPI_rec_sum``
and ``MemoryAPI_vector`` (``bfcl-eval==2026.3.23``, installed there with ``--no-deps``). This script
reads one JSON request per line — a backend, a list of calls, and for the vector backend the embedding
of every text — plays the calls on a fresh BFCL instance, renders each result as BFCL's executor does,
and answers with the results and the final memory. It imports ``bfcl_eval`` and never envtune.

BFCL's vector module loads all-MiniLM-L6-v2 from the hub at import; here a stand-in
``sentence_transformers`` module returns the vectors given in the request, so BFCL's own store and
FAISS index run on envtune's embeddings.
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any


def _install_embedding_stub(table: dict[str, list[float]], dimension: int) -> None:
    import numpy as np

    class SentenceTransformer:
        def __init__(self, name: str, device: str = "cpu") -> None:
            self.name = name

        def get_sentence_embedding_dimension(self) -> int:
            return dimension

        def encode(self, texts: list[str], normalize_embeddings: bool = True) -> Any:
            return np.asarray([table[text] for text in texts], dtype=np.float32)

    module = types.ModuleType("sentence_transformers")
    module.SentenceTransformer = SentenceTransformer  # type: ignore[attr-defined]
    sys.modules["sentence_transformers"] = module


def _render(value: Any) -> str:
    """BFCL's ``execute_multi_turn_func_call`` rendering of a result."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except Exception:
            return str(value)
    return str(value)


def run(request: dict[str, Any], table: dict[str, list[float]]) -> dict[str, Any]:
    backend = request["backend"]
    if backend == "kv":
        from bfcl_eval.eval_checker.multi_turn_eval.func_source_code.memory_kv import MemoryAPI_kv as cls
    elif backend == "rec_sum":
        from bfcl_eval.eval_checker.multi_turn_eval.func_source_code.memory_rec_sum import (
            MemoryAPI_rec_sum as cls,
        )
    else:
        table.clear()
        table.update(request["embeddings"])
        from bfcl_eval.eval_checker.multi_turn_eval.func_source_code.memory_vector import (
            MemoryAPI_vector as cls,
        )
    instance = cls()
    results = []
    for call in request["calls"]:
        try:
            results.append(_render(getattr(instance, call["name"])(**call["arguments"])))
        except Exception as exc:
            results.append(f"Error during execution: {exc}")
    if backend == "kv":
        state = {"core_memory": instance.core_memory, "archival_memory": instance.archival_memory}
    elif backend == "rec_sum":
        state = {"memory": instance.memory}
    else:
        state = {
            "core_memory": instance.core_memory.export(),
            "archival_memory": instance.archival_memory.export(),
        }
    return {
        "results": results,
        "state": json.loads(json.dumps(state)),
        "context": instance._dump_core_memory_to_context(),
    }


def main() -> int:
    table: dict[str, list[float]] = {}
    _install_embedding_stub(table, int(sys.argv[1]) if len(sys.argv) > 1 else 384)
    for line in sys.stdin:
        try:
            reply = {"ok": True, "result": run(json.loads(line), table)}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
