"""Logprob of the sampled token and entropy, in chunks over tokens, optionally under grammar masks.

Why chunks. The straightforward computation (LM head over every predicted position, fp32
``log_softmax``, ``exp``, ``p · log p``) keeps four [tokens, vocab] fp32 tensors alive for the backward
pass: about 20 GB for 8k tokens at Qwen's 152k vocabulary. ``chunked_token_logprobs`` takes the final
hidden states instead and runs the LM head, the log-softmax and the entropy ``chunk_tokens`` rows at a
time, inside one autograd ``Function`` that keeps only the hidden states, the targets and two floats
per token; its backward recomputes each chunk's logits and writes the gradient analytically:

    d logp_t / dz_j = [j = t] - p_j            d H / dz_j = -p_j (log p_j + H)

(z = logits / temperature), so at most three [chunk, vocab] fp32 tensors exist at any time. Measured
against checkpointed chunks (``torch.utils.checkpoint`` around the same per-chunk math), which
recompute the forward with autograd and then run its backward: see ``benchmarks/learner_memory.py``.

Grammar masks. Under constrained decoding the engine samples from ``softmax(masked(z))``: the logits of
tokens the grammar forbids are -inf before the temperature-scaled softmax (xgrammar's
``apply_token_bitmask_inplace``; SGLang does the same). The learner must compute the policy, the
reference and the entropy under the same masks or its ratio is wrong. A mask is one row per predicted
token in xgrammar's packed layout: int32 words, token ``t`` allowed iff bit ``t % 32`` of word
``t // 32`` is set; a row of all ones (-1) is an unconstrained position. ``token_logprobs_reference``
is the straightforward full-vocabulary version, kept as the baseline and the tests' reference.

Deliberately left out: LM heads that are not ``logits = hidden @ weight.T + bias`` (logit soft-capping
or scaling; a LoRA head with dropout); callers use the reference path for those. A plain LoRA on the
head is a weight delta: ``packing.token_logprobs`` passes the adapted weight.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

UNCONSTRAINED_WORD = -1
"""An int32 mask word with every bit set: all 32 tokens allowed."""


def bitmask_words(vocab_size: int) -> int:
    """Int32 words per mask row for ``vocab_size`` tokens (xgrammar's ``allocate_token_bitmask`` width)."""
    return (vocab_size + 31) // 32


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 packed masks -> [rows, vocab_size] bool (True = allowed)."""
    # Bytes of a little-endian int32 hold bits 0-7, 8-15, ...: token 32w + 8k + j is bit j of byte 4w + k.
    as_bytes = words.contiguous().view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab_size].bool()


def check_masks(masks: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless ``masks`` is [len(targets), words] int32 and allows every target token.

    A target the mask forbids means the mask is not the one the token was sampled under (wrong grammar,
    wrong alignment): its logprob would be -inf, so this is refused rather than trained on.
    """
    if masks.dtype != torch.int32 or masks.dim() != 2:
        raise ValueError(f"masks must be a 2-d int32 tensor, got {masks.dtype} with {masks.dim()} dims")
    if masks.shape != (targets.numel(), bitmask_words(vocab_size)):
        raise ValueError(
            f"masks have shape {tuple(masks.shape)}, expected ({targets.numel()}, "
            f"{bitmask_words(vocab_size)}) for {targets.numel()} targets at vocab {vocab_size}"
        )
    if targets.numel() == 0:
        return
    word = masks.gather(1, (targets // 32)[:, None]).squeeze(1)
    allowed = (word >> (targets % 32).to(torch.int32)) & 1
    bad = torch.nonzero(allowed == 0).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{bad.numel()} target tokens are forbidden by their masks (first: position {i}, "
            f"token {int(targets[i])}); the masks do not match the sampled tokens"
        )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32, or the tensor's own dtype when it is wider (fp64 models, in the equivalence checks)."""
    return torch.promote_types(t.dtype, torch.float32)


def _masked_scaled(raw: torch.Tensor, temperature: float, allowed: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``raw`` / temperature, -inf where not allowed; may work in ``raw``'s storage (callers pass
    a fresh LM-head output they do not use again)."""
    z = raw.to(_compute_dtype(raw))
    if temperature != 1.0:
        z.div_(temperature)
    if allowed is not None:
        z.masked_fill_(~allowed, -math.inf)
    return z


def token_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    masks: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The straightforward full-vocabulary computation from [N, vocab] logits (autograd throughout)."""
    z = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature
    allowed = None
    if masks is not None:
        check_masks(masks, targets, z.shape[-1])
        allowed = unpack_bitmask(masks, z.shape[-1])
        z = z.masked_fill(~allowed, -math.inf)
    log_probs = torch.log_softmax(z, dim=-1)
    chosen = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        finite = log_probs
        if allowed is not None:
            # p = 0 and log p = -inf where masked: 0 · -inf is NaN, in the value and in the gradient
            # (a where() after the product still back-propagates 0 · -inf), unless log p is zeroed first.
            finite = log_probs.masked_fill(~allowed, 0.0)
        entropy = -(log_probs.exp() * finite).sum(-1)
    return chosen, entropy


def _chunk_allowed(masks: torch.Tensor | None, start: int, end: int, vocab: int) -> torch.Tensor | None:
    if masks is None:
        return None
    rows = masks[start:end]
    if bool((rows == UNCONSTRAINED_WORD).all()):
        return None  # unconstrained chunk: skip the unpacking
    return unpack_bitmask(rows, vocab)


class _ChunkedLogprobs(torch.autograd.Function):
    """(hidden, weight, bias) -> (logp of targets, entropy), chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        masks: torch.Tensor | None,
        temperature: float,
        chunk_tokens: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        vocab = weight.shape[0]
        dtype = _compute_dtype(hidden)
        logp = hidden.new_empty(n, dtype=dtype)
        lse = hidden.new_empty(n, dtype=dtype)
        entropy = hidden.new_zeros(n if with_entropy else 0, dtype=dtype)
        for start in range(0, n, chunk_tokens):
            end = min(n, start + chunk_tokens)
            allowed = _chunk_allowed(masks, start, end, vocab)
            raw = torch.nn.functional.linear(hidden[start:end], weight, bias)
            z = _masked_scaled(raw, temperature, allowed)
            lse_c = torch.logsumexp(z, dim=-1)
            lse[start:end] = lse_c
            log_probs = z.sub_(lse_c[:, None])  # in place: z is not needed any more
            logp[start:end] = log_probs.gather(-1, targets[start:end, None]).squeeze(-1)
            if with_entropy:
                p = log_probs.exp()
                if allowed is not None:
                    log_probs.masked_fill_(~allowed, 0.0)  # p = 0 there; avoids 0 · -inf
                entropy[start:end] = -(p.mul_(log_probs)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, masks, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        ctx.with_entropy = with_entropy
        device_type = hidden.device.type
        ctx.autocast = (
            device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        )
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, masks, lse, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=_compute_dtype(weight)) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=_compute_dtype(bias)) if need_b and bias is not None else None
        if grad_logp is None and grad_entropy is None:
            return grad_h, grad_w, grad_b, None, None, None, None, None
        device_type, autocast_on, autocast_dtype = ctx.autocast
        n, vocab = hidden.shape[0], weight.shape[0]
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            for start in range(0, n, ctx.chunk_tokens):
                end = min(n, start + ctx.chunk_tokens)
                h = hidden[start:end]
                allowed = _chunk_allowed(masks, start, end, vocab)
                raw = torch.nn.functional.linear(h, weight, bias)
                log_probs = _masked_scaled(raw, ctx.temperature, allowed).sub_(lse[start:end, None])
                p = log_probs.exp()
                # g = dL/dz = g_logp (onehot - p) - g_H p (log p + H), built in log_probs' storage.
                if grad_entropy is not None:
                    if allowed is not None:
                        log_probs.masked_fill_(~allowed, 0.0)
                    g = log_probs.add_(entropy[start:end, None]).mul_(grad_entropy[start:end, None])
                    if grad_logp is not None:
                        g.add_(grad_logp[start:end, None])
                    g.mul_(p).neg_()
                else:
                    assert grad_logp is not None  # autograd calls backward with at least one gradient
                    g = p.mul_(-grad_logp[start:end, None])
                if grad_logp is not None:
                    rows = torch.arange(end - start, device=g.device)
                    g[rows, targets[start:end]] += grad_logp[start:end]
                if ctx.temperature != 1.0:
                    g.div_(ctx.temperature)
                g = g.to(raw.dtype)  # the matmuls run in the dtype the forward's LM head ran in
                if grad_h is not None:
                    grad_h[start:end] = g @ weight.to(raw.dtype)
                if grad_w is not None:
                    grad_w += (g.t() @ h.to(raw.dtype)).to(grad_w.dtype)
                if grad_b is not None:
                    grad_b += g.to(grad_b.dtype).sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


class LinearHead(Protocol):
    """What the chunked path needs of an LM head: ``logits = hidden @ weight.T + bias``."""

    @property
    def weight(self) -> torch.Tensor: ...

    @property
    def bias(self) -> torch.Tensor | None: ...


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: LinearHead,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    masks: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of ``targets`` (and entropy) from [N, hidden] final hidden states through ``head``.

    Equals ``token_logprobs_reference(head(hidden), ...)`` in values and gradients (to float rounding)
    without ever holding more than a few [chunk_tokens, vocab] fp32 tensors.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, H] and targets [N], got {tuple(hidden.shape)} / {tuple(targets.shape)}"
        )
    if masks is not None:
        check_masks(masks, targets, head.weight.shape[0])
    logp, entropy = _ChunkedLogprobs.apply(
        hidden, head.weight, head.bias, targets, masks, temperature, chunk_tokens, with_entropy
    )
    return logp, entropy if with_entropy else None
