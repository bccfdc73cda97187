"""The embedded engine: batching, sampling, logprobs, grammars, LoRA adapters and weight versions."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from envtune.agents.engine import (
    Completion,
    Constraint,
    ConstraintKind,
    Engine,
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    WeightSync,
)
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.kv_batch import cache_kv, merge_left_padded, select_rows
from envtune.runtime.engines.prefix_cache import EpisodePrefixCache, common_prefix_length
from envtune.runtime.engines.settings import EmbeddedEngineConfig
from hypothesis import given
from hypothesis import strategies as st

TOOL_NAMES = ("cd", "ls")
TOOL_CALL_EBNF = r"""
root ::= "<tool_call>[{\"name\": " name ", \"arguments\": {}}]</tool_call>"
name ::= "\"cd\"" | "\"ls\""
"""
TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"enum": list(TOOL_NAMES)},
        "arguments": {"type": "object", "properties": {}, "additionalProperties": False},
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[EmbeddedEngine]:
    engine = EmbeddedEngine(tiny_model_dir, EmbeddedEngineConfig(max_batch_rows=16))
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def prompt(engine: EmbeddedEngine) -> tuple[int, ...]:
    messages = [{"role": "user", "content": "List the files in the current directory, then go to 'docs'."}]
    return tuple(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def make_adapter(base_dir: Path, folder: Path, seed: int) -> Path:
    """A random (non-zero) LoRA adapter for the tiny model, saved in peft's layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(
            base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    model.save_pretrained(folder)
    return folder


def recomputed_logprobs(
    model: torch.nn.Module, prompt: tuple[int, ...], completion: Completion, temperature: float
) -> torch.Tensor:
    """Logprobs of the sampled tokens from ONE full-sequence forward pass (what a learner computes)."""
    ids = torch.tensor([list(prompt) + list(completion.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, dim=-1).gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]


def test_implements_the_protocols(engine: EmbeddedEngine) -> None:
    assert isinstance(engine, Engine)
    assert isinstance(engine, WeightSync)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_new_tokens=24, temperature=1.0, seed=7, n=3),
        SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=50, seed=8, n=2),
        SamplingParams(max_new_tokens=16, temperature=0.0),
    ],
)
async def test_logprobs_match_a_full_forward_recomputation(
    engine: EmbeddedEngine, prompt: tuple[int, ...], sampling: SamplingParams
) -> None:
    completions = await engine.generate(GenerateRequest(prompt, sampling))
    assert len(completions) == sampling.n
    for completion in completions:
        assert len(completion.token_ids) == len(completion.logprobs) >= 1
        assert completion.prompt_tokens == len(prompt)
        expected = recomputed_logprobs(engine._base, prompt, completion, sampling.temperature)
        assert torch.max(torch.abs(expected - torch.tensor(completion.logprobs))) < 1e-4
        if sampling.temperature == 0:
            ids = torch.tensor([list(prompt) + list(completion.token_ids)])
            with torch.no_grad():
                greedy = engine._base(ids).logits[0, len(prompt) - 1 : -1].argmax(-1)
            assert greedy.tolist() == list(completion.token_ids)


async def test_seeded_sampling_is_reproducible_and_group_members_differ(
    engine: EmbeddedEngine, prompt: tuple[int, ...]
) -> None:
    request = GenerateRequest(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=42, n=4))
    first, second = await engine.generate(request), await engine.generate(request)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert len({c.token_ids for c in first}) > 1


async def test_concurrent_requests_batch_and_match_sequential_runs(
    engine: EmbeddedEngine, prompt: tuple[int, ...]
) -> None:
    requests = [
        GenerateRequest(prompt[: 8 + 3 * i], SamplingParams(max_new_tokens=10 + i, temperature=0.9, seed=i))
        for i in range(10)
    ]
    peak_before = engine.statistics().peak_rows
    together = await asyncio.gather(*(engine.generate(r) for r in requests))
    alone = [await engine.generate(r) for r in requests[:4]]
    for batched, single in zip(together, alone, strict=False):
        assert batched[0].token_ids == single[0].token_ids
        assert max(abs(a - b) for a, b in zip(batched[0].logprobs, single[0].logprobs, strict=True)) < 1e-4
    assert max(peak_before, engine.statistics().peak_rows) > 1


