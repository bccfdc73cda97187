"""BFCL V4's key-value memory backend: a small core memory and a larger archival memory.

Same capacities, validation order, messages and result shapes as BFCL's ``MemoryAPI_kv`` (so what
the model reads is what BFCL would show), written for envtune: state lives in the object only (BFCL
writes snapshot files under its result folder; envtune's environment keeps snapshots in memory), and
the tool methods are the only public attributes (the episode's dispatch whitelist is exactly the
documented function names).
"""

from __future__ import annotations

import json
import re
from typing import Any

from envtune.environments.bfcl_v4.bm25 import bm25_plus_scores, tokenize

MAX_CORE_MEMORY_SIZE = 7
MAX_CORE_MEMORY_ENTRY_LENGTH = 300
MAX_ARCHIVAL_MEMORY_SIZE = 50
MAX_ARCHIVAL_MEMORY_ENTRY_LENGTH = 2000

_KEY = re.compile(r"^[a-z]+(_[a-z0-9]+)*$")


class _Store:
    """One bounded key-value store (core or archival)."""

    __slots__ = ("entries", "full_message", "max_length", "max_size")

    def __init__(self, max_size: int, max_length: int, full_message: str) -> None:
        self.entries: dict[str, str] = {}
        self.max_size = max_size
        self.max_length = max_length
        self.full_message = full_message

    def too_long(self) -> dict[str, str]:
        return {
            "error": f"Entry is too long. Please shorten the entry to less than {self.max_length} characters."
        }

    def add(self, key: Any, value: Any, ok: str) -> dict[str, str]:
        key, value = str(key), str(value)
        if len(self.entries) >= self.max_size:
            return {"error": self.full_message}
        if len(value) > self.max_length:
            return self.too_long()
        if not _KEY.match(key):
            return {"error": "Key must be in snake_case format and cannot contain spaces."}
        if key in self.entries:
            return {"error": "Key name must be unique."}
        self.entries[key] = value
        return {"status": ok}

    def remove(self, key: Any) -> dict[str, str]:
        if key in self.entries:
            del self.entries[key]
            return {"status": "Key removed."}
        return {"error": "Key not found."}

    def replace(self, key: Any, value: Any) -> dict[str, str]:
        key, value = str(key), str(value)
        if key not in self.entries:
            return {"error": "Key not found."}
        if len(value) > self.max_length:
            return self.too_long()
        self.entries[key] = value
        return {"status": "Key replaced."}

    def retrieve(self, key: Any) -> dict[str, str]:
        if key not in self.entries:
            return {"error": "Key not found."}
        return {"value": self.entries[key]}

    def key_search(self, query: Any, k: Any) -> dict[str, list[tuple[float, str]]]:
        keys = list(self.entries)
        scores = bm25_plus_scores([tokenize(key) for key in keys], tokenize(query))
        ranked = sorted(zip(scores, keys, strict=True), key=lambda pair: pair[0], reverse=True)
        return {"ranked_results": ranked[:k]}


class KeyValueMemory:
    """The ``MemoryAPI_kv`` tools over an in-memory state."""

    def __init__(self) -> None:
        self._core = _Store(
            MAX_CORE_MEMORY_SIZE,
            MAX_CORE_MEMORY_ENTRY_LENGTH,
            "Core memory is full. Please clear some entries.",
        )
        self._archival = _Store(
            MAX_ARCHIVAL_MEMORY_SIZE,
            MAX_ARCHIVAL_MEMORY_ENTRY_LENGTH,
            "Long term memory is full. Please clear some entries.",
        )

    # --- snapshots (not tools) --------------------------------------------------------------

    def _export(self) -> dict[str, Any]:
        return {"core_memory": dict(self._core.entries), "archival_memory": dict(self._archival.entries)}

    def _load(self, snapshot: dict[str, Any]) -> None:
        self._core.entries = {str(k): str(v) for k, v in snapshot["core_memory"].items()}
        self._archival.entries = {str(k): str(v) for k, v in snapshot["archival_memory"].items()}

    def _context_dump(self) -> str:
        if not self._core.entries:
            return "There is no content in the core memory at this point."
        return json.dumps(self._core.entries, indent=4)

    # --- core memory ------------------------------------------------------------------------

    def core_memory_add(self, key: str, value: str) -> dict[str, str]:
        return self._core.add(key, value, "Key-value pair added.")

    def core_memory_remove(self, key: str) -> dict[str, str]:
        return self._core.remove(key)

    def core_memory_replace(self, key: str, value: str) -> dict[str, str]:
        return self._core.replace(key, value)

    def core_memory_clear(self) -> dict[str, str]:
        self._core.entries = {}
        return {"status": "Short term memory cleared."}

    def core_memory_retrieve(self, key: str) -> dict[str, str]:
        return self._core.retrieve(key)

    def core_memory_list_keys(self) -> dict[str, list[str]]:
        return {"keys": list(self._core.entries)}

    def core_memory_key_search(self, query: str, k: int = 5) -> dict[str, list[tuple[float, str]]]:
        return self._core.key_search(query, k)

    def core_memory_retrieve_all(self) -> dict[str, str]:
        return dict(self._core.entries)

    # --- archival memory --------------------------------------------------------------------

    def archival_memory_add(self, key: str, value: str) -> dict[str, str]:
        return self._archival.add(key, value, "Key added.")

    def archival_memory_remove(self, key: str) -> dict[str, str]:
        return self._archival.remove(key)

    def archival_memory_replace(self, key: str, value: str) -> dict[str, str]:
        return self._archival.replace(key, value)

    def archival_memory_clear(self) -> dict[str, str]:
        self._archival.entries = {}
        return {"status": "Long term memory cleared."}

    def archival_memory_retrieve(self, key: str) -> dict[str, str]:
        return self._archival.retrieve(key)

    def archival_memory_list_keys(self) -> dict[str, list[str]]:
        return {"keys": list(self._archival.entries)}

    def archival_memory_key_search(self, query: str, k: int = 5) -> dict[str, list[tuple[float, str]]]:
        return self._archival.key_search(query, k)
