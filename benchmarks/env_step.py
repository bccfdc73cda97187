"""Environment speed: tool-call steps and per-turn scoring, envtune vs BFCL's reference path.

Both sides replay the same ground-truth trajectories of all four categories, in the same run.

Steps (``steps_per_s`` = tool calls per second):
- envtune: ``Episode.step`` on a ``<tool_call>`` reply: parse (JSON), validate against the
  schemas, execute through the whitelist, build the feedback message; episode creation (fresh
  instances) is timed too and amortised over the episode's calls.
- reference: ``bfcl_eval``'s ``execute_multi_turn_func_call`` on the same calls in BFCL's
  pythonic form (``eval`` on strings, instances created on first use and kept in module globals).

Scoring (``scoring_per_s`` = scored turns per second); on both sides the model's calls of the
turn are executed untimed first, then the turn is scored:
- envtune: ``TurnScorer.judge``: state and response checks against the ground-truth trace, which
  is computed once per task (warmed before timing; its one-off cost is printed as
  ``gt_trace_ms_per_task``) and never re-executed.
- reference: what a rollout does without a cache: execute the turn's ground truth on its own
  ground-truth instances (``execute_multi_turn_func_call``), then BFCL's ``state_checker`` and
  ``response_checker``.

Timing: CPU time of the one thread both arms run on (``time.thread_time``: less sensitive to a
shared machine than wall time). A repeat alternates full passes of the two arms until each has
``--min-seconds`` of timed step work, so a ratio never rests on a fraction of a second; ratios
are median [min, max] over ``--repeats`` repeats, with the machine's load average.

    python benchmarks/env_step.py [--quick] [--repeats N] [--min-seconds S]

Ends with one JSON line: steps_per_s, baseline_steps_per_s, step_ratio (+ samples), scoring_per_s,
baseline_scoring_per_s, scoring_ratio (+ samples), load_average.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

from envtune.environments.episode import BfclEnvironment, EpisodeConfig
from envtune.environments.ground_truth import ground_truth_calls
from envtune.environments.instances import Dispatcher, build_instances
from envtune.environments.scoring import TurnScorer
from envtune.environments.tasks import CATEGORIES, Task, class_function_docs, load_tasks, thaw
from envtune.environments.tool_calls import ANSWER_REPLY, format_pythonic_call, format_reply
from envtune.environments.types import FeedbackMode
from envtune.runtime.cli.bench_registry import Benchmark, Figure

BENCHMARK = Benchmark(
    name="env_step",
    summary="environment tool steps and turn scoring: envtune vs bfcl_eval's own executor and checkers",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="step_ratio", label="tool-call steps/s, envtune over bfcl_eval", unit="x", target=">= 1.5",
               samples="step_ratio_samples", baseline_key="baseline_steps_per_s",
               baseline_label="bfcl_eval 2025.6.13 execute_multi_turn_func_call", ratio=True),
        Figure(key="scoring_ratio", label="turn scoring/s, envtune over bfcl_eval", unit="x", target=">= 10",
               samples="scoring_ratio_samples", baseline_key="baseline_scoring_per_s",
               baseline_label="bfcl_eval: re-execute ground truth + state_checker + response_checker",
               ratio=True),
        Figure(key="gt_trace_ms_per_task", label="ground-truth trace, once per task (left out above)",
               unit="ms", baseline_label="paid once per task per run"),
    ),
    timeout_s=1800,
)

CLOCK = time.thread_time
"""CPU time of this thread: both arms run on it."""


def run_envtune_steps(env: BfclEnvironment, tasks: list[Task], feedback: FeedbackMode) -> tuple[float, int]:
    """(seconds in episode creation + tool steps, calls): ``Episode.step`` on ``<tool_call>`` replies."""
    seconds = 0.0
    calls_done = 0
    clock = CLOCK
    for task in tasks:
        replies = [
            (format_reply(calls) if calls else None, len(calls)) for calls in ground_truth_calls(task)
        ]
        t0 = clock()
        episode = env.make_episode(task.id, EpisodeConfig(feedback=feedback))
        episode.start()
        seconds += clock() - t0
        for reply, count in replies:
            if reply is not None:
                t0 = clock()
                episode.step(reply)
                seconds += clock() - t0
                calls_done += count
            episode.step(ANSWER_REPLY)
        if not episode.score().all_passed:
            raise RuntimeError(f"ground-truth replay failed on {task.id}: the benchmark would be meaningless")
    return seconds, calls_done


def run_envtune_scoring(env: BfclEnvironment, tasks: list[Task]) -> tuple[float, int]:
    """(seconds in ``TurnScorer.judge``, turns): the model side acts untimed, then each turn is scored."""
    seconds = 0.0
    turns_done = 0
    clock = CLOCK
    for task in tasks:
        instances = build_instances(task)
        dispatcher = Dispatcher(
            instances, {d.name: d.class_name for d in class_function_docs(task.involved_classes)}
        )
        scorer = TurnScorer(env.ground_truth.get(task), instances)
        for turn, calls in enumerate(ground_truth_calls(task)):
            for call in calls:
                result, _ = dispatcher.call(call.name, call.arguments)
                scorer.record(dispatcher.class_of(call.name), result)
            t0 = clock()
            passed = scorer.judge(turn, calls_in_turn=len(calls), called_on_empty_turn=False, forced=False)
            seconds += clock() - t0
            turns_done += 1
            if not passed:
                raise RuntimeError(f"ground-truth scoring failed on {task.id} turn {turn}")
    return seconds, turns_done


def run_reference(tasks: list[Task], tag: str) -> tuple[float, int, float, int]:
    """The same replay through bfcl_eval's executor and checkers (no ground-truth cache)."""
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import response_checker, state_checker

    step_seconds = score_seconds = 0.0
    calls_done = turns_done = 0
    clock = CLOCK
    for index, task in enumerate(tasks):
        model_name = f"bench_{tag}_{index}"
        config = thaw(task.initial_config)
        classes = list(task.involved_classes)
        turns = [[format_pythonic_call(c) for c in calls] for calls in ground_truth_calls(task)]
        all_model_results: list[str] = []
        for turn_index, call_strings in enumerate(turns):
            t0 = clock()
            results, model_instances = multi_turn_utils.execute_multi_turn_func_call(
                call_strings, config, classes, model_name, task.id, long_context=task.long_context
            )
            step_seconds += clock() - t0
            calls_done += len(call_strings)
            all_model_results.extend(results)
            t0 = clock()
            gt_results, gt_instances = multi_turn_utils.execute_multi_turn_func_call(
                list(task.ground_truth[turn_index]),
                config,
                classes,
                model_name + "_ground_truth",
                task.id,
                long_context=task.long_context,
            )
            if task.ground_truth[turn_index]:
                state_ok = state_checker(model_instances, gt_instances)["valid"]
                response_ok = response_checker(all_model_results, gt_results, turn_index)["valid"]
                if not (state_ok and response_ok):
                    raise RuntimeError(f"reference replay failed on {task.id} turn {turn_index}")
            score_seconds += clock() - t0
            turns_done += 1
        for key in [k for k in vars(multi_turn_utils) if k.startswith(model_name)]:
            delattr(multi_turn_utils, key)
    return step_seconds, calls_done, score_seconds, turns_done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="40 tasks per category instead of 200")
    parser.add_argument("--repeats", type=int, default=5, help="repeats (median [min, max] of their ratios)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="timed step seconds per arm per repeat (default 1.0 quick, 3.0 full)")
    parser.add_argument("--feedback", choices=[m.value for m in FeedbackMode], default="augmented")
    args = parser.parse_args(argv)

    per_category = 40 if args.quick else 200
    all_tasks = load_tasks()
    tasks = [t for c in CATEGORIES for t in [t for t in all_tasks.values() if t.category == c][:per_category]]
    env = BfclEnvironment()
    min_seconds = args.min_seconds if args.min_seconds is not None else (1.0 if args.quick else 3.0)
    t0 = CLOCK()
    for task in tasks:
        env.ground_truth.get(task)
    trace_ms = (CLOCK() - t0) * 1000 / len(tasks)

    feedback = FeedbackMode(args.feedback)
    # Per repeat: envtune steps/s and scoring/s, then the reference's.
    rates: list[tuple[float, float, float, float]] = []
    passes = 0
    for repeat in range(args.repeats):
        acc = [0.0] * 8  # env (s, calls, s, turns), reference (s, calls, s, turns)
        while min(acc[0], acc[4]) < min_seconds:  # whole passes, alternating, until both have enough
            gc.collect()
            s_sec, calls = run_envtune_steps(env, tasks, feedback)
            sc_sec, turns = run_envtune_scoring(env, tasks)
            gc.collect()
            r = run_reference(tasks, f"{repeat}_{passes}")
            for i, x in enumerate((s_sec, calls, sc_sec, turns, *r)):
                acc[i] += x
            passes += 1
        rates.append((acc[1] / acc[0], acc[3] / acc[2], acc[5] / acc[4], acc[7] / acc[6]))
    step_ratios = [e / r for e, _, r, _ in rates]
    scoring_ratios = [e / r for _, e, _, r in rates]
    figures = {
        "tasks": len(tasks),
        "calls_per_pass": calls,
        "turns_per_pass": turns,
        "passes": passes,
        "min_seconds": min_seconds,
        "feedback": feedback.value,
        "clock": "thread CPU time",
        "gt_trace_ms_per_task": round(trace_ms, 3),
        "steps_per_s": round(statistics.median(x[0] for x in rates)),
        "baseline_steps_per_s": round(statistics.median(x[2] for x in rates)),
        "step_ratio": round(statistics.median(step_ratios), 3),
        "step_ratio_samples": [round(x, 3) for x in step_ratios],
        "scoring_per_s": round(statistics.median(x[1] for x in rates)),
        "baseline_scoring_per_s": round(statistics.median(x[3] for x in rates)),
        "scoring_ratio": round(statistics.median(scoring_ratios), 3),
        "scoring_ratio_samples": [round(x, 3) for x in scoring_ratios],
        "load_average": round(os.getloadavg()[0], 2),
    }
    f = figures
    print(f"steps: ours {f['steps_per_s']}/s, reference {f['baseline_steps_per_s']}/s, x{f['step_ratio']} "
          f"[{min(step_ratios):.2f}, {max(step_ratios):.2f}] over {args.repeats} repeats, {passes} passes")
    print(
        f"turn scoring: envtune {f['scoring_per_s']}/s vs reference {f['baseline_scoring_per_s']}/s "
        f"(x{f['scoring_ratio']}); ground-truth trace, once per task: {f['gt_trace_ms_per_task']} ms"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