async def test_stop_tokens_and_length(engine: EmbeddedEngine, prompt: tuple[int, ...]) -> None:
    greedy = (
        await engine.generate(GenerateRequest(prompt, SamplingParams(max_new_tokens=6, temperature=0)))
    )[0]
    assert greedy.finish_reason is FinishReason.LENGTH and len(greedy.token_ids) == 6
    stop = greedy.token_ids[2]
    first_hit = greedy.token_ids.index(stop)
    stopped = (
        await engine.generate(
            GenerateRequest(prompt, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=(stop,)))
        )
    )[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == greedy.token_ids[: first_hit + 1]  # the stop token is kept


async def test_stream_events_build_the_completion(engine: EmbeddedEngine, prompt: tuple[int, ...]) -> None:
    request = GenerateRequest(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, n=2))
    tokens: dict[int, list[int]] = {0: [], 1: []}
    finals = {}
    async for event in engine.generate_stream(request):
        tokens[event.index].append(event.token_id)
        if event.completion is not None:
            finals[event.index] = event.completion
    expected = await engine.generate(request)
    assert [finals[0], finals[1]] == list(expected)
    assert [tuple(tokens[0]), tuple(tokens[1])] == [c.token_ids for c in expected]


def _parse_tool_call(text: str) -> dict:
    match = re.fullmatch(r"<tool_call>(.*)</tool_call>", text, re.DOTALL)
    assert match, text
    calls = json.loads(match.group(1))
    return calls[0] if isinstance(calls, list) else calls


async def test_grammars_constrain_a_random_model(engine: EmbeddedEngine, prompt: tuple[int, ...]) -> None:
    tag_new = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<tool_call>",
            "content": {"type": "json_schema", "json_schema": TOOL_SCHEMA},
            "end": "</tool_call>",
        },
    }
    cases = [
        (ConstraintKind.EBNF, TOOL_CALL_EBNF, _parse_tool_call),
        (ConstraintKind.JSON_SCHEMA, json.dumps(TOOL_SCHEMA), json.loads),
        (ConstraintKind.STRUCTURAL_TAG, json.dumps(tag_new), _parse_tool_call),
    ]
    sampling = SamplingParams(max_new_tokens=128, temperature=1.0, seed=11, n=6)
    for kind, grammar, parse in cases:
        completions = await engine.generate(GenerateRequest(prompt, sampling, Constraint(kind, grammar)))
        finished = [c for c in completions if c.finish_reason is FinishReason.STOP]
        assert finished, kind
        for completion in finished:
            assert completion.token_ids[-1] in engine.eos_token_ids
            text = engine.tokenizer.decode(completion.token_ids[:-1])
            assert parse(text)["name"] in TOOL_NAMES, text


async def test_legacy_structural_tag_and_regex(engine: EmbeddedEngine, prompt: tuple[int, ...]) -> None:
    legacy = {
        "structures": [{"begin": "<tool_call>", "schema": TOOL_SCHEMA, "end": "</tool_call>"}],
        "triggers": ["<tool_call>"],
    }
    sampling = SamplingParams(max_new_tokens=64, temperature=1.0, seed=3, n=4)
    completions = await engine.generate(
        GenerateRequest(prompt, sampling, Constraint(ConstraintKind.STRUCTURAL_TAG, json.dumps(legacy)))
    )
    for completion in completions:
        text = engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        # Free text is allowed outside the tags; every tag that closes holds a valid call.
        for body in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL):
            assert json.loads(body)["name"] in TOOL_NAMES
    regex = await engine.generate(
        GenerateRequest(prompt, sampling, Constraint(ConstraintKind.REGEX, r"(cd|ls) [a-z]{1,6}"))
    )
    for completion in regex:
        assert completion.finish_reason is FinishReason.STOP
        assert re.fullmatch(r"(cd|ls) [a-z]{1,6}", engine.tokenizer.decode(completion.token_ids[:-1]))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerateRequest(()), "empty"),
        (GenerateRequest((1, 10**6)), "outside the vocabulary"),
        (GenerateRequest((1, 2), SamplingParams(max_new_tokens=10**6)), "exceeds the model context"),
        (GenerateRequest((1, 2), adapter="nope"), "not loaded"),
        (GenerateRequest((1, 2), constraint=Constraint(ConstraintKind.EBNF, "root ::= ")), "invalid ebnf"),
        (GenerateRequest((1, 2), constraint=Constraint(ConstraintKind.JSON_SCHEMA, "{bad")), "invalid json"),
    ],
)
async def test_bad_requests_raise_non_retryable_errors(
    engine: EmbeddedEngine, request_: GenerateRequest, message: str
) -> None:
    with pytest.raises(EngineError, match=message) as info:
        await engine.generate(request_)
    assert info.value.retryable is False


