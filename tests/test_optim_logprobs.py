"""Chunked logprobs and entropies equal the full-vocabulary computation, masks included."""

from __future__ import annotations

import pytest
import torch
import xgrammar
from envtune.optim.config import QWEN2_TARGET_MODULES, Batching, LearnerConfig
from envtune.optim.logprobs import (
    bitmask_words,
    check_masks,
    chunked_token_logprobs,
    token_logprobs_reference,
    unpack_bitmask,
)
from envtune.optim.lora import LoraSettings, attach_lora, reference_mode
from envtune.optim.packing import (
    DEFAULT_LOGITS_CHUNK_ELEMENTS,
    build_batch,
    enable_packed_attention,
    token_logprobs,
    with_masks,
)
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 1003
"""Not a multiple of 32: the last mask word is partly padding."""


def random_masks(targets: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """Per target: unconstrained (-1), a random allowed set, or the target alone (a forced token)."""
    g = torch.Generator().manual_seed(seed)
    words = bitmask_words(vocab)
    rows = []
    for i, t in enumerate(targets.tolist()):
        kind = i % 3
        if kind == 0:
            rows.append(torch.full((words,), -1, dtype=torch.int32))
            continue
        allowed = torch.rand(vocab, generator=g) < 0.3 if kind == 1 else torch.zeros(vocab, dtype=torch.bool)
        allowed[t] = True
        packed = torch.zeros(words * 32, dtype=torch.int64)
        packed[:vocab] = allowed.long()
        word = (packed.view(words, 32) << torch.arange(32)).sum(-1)
        rows.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32))
    return torch.stack(rows)


