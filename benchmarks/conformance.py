"""Conformance of envtune's environment with BFCL's own multi-turn checker.

1. Ground-truth replay: every task's ground truth played through an envtune episode must pass
   every turn (800/800).
2. Perturbed trajectories (calls dropped, arguments altered, calls reordered, extra calls, wrong
   function, skipped turns, calls on turns that must not call, steps split): envtune's verdict "all
   turns pass" is compared with BFCL's checker on the same calls.

Prints the agreement and the first disagreements; ends with one JSON line:
``{"replay_pass", "tasks", "trajectories", "agreement", ...}``.

    python benchmarks/conformance.py [--per-task 3] [--seed 0] [--limit N]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from envtune.environments.conformance import (
    ground_truth_run,
    judge,
    perturbed_runs,
    play_envtune,
)
from envtune.environments.episode import BfclEnvironment
from envtune.environments.tasks import load_tasks
from envtune.environments.types import FeedbackMode
from envtune.runtime.cli.bench_registry import Benchmark, Figure

BENCHMARK = Benchmark(
    name="conformance",
    summary="ground-truth replay and perturbed trajectories judged by envtune and by bfcl_eval's checker",
    quick=("--limit", "200"),
    full=(),
    figures=(
        Figure(key="replay_pass", label="tasks whose ground truth passes every turn", unit="tasks",
               baseline_key="tasks", baseline_label="all tasks run"),
        Figure(key="agreement", label="verdict agreement with bfcl_eval multi_turn_checker", target=">= 1.0",
               baseline_label="bfcl_eval 2025.6.13 multi_turn_checker + irrelevance checker"),
    ),
    checks=("all_replayed",),
    timeout_s=1200,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-task", type=int, default=3, help="perturbed trajectories per task (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks (default: all 800)")
    parser.add_argument("--show", type=int, default=10, help="disagreements to print")
    args = parser.parse_args(argv)

    tasks = list(load_tasks().values())[: args.limit]
    env = BfclEnvironment()
    started = time.perf_counter()

    replay_failures = []
    for task in tasks:
        for feedback in (FeedbackMode.STANDARD, FeedbackMode.AUGMENTED):
            turns = play_envtune(env, ground_truth_run(task), feedback)
            if not all(turns):
                replay_failures.append((task.id, feedback.value, turns))
    replay_pass = len(tasks) - len({task_id for task_id, _, _ in replay_failures})
    print(f"ground-truth replay: {replay_pass}/{len(tasks)} tasks pass every turn (standard and augmented)")
    for task_id, mode, turns in replay_failures[: args.show]:
        print(f"  replay FAIL {task_id} [{mode}] turns={turns}")

    verdicts = []
    by_kind: dict[str, list[bool]] = collections.defaultdict(list)
    for serial, trajectory in enumerate(perturbed_runs(tasks, args.per_task, args.seed)):
        verdict = judge(
            env, trajectory, serial, FeedbackMode.AUGMENTED if serial % 2 else FeedbackMode.STANDARD
        )
        verdicts.append(verdict)
        by_kind[trajectory.kind].append(verdict.agree)
    agreeing = sum(v.agree for v in verdicts)
    agreement = agreeing / len(verdicts) if verdicts else 1.0
    both_pass = sum(v.envtune_pass and v.bfcl_pass for v in verdicts)
    print(f"perturbed trajectories: {len(verdicts)}, agreement {agreeing}/{len(verdicts)} = {agreement:.4f}")
    print(f"  of which both judges pass: {both_pass}, both fail: {agreeing - both_pass}")
    for kind, agrees in sorted(by_kind.items()):
        print(f"  {kind:20s} {sum(agrees)}/{len(agrees)}")
    disagreements = [v for v in verdicts if not v.agree]
    for v in disagreements[: args.show]:
        print(
            f"  DISAGREE {v.trajectory.task_id} {v.trajectory.kind}: envtune={v.envtune_pass} "
            f"turns={v.envtune_turns} bfcl={v.bfcl_pass} ({v.bfcl_detail})"
        )
    elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "replay_pass": replay_pass,
                "tasks": len(tasks),
                "trajectories": len(verdicts),
                "agreement": round(agreement, 6),
                "both_pass": both_pass,
                "seconds": round(elapsed, 1),
                "all_replayed": replay_pass == len(tasks),
            }
        )
    )
    return 0 if replay_pass == len(tasks) and not disagreements else 1


if __name__ == "__main__":
    sys.exit(main())