async def test_cancelled_request_leaves_the_engine_serving(
    engine: EmbeddedEngine, prompt: tuple[int, ...]
) -> None:
    # Seeded: an unseeded sample sometimes ends on EOS within the first few tokens (seed 1 does at
    # token 11), finishing before the cancel arrives; seed 0 runs past 300 tokens.
    sampling = SamplingParams(max_new_tokens=2000, temperature=1.0, seed=0)
    long = asyncio.ensure_future(engine.generate(GenerateRequest(prompt, sampling)))
    await asyncio.sleep(0.05)
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long
    done = await engine.generate(GenerateRequest(prompt, SamplingParams(max_new_tokens=3, temperature=0)))
    assert len(done[0].token_ids) == 3


async def test_lora_adapters_versions_and_weight_updates(
    tmp_path: Path, prompt: tuple[int, ...], tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny = tiny_model_dir
    first = make_adapter(tiny, tmp_path / "a1", seed=1)
    second = make_adapter(tiny, tmp_path / "a2", seed=2)
    async with await EmbeddedEngine.open(tiny) as engine:
        assert engine.policy_version == 0
        await engine.load_adapter("policy-v1", str(first), version=1)
        await engine.load_adapter("policy-v2", str(second), version=2)
        await engine.load_adapter("custom", str(first), version=3)  # versions are given, never parsed
        assert engine.adapters() == {"policy-v1": 1, "policy-v2": 2, "custom": 3}
        with pytest.raises(EngineError, match="already loaded"):
            await engine.load_adapter("policy-v1", str(first), version=4)
        with pytest.raises(EngineError, match="cannot load"):
            await engine.load_adapter("broken", str(tmp_path / "missing"), version=4)
        assert engine.policy_version == 3

        sampling = SamplingParams(max_new_tokens=10, temperature=1.0, seed=9)
        base_run, v1_run, v2_run = await asyncio.gather(
            engine.generate(GenerateRequest(prompt, sampling)),
            engine.generate(GenerateRequest(prompt, sampling, adapter="policy-v1")),
            engine.generate(GenerateRequest(prompt, sampling, adapter="policy-v2")),
        )
        assert [base_run[0].policy_version, v1_run[0].policy_version, v2_run[0].policy_version] == [0, 1, 2]
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(first)).eval()
        expected = recomputed_logprobs(reference, prompt, v1_run[0], 1.0)
        assert torch.max(torch.abs(expected - torch.tensor(v1_run[0].logprobs))) < 1e-4
        plain = recomputed_logprobs(AutoModelForCausalLM.from_pretrained(tiny), prompt, base_run[0], 1.0)
        assert torch.max(torch.abs(plain - torch.tensor(base_run[0].logprobs))) < 1e-4

        on_base = await engine.generate(GenerateRequest(prompt, sampling, affinity_key="on-base"))
        on_v1 = await engine.generate(
            GenerateRequest(prompt, sampling, adapter="policy-v1", affinity_key="v1")
        )
        kept_base, kept_v1 = (len(prompt) + len(run[0].token_ids) - 1 for run in (on_base, on_v1))
        await engine.load_adapter("policy-v5", str(second), version=5)  # a new adapter leaves kept KV alone
        # (Read after a control: those run after the worker's step that finished both requests.)
        assert engine.statistics().prefix_cache_held == kept_base + kept_v1
        await engine.unload_adapter("policy-v5")
        assert engine.statistics().prefix_cache_held == kept_base + kept_v1
        await engine.unload_adapter("policy-v1")  # drops only the KV computed with policy-v1
        assert engine.statistics().prefix_cache_held == kept_base
        await engine.unload_adapter("custom")
        with pytest.raises(EngineError, match="not loaded"):
            await engine.generate(GenerateRequest(prompt, sampling, adapter="policy-v1"))
        with pytest.raises(EngineError, match="not loaded"):
            await engine.unload_adapter("policy-v1")

        assert engine.policy_version == 5  # unloading never lowers the high-water mark
        await engine.update_weights_from_disk(str(tiny), version=6)
        assert engine.statistics().prefix_cache_held == 0  # new base weights: every kept KV is stale
        after = await engine.generate(GenerateRequest(prompt, sampling))
        assert after[0].policy_version == 6
        assert after[0].token_ids == base_run[0].token_ids  # same weights reloaded
        still = await engine.generate(GenerateRequest(prompt, sampling, adapter="policy-v2"))
        assert still[0].token_ids == v2_run[0].token_ids  # adapters survive a base update
        await engine.unload_adapter("policy-v2")
        await engine.flush_cache()
        assert engine.adapters() == {}
    with pytest.raises(EngineError, match="closed"):
        await engine.generate(GenerateRequest(prompt))


