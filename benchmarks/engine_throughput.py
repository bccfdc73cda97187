"""Embedded-engine throughput: one request at a time vs 16 concurrent ones, in the same run.

Baseline: batch 1 (requests one after another). Measured: 16 concurrent requests (continuous
batching), directly and through the SGLang-protocol server + SGLang client over local HTTP. The
prompt is a real BFCL episode prompt rendered with the tiny model's chat template (``--prompt-tokens``
truncates it), so prefill cost is realistic for the CPU default run.

Also: eight concurrent 3-turn episodes with and without the per-episode KV cache (``affinity_key``).

Ends with one JSON line: ``{"batch1_tok_s", "batch16_tok_s", "speedup", "http_batch16_tok_s",
"http_over_direct", "prefix_cache_speedup", ...}``.

    python benchmarks/engine_throughput.py [--model PATH] [--max-new-tokens 64] [--prompt-tokens 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from envtune.environments.tasks import class_function_docs, load_tasks
from envtune.runtime.engines import (
    EmbeddedEngine,
    EmbeddedEngineConfig,
    GenerateRequest,
    SamplingParams,
    SGLangClient,
    SGLangClientConfig,
    SGLangProtocolServer,
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


async def main(args: argparse.Namespace) -> dict[str, float]:
    engine = await EmbeddedEngine.open(EmbeddedEngineConfig(model_path=args.model, max_batch_rows=16))
    try:
        prompt = bfcl_prompt(engine, args.prompt_tokens)

        def requests(count: int, offset: int) -> list[GenerateRequest]:
            sampling = [
                SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=offset + i)
                for i in range(count)
            ]
            return [GenerateRequest(prompt, s) for s in sampling]

        await timed(engine, requests(2, 1000), concurrent=True)  # warm-up
        t1, n1 = await timed(engine, requests(args.sequential, 0), concurrent=False)
        t16, n16 = await timed(engine, requests(16, 100), concurrent=True)
        cold = await episodes(engine, prompt, use_affinity=False)
        warm = await episodes(engine, prompt, use_affinity=True)
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
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--sequential", type=int, default=4)
    figures = asyncio.run(main(parser.parse_args()))
    print(json.dumps(figures))
