"""Per-turn tokenization cost: incremental appends vs re-templating the whole history.

A scripted 40-turn BFCL-like conversation (system prompt with the tool docs of two classes, then per
turn a reply, tool feedback and the next user question). For each turn it times

* incremental: ``ChatTokenizer.append_messages`` of only that turn's new messages (what the episode
  loop does), and
* baseline: ``apply_chat_template`` over the whole history plus tokenizing it (what a loop that
  re-renders the conversation every turn does),

each the median of several repeats. "first" and "last" are the medians over the first and last
three turns, so one noisy turn does not decide a ratio. The output ends with one JSON line:
``cost_ratio_last_first`` (incremental; flat means about 1) and ``baseline_cost_ratio_last_first``.

    python benchmarks/token_cost.py [--turns 40] [--repeats 7] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from envtune.agents.chat_tokens import ChatTokenizer
from envtune.environments.tasks import load_function_docs
from envtune.environments.types import Message
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
from transformers import AutoTokenizer

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


def timed(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
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
        incremental.append(timed(lambda m=new_messages: chat.append_messages(m), args.repeats))
        baseline.append(timed(lambda h=tuple(history): chat.render_prompt(h), args.repeats))
        ids += chat.append_messages(new_messages)
        lengths.append(len(ids))
    if ids != chat.render_prompt(history):  # same ids either way; only the cost differs
        raise SystemExit("incremental ids differ from re-templating: the template is not prefix-stable")

    def ratio(costs: list[float]) -> float:
        return statistics.median(costs[-EDGE_TURNS:]) / statistics.median(costs[:EDGE_TURNS])

    print(f"{'turn':>4} {'tokens':>7} {'incremental_ms':>15} {'baseline_ms':>12}")
    for t, (n, inc, base) in enumerate(zip(lengths, incremental, baseline, strict=True)):
        print(f"{t:>4} {n:>7} {inc * 1e3:>15.3f} {base * 1e3:>12.3f}")
    figures = {
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


if __name__ == "__main__":
    main()
