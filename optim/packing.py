"""Padding-free packing of variable-length trajectories, and the padded baseline it replaces.

Packed: the sequences of a micro-batch are concatenated into ONE row whose ``position_ids``
restart at 0 for each sequence; no pad token is computed. Attention must then be block-diagonal:

- flash-attention models handle restarting ``position_ids`` natively (varlen kernels);
- for ``sdpa``/``eager`` we register ``envtune_packed_sdpa``, which runs sdpa causally on each
  segment separately (cost Σ L², not the (Σ L)² of a dense block mask). It delegates every other
  call (padded batches, decoding with a cache) to plain sdpa with transformers' own mask.

Gotcha measured on transformers 5.23: the model only honours packing when called with
``use_cache=False`` and no ``attention_mask``; with a cache it silently attends across sequences.

Only the positions that predict a sampled (loss) token are sent through the LM head, and the
logprobs and entropies are computed from the final hidden states in chunks of at most
``logits_chunk_elements`` fp32 logits (``logprobs.py``), so no [tokens, vocab] tensor exists for the
whole micro-batch on real vocabularies. Optional per-token grammar masks (``ModelBatch.token_masks``)
make the learner's logprobs the ones the engine sampled under a constraint.

Padded: classic right-padded rows with an attention mask, kept as the benchmark baseline.
Deliberately left out: sequence splitting across rows (a sequence longer than the budget gets a row
of its own), gradient checkpointing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import Batching
from .logprobs import UNCONSTRAINED_WORD, chunked_token_logprobs, token_logprobs_reference

PACKED_ATTENTION = "envtune_packed_sdpa"
"""Name under which the segment-wise sdpa is registered with transformers."""

_NATIVE_PACKED = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Implementations that handle restarting position_ids themselves."""

DEFAULT_LOGITS_CHUNK_ELEMENTS = 1 << 26
"""fp32 logits per chunk (256 MiB): 441 tokens at Qwen's 152k vocabulary; a whole micro-batch at small
vocabularies (then nothing is recomputed in the backward pass and the speed is the unchunked one)."""

