"""KV-cache plumbing of the embedded engine: growable cache layers and the left-padded running batch.

The running batch keeps one transformers ``Cache`` whose rows are left-padded to a common width (a
decode step appends one column to every row). Rows join and leave between decode steps; each change
rebuilds the cache, and with 4-6k-token BFCL histories in every row that copying is a visible part of
a step. So every function here writes each kept row exactly once, straight into a buffer with room to
grow (earlier versions padded with ``torch.cat``, concatenated again, then copied into the roomy
buffer: three copies of the whole batch per join).

Padding columns hold zeros and are masked out by the attention mask (finite values matter: a masked
score is exactly zero only if the key and value there are finite). Left out: paged or ragged
layouts (rows of very different lengths still pay for the padding in attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, keys and values shaped (rows, kv_heads, tokens, head_dim)."""

CACHE_GROWTH = 256
"""Positions added to a KV buffer when it is full."""


def _growing_layer(keys: torch.Tensor, values: torch.Tensor, length: int) -> Any:
    """A cache layer over buffers whose first ``length`` positions are filled (no copy).

    transformers' ``DynamicLayer.update`` copies the whole layer (``torch.cat``) on every token, which
    was most of a batch-16 decode step on CPU. This subclass keeps ``keys``/``values`` as views of the
    larger buffers (the attributes ``DynamicLayer`` and the attention code read), writes new tokens in
    place and grows the buffers by ``CACHE_GROWTH`` positions when full.
    """
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self._length = length
            self._keys, self._values = keys, values
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            end = self._length + key_states.shape[2]
            if end > self._keys.shape[2]:
                self._keys = with_room(self._keys[:, :, : self._length], end + CACHE_GROWTH)
                self._values = with_room(self._values[:, :, : self._length], end + CACHE_GROWTH)
            self._keys[:, :, self._length : end] = key_states
            self._values[:, :, self._length : end] = value_states
            self._length = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

    return GrowingLayer()


def with_room(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    """A copy of ``tensor`` (B, H, L, D) in a buffer of ``capacity`` positions."""
    batch, heads, length, dim = tensor.shape
    buffer = tensor.new_empty((batch, heads, capacity, dim))
    buffer[:, :, :length] = tensor
    return buffer


def _cache(layers: list[Any]) -> Any:
    from transformers.cache_utils import Cache

    return Cache(layers=layers)


def growing_cache(kv: KV) -> Any:
    """A ``Cache`` holding a copy of ``kv`` with room to grow."""
    layers = []
    for keys, values in kv:
        length = keys.shape[2]
        layers.append(
            _growing_layer(
                with_room(keys, length + CACHE_GROWTH), with_room(values, length + CACHE_GROWTH), length
            )
        )
    return _cache(layers)


def cache_kv(cache: Any) -> KV:
    """The filled part of a cache's layers (views)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def merge_left_padded(parts: Sequence[KV]) -> Any:
    """One ``Cache`` with every part's rows, right-aligned to the widest part (zeros on the left).

    Each part's tensors are written once into the new buffers; parts may be ``expand``-ed views (one
    prompt's KV serving a group of rows).
    """
    width = max(part[0][0].shape[2] for part in parts)
    rows = sum(part[0][0].shape[0] for part in parts)
    layers = []
    for layer in range(len(parts[0])):
        buffers = []
        for which in (0, 1):
            sample = parts[0][layer][which]
            _, heads, _, dim = sample.shape
            buffer = sample.new_empty((rows, heads, width + CACHE_GROWTH, dim))
            row = 0
            for part in parts:
                tensor = part[layer][which]
                count, _, length, _ = tensor.shape
                buffer[row : row + count, :, : width - length] = 0
                buffer[row : row + count, :, width - length : width] = tensor
                row += count
            buffers.append(buffer)
        layers.append(_growing_layer(buffers[0], buffers[1], width))
    return _cache(layers)


def select_rows(kv: KV, keep: Sequence[int], start: int) -> Any:
    """A ``Cache`` with only the rows ``keep`` of ``kv``, from position ``start`` on (one copy)."""
    layers = []
    for keys, values in kv:
        buffers = []
        for tensor in (keys, values):
            _, heads, length, dim = tensor.shape
            width = length - start
            buffer = tensor.new_empty((len(keep), heads, width + CACHE_GROWTH, dim))
            # Row by row: an index_select would materialise a temporary and copy it again.
            for target, source in enumerate(keep):
                buffer[target, :, :width] = tensor[source, :, start:]
            buffers.append(buffer)
        layers.append(_growing_layer(buffers[0], buffers[1], length - start))
    return _cache(layers)
