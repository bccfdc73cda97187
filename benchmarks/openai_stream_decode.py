"""Streaming detokenization cost of the OpenAI endpoint: a window of new tokens vs the whole reply.

While streaming (or matching stop strings) ``/v1/chat/completions`` needs the reply's text after
every token, on the event loop. It times, for one reply of ``--tokens`` tokens (multilingual text
and protocol tags, tokenized by the tiny model's tokenizer):

* incremental: ``OpenAIChatRoutes._detokenize`` per token (a window since the last complete text);
* baseline: ``tokenizer.decode`` of the whole reply so far per token (the obvious way to do it).

Both arms run in one process, interleaved, on the same ids, ``--repeats`` times; times are
median [min, max] seconds per reply. The last line is one JSON object with ``speedup`` (baseline /
incremental medians), the machine's load average, and a check that both produced the same text.

    python benchmarks/openai_stream_decode.py [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.engines.openai_api import OpenAIChatRoutes, OpenAIServingConfig, _Choice
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
from transformers import AutoTokenizer

BENCHMARK = Benchmark(
    name="openai_stream_decode",
    summary="streaming detokenization per token: a window of new tokens vs decoding the whole reply",
    quick=("--repeats", "3"),
    full=(),
    figures=(
        Figure(key="speedup", label="streaming detokenization, whole-reply decode / windowed", unit="x",
               baseline_label="tokenizer.decode of the whole reply per token", ratio=True),
    ),
    checks=("same_text",),
    timeout_s=600,
)

TEXT = (
    "<think>Need the listing first.</think> Grüße aus Köln, 日本語のテキスト, emojis 🚀✓ and plain "
    'English words. <tool_call>\n{"name": "ls", "arguments": {"a": true}}\n</tool_call>\n'
)


def incremental(routes: OpenAIChatRoutes, ids: list[int]) -> str:
    choice = _Choice(0)
    for token in ids:
        choice.token_ids.append(token)
        routes._detokenize(choice)
    return choice.text


def whole(tokenizer: Any, ids: list[int]) -> str:
    text = ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(default_tiny_model_dir()))
    routes = OpenAIChatRoutes(engine=None, tokenizer=tokenizer, config=OpenAIServingConfig("tiny"))  # type: ignore[arg-type]
    ids: list[int] = []
    while len(ids) < args.tokens:
        ids += tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ids = ids[: args.tokens]
    times: dict[str, list[float]] = {"incremental": [], "baseline": []}
    same = True
    for _ in range(args.repeats):
        started = time.perf_counter()
        a = incremental(routes, ids)
        times["incremental"].append(time.perf_counter() - started)
        started = time.perf_counter()
        b = whole(tokenizer, ids)
        times["baseline"].append(time.perf_counter() - started)
        same = same and a == b
    summary = {arm: [statistics.median(v), min(v), max(v)] for arm, v in times.items()}
    for arm, (median, low, high) in summary.items():
        print(f"{arm:12s} {median:.4f} s per {args.tokens}-token reply [{low:.4f}, {high:.4f}]")
    print(
        json.dumps(
            {
                "benchmark": "openai_stream_decode",
                "tokens": args.tokens,
                "repeats": args.repeats,
                "incremental_s": summary["incremental"],
                "baseline_s": summary["baseline"],
                "speedup": summary["baseline"][0] / summary["incremental"][0],
                "same_text": same,
                "load_avg_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
