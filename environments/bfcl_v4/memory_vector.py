"""BFCL V4's vector memory backend: texts retrieved by embedding similarity.

The tools, limits, ids and messages of BFCL's ``MemoryAPI_vector``; the exact inner-product search of
its FAISS ``IndexFlatIP`` done in Python (at most 50 vectors). Embeddings come from an ``Embedder``
(see ``embeddings.py``: BFCL's MiniLM model is a hub download, so the offline default differs).

Kept from BFCL on purpose: ids are never reused except after ``clear``; an update moves the entry to
the end of the index (FAISS removes and re-adds it); a snapshot stores ``next_id`` and the texts and
re-embeds on load; the core memory shown in the system prompt is always the JSON of its store (BFCL's
emptiness check on the store object never fires).
"""

from __future__ import annotations

import json
import operator
from typing import Any

from envtune.environments.bfcl_v4.embeddings import Embedder

MAX_CORE_MEMORY_SIZE = 7
MAX_CORE_MEMORY_ENTRY_LENGTH = 300
MAX_ARCHIVAL_MEMORY_SIZE = 50
MAX_ARCHIVAL_MEMORY_ENTRY_LENGTH = 2000


class VectorStore:
    """A bounded id -> text store with an exact inner-product index."""

    __slots__ = ("_embedder", "_next_id", "_order", "_store", "_vectors", "max_length", "max_size")

    def __init__(self, embedder: Embedder, max_size: int, max_length: int) -> None:
        self._embedder = embedder
        self.max_size = max_size
        self.max_length = max_length
        self._store: dict[int, str] = {}
        self._vectors: dict[int, list[float]] = {}
        self._order: list[int] = []  # index order (FAISS's scan order)
        self._next_id = 0

    def add(self, text: str) -> dict[str, Any]:
        if len(text) > self.max_length:
            return {"error": f"Entry length exceeds maximum length of {self.max_length} characters."}
        if len(self._store) >= self.max_size:
            return {"error": f"Memory size exceeds maximum size of {self.max_size} entries."}
        vec_id = self._next_id
        self._next_id += 1
        (self._vectors[vec_id],) = self._embedder.embed([text])
        self._order.append(vec_id)
        self._store[vec_id] = text
        return {"id": vec_id}

    def remove(self, vec_id: int) -> dict[str, str]:
        if vec_id not in self._store:
            return {"error": f"ID {vec_id} not present in store."}
        self._order.remove(vec_id)
        del self._vectors[vec_id], self._store[vec_id]
        return {"status": f"ID {vec_id} removed from store."}

    def update(self, vec_id: int, new_text: str) -> dict[str, str]:
        if vec_id not in self._store:
            return {"error": f"ID {vec_id} not present in store."}
        if len(new_text) > self.max_length:
            return {"error": f"Entry length exceeds maximum length of {self.max_length} characters."}
        self._order.remove(vec_id)
        (self._vectors[vec_id],) = self._embedder.embed([new_text])
        self._order.append(vec_id)
        self._store[vec_id] = new_text
        return {"status": f"ID {vec_id} updated."}

    def clear(self) -> dict[str, str]:
        self._store.clear()
        self._vectors.clear()
        self._order.clear()
        self._next_id = 0
        return {"status": "Memory cleared."}

    def retrieve(self, query: str, top_k: int) -> list[dict[str, Any]]:
        if not self._store:
            return []
        if top_k < 1:
            raise ValueError(f"top_k must be a positive number of entries, got {top_k}")
        (query_vector,) = self._embedder.embed([query])
        scored = [
            (sum(map(operator.mul, query_vector, self._vectors[vec_id])), position, vec_id)
            for position, vec_id in enumerate(self._order)
        ]
        scored.sort(key=lambda item: (-item[0], item[1]))
        return [
            {"id": vec_id, "similarity_score": float(score), "text": self._store[vec_id]}
            for score, _, vec_id in scored[: min(top_k, len(self._store))]
        ]

    def retrieve_all(self) -> list[dict[str, Any]]:
        return [{"id": vec_id, "text": text} for vec_id, text in self._store.items()]

    def export(self) -> dict[str, Any]:
        # Through JSON, as BFCL's snapshot file does: ids become strings and are parsed back on load.
        return json.loads(json.dumps({"next_id": self._next_id, "store": self._store}))

    def load(self, snapshot: dict[str, Any]) -> None:
        self._next_id = int(snapshot["next_id"])
        self._store = {int(key): str(text) for key, text in snapshot["store"].items()}
        self._order = sorted(self._store)
        vectors = self._embedder.embed([self._store[vec_id] for vec_id in self._order]) if self._order else []
        self._vectors = dict(zip(self._order, vectors, strict=True))

    def store_json(self) -> str:
        return json.dumps(self._store, indent=4)


class VectorMemory:
    """The ``MemoryAPI_vector`` tools."""

    def __init__(self, embedder: Embedder) -> None:
        self._core = VectorStore(embedder, MAX_CORE_MEMORY_SIZE, MAX_CORE_MEMORY_ENTRY_LENGTH)
        self._archival = VectorStore(embedder, MAX_ARCHIVAL_MEMORY_SIZE, MAX_ARCHIVAL_MEMORY_ENTRY_LENGTH)

    def _export(self) -> dict[str, Any]:
        return {"core_memory": self._core.export(), "archival_memory": self._archival.export()}

    def _load(self, snapshot: dict[str, Any]) -> None:
        self._core.load(snapshot["core_memory"])
        self._archival.load(snapshot["archival_memory"])

    def _context_dump(self) -> str:
        return self._core.store_json()

    def core_memory_add(self, text: str) -> dict[str, Any]:
        return self._core.add(text)

    def core_memory_remove(self, vec_id: int) -> dict[str, str]:
        return self._core.remove(vec_id)

    def core_memory_update(self, vec_id: int, new_text: str) -> dict[str, str]:
        return self._core.update(vec_id, new_text)

    def core_memory_clear(self) -> dict[str, str]:
        return self._core.clear()

    def core_memory_retrieve(self, query: str, top_k: int = 5) -> dict[str, Any]:
        return {"result": self._core.retrieve(query, top_k)}

    def core_memory_retrieve_all(self) -> dict[str, Any]:
        return {"result": self._core.retrieve_all()}

    def archival_memory_add(self, text: str) -> dict[str, Any]:
        return self._archival.add(text)

    def archival_memory_remove(self, vec_id: int) -> dict[str, str]:
        return self._archival.remove(vec_id)

    def archival_memory_update(self, vec_id: int, new_text: str) -> dict[str, str]:
        return self._archival.update(vec_id, new_text)

    def archival_memory_clear(self) -> dict[str, str]:
        return self._archival.clear()

    def archival_memory_retrieve(self, query: str, top_k: int = 5) -> dict[str, Any]:
        return {"result": self._archival.retrieve(query, top_k)}

    def archival_memory_retrieve_all(self) -> dict[str, Any]:
        return {"result": self._archival.retrieve_all()}
