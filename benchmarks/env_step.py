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

    python benchmarks/env_step.py [--quick] [--repeats N]

Ends with one JSON line: steps_per_s, baseline_steps_per_s, step_ratio, scoring_per_s,
baseline_scoring_per_s, scoring_ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from envtune.environments.episode import BfclEnvironment, EpisodeConfig
from envtune.environments.ground_truth import ground_truth_calls
from envtune.environments.instances import Dispatcher, build_instances
from envtune.environments.scoring import TurnScorer
from envtune.environments.tasks import CATEGORIES, Task, class_function_docs, load_tasks, thaw
from envtune.environments.tool_calls import ANSWER_REPLY, format_pythonic_call, format_reply
from envtune.environments.types import FeedbackMode


def run_envtune_steps(env: BfclEnvironment, tasks: list[Task], feedback: FeedbackMode) -> tuple[float, int]:
    """(seconds in episode creation + tool steps, calls): ``Episode.step`` on ``<tool_call>`` replies."""
    seconds = 0.0
    calls_done = 0
    clock = time.perf_counter
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
    clock = time.perf_counter
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
    clock = time.perf_counter
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
    parser.add_argument("--repeats", type=int, default=3, help="passes over the tasks (best pass is kept)")
    parser.add_argument("--feedback", choices=[m.value for m in FeedbackMode], default="augmented")
    args = parser.parse_args(argv)

    per_category = 40 if args.quick else 200
    all_tasks = load_tasks()
    tasks = [t for c in CATEGORIES for t in [t for t in all_tasks.values() if t.category == c][:per_category]]
    env = BfclEnvironment()
    t0 = time.perf_counter()
    for task in tasks:
        env.ground_truth.get(task)
    trace_ms = (time.perf_counter() - t0) * 1000 / len(tasks)

    feedback = FeedbackMode(args.feedback)
    best_env: tuple[float, float] | None = None
    best_ref: tuple[float, float] | None = None
    for repeat in range(args.repeats):
        gc.collect()
        s_sec, calls = run_envtune_steps(env, tasks, feedback)
        sc_sec, turns = run_envtune_scoring(env, tasks)
        rates = (calls / s_sec, turns / sc_sec)
        best_env = rates if best_env is None else (max(best_env[0], rates[0]), max(best_env[1], rates[1]))
        gc.collect()
        s_sec, calls, sc_sec, turns = run_reference(tasks, str(repeat))
        rates = (calls / s_sec, turns / sc_sec)
        best_ref = rates if best_ref is None else (max(best_ref[0], rates[0]), max(best_ref[1], rates[1]))
    assert best_env is not None and best_ref is not None
    figures = {
        "tasks": len(tasks),
        "calls_per_pass": calls,
        "turns_per_pass": turns,
        "feedback": feedback.value,
        "gt_trace_ms_per_task": round(trace_ms, 3),
        "steps_per_s": round(best_env[0]),
        "baseline_steps_per_s": round(best_ref[0]),
        "step_ratio": round(best_env[0] / best_ref[0], 3),
        "scoring_per_s": round(best_env[1]),
        "baseline_scoring_per_s": round(best_ref[1]),
        "scoring_ratio": round(best_env[1] / best_ref[1], 3),
    }
    f = figures
    print(f"steps: ours {f['steps_per_s']}/s, reference {f['baseline_steps_per_s']}/s, x{f['step_ratio']}")
    print(
        f"turn scoring: envtune {f['scoring_per_s']}/s vs reference {f['baseline_scoring_per_s']}/s "
        f"(x{f['scoring_ratio']}); ground-truth trace, once per task: {f['gt_trace_ms_per_task']} ms"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
