"""Packed and padded logprobs equal per-sequence forwards; micro-batch planning."""

from __future__ import annotations

import pytest
import torch
from envtune.optim.config import Batching
from envtune.optim.packing import (
    PACKED_ATTENTION,
    build_batch,
    enable_packed_attention,
    plan_microbatches,
    token_logprobs,
)
from transformers import Qwen2Config, Qwen2ForCausalLM


def tiny_model(attn: str = "sdpa", seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config).eval()


def per_sequence_logprobs(model: torch.nn.Module, seq: list[int], predict: list[bool]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[j - 1, seq[j]] for j in range(1, len(seq)) if predict[j]])


def random_batch(seed: int, n: int = 5) -> tuple[list[list[int]], list[list[bool]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (n,), generator=g).tolist()
    seqs = [torch.randint(0, 97, (n_,), generator=g).tolist() for n_ in lengths]
    predict = [[False, *(torch.rand(len(s) - 1, generator=g) > 0.4).tolist()] for s in seqs]
    return seqs, predict


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batching", [Batching.PACKED, Batching.PADDED])
def test_batched_logprobs_equal_per_sequence_forward(attn: str, batching: Batching) -> None:
    model = tiny_model(attn)
    reference_model = tiny_model(attn)
    if batching is Batching.PACKED:
        assert enable_packed_attention(model) == PACKED_ATTENTION
    seqs, predict = random_batch(seed=1)
    expected = torch.cat(
        [per_sequence_logprobs(reference_model, s, p) for s, p in zip(seqs, predict, strict=True)]
    )
    batch = build_batch(seqs, predict, list(range(len(seqs))), batching)
    with torch.no_grad():
        got, entropy = token_logprobs(model, batch, with_entropy=True)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert entropy is not None and bool((entropy > 0).all())


def test_packing_with_transformers_default_mask_needs_no_cache() -> None:
    # Why token_logprobs passes use_cache=False: with a cache transformers ignores the packing.
    model = tiny_model("sdpa")
    seqs, predict = random_batch(seed=2, n=3)
    batch = build_batch(seqs, predict, [0, 1, 2], Batching.PACKED)
    expected = torch.cat([per_sequence_logprobs(model, s, p) for s, p in zip(seqs, predict, strict=True)])
    with torch.no_grad():
        got, _ = token_logprobs(model, batch)
    assert torch.allclose(got, expected, atol=1e-5)


def test_packed_attention_leaves_padded_and_cached_calls_alone() -> None:
    model = tiny_model("sdpa")
    reference = tiny_model("sdpa")
    enable_packed_attention(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = reference(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(a[0], b[0], atol=1e-6)
        assert torch.allclose(a[1, :2], b[1, :2], atol=1e-6)
        ga = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False)
        gb = reference.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False)
    assert ga.tolist() == gb.tolist()


def test_plan_packed_first_fit_decreasing() -> None:
    plan = plan_microbatches([5, 9, 3, 4, 12], 10, Batching.PACKED)
    assert sorted(i for mb in plan for i in mb) == [0, 1, 2, 3, 4]
    lengths = [5, 9, 3, 4, 12]
    for mb in plan:
        assert sum(lengths[i] for i in mb) <= 10 or len(mb) == 1
    assert [4] in plan  # longer than the budget: alone


def test_plan_padded_counts_padding() -> None:
    plan = plan_microbatches([4, 4, 8, 2], 16, Batching.PADDED)
    assert plan == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        plan_microbatches([1], 0, Batching.PACKED)


def test_build_batch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="token 0"):
        build_batch([[1, 2]], [[True, True]], [0], Batching.PACKED)
    with pytest.raises(ValueError, match="length"):
        build_batch([[1, 2]], [[False]], [0], Batching.PACKED)