async def test_episode_prefix_cache_reuses_kv_without_changing_results(
    engine: EmbeddedEngine, prompt: tuple[int, ...]
) -> None:
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=17)
    first = (await engine.generate(GenerateRequest(prompt, sampling, affinity_key="episode-a")))[0]
    assert first.cached_tokens == 0
    follow_up = (
        prompt + first.token_ids + tuple(engine.tokenizer.encode("<tool_response>\nok\n</tool_response>"))
    )
    hits_before = engine.statistics().prefix_hits
    warm = (await engine.generate(GenerateRequest(follow_up, sampling, affinity_key="episode-a")))[0]
    cold = (await engine.generate(GenerateRequest(follow_up, sampling)))[0]
    assert warm.cached_tokens == len(prompt) + len(first.token_ids) - 1
    assert engine.statistics().prefix_hits == hits_before + 1
    assert warm.token_ids == cold.token_ids
    assert max(abs(a - b) for a, b in zip(warm.logprobs, cold.logprobs, strict=True)) < 1e-4
    # A prompt sharing only part of the kept tokens reuses that part (all but its last token).
    other = (await engine.generate(GenerateRequest(prompt[:-3], sampling, affinity_key="episode-a")))[0]
    assert other.cached_tokens == len(prompt) - 4
    other_cold = (await engine.generate(GenerateRequest(prompt[:-3], sampling)))[0]
    assert other.token_ids == other_cold.token_ids
    # Weight changes flush it.
    (await engine.generate(GenerateRequest(prompt, sampling, affinity_key="episode-b")))
    assert engine.statistics().prefix_cache_held > 0
    await engine.flush_cache()
    assert engine.statistics().prefix_cache_held == 0


async def test_group_members_sharing_a_key_keep_their_kv_when_interleaved(
    engine: EmbeddedEngine, prompt: tuple[int, ...]
) -> None:
    """Two episodes of one GRPO group (one affinity key) run concurrently: every turn after the first
    reuses the member's own history, and the results match cold runs. With one entry per key the
    members evicted each other and every turn re-prefilled the whole history."""
    feedback = tuple(engine.tokenizer.encode("<tool_response>\nok\n</tool_response>"))

    async def member(index: int) -> list[tuple[tuple[int, ...], Completion, Completion]]:
        history, turns = prompt, []
        for turn in range(3):
            sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=10 * index + turn)
            warm = (await engine.generate(GenerateRequest(history, sampling, affinity_key="group-x")))[0]
            turns.append((history, warm, sampling))
            history = history + warm.token_ids + feedback
        return turns

    first, second = await asyncio.gather(member(1), member(2))
    for turns in (first, second):
        for turn, (history, warm, sampling) in enumerate(turns):
            if turn > 0:
                assert warm.cached_tokens == len(turns[turn - 1][0]) + len(turns[turn - 1][1].token_ids) - 1
            cold = (await engine.generate(GenerateRequest(history, sampling)))[0]
            assert warm.token_ids == cold.token_ids
            assert max(abs(a - b) for a, b in zip(warm.logprobs, cold.logprobs, strict=True)) < 1e-4
    # The sibling that prefilled second reused the first one's prompt KV.
    assert max(first[0][1].cached_tokens, second[0][1].cached_tokens) == len(prompt) - 1


# --- the per-episode prefix cache and the batch KV helpers, without a model ---------------------


