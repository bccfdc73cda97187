"""BFCL V4's recursive-summarization memory backend: one text the model rewrites as it goes.

Messages and limits as BFCL's ``MemoryAPI_rec_sum``, with one bound BFCL lacks: ``memory_replace``
checks only the length of ``new_text``, so replacing a short (or empty) ``old_text`` that occurs
thousands of times could grow the memory by orders of magnitude in one call. envtune computes the
resulting length first and refuses a replacement beyond ``MAX_REPLACED_MEMORY_CHARS`` (ten times
BFCL's entry limit, far above anything the limit lets a normal run reach).
"""

from __future__ import annotations

from typing import Any

MAX_MEMORY_ENTRY_LENGTH = 10_000
MAX_REPLACED_MEMORY_CHARS = 10 * MAX_MEMORY_ENTRY_LENGTH
"""envtune's flood bound on the memory after a replacement (see the module docstring)."""


class RecursiveSummaryMemory:
    """The ``MemoryAPI_rec_sum`` tools over an in-memory text."""

    def __init__(self) -> None:
        self._memory = ""

    def _export(self) -> dict[str, Any]:
        return {"memory": self._memory}

    def _load(self, snapshot: dict[str, Any]) -> None:
        memory = snapshot["memory"]
        if not isinstance(memory, str):
            raise TypeError(f"memory snapshot must hold a string, got {type(memory).__name__}")
        self._memory = memory

    def _context_dump(self) -> str:
        if not self._memory:
            return "There is no content in the memory at this point."
        return self._memory

    def memory_append(self, text: str) -> dict[str, str]:
        text = str(text)
        if len(self._memory) + len(text) > MAX_MEMORY_ENTRY_LENGTH:
            return {
                "error": "Entry will be too long after appending. Please shorten the entry to less than "
                f"{MAX_MEMORY_ENTRY_LENGTH} characters."
            }
        self._memory += text
        return {"status": "Memory appended."}

    def memory_update(self, text: str) -> dict[str, str]:
        text = str(text)
        if len(text) > MAX_MEMORY_ENTRY_LENGTH:
            return {
                "error": "Entry will be too long after updating. Please shorten the entry to less than "
                f"{MAX_MEMORY_ENTRY_LENGTH} characters."
            }
        self._memory = text
        return {"status": "Memory updated."}

    def memory_clear(self) -> dict[str, str]:
        self._memory = ""
        return {"status": "Short term memory cleared."}

    def memory_replace(self, old_text: str, new_text: str) -> dict[str, str]:
        old_text, new_text = str(old_text), str(new_text)
        if old_text not in self._memory:
            return {"error": f"Text '{old_text}' not found in memory."}
        if len(new_text) > MAX_MEMORY_ENTRY_LENGTH:
            return {
                "error": "Entry will be too long after replacing. Please shorten the entry to less than "
                f"{MAX_MEMORY_ENTRY_LENGTH} characters."
            }
        grown = len(self._memory) + self._memory.count(old_text) * (len(new_text) - len(old_text))
        if grown > MAX_REPLACED_MEMORY_CHARS:
            return {
                "error": f"Replacing every occurrence would make the memory {grown} characters long; the "
                f"limit is {MAX_REPLACED_MEMORY_CHARS}. Replace a longer, more specific text."
            }
        self._memory = self._memory.replace(old_text, new_text)
        return {"status": "Memory updated."}

    def memory_retrieve(self) -> dict[str, str]:
        if not self._memory:
            return {"error": "Memory is empty."}
        return {"memory_content": self._memory}
