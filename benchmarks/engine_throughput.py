"""Embedded-engine throughput: one request at a time vs 16 concurrent ones, in the same run.

Baseline: batch 1 (requests one after another). Measured: 16 concurrent requests (continuous
batching), directly and through the SGLang-protocol server + SGLang client over local HTTP. The
prompt is a real BFCL episode prompt rendered with the tiny model's chat template (``--prompt-tokens``
truncates it), so prefill cost is realistic for the CPU default run.

Also: eight concurrent 3-turn episodes with and without the per-episode KV cache (``affinity_key``).

Multi-turn episodes, concurrent vs one at a time (what ``rollout.max_concurrent_episodes`` trades):
``--episodes`` episodes, two per GRPO group (same task, same affinity key, as the episode loop keys
them), each a full BFCL prompt (system prompt with the tools' JSON + first question, 2-5k tokens)
followed by ``--turns`` turns of (sample up to 40 tokens, append 100-300 tokens of tool feedback
rendered with the chat template). Baseline: the same episodes run one after another on the same
engine, prefix cache flushed in between.

Ends with one JSON line: ``{"batch1_tok_s", "batch16_tok_s", "speedup", "http_batch16_tok_s",
"http_over_direct", "prefix_cache_speedup", "concurrent_vs_sequential_ratio", ...}``.

    python benchmarks/engine_throughput.py [--quick] [--model PATH] [--max-new-tokens 64]
        [--prompt-tokens 1024] [--episodes 8] [--turns 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from envtune.agents.engine import GenerateRequest, SamplingParams
from envtune.environments.tasks import class_function_docs, load_tasks
from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.settings import EmbeddedEngineConfig, SGLangClientConfig
from envtune.runtime.engines.sglang_client import SGLangClient
from envtune.runtime.engines.sglang_server import SGLangProtocolServer
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir

BENCHMARK = Benchmark(
    name="engine_throughput",
    summary="the embedded CPU engine (tiny model): batching, HTTP, prefix cache, concurrent multi-turn",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="speedup", label="embedded engine, batch 16 over batch 1 (tiny model, CPU)", unit="x",
               baseline_key="batch1_tok_s", baseline_label="the same requests one at a time", ratio=True),
        Figure(key="http_over_direct", label="batch 16 over HTTP / in process", unit="x",
               baseline_key="batch16_tok_s", baseline_label="EmbeddedEngine.generate in process", ratio=True),
        Figure(key="prefix_cache_speedup", label="episode KV cache on / off", unit="x",
               baseline_label="no episode affinity (every turn re-prefilled)", ratio=True),
        Figure(key="concurrent_vs_sequential_ratio", label="multi-turn episodes concurrent / one at a time",
               unit="x", baseline_label="the same episodes one at a time", ratio=True),
    ),
    timeout_s=900,
)


def bfcl_prompt(engine: EmbeddedEngine, limit: int) -> tuple[int, ...]:
    task = next(iter(load_tasks().values()))
    tools = json.dumps([doc.to_json() for doc in class_function_docs(task.involved_classes)])
    messages = [
        {"role": "system", "content": f"You can call these tools:\n{tools}"},
        {"role": "user", "content": task.questions[0][0]},
    ]
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    return tuple(ids[-limit:])


async def timed(engine, requests: list[GenerateRequest], concurrent: bool) -> tuple[float, int]:
    start = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(engine.generate(r) for r in requests))
    else:
        results = [await engine.generate(r) for r in requests]
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(c.token_ids) for completions in results for c in completions)


async def episodes(engine: EmbeddedEngine, prompt: tuple[int, ...], use_affinity: bool) -> float:
    """Eight concurrent 3-turn episodes (each turn: prompt + reply + a 32-token tool result)."""

    async def one(index: int) -> None:
        history = prompt
        for turn in range(3):
            sampling = SamplingParams(max_new_tokens=32, temperature=1.0, seed=100 * index + turn)
            key = f"episode-{index}" if use_affinity else None
            reply = (await engine.generate(GenerateRequest(history, sampling, affinity_key=key)))[0]
            history = history + reply.token_ids + tuple(range(3, 35))

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for index in range(8):
            group.create_task(one(index))
    return time.perf_counter() - start


def episode_prompts(engine: EmbeddedEngine, groups: int) -> list[tuple[tuple[int, ...], str]]:
    """One full BFCL prompt (tools JSON + first question) per group, and the task's state as JSON text."""
    prompts = []
    for task in list(load_tasks().values())[:groups]:
        tools = json.dumps([doc.to_json() for doc in class_function_docs(task.involved_classes)])
        messages = [
            {"role": "system", "content": f"You can call these tools:\n{tools}"},
            {"role": "user", "content": task.questions[0][0]},
        ]
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        prompts.append((tuple(ids), " ".join(task.config_json.values())))
    return prompts


