"""The embedded engine's per-episode prefix cache: an episode's KV kept between its turns.

A multi-turn episode sends its whole history every turn, and each history extends the previous one
(prompt + reply + tool feedback). Keeping the KV of the last prompt + completion under the request's
``affinity_key`` lets the next turn prefill only the new tokens.

Several entries per key. The episode loop uses the GRPO group's id as the affinity key, so the
members of a group — same prompt, different replies — share one key. With one entry per key,
concurrent members evicted each other's KV on every turn and each turn re-prefilled the whole
4-6k-token history (concurrent episodes ran 2x slower than sequential ones on the CPU preset). Here
a key holds one entry per diverging history and a lookup takes the entry sharing the longest common
prefix with the prompt: a member's own history, or, on a member's first turn, a sibling's prompt
(causal attention: the KV of the first ``L`` tokens does not depend on what follows).

The cache is bounded in tokens (LRU over entries). It is owned by the engine's worker thread (no
locking). Left out: sharing across keys (a radix tree, as SGLang's), which the episode loop's
keying makes unnecessary for GRPO groups.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, keys and values shaped (1, kv_heads, tokens, head_dim)."""


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """KV reused for a prompt's first ``tokens`` tokens."""

    tokens: int
    """How many prompt tokens the KV covers (always fewer than the prompt's length)."""
    kv: KV
    """The KV of those tokens; may alias the cache's own tensors: copy before writing."""


@dataclass(frozen=True, slots=True)
class _Entry:
    key: str
    token_ids: tuple[int, ...]
    kv: KV
    adapter: str | None
    version: int


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences (slice compares, binary search)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # invariant: a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


class EpisodePrefixCache:
    """Kept KV, several entries per affinity key, bounded in tokens (see the module docstring)."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._by_key: dict[str, set[int]] = {}
        self._ids = itertools.count()
        self._held = 0

    @property
    def held_tokens(self) -> int:
        """Tokens of KV held now."""
        return self._held

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, key: str, prompt_ids: Sequence[int], adapter: str | None, version: int
    ) -> PrefixHit | None:
        """The kept KV sharing the longest prefix with ``prompt_ids`` (same adapter and version).

        At least the prompt's last token is left to prefill (its logits start the completion). An
        entry the prompt fully extends is handed over and removed (the request will keep its own,
        longer history); a partly shared one stays for the episode it belongs to.
        """
        best: tuple[int, int] | None = None
        for entry_id in self._by_key.get(key, ()):
            entry = self._entries[entry_id]
            if entry.adapter != adapter or entry.version != version:
                continue
            usable = min(common_prefix_length(entry.token_ids, prompt_ids), len(prompt_ids) - 1)
            if usable > 0 and (best is None or usable > best[0]):
                best = (usable, entry_id)
        if best is None:
            return None
        usable, entry_id = best
        entry = self._entries[entry_id]
        if usable == len(entry.token_ids):
            self._drop(entry_id)
            return PrefixHit(usable, entry.kv)
        self._entries.move_to_end(entry_id)
        return PrefixHit(usable, [(k[:, :, :usable], v[:, :, :usable]) for k, v in entry.kv])

    def remember(
        self, key: str, token_ids: tuple[int, ...], kv: KV, adapter: str | None, version: int
    ) -> None:
        """Keep ``kv`` (copied) for ``token_ids``; entries of ``key`` that it extends are dropped."""
        if not token_ids or len(token_ids) > self.capacity_tokens:
            return
        for entry_id in list(self._by_key.get(key, ())):
            entry = self._entries[entry_id]
            if entry.adapter != adapter or entry.version != version:
                continue
            if token_ids[: len(entry.token_ids)] == entry.token_ids:
                self._drop(entry_id)  # the new entry serves every prompt the old one served
            elif entry.token_ids[: len(token_ids)] == token_ids:
                self._entries.move_to_end(entry_id)
                return  # an existing entry already covers these tokens
        entry_id = next(self._ids)
        self._entries[entry_id] = _Entry(
            key, token_ids, [(k.clone(), v.clone()) for k, v in kv], adapter, version
        )
        self._by_key.setdefault(key, set()).add(entry_id)
        self._held += len(token_ids)
        while self._held > self.capacity_tokens:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Drop everything (weights changed: the kept KV is stale)."""
        self._entries.clear()
        self._by_key.clear()
        self._held = 0

    def drop_adapter(self, adapter: str) -> None:
        """Drop the KV computed with ``adapter`` (unloaded: the name may come back with other weights)."""
        for entry_id in [i for i, entry in self._entries.items() if entry.adapter == adapter]:
            self._drop(entry_id)

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self._held -= len(entry.token_ids)
        ids = self._by_key[entry.key]
        ids.discard(entry_id)
        if not ids:
            del self._by_key[entry.key]
