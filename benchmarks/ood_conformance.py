"""Out-of-distribution suites vs each benchmark's own evaluator: agreement on every task, judge speed.

1. BFCL V4 memory (kv, vector, rec_sum): every question's ground truth and every perturbation, after
   the prerequisite conversations, judged by envtune and by BFCL's ``agentic_checker`` (2026.3.23).
2. BFCL V4 web search (base, no-snippet): every task's ground truth (search each hop, read its page,
   answer) on the offline corpus; perturbations on every task (``--quick``: the first 20).
3. BFCL V4 memory backends vs BFCL's classes: random call sequences (``--quick``: 10 per backend).
4. τ² (retail, airline, telecom; ``--split``): every task's ground truth, envtune's judge vs tau2's
   ``evaluate_simulation`` (in a second worker process, in parallel); perturbations on every task
   (``--quick``: one task per domain, every perturbation kind).
5. Judge throughput, same run, both arms on equal work, interleaved, ``--repeats`` times:
   - BFCL: envtune's answer rule vs BFCL's checker on the same (final message, answers) pairs;
   - τ²: judging a finished conversation — envtune (final-state hash of the session, gold state
     replayed and hashed, rules) vs tau2's ``evaluate_simulation`` (replays the trajectory and the
     gold actions into two fresh environments). "cold" recomputes envtune's gold state for every
     conversation (equal work); "warm" reuses the per-task gold cache as an evaluation run does.

6. With ``--acebench PATH`` (an ACEBench checkout): milestone replays and perturbations judged by
   envtune and by the checkout's own ``agent_checker``.

Prints progress, then one JSON line. Needs ``make setup`` and ``make setup-ood``.

    python benchmarks/ood_conformance.py [--quick] [--repeats 3] [--seed 0] [--split base] [--acebench PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from envtune.environments.bfcl_v4 import MemoryEnvironment, WebSearchEnvironment, check_answer
from envtune.environments.bfcl_v4 import conformance as v4
from envtune.environments.bfcl_v4.backend_conformance import ReferenceBackends, compare, random_calls
from envtune.environments.tau2 import conformance as t2
from envtune.environments.tau2.environment import Tau2Environment
from envtune.environments.tau2.worker import Tau2Worker, default_python
from envtune.runtime.cli.bench_registry import Benchmark, Figure

BENCHMARK = Benchmark(
    name="ood_conformance",
    summary="BFCL V4 / tau2 verdicts vs their own evaluators; judge throughput (needs make setup-ood)",
    quick=("--quick",),
    full=(),
    figures=(
        Figure(key="bfcl_v4_memory_agreement", label="BFCL V4 memory: agreement with agentic_checker",
               target=">= 1.0", baseline_label="bfcl_eval 2026.3.23 agentic_checker"),
        Figure(key="bfcl_v4_web_search_agreement", label="BFCL V4 web search: agreement", target=">= 1.0",
               baseline_label="bfcl_eval 2026.3.23 agentic_checker"),
        Figure(key="tau2_agreement", label="tau2: agreement with evaluate_simulation", target=">= 1.0",
               baseline_label="tau2-bench evaluate_simulation"),
        Figure(key="bfcl_judge_speedup.median", label="BFCL V4 judge, envtune over BFCL's checker", unit="x",
               baseline_label="bfcl_eval agentic_checker on the same pairs", ratio=True),
    ),
    timeout_s=3600,
)


def log(message: str) -> None:
    print(message, flush=True)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bfcl_v4_agreement(quick: bool, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    memory_runs: list[v4.Agreement] = []
    memory_tasks = 0
    for backend in ("kv", "vector", "rec_sum"):
        started = time.perf_counter()
        items = list(v4.environment_agreements(MemoryEnvironment(backend), seed=seed))
        result = v4.summary(items)
        memory_runs += items
        memory_tasks += result["tasks"]
        log(
            f"bfcl-v4 memory {backend}: {result['tasks']} tasks, {result['runs']} runs, agreement "
            f"{result['agreement']:.4f}, ground truth passes {result['ground_truth_pass_envtune']}/"
            f"{result['ground_truth_pass_bfcl']} ({time.perf_counter() - started:.0f} s)"
        )
    web_runs: list[v4.Agreement] = []
    web_tasks = 0
    for variant in ("base", "no_snippet"):
        started = time.perf_counter()
        env = WebSearchEnvironment(variant, seed=seed)
        truth = list(v4.environment_agreements(env, perturbed=False))
        perturbed = [
            a
            for a in v4.environment_agreements(env, seed=seed, limit=20 if quick else None)
            if a.plan.kind != "ground_truth"
        ]
        items = truth + perturbed
        result = v4.summary(items)
        web_runs += items
        web_tasks += result["tasks"]
        log(
            f"bfcl-v4 web search {variant}: {result['tasks']} tasks, {result['runs']} runs, agreement "
            f"{result['agreement']:.4f} ({time.perf_counter() - started:.0f} s)"
        )
    out["bfcl_v4_memory_tasks"] = memory_tasks
    out["bfcl_v4_memory_runs"] = len(memory_runs)
    out["bfcl_v4_memory_agreement"] = sum(a.agree for a in memory_runs) / len(memory_runs)
    out["bfcl_v4_web_search_tasks"] = web_tasks
    out["bfcl_v4_web_search_runs"] = len(web_runs)
    out["bfcl_v4_web_search_agreement"] = sum(a.agree for a in web_runs) / len(web_runs)
    out["_bfcl_pairs"] = [
        (a.plan.steps[-1], task_answers)
        for a, task_answers in _answers_of(memory_runs + web_runs)
        if isinstance(a.plan.steps[-1], str) and a.plan.steps[-1]
    ]
    return out


def _answers_of(items: Sequence[v4.Agreement]) -> list[tuple[v4.Agreement, list[str]]]:
    answers: dict[str, list[str]] = {}
    for backend in ("kv", "vector", "rec_sum"):
        answers.update({t.id: list(t.answers) for t in MemoryEnvironment(backend).task_map.values()})
    for variant in ("base", "no_snippet"):
        answers.update({t.id: list(t.answers) for t in WebSearchEnvironment(variant).task_map.values()})
    return [(a, answers[a.plan.task_id]) for a in items]


def backend_agreement(quick: bool, seed: int) -> dict[str, Any]:
    reference = ReferenceBackends(default_python())
    try:
        rng = random.Random(seed)
        per_backend = 10 if quick else 50
        results = {}
        calls = 0
        for backend in ("kv", "vector", "rec_sum"):
            comparisons = [
                compare(reference, backend, random_calls(backend, rng, 80)) for _ in range(per_backend)
            ]
            calls += sum(c.calls for c in comparisons)
            results[backend] = sum(c.agree for c in comparisons) / len(comparisons)
            log(
                f"bfcl-v4 {backend} backend vs BFCL's class: {len(comparisons)} sequences, "
                f"agreement {results[backend]:.4f}"
            )
    finally:
        reference.close()
    return {"bfcl_v4_backend_sequences_agreement": results, "bfcl_v4_backend_calls": calls}


def tau2_agreement(
    quick: bool, seed: int, split: str, worker: Tau2Worker, reference: Tau2Worker
) -> dict[str, Any]:
    runs: list[t2.Agreement] = []
    tasks = 0
    truth_ok = 0
    envs = {}
    for domain in ("retail", "airline", "telecom"):
        started = time.perf_counter()
        env = envs[domain] = Tau2Environment(domain, split=split, worker=worker)
        truth = list(t2.agreements(env, perturbed=False, reference=reference))
        if quick:
            sample = [
                next(
                    t.id
                    for t in env.task_map.values()
                    if len(t.actions) >= 3 and any(not a.name.startswith(t2.READ_PREFIXES) for a in t.actions)
                )
            ]
        else:
            sample = list(env.task_map)
        perturbed = [
            a
            for a in t2.agreements(env, seed=seed, task_ids=sample, reference=reference)
            if a.plan.kind != "ground_truth"
        ]
        items = truth + perturbed
        result = t2.summary(items)
        runs += items
        tasks += len(truth)
        truth_ok += sum(a.envtune_reward == 1.0 and a.reference_reward == 1.0 for a in truth)
        log(
            f"tau2 {domain} ({split}): {len(truth)} tasks, {len(items)} runs, "
            f"agreement {result['agreement']:.4f}, "
            f"ground truth reward 1: {result['ground_truth_reward1_envtune']} envtune / "
            f"{result['ground_truth_reward1_tau2']} tau2 ({time.perf_counter() - started:.0f} s)"
        )
        for a in items:
            if not a.agree:
                log(
                    f"  DISAGREE {a.plan.kind} {a.plan.task_id}: "
                    f"envtune {a.envtune_reward} tau2 {a.reference_reward}"
                )
    return {
        "tau2_split": split,
        "tau2_tasks": tasks,
        "tau2_runs": len(runs),
        "tau2_agreement": sum(a.agree for a in runs) / len(runs),
        "tau2_ground_truth_reward1": truth_ok,
        "_tau2_envs": envs,
        "_tau2_runs": runs,
    }


def interleaved(arms: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """Items per second of each arm, alternating which goes first."""
    rates: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            started = time.perf_counter()
            count = arms[name]()
            rates[name].append(count / (time.perf_counter() - started))
    return rates


def bfcl_judge_throughput(pairs: list[tuple[str, list[str]]], repeats: int) -> dict[str, Any]:
    checker = v4.reference_checker()

    def ours() -> int:
        for text, answers in pairs:
            check_answer(text, tuple(answers))
        return len(pairs)

    def theirs() -> int:
        for text, answers in pairs:
            checker.agentic_checker(text, answers)
        return len(pairs)

    rates = interleaved({"envtune": ours, "bfcl": theirs}, repeats)
    ratios = [a / b for a, b in zip(rates["envtune"], rates["bfcl"], strict=True)]
    return {
        "bfcl_judge_items": len(pairs),
        "bfcl_judge_per_s_envtune": spread(rates["envtune"]),
        "bfcl_judge_per_s_bfcl": spread(rates["bfcl"]),
        "bfcl_judge_speedup": spread(ratios),
    }


def tau2_judge_throughput(
    envs: dict[str, Tau2Environment],
    runs: list[t2.Agreement],
    reference: Tau2Worker,
    per_domain: int,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """Judge the same finished conversations with both evaluators."""
    rng = random.Random(seed)
    chosen: list[tuple[Tau2Environment, t2.Agreement, list[dict[str, Any]]]] = []
    for domain, env in envs.items():
        stops = [
            a
            for a in runs
            if a.plan.task_id in env.task_map
            and a.termination in ("user_stop", "agent_stop")
            and env.task_map[a.plan.task_id].domain == domain
        ]
        for item in rng.sample(stops, min(per_domain, len(stops))):
            messages = t2.play(env, item.plan)[2]
            chosen.append((env, item, messages))
    sessions = []
    for index, (env, item, messages) in enumerate(chosen):
        session = f"bench:{index}"
        t2.replay_into_session(env, item.plan.task_id, messages, session)
        sessions.append(session)

    def envtune(cold: bool) -> Callable[[], int]:
        def run() -> int:
            for (env, item, messages), session in zip(chosen, sessions, strict=True):
                if cold:
                    env._gold.pop(item.plan.task_id, None)
                env.judge_conversation(env.task_map[item.plan.task_id], session, messages, item.termination)
            return len(chosen)

        return run

    def tau2() -> int:
        for env, item, messages in chosen:
            t2.reference_reward(env, item.plan.task_id, messages, item.termination, reference)
        return len(chosen)

    rates = interleaved(
        {"envtune_cold": envtune(True), "envtune_warm": envtune(False), "tau2": tau2}, repeats
    )
    for (env, _, _), session in zip(chosen, sessions, strict=True):
        env.worker.close_session(session)
    return {
        "tau2_judge_conversations": len(chosen),
        "tau2_judge_per_s_envtune_cold": spread(rates["envtune_cold"]),
        "tau2_judge_per_s_envtune_warm": spread(rates["envtune_warm"]),
        "tau2_judge_per_s_tau2": spread(rates["tau2"]),
        "tau2_judge_speedup_cold": spread(
            [a / b for a, b in zip(rates["envtune_cold"], rates["tau2"], strict=True)]
        ),
        "tau2_judge_speedup_warm": spread(
            [a / b for a, b in zip(rates["envtune_warm"], rates["tau2"], strict=True)]
        ),
    }


def acebench_agreement(root: Path, seed: int) -> dict[str, Any]:
    """envtune's end-state verdicts vs the checkout's own ``agent_checker`` (milestone replays)."""
    from envtune.environments.acebench import AceBenchEnvironment
    from envtune.environments.acebench import conformance as ace

    env = AceBenchEnvironment(root)
    try:
        items = list(ace.agreements(env, seed=seed))
    finally:
        env.close()
    runs = [a for a in items if not isinstance(a, str)]
    truth = [a for a in runs if a.plan.kind == "ground_truth"]
    log(
        f"acebench: {len(env.task_map)} tasks, {len(runs)} runs, agreement "
        f"{sum(a.agree for a in runs) / len(runs):.4f}; "
        f"{len(items) - len(runs)} tasks with unparseable milestones"
    )
    return {
        "acebench_tasks": len(env.task_map),
        "acebench_replayed_tasks": len(truth),
        "acebench_runs": len(runs),
        "acebench_agreement": sum(a.agree for a in runs) / len(runs),
        "acebench_milestone_replay_reaches_ground_truth": sum(a.envtune_pass for a in truth),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="every task's ground truth; fewer perturbations and timings"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3 quick, 5 full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="base", help="tau2 split (base or test)")
    parser.add_argument(
        "--acebench", type=Path, default=None, help="an ACEBench checkout: also check ACEBench"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    started = time.perf_counter()
    load_start = os.getloadavg()
    if not default_python().exists():
        log(f"the OOD extra environment is missing ({default_python()}): run `make setup-ood`")
        return 2

    out: dict[str, Any] = {"quick": args.quick, "seed": args.seed}
    out.update(bfcl_v4_agreement(args.quick, args.seed))
    out.update(backend_agreement(args.quick, args.seed))
    worker, reference = Tau2Worker(), Tau2Worker()
    try:
        out.update(tau2_agreement(args.quick, args.seed, args.split, worker, reference))
        log("timing the judges ...")
        out.update(bfcl_judge_throughput(out.pop("_bfcl_pairs"), repeats))
        out.update(
            tau2_judge_throughput(
                out.pop("_tau2_envs"),
                out.pop("_tau2_runs"),
                reference,
                per_domain=4 if args.quick else 10,
                repeats=repeats,
                seed=args.seed,
            )
        )
    finally:
        worker.close()
        reference.close()
    if args.acebench is not None:
        out.update(acebench_agreement(args.acebench, args.seed))
    out["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    # CPU time of this process and its (closed) worker processes: the run's own need on a shared machine.
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu_seconds"] = round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1)
    out["cpus"] = os.cpu_count()
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))
    agree = [out["bfcl_v4_memory_agreement"], out["bfcl_v4_web_search_agreement"], out["tau2_agreement"]]
    return 0 if all(value == 1.0 for value in agree) else 1


if __name__ == "__main__":
    sys.exit(main())