def _kv(tokens: int, rows: int = 1, fill: float | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers of fake KV whose values encode their position (checks which positions were kept)."""
    base = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1).expand(rows, 2, tokens, 3)
    if fill is not None:
        base = torch.full_like(base, fill)
    return [(base.clone(), -base.clone()) for _ in range(2)]


def test_prefix_cache_picks_the_longest_shared_prefix_per_key() -> None:
    cache = EpisodePrefixCache(capacity_tokens=1000)
    cache.remember("g", (1, 2, 3, 4, 5), _kv(5), None, 0)
    cache.remember("g", (1, 2, 9, 9), _kv(4), None, 0)
    cache.remember("other", (1, 2, 3, 4, 5, 6), _kv(6), None, 0)
    assert cache.lookup("g", (7, 7), None, 0) is None
    assert cache.lookup("g", (1, 2, 3, 4, 5, 6), "adapter", 0) is None
    assert cache.lookup("g", (1, 2, 3, 4, 5, 6), None, 1) is None
    # A sibling's history shared in part: reused up to the divergence, and kept for its owner.
    partial = cache.lookup("g", (1, 2, 3, 8, 8), None, 0)
    assert partial is not None and partial.tokens == 3
    assert partial.kv[0][0][0, 0, :, 0].tolist() == [0.0, 1.0, 2.0]
    assert len(cache) == 3
    # Identical prompt: all but its last token, so the prefill still yields the first logits.
    same = cache.lookup("g", (1, 2, 9, 9), None, 0)
    assert same is not None and same.tokens == 3 and len(cache) == 3
    # The prompt extends an entry: it is handed over and leaves the cache.
    full = cache.lookup("g", (1, 2, 3, 4, 5, 6, 7), None, 0)
    assert full is not None and full.tokens == 5
    assert len(cache) == 2 and cache.held_tokens == 10


def test_prefix_cache_supersedes_drops_adapters_and_stays_bounded() -> None:
    cache = EpisodePrefixCache(capacity_tokens=12)
    cache.remember("g", (1, 2, 3), _kv(3), None, 0)
    cache.remember("g", (1, 2, 3, 4, 5), _kv(5), None, 0)  # extends the first: replaces it
    assert len(cache) == 1 and cache.held_tokens == 5
    cache.remember("g", (1, 2), _kv(2), None, 0)  # already covered
    assert len(cache) == 1
    cache.remember("h", (4, 5, 6, 7), _kv(4), "lora", 2)
    cache.remember("i", (8, 9, 10, 11), _kv(4), None, 0)  # 13 tokens > 12: the oldest goes
    assert cache.held_tokens == 8 and cache.lookup("g", (1, 2, 3, 4, 5, 6), None, 0) is None
    cache.drop_adapter("lora")
    assert cache.held_tokens == 4 and cache.lookup("h", (4, 5, 6, 7, 8), "lora", 2) is None
    cache.remember("j", tuple(range(13)), _kv(13), None, 0)  # larger than the whole cache: not kept
    assert cache.held_tokens == 4
    cache.clear()
    assert cache.held_tokens == 0 and len(cache) == 0


@given(
    st.lists(st.integers(0, 3), max_size=40),
    st.lists(st.integers(0, 3), max_size=40),
)
def test_common_prefix_length_matches_a_plain_loop(a: list[int], b: list[int]) -> None:
    expected = 0
    while expected < min(len(a), len(b)) and a[expected] == b[expected]:
        expected += 1
    assert common_prefix_length(tuple(a), tuple(b)) == expected


def test_batch_kv_merges_left_padded_and_selects_rows() -> None:
    short, long = _kv(3), _kv(5, rows=2, fill=7.0)
    cache = merge_left_padded([short, long])
    keys = cache_kv(cache)[1][0]
    assert keys.shape == (3, 2, 5, 3)
    assert keys[0, 0, :, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 2.0]  # right-aligned, zeros on the left
    assert keys[1:, :, :, :].eq(7.0).all()
    # A decode step writes one column in place for every row.
    cache.layers[1].update(torch.ones(3, 2, 1, 3), torch.ones(3, 2, 1, 3))
    assert cache_kv(cache)[1][0].shape == (3, 2, 6, 3)
    kept = cache_kv(select_rows(cache_kv(cache), [0], start=2))[1]
    assert kept[0][0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 1.0]
    assert kept[1][0, 0, :, 0].tolist() == [-0.0, -1.0, -2.0, 1.0]