def test_unpack_matches_xgrammar_application() -> None:
    targets = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    masks = random_masks(targets, VOCAB, seed=1)
    logits = torch.zeros(12, VOCAB)
    xgrammar.apply_token_bitmask_inplace(logits, masks, vocab_size=VOCAB)
    assert torch.equal(unpack_bitmask(masks, VOCAB), logits == 0)
    assert bool(unpack_bitmask(masks, VOCAB)[torch.arange(12), targets].all())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_equals_reference_values_and_gradients(
    masked: bool, temperature: float, with_entropy: bool
) -> None:
    torch.manual_seed(0)
    n, hidden_size = 37, 16
    head = torch.nn.Linear(hidden_size, VOCAB, bias=True)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    targets = torch.randint(0, VOCAB, (n,))
    masks = random_masks(targets, VOCAB, seed=2) if masked else None
    up_logp, up_entropy = torch.randn(n), torch.randn(n)

    def run(chunked: bool) -> tuple[torch.Tensor, ...]:
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        if chunked:
            logp, entropy = chunked_token_logprobs(
                hidden, head, targets, temperature=temperature, masks=masks, with_entropy=with_entropy,
                chunk_tokens=5,
            )
        else:
            logp, entropy = token_logprobs_reference(
                head(hidden), targets, temperature=temperature, masks=masks, with_entropy=with_entropy
            )
        loss = (logp * up_logp).sum()
        if with_entropy:
            assert entropy is not None
            loss = loss + (entropy * up_entropy).sum()
        else:
            assert entropy is None
        loss.backward()
        out = [logp.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
        if entropy is not None:
            out.append(entropy.detach())
        return tuple(out)

    for got, want in zip(run(True), run(False), strict=True):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_forced_tokens_have_logprob_zero_and_no_gradient() -> None:
    torch.manual_seed(1)
    head = torch.nn.Linear(8, VOCAB, bias=False)
    hidden = torch.randn(6, 8, requires_grad=True)
    targets = torch.randint(0, VOCAB, (6,))
    masks = random_masks(targets, VOCAB, seed=3)  # rows 2 and 5 allow their target alone
    logp, entropy = chunked_token_logprobs(
        hidden, head, targets, masks=masks, with_entropy=True, chunk_tokens=4
    )
    assert entropy is not None
    (logp.sum() + entropy.sum()).backward()
    assert logp[[2, 5]].abs().max() == 0 and entropy[[2, 5]].abs().max() == 0
    assert hidden.grad is not None and hidden.grad[[2, 5]].abs().max() == 0
    assert hidden.grad[[0, 1, 3, 4]].abs().min() > 0


def test_detached_entropy_backpropagates_the_logprob_only() -> None:
    torch.manual_seed(2)
    head = torch.nn.Linear(8, VOCAB, bias=False)
    hidden = torch.randn(9, 8, requires_grad=True)
    targets = torch.randint(0, VOCAB, (9,))
    logp, entropy = chunked_token_logprobs(hidden, head, targets, with_entropy=True, chunk_tokens=2)
    assert entropy is not None and not entropy.detach().requires_grad
    logp.sum().backward()
    expected = torch.autograd.grad(token_logprobs_reference(head(hidden), targets)[0].sum(), hidden)[0]
    assert torch.allclose(hidden.grad, expected, atol=1e-6)


def test_bad_masks_raise() -> None:
    targets = torch.tensor([3, 40])
    good = random_masks(targets, VOCAB, seed=4)
    check_masks(good, targets, VOCAB)
    with pytest.raises(ValueError, match="int32"):
        check_masks(good.long(), targets, VOCAB)
    with pytest.raises(ValueError, match="shape"):
        check_masks(good[:, :-1], targets, VOCAB)
    with pytest.raises(ValueError, match="forbidden"):
        check_masks(good, torch.tensor([3, 41]), VOCAB)  # row 1 allows 40 and a random set
    forced = random_masks(torch.tensor([0, 0, 7]), VOCAB, seed=5)
    with pytest.raises(ValueError, match="first: position 2, token 8"):
        check_masks(forced, torch.tensor([0, 0, 8]), VOCAB)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_logprobs(torch.zeros(2, 8), torch.nn.Linear(8, VOCAB), targets, chunk_tokens=0)


# --- through the model: token_logprobs chunked vs the model's own full logits ---------------------


def lora_model(seed: int = 0, *, head: bool = False) -> torch.nn.Module:
    """``head``: the adapter also targets the (untied) LM head, as the CPU preset's adapter does."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=not head,
        attn_implementation="sdpa",
    )
    targets = (*QWEN2_TARGET_MODULES, "lm_head") if head else QWEN2_TARGET_MODULES
    model = attach_lora(Qwen2ForCausalLM(config), LoraSettings(rank=4, alpha=8.0, target_modules=targets))
    with torch.no_grad():  # a non-zero adapter, so its gradients exercise the whole path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("batching", [Batching.PACKED, Batching.PADDED])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("head", [False, True])
def test_token_logprobs_chunked_equals_full_logits(batching: Batching, masked: bool, head: bool) -> None:
    model = lora_model(head=head)
    if batching is Batching.PACKED:
        enable_packed_attention(model)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (23, 9, 31)]
    predict = [[False, *(torch.rand(len(s) - 1, generator=g) > 0.3).tolist()] for s in seqs]
    batch = build_batch(seqs, predict, [0, 1, 2], batching)
    if masked:
        per_seq = [random_masks(torch.tensor([s[j] for j in range(len(s)) if p[j]]), VOCAB, seed=i)
                   for i, (s, p) in enumerate(zip(seqs, predict, strict=True))]
        batch = with_masks(batch, [per_seq[0], None, per_seq[2]], [sum(p) for p in predict])
        assert batch.token_masks is not None and (batch.token_masks == -1).all(-1).sum() > sum(predict[1])
    params = [p for p in model.parameters() if p.requires_grad]

    def run(elements: int) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logp, entropy = token_logprobs(
            model, batch, temperature=0.8, with_entropy=True, logits_chunk_elements=elements
        )
        assert entropy is not None
        (logp.sum() - 0.3 * entropy.sum()).backward()
        return [logp.detach(), entropy.detach(), *(p.grad.clone() for p in params)]

    full = run(0)
    chunked = run(7 * VOCAB)  # 7 tokens per chunk
    single = run(10**9)  # one chunk: plain autograd on the predicted hidden states
    for a, b, c in zip(full, chunked, single, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()
    assert full[0].shape == batch.target_ids.shape
    if head:  # the head's adapter gets gradients (through the effective weight when chunked)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        head_grads = [g for n, g in zip(names, chunked[2:], strict=True) if "lm_head" in n]
        assert len(head_grads) == 2 and all(g.abs().sum() > 0 for g in head_grads)
        with reference_mode(model), torch.no_grad():  # adapters off: the base head, in every path
            base = [token_logprobs(model, batch, logits_chunk_elements=e)[0] for e in (0, 7 * VOCAB, 10**9)]
        assert torch.allclose(base[0], base[1], atol=1e-5) and torch.allclose(base[0], base[2], atol=1e-5)
        assert not torch.allclose(base[0], full[0], atol=1e-3)


def test_chunked_path_refuses_a_head_adapter_that_is_not_a_weight_delta() -> None:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    settings = LoraSettings(rank=4, alpha=8.0, dropout=0.1, target_modules=("lm_head",))
    model = attach_lora(Qwen2ForCausalLM(config), settings)
    batch = build_batch([[1, 2, 3, 4]], [[False, True, True, True]], [0], Batching.PADDED)
    with pytest.raises(ValueError, match="dropout or DoRA"):
        token_logprobs(model, batch, logits_chunk_elements=7 * VOCAB)
    assert token_logprobs(model, batch, logits_chunk_elements=0)[0].shape == (3,)  # the way out works


def test_learner_default_budget_is_the_packing_default() -> None:
    # LearnerConfig spells the number out (its module stays free of torch); they must not drift.
    assert LearnerConfig().logits_chunk_elements == DEFAULT_LOGITS_CHUNK_ELEMENTS
    with pytest.raises(ValueError, match="logits_chunk_elements"):
        LearnerConfig(logits_chunk_elements=-1)


def test_with_masks_refuses_misaligned_rows() -> None:
    seqs, predict = [[1, 2, 3], [4, 5]], [[False, True, True], [False, True]]
    batch = build_batch(seqs, predict, [0, 1], Batching.PACKED)
    words = bitmask_words(VOCAB)
    ok = torch.full((2, words), -1, dtype=torch.int32)
    assert with_masks(batch, [None, None], [2, 1]).token_masks is None
    assert with_masks(batch, [ok, None], [2, 1]).token_masks.shape == (3, words)
    with pytest.raises(ValueError, match="mask rows"):
        with_masks(batch, [ok[:1], None], [2, 1])
    with pytest.raises(ValueError, match="target counts"):
        with_masks(batch, [ok, None], [2, 2])
    with pytest.raises(ValueError, match="int32"):
        with_masks(batch, [ok.long(), None], [2, 1])
    with pytest.raises(ValueError, match="logits_chunk_elements"):
        token_logprobs(lora_model(), batch, logits_chunk_elements=-1)
