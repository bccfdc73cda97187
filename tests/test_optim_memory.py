"""The per-GPU memory estimate: parameter counts exact, activations close to what autograd keeps."""

from __future__ import annotations

import pytest
import torch
from envtune.optim.memory import (
    GIB,
    QWEN2_LINEAR_MODULES,
    MemoryBudgetError,
    ModelShape,
    check_fits,
    estimate_learner_memory,
)
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

QWEN25_7B = Qwen2Config(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)
"""Qwen2.5-7B-Instruct's published config.json sizes (no download: the numbers are typed here)."""


def small_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize("config", [small_config(), QWEN25_7B], ids=["small", "qwen2.5-7b"])
def test_parameter_counts_match_the_real_modules(config: Qwen2Config) -> None:
    shape = ModelShape.from_hf_config(config)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
        base = sum(p.numel() for p in model.parameters())
        peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=list(QWEN2_LINEAR_MODULES)))
        lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.base_params() == base
    assert shape.lora_params(16) == lora
    with torch.device("meta"):
        targets = [*QWEN2_LINEAR_MODULES, "lm_head"]
        with_head = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=4, target_modules=targets))
        head_lora = sum(p.numel() for p in with_head.parameters() if p.requires_grad)
        only_head = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=4, target_modules=["lm_head"]))
        only_head_lora = sum(p.numel() for p in only_head.parameters() if p.requires_grad)
    assert shape.lora_params(4, targets) == head_lora  # the CPU preset's head adapter is counted too
    assert shape.lora_params(4, ("lm_head",)) == only_head_lora
    if config is QWEN25_7B:
        assert 7.6e9 < base < 7.7e9  # "7.61B parameters" in the model card


def saved_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes of distinct storages autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize(
    ("base_dtype", "lora_dtype"),
    [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")],
)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_within_ten_percent_of_autograd(
    base_dtype: str, lora_dtype: str, checkpointing: bool
) -> None:
    torch.manual_seed(0)
    config = small_config()
    model = Qwen2ForCausalLM(config).to(getattr(torch, base_dtype))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(QWEN2_LINEAR_MODULES)))
    if lora_dtype != "float32":
        model = model.to(getattr(torch, lora_dtype))
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    tokens = 512
    measured = saved_bytes(model, tokens)
    shape = ModelShape.from_hf_config(config)
    a = 2 if base_dtype == "bfloat16" else 4
    per_layer = shape.activation_bytes_per_token(
        a, 8, QWEN2_LINEAR_MODULES, 4 if lora_dtype == "float32" else 2
    )
    root = shape.root_activation_bytes_per_token()
    # Forward only: with checkpointing autograd keeps each layer's input; the recomputation is in backward.
    kept = shape.hidden_size * a if checkpointing else per_layer
    estimate = tokens * (root + shape.num_layers * kept)
    assert 0.9 * measured <= estimate <= 1.1 * measured, (estimate, measured)


def test_checkpointing_and_sharding_lower_the_estimate_and_the_7b_numbers_are_sane() -> None:
    shape = ModelShape.from_hf_config(QWEN25_7B)
    common = dict(lora_rank=16, micro_batch_tokens=32768, logits_chunk_tokens=1024)
    plain = estimate_learner_memory(shape, world_size=8, gradient_checkpointing=False, **common)
    ckpt = estimate_learner_memory(shape, world_size=8, gradient_checkpointing=True, **common)
    one = estimate_learner_memory(shape, world_size=1, gradient_checkpointing=True, **common)
    assert ckpt.activations < plain.activations / 5
    assert one.base_shard == 8 * ckpt.base_shard or abs(one.base_shard - 8 * ckpt.base_shard) < 8
    # bf16 base weights of 7.6B parameters: ~14.2 GiB unsharded.
    assert 14.0 < one.base_shard / GIB < 14.4
    # 32k tokens without checkpointing cannot fit one 80 GiB GPU; with it, one 8-way shard does.
    with pytest.raises(MemoryBudgetError, match="gradient checkpointing"):
        check_fits(plain, 80 * GIB)
    check_fits(ckpt, 80 * GIB)
    assert "GiB" in ckpt.describe() and ckpt.as_dict()["total"] == ckpt.total


def test_longest_sequence_and_unchunked_logits_grow_the_estimate() -> None:
    shape = ModelShape.from_hf_config(QWEN25_7B)
    base = dict(world_size=8, lora_rank=16, gradient_checkpointing=True, micro_batch_tokens=8192)
    short = estimate_learner_memory(shape, **base, logits_chunk_tokens=1024)
    long = estimate_learner_memory(shape, **base, max_sequence_tokens=32768, logits_chunk_tokens=1024)
    unchunked = estimate_learner_memory(shape, **base)
    assert long.tokens_per_microbatch == 32768 and long.activations > 3 * short.activations
    assert unchunked.logits == 8 * short.logits  # 8192 positions vs a 1024-token chunk


def test_bad_arguments_are_refused() -> None:
    shape = ModelShape.from_hf_config(small_config())
    with pytest.raises(ValueError, match="param_dtype"):
        estimate_learner_memory(
            shape,
            world_size=1,
            lora_rank=8,
            micro_batch_tokens=8,
            gradient_checkpointing=False,
            param_dtype="fp8",
        )
    with pytest.raises(ValueError, match="unknown LoRA target"):
        shape.lora_params(8, ("q_proj", "mlp"))
    with pytest.raises(ValueError, match=">= 1"):
        estimate_learner_memory(
            shape, world_size=0, lora_rank=8, micro_batch_tokens=8, gradient_checkpointing=False
        )
