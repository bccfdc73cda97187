"""Padding-free packing of variable-length trajectories, and the padded baseline it replaces.

Packed: the sequences of a micro-batch are concatenated into ONE row whose ``position_ids``
restart at 0 for each sequence; no pad token is computed. Attention must then be block-diagonal:

- flash-attention models handle restarting ``position_ids`` natively (varlen kernels);
- for ``sdpa``/``eager`` we register ``envtune_packed_sdpa``, which runs sdpa causally on each
  segment separately (cost Σ L², not the (Σ L)² of a dense block mask). It delegates every other
  call (padded batches, decoding with a cache) to plain sdpa with transformers' own mask.

Gotcha measured on transformers 5.23: the model only honours packing when called with
``use_cache=False`` and no ``attention_mask``; with a cache it silently attends across sequences.

Only the positions that predict a sampled (loss) token are sent through the LM head
(``logits_to_keep``), which keeps the [tokens, vocab] logits small on real vocabularies.

Padded: classic right-padded rows with an attention mask, kept as the benchmark baseline.
Deliberately left out: sequence splitting across rows (a sequence longer than the budget gets a row
of its own), gradient checkpointing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import Batching

PACKED_ATTENTION = "envtune_packed_sdpa"
"""Name under which the segment-wise sdpa is registered with transformers."""

_NATIVE_PACKED = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Implementations that handle restarting position_ids themselves."""


@dataclass(frozen=True, slots=True)
class ModelBatch:
    """One micro-batch as model input, plus where its predicted tokens sit."""

    input_ids: torch.Tensor
    """[rows, length] token ids (pad id 0 in padded rows)."""
    position_ids: torch.Tensor | None
    """[1, length] restarting positions (packed) or None (padded)."""
    attention_mask: torch.Tensor | None
    """[rows, length] 1/0 mask (padded) or None (packed)."""
    predict_index: torch.Tensor
    """[N] flat index into the [rows * length] positions whose logits predict ``target_ids``."""
    target_ids: torch.Tensor
    """[N] the tokens predicted (a subset of the sequences' tokens, in sequence order)."""
    sequence_index: torch.Tensor
    """[N] which sequence of ``members`` each target belongs to (0-based, local)."""
    members: tuple[int, ...]
    """Indices of the sequences (in the caller's list) in this micro-batch, in order."""
    num_tokens: int
    """Real (non-pad) tokens in the micro-batch."""
    num_computed: int
    """Positions the model computes (including padding)."""


def plan_microbatches(lengths: Sequence[int], max_tokens: int, batching: Batching) -> list[list[int]]:
    """Group sequence indices into micro-batches whose computed positions fit ``max_tokens``.

    Packed: first-fit decreasing on lengths. Padded: arrival order, rows × longest ≤ budget (the
    usual padded loader). A sequence longer than the budget always gets a micro-batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if batching is Batching.PACKED:
        bins: list[list[int]] = []
        loads: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
            for b, load in enumerate(loads):
                if load + lengths[i] <= max_tokens:
                    bins[b].append(i)
                    loads[b] += lengths[i]
                    break
            else:
                bins.append([i])
                loads.append(lengths[i])
        return [sorted(b) for b in bins]
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def build_batch(
    sequences: Sequence[Sequence[int]],
    predict: Sequence[Sequence[bool]],
    members: Sequence[int],
    batching: Batching,
    device: torch.device | str = "cpu",
) -> ModelBatch:
    """Model input for ``members`` of ``sequences``; ``predict[i][j]`` marks token j of sequence i
    as one whose logprob is wanted (j >= 1: token 0 has no context)."""
    seqs = [sequences[m] for m in members]
    masks = [predict[m] for m in members]
    for seq, mask in zip(seqs, masks, strict=True):
        if len(seq) != len(mask):
            raise ValueError("sequence and predict mask disagree in length")
        if len(seq) == 0:
            raise ValueError("empty sequence")
        if mask[0]:
            raise ValueError("token 0 cannot be predicted (it has no context)")
    lengths = [len(s) for s in seqs]
    predict_index: list[int] = []
    target_ids: list[int] = []
    sequence_index: list[int] = []
    if batching is Batching.PACKED:
        offset = 0
        for k, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
            for j in range(1, len(seq)):
                if mask[j]:
                    predict_index.append(offset + j - 1)
                    target_ids.append(seq[j])
                    sequence_index.append(k)
            offset += len(seq)
        input_ids = torch.tensor([[t for s in seqs for t in s]], dtype=torch.long)
        position_ids = torch.tensor([[p for n in lengths for p in range(n)]], dtype=torch.long)
        attention_mask = None
        computed = offset
    else:
        width = max(lengths)
        input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for k, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
            input_ids[k, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[k, : len(seq)] = 1
            for j in range(1, len(seq)):
                if mask[j]:
                    predict_index.append(k * width + j - 1)
                    target_ids.append(seq[j])
                    sequence_index.append(k)
        position_ids = None
        computed = len(seqs) * width
    return ModelBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device) if position_ids is not None else None,
        attention_mask=attention_mask.to(device) if attention_mask is not None else None,
        predict_index=torch.tensor(predict_index, dtype=torch.long, device=device),
        target_ids=torch.tensor(target_ids, dtype=torch.long, device=device),
        sequence_index=torch.tensor(sequence_index, dtype=torch.long, device=device),
        members=tuple(members),
        num_tokens=sum(lengths),
        num_computed=computed,
    )


def token_logprobs(
    model: torch.nn.Module, batch: ModelBatch, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each target token (and the entropy of its predictive distribution), in fp32."""
    if batch.position_ids is not None:
        # logits_to_keep with a tensor keeps those sequence positions: only predicted positions
        # go through the LM head.
        out = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=batch.predict_index,
        )
        logits = out.logits[0]
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = out.logits.reshape(-1, out.logits.shape[-1])[batch.predict_index]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, batch.target_ids[:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return chosen, entropy


def _segment_bounds(position_ids: torch.Tensor) -> list[int]:
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    return [*starts, position_ids.shape[-1]]


def _packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sdpa per packed segment when the call is a packed training row; plain sdpa otherwise."""
    position_ids = kwargs.get("position_ids")
    packed = (
        position_ids is not None
        and attention_mask is None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and position_ids.shape[-1] == query.shape[2]
    )
    if packed and position_ids is not None:
        bounds = _segment_bounds(position_ids)
        if bounds[0] != 0:
            raise ValueError("packed position_ids must start at 0")
        if len(bounds) > 2:
            outs = [
                sdpa_attention_forward(
                    module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs
                )[0]
                for s, e in itertools.pairwise(bounds)
            ]
            return torch.cat(outs, dim=1), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _packed_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    # No dense mask for a packed row: the attention function splits it by position_ids instead.
    if attention_mask is None and kwargs.get("q_length", 0) == kwargs.get("kv_length", 0):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)  # type: ignore[misc]


def enable_packed_attention(model: torch.nn.Module) -> str:
    """Make ``model`` attend block-diagonally on packed rows; returns the implementation in use.

    Registers ``envtune_packed_sdpa`` with transformers (idempotent) and switches sdpa/eager models
    to it; flash-attention models are left as they are.
    """
    base: Any = getattr(model, "get_base_model", lambda: model)()
    current: str = base.config._attn_implementation
    if current in _NATIVE_PACKED or current == PACKED_ATTENTION:
        return current
    if current not in ("sdpa", "eager", None):
        raise ValueError(f"packing is not supported with attention implementation {current!r}")
    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_sdpa_mask)
    base.set_attn_implementation(PACKED_ATTENTION)
    return PACKED_ATTENTION
