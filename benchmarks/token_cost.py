"""Per-turn tokenization cost: incremental appends vs re-templating the whole history.

A scripted 40-turn BFCL-like conversation (system prompt with the tool docs of two classes, then per
turn a reply, tool feedback and the next user question). For each turn it times

* incremental: ``ChatTokenizer.append_messages`` of only that turn's new messages (what the episode
  loop does), and
* baseline: ``apply_chat_template`` over the whole history plus tokenizing it (what a loop that
  re-renders the conversation every turn does),

each the median of several repeats of CPU time (``time.thread_time``). The figures are absolute:
microseconds per turn against the history length (the table; ``incremental_us_by_history`` in the
JSON), the least-squares growth in microseconds per 1,000 history tokens, and the speedup at the
last turns ("first"/"last" = medians over three turns, so one noisy turn decides nothing). A
last/first ratio alone cannot separate the two (the re-templating baseline grows only with
history / system prompt), so it is reported but judges nothing.

    python benchmarks/token_cost.py [--turns 40] [--repeats 7] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from envtune.agents.chat_tokens import ChatTokenizer
from envtune.environments.tasks import load_function_docs
from envtune.environments.types import Message
from envtune.runtime.cli.bench_registry import Benchmark, Figure
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
from transformers import AutoTokenizer

BENCHMARK = Benchmark(
    name="token_cost",
    summary="tokenization per turn: incremental appends vs re-templating the whole history",
    quick=("--turns", "24", "--repeats", "5"),
    full=(),
    figures=(
        Figure(key="incremental_us_last", label="tokenization per turn at the longest history", unit="us",
               baseline_key="baseline_us_last",
               baseline_label="apply_chat_template + tokenize of the whole history per turn"),
        Figure(key="speedup_last_turn", label="re-templating / incremental at the longest history", unit="x",
               target=">= 10", baseline_key="baseline_us_last",
               baseline_label="apply_chat_template + tokenize of the whole history per turn", ratio=True),
        Figure(key="incremental_growth_us_per_1k_tokens", unit="us",
               label="incremental cost growth per 1k history tokens",
               baseline_key="baseline_growth_us_per_1k_tokens",
               baseline_label="re-templating growth per 1k history tokens"),
    ),
    checks=("ids_equal",),
    timeout_s=900,
)

EDGE_TURNS = 3
"""Turns averaged (median) at each end of the conversation."""


def conversation(turns: int) -> tuple[list[Message], list[tuple[str, list[Message]]]]:
    """Opening messages, then per turn (reply text, new environment messages)."""
    docs = [d for d in load_function_docs().values() if d.class_name in ("GorillaFileSystem", "TwitterAPI")]
    tools = "\n".join(json.dumps(d.to_json()) for d in docs)
    opening = [
        Message("system", f"You are an expert at composing function calls.\n{tools}\nReply in the formats."),
        Message("user", "Go to the documents folder and list what is there."),
    ]
    steps = []
    for t in range(turns):
        reply = (
            f"<think>Step {t}: I need the folder listing before I answer.</think>"
            f'<tool_call>[{{"name": "ls", "arguments": {{"a": {str(t % 2 == 0).lower()}}}}}]</tool_call>'
        )
        files = [f"report_{t}_{k}.txt" for k in range(8)]
        feedback = json.dumps([{"name": "ls", "result": json.dumps({"current_directory_content": files})}])
        steps.append(
            (
                reply,
                [
                    Message("tool", f"Execution results:\n{feedback}\nIf the request is fulfilled, answer."),
                    Message("user", f"Now move report_{t}_0.txt into the archive folder, number {t}."),
                ],
            )
        )
    return opening, steps


def timed(fn: Callable[[], object], repeats: int, chat: ChatTokenizer) -> float:
    samples = []
    for _ in range(repeats):
        chat.clear_caches()
        start = time.thread_time()
        fn()
        samples.append(time.thread_time() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokenizer", type=Path, default=None, help="HF tokenizer folder (default: tiny)")
    args = parser.parse_args()
    if args.turns < 2 * EDGE_TURNS:
        parser.error(f"--turns must be >= {2 * EDGE_TURNS}")

    folder = args.tokenizer or build_tiny_model(default_tiny_model_dir())
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(folder))
    opening, steps = conversation(args.turns)

    ids = chat.render_prompt(opening)
    history = list(opening)
    incremental, baseline, lengths = [], [], []
    for reply, new_messages in steps:
        ids += chat.encode_reply(reply)  # the engine's sampled ids: not tokenization work of the loop
        history += [Message("assistant", reply), *new_messages]
        # Uncached costs: ChatTokenizer caches prompts and recent messages, which would turn every
        # repeat after the first into a dictionary lookup.
        incremental.append(timed(lambda m=new_messages: chat.append_messages(m), args.repeats, chat))
        baseline.append(timed(lambda h=tuple(history): chat.render_prompt(h), args.repeats, chat))
        ids += chat.append_messages(new_messages)
        lengths.append(len(ids))
    ids_equal = ids == chat.render_prompt(history)  # same ids either way; only the cost differs

    def ratio(costs: list[float]) -> float:
        return statistics.median(costs[-EDGE_TURNS:]) / statistics.median(costs[:EDGE_TURNS])

    print(f"{'turn':>4} {'history tokens':>14} {'incremental us':>15} {'re-templating us':>17}")
    for t, (n, inc, base) in enumerate(zip(lengths, incremental, baseline, strict=True)):
        print(f"{t:>4} {n:>14} {inc * 1e6:>15.1f} {base * 1e6:>17.1f}")
    def growth(costs: list[float]) -> float:
        """Least-squares slope, microseconds per 1,000 history tokens."""
        mx, my = statistics.fmean(lengths), statistics.fmean(costs)
        sxx = sum((x - mx) ** 2 for x in lengths)
        return 1e9 * sum((x - mx) * (y - my) for x, y in zip(lengths, costs, strict=True)) / sxx

    quarters = [len(lengths) * q // 4 for q in range(4)] + [len(lengths) - 1]
    figures = {
        "ids_equal": ids_equal,
        "incremental_us_first": round(statistics.median(incremental[:EDGE_TURNS]) * 1e6, 1),
        "incremental_us_last": round(statistics.median(incremental[-EDGE_TURNS:]) * 1e6, 1),
        "baseline_us_first": round(statistics.median(baseline[:EDGE_TURNS]) * 1e6, 1),
        "baseline_us_last": round(statistics.median(baseline[-EDGE_TURNS:]) * 1e6, 1),
        "incremental_growth_us_per_1k_tokens": round(growth(incremental), 2),
        "baseline_growth_us_per_1k_tokens": round(growth(baseline), 2),
        "incremental_us_by_history": {str(lengths[i]): round(incremental[i] * 1e6, 1) for i in quarters},
        "baseline_us_by_history": {str(lengths[i]): round(baseline[i] * 1e6, 1) for i in quarters},
        "load_average": round(os.getloadavg()[0], 2),
        "turns": args.turns,
        "final_tokens": lengths[-1],
        "incremental_ms_first": round(statistics.median(incremental[:EDGE_TURNS]) * 1e3, 4),
        "incremental_ms_last": round(statistics.median(incremental[-EDGE_TURNS:]) * 1e3, 4),
        "baseline_ms_first": round(statistics.median(baseline[:EDGE_TURNS]) * 1e3, 4),
        "baseline_ms_last": round(statistics.median(baseline[-EDGE_TURNS:]) * 1e3, 4),
        "cost_ratio_last_first": round(ratio(incremental), 3),
        "baseline_cost_ratio_last_first": round(ratio(baseline), 3),
        "speedup_last_turn": round(statistics.median(baseline[-EDGE_TURNS:])
                                   / statistics.median(incremental[-EDGE_TURNS:]), 1),
    }
    print(json.dumps(figures))
    if not ids_equal:
        raise SystemExit("incremental ids differ from re-templating: the template is not prefix-stable")


if __name__ == "__main__":
    main()