_HEAD_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config fields of models whose logits are not plain ``lm_head(hidden)``; chunking refuses them."""


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
    token_masks: torch.Tensor | None = None
    """[N, ceil(vocab/32)] int32 allowed-token masks of the targets in xgrammar's layout (token t
    allowed iff bit t % 32 of word t // 32 is set; a row of -1 is unconstrained), or None when no
    target was sampled under a grammar. Logprobs and entropies are then taken under these masks."""


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
    token_masks: Sequence[torch.Tensor | None] | None = None,
) -> ModelBatch:
    """Model input for ``members`` of ``sequences``; ``predict[i][j]`` marks token j of sequence i
    as one whose logprob is wanted (j >= 1: token 0 has no context). ``token_masks[i]``, when given,
    is sequence i's [predicted tokens, words] int32 mask (None: unconstrained); see ``with_masks``."""
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
    batch = ModelBatch(
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
    if token_masks is None:
        return batch
    return with_masks(batch, [token_masks[m] for m in members], [sum(predict[m]) for m in members])


def with_masks(
    batch: ModelBatch, member_masks: Sequence[torch.Tensor | None], member_targets: Sequence[int]
) -> ModelBatch:
    """``batch`` with the grammar masks of its members attached (in ``batch.members`` order).

    ``member_masks[k]`` is member k's [member_targets[k], words] int32 mask rows, one per predicted
    token in sequence order, or None for a member sampled without a constraint (its rows become -1).
    When every member is None the batch stays unmasked. Kept separate from ``build_batch`` so a learner
    can attach masks per micro-batch, just before its forward, and hold only those in memory.
    """
    if len(member_masks) != len(batch.members) or len(member_targets) != len(batch.members):
        raise ValueError("one mask (or None) and one target count per member")
    if sum(member_targets) != batch.target_ids.numel():
        raise ValueError(
            f"target counts sum to {sum(member_targets)}, the batch has {batch.target_ids.numel()}"
        )
    given = [m for m in member_masks if m is not None]
    if not given:
        return replace(batch, token_masks=None)
    words = given[0].shape[-1]
    device = batch.target_ids.device
    rows: list[torch.Tensor] = []
    for k, (mask, count) in enumerate(zip(member_masks, member_targets, strict=True)):
        if mask is None:
            rows.append(torch.full((count, words), UNCONSTRAINED_WORD, dtype=torch.int32, device=device))
            continue
        if mask.dtype != torch.int32 or mask.dim() != 2 or mask.shape[1] != words:
            raise ValueError(
                f"member {k}: masks must be int32 [targets, {words}], got {mask.dtype} {tuple(mask.shape)}"
            )
        if mask.shape[0] != count:
            raise ValueError(f"member {k}: {mask.shape[0]} mask rows for {count} predicted tokens")
        rows.append(mask.to(device))
    return replace(batch, token_masks=torch.cat(rows))


def token_logprobs(
    model: torch.nn.Module,
    batch: ModelBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    logits_chunk_elements: int = DEFAULT_LOGITS_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each target token (and the entropy of its predictive distribution), in fp32.

    Under ``batch.token_masks`` when present. ``logits_chunk_elements`` bounds the fp32 logits held
    at once (see ``logprobs.py``); 0 runs the model's own forward with full-vocabulary logits for all
    predicted positions (the unchunked baseline; also the path for LM heads chunking refuses).
    """
    if logits_chunk_elements < 0:
        raise ValueError(f"logits_chunk_elements must be >= 0, got {logits_chunk_elements}")
    if logits_chunk_elements == 0:
        return token_logprobs_reference(
            _full_logits(model, batch),
            batch.target_ids,
            temperature=temperature,
            masks=batch.token_masks,
            with_entropy=with_entropy,
        )
    head = _plain_head(model)
    hidden = _predicted_hidden(model, batch)
    chunk = max(1, logits_chunk_elements // head.weight.shape[0])
    if chunk >= hidden.shape[0]:
        # One chunk: plain autograd, which keeps its intermediates instead of recomputing the LM head.
        return token_logprobs_reference(
            head(hidden), batch.target_ids, temperature=temperature, masks=batch.token_masks,
            with_entropy=with_entropy,
        )
    return chunked_token_logprobs(
        hidden, head, batch.target_ids, temperature=temperature, masks=batch.token_masks,
        with_entropy=with_entropy, chunk_tokens=chunk,
    )


def _full_logits(model: torch.nn.Module, batch: ModelBatch) -> torch.Tensor:
    """[N, vocab] logits of the predicted positions from the model's own forward."""
    if batch.position_ids is not None:
        # logits_to_keep with a tensor keeps those sequence positions: only predicted positions
        # go through the LM head.
        out = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=batch.predict_index,
        )
        return out.logits[0]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.logits.reshape(-1, out.logits.shape[-1])[batch.predict_index]


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    base: torch.nn.Module = getattr(model, "get_base_model", lambda: model)()
    return base


@dataclass(frozen=True)
class HeadWeights:
    """The LM head as the logits see it: its weight with any active LoRA delta added (differentiable,
    so gradients reach the adapter through ``chunked_token_logprobs`` as through ``head(hidden)``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


def _plain_head(model: torch.nn.Module) -> HeadWeights:
    """The LM head, when logits are exactly ``head(final hidden state)``; ValueError otherwise.

    A plain ``nn.Linear``, or one wrapped by a peft LoRA layer (``lm_head`` among the adapter's
    targets): then the active adapters' deltas are added to the weight, unless the adapters are
    disabled (the reference pass). LoRA dropout or variants (DoRA) are not a weight delta: refused.
    """
    base: Any = _causal_lm(model)
    head = base.get_output_embeddings()
    weights = _lora_head_weights(head) if hasattr(head, "base_layer") else None
    if weights is None:
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(
                f"chunked logprobs need a plain nn.Linear LM head, got {type(head).__name__}; "
                "set logits_chunk_elements=0"
            )
        weights = HeadWeights(head.weight, head.bias)
    modifiers = [name for name in _HEAD_MODIFIERS if getattr(base.config, name, None) not in (None, 1, 1.0)]
    if modifiers:
        raise ValueError(
            f"this model transforms its logits ({', '.join(modifiers)}); set logits_chunk_elements=0"
        )
    return weights


def _lora_head_weights(head: Any) -> HeadWeights:
    """Effective weight of a peft LoRA-wrapped linear head (see ``_plain_head``)."""
    layer = head.base_layer
    if not isinstance(layer, torch.nn.Linear):
        name = type(layer).__name__
        raise ValueError(f"the LM head wraps a {name}, not nn.Linear; set logits_chunk_elements=0")
    weight = layer.weight
    if head.disable_adapters or head.merged:
        return HeadWeights(weight, layer.bias)  # merged: the delta is already in the weight
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        dropout = head.lora_dropout[name]
        if not isinstance(dropout, torch.nn.Identity) or head.use_dora.get(name, False):
            raise ValueError(
                "the LM head's LoRA has dropout or DoRA, which is not a weight delta; "
                "set logits_chunk_elements=0"
            )
        weight = weight + head.get_delta_weight(name)
    return HeadWeights(weight, layer.bias)


def _predicted_hidden(model: torch.nn.Module, batch: ModelBatch) -> torch.Tensor:
    """[N, hidden] final hidden states at the predicted positions (the decoder only, no LM head)."""
    decoder = getattr(_causal_lm(model), "get_decoder")()  # noqa: B009  (typed as a tensor by torch)
    if batch.position_ids is not None:
        out = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    else:
        out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch.predict_index]


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