def feedback_ids(engine: EmbeddedEngine, state: str, turn: int) -> tuple[int, ...]:
    """A tool message of 100-300 tokens (a slice of the task's state JSON) rendered by the chat template."""
    target = 100 + (73 * turn) % 200
    state_ids = engine.tokenizer.encode(state * (1 + 8 * target // max(len(state), 1)))
    messages = [{"role": "tool", "content": engine.tokenizer.decode(state_ids[:target])}]
    return tuple(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


async def multi_turn(
    engine: EmbeddedEngine, prompts: list[tuple[tuple[int, ...], str]], turns: int, concurrent: bool
) -> tuple[float, int]:
    """Two episodes per group prompt, concurrently or one at a time; (seconds, sampled tokens)."""
    await engine.flush_cache()

    async def episode(group: int, member: int) -> int:
        history, state = prompts[group]
        sampled = 0
        for turn in range(turns):
            seed = 1000 * group + 10 * member + turn
            sampling = SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed)
            request = GenerateRequest(history, sampling, affinity_key=f"group-{group}")
            reply = (await engine.generate(request))[0]
            sampled += len(reply.token_ids)
            if turn + 1 < turns:
                history = history + reply.token_ids + feedback_ids(engine, state, turn + member)
        return sampled

    members = [(group, member) for group in range(len(prompts)) for member in range(2)]
    start = time.perf_counter()
    if concurrent:
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(episode(group, member)) for group, member in members]
        sampled = sum(task.result() for task in running)
    else:
        sampled = sum([await episode(group, member) for group, member in members])
    return time.perf_counter() - start, sampled


async def main(args: argparse.Namespace) -> dict[str, float]:
    model = args.model or build_tiny_model(default_tiny_model_dir())
    engine = await EmbeddedEngine.open(model, EmbeddedEngineConfig(max_batch_rows=16))
    try:
        prompt = bfcl_prompt(engine, args.prompt_tokens)

        def requests(count: int, offset: int) -> list[GenerateRequest]:
            sampling = [
                SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=offset + i)
                for i in range(count)
            ]
            return [GenerateRequest(prompt, s) for s in sampling]

        await timed(engine, requests(2, 1000), concurrent=True)  # warm-up
        # Equal work per request: the batch-1 arm runs the first requests (same seeds) of the batch-16 arm.
        t1, n1 = await timed(engine, requests(args.sequential, 100), concurrent=False)
        t16, n16 = await timed(engine, requests(16, 100), concurrent=True)
        cold = await episodes(engine, prompt, use_affinity=False)
        warm = await episodes(engine, prompt, use_affinity=True)
        groups = episode_prompts(engine, max(1, args.episodes // 2))
        t_seq, n_seq = await multi_turn(engine, groups, args.turns, concurrent=False)
        t_con, n_con = await multi_turn(engine, groups, args.turns, concurrent=True)
        server = SGLangProtocolServer(engine)
        await server.start()
        try:
            async with SGLangClient(SGLangClientConfig(urls=(server.url,))) as client:
                await timed(client, requests(2, 2000), concurrent=True)
                th, nh = await timed(client, requests(16, 100), concurrent=True)
        finally:
            await server.close()
    finally:
        await engine.close()
    batch1, batch16, http16 = n1 / t1, n16 / t16, nh / th
    print(f"prompt tokens: {len(prompt)}, max_new_tokens: {args.max_new_tokens}")
    print(f"batch 1  (sequential x{args.sequential}): {n1} tokens in {t1:.2f}s = {batch1:.0f} tok/s")
    print(f"batch 16 (concurrent):        {n16} tokens in {t16:.2f}s = {batch16:.0f} tok/s")
    print(f"batch 16 over HTTP (client):  {nh} tokens in {th:.2f}s = {http16:.0f} tok/s")
    print(f"8 episodes x 3 turns: {cold:.2f}s without the episode KV cache, {warm:.2f}s with it")
    count = 2 * len(groups)
    lengths = sorted(len(history) for history, _ in groups)
    print(f"multi-turn: {count} episodes x {args.turns} turns, prompts {lengths[0]}-{lengths[-1]} tokens")
    for name, seconds, tokens in (("one at a time", t_seq, n_seq), ("concurrent", t_con, n_con)):
        print(
            f"  {name:14s} {seconds:6.2f}s  {tokens / seconds:6.1f} tok/s  {count / seconds:5.2f} episodes/s"
        )
    ratio = t_seq / t_con
    print(f"  concurrent / one at a time (episodes/s): {ratio:.2f}")
    return {
        "prompt_tokens": len(prompt),
        "max_new_tokens": args.max_new_tokens,
        "batch1_tok_s": round(batch1, 1),
        "batch16_tok_s": round(batch16, 1),
        "speedup": round(batch16 / batch1, 2),
        "http_batch16_tok_s": round(http16, 1),
        "http_over_direct": round(http16 / batch16, 3),
        "episodes_s_no_prefix_cache": round(cold, 2),
        "episodes_s_prefix_cache": round(warm, 2),
        "prefix_cache_speedup": round(cold / warm, 2),
        "multi_turn_episodes": count,
        "sequential_episodes_s": round(count / t_seq, 3),
        "concurrent_episodes_s": round(count / t_con, 3),
        "sequential_tok_s": round(n_seq / t_seq, 1),
        "concurrent_tok_s": round(n_con / t_con, 1),
        "concurrent_vs_sequential_ratio": round(ratio, 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--sequential", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=8, help="multi-turn episodes (two per group)")
    parser.add_argument("--turns", type=int, default=4, help="turns per multi-turn episode")
    parser.add_argument("--quick", action="store_true", help="smaller run (under ~2 minutes on 2 cores)")
    arguments = parser.parse_args()
    if arguments.quick:  # the multi-turn scenario keeps its size: it is the one that needs it
        arguments.max_new_tokens, arguments.sequential = 32, 2
    figures = asyncio.run(main(arguments))
    print(json.dumps(figures))
