"""What ``envtune-eval`` writes: ``eval.json``, the trajectories beside it, and the table it prints.

``eval.json`` (``SCHEMA_VERSION`` 1)::

    schema_version, created (UTC ISO), complete (false: interrupted, holds what finished), seconds,
    model, adapter, run, checkpoint_step, policy_version (the --run checkpoint's; else null),
    engine, sampling, conditions, trajectories (file name, beside eval.json),
    overall: {suites, tasks, passed, errors, accuracy (mean of the suites' accuracies),
              micro_accuracy (passed / tasks over every suite)},
    suites: {NAME: {
        family, metric, options,          # the suite's settings that shaped its numbers
        complete,                         # false: interrupted; the counts are of what finished
        tasks, passed, accuracy,          # scored episodes (trials count one each), passed, headline
        micro_accuracy, errors,           # passed / tasks; episodes that raised (failed, with reason)
        unscored_tasks,                   # set-up episodes run for dependencies (memory prerequisites)
        categories: {CATEGORY: {tasks, passed, accuracy}},
        verdicts: [{task_id, category, passed, reward, trial, detail}],  # one per scored episode
        trajectories,                     # the file holding this suite's episodes
        bfcl_v3: {split, categories} | bfcl_v4: {...} | tau2: {split, trials, average_reward,
        pass_hat: {k: value}, user_simulator, nl_judge, nl_assertion_tasks}
        | acebench: {process_accuracy: {...}}}}

``accuracy`` is each benchmark's headline: BFCL V3's overall is the unweighted mean of its category
accuracies (BFCL's multi-turn summary; with equal categories it is the plain mean); every other suite
reports passed / tasks (τ²'s pass^1 over all trials, BFCL V4's and ACEBench's accuracy). A verdict's
``detail`` explains it in the benchmark's terms; an episode that raised has ``detail.error``.

The trajectories file has one JSON line per episode (scored or not, failed or not), every key
present (null where it does not apply): ``suite, task_id, category, trial, scored, passed, reward,
error, progress, format_reward, tool_reward, turn_passed, step_codes, prompt_tokens,
completion_tokens, total_tokens, truncated, seconds, messages, tool_calls`` -- ``messages`` and
``tool_calls`` in the shape of the training run's trajectory log (``trajectory_log.py``). Lines are
written as episodes end, so an interrupted evaluation keeps every finished one.

Left out: running anything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from envtune.environments.suite_api import TaskVerdict
from envtune.environments.suites import SuiteInfo, SuiteOptions
from envtune.environments.tasks import CATEGORIES
from envtune.runtime.recipe.run_folder import atomic_write_text
from envtune.runtime.recipe.suite_eval import EpisodeOutcome
from envtune.runtime.recipe.trajectory_log import transcript_calls, transcript_messages

SCHEMA_VERSION = 1
EVAL_FILE = "eval.json"
TRAJECTORIES_SUFFIX = "_trajectories.jsonl"
"""The trajectories file is ``<eval file stem>_trajectories.jsonl`` beside ``eval.json``."""


def trajectories_path(eval_path: Path) -> Path:
    return eval_path.with_name(eval_path.stem + TRAJECTORIES_SUFFIX)


def default_output(run_folder: str, now: dt.datetime | None = None) -> Path:
    """``<run>/eval.json``, or ``evals/<UTC timestamp>/eval.json`` without a run."""
    if run_folder:
        return Path(run_folder) / EVAL_FILE
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d-%H%M%S")
    return Path("evals") / stamp / EVAL_FILE


def plain(value: Any) -> Any:
    """JSON-ready: Paths as strings, records as objects, enums as values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def suite_options(info: SuiteInfo, options: SuiteOptions) -> dict[str, Any]:
    """The options that shaped a suite's numbers (the others do not apply to it)."""
    keys: tuple[str, ...] = ()
    if info.name.startswith("bfcl-v4-memory"):
        keys = ("memory_embedder",)
    elif info.name.startswith("bfcl-v4-web-search"):
        keys = ("web_search_backend", "web_search_recording", "web_search_failure_rate", "seed")
    elif info.family == "tau2":
        keys = ("tau2_split", "tau2_user", "tau2_judge")
    elif info.family == "acebench":
        keys = ("acebench_data", "tau2_user")
    return {key: plain(getattr(options, key)) for key in keys}


def _rate(passed: int, tasks: int) -> float:
    return passed / tasks if tasks else 0.0


def _verdict_json(verdict: TaskVerdict, trial: int) -> dict[str, Any]:
    return {
        "task_id": verdict.task_id,
        "category": verdict.category,
        "passed": verdict.passed,
        "reward": verdict.reward,
        "trial": trial,
        "detail": plain(verdict.detail),
    }


def summarize_suite(
    info: SuiteInfo,
    outcomes: Sequence[EpisodeOutcome],
    *,
    options: Mapping[str, Any],
    trajectories: str,
    family_block: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One suite's entry of ``eval.json`` (see the module docstring)."""
    scored = [o for o in outcomes if o.run.scored and o.verdict is not None]
    categories: dict[str, dict[str, Any]] = {}
    order = list(CATEGORIES) if info.family == "bfcl-v3" else []
    for outcome in scored:
        if outcome.run.category not in order:
            order.append(outcome.run.category)
    for category in order:
        rows = [o for o in scored if o.run.category == category]
        if rows:
            passed = sum(o.verdict is not None and o.verdict.passed for o in rows)
            categories[category] = {
                "tasks": len(rows),
                "passed": passed,
                "accuracy": _rate(passed, len(rows)),
            }
    passed = sum(o.verdict is not None and o.verdict.passed for o in scored)
    micro = _rate(passed, len(scored))
    headline = micro
    if info.family == "bfcl-v3" and categories:
        headline = statistics.fmean(c["accuracy"] for c in categories.values())
    entry: dict[str, Any] = {
        "family": info.family,
        "metric": info.metric,
        "options": dict(options),
        "tasks": len(scored),
        "passed": passed,
        "accuracy": headline,
        "micro_accuracy": micro,
        "errors": sum(o.error is not None for o in outcomes),
        "unscored_tasks": sum(not o.run.scored for o in outcomes),
        "categories": categories,
        "verdicts": [_verdict_json(o.verdict, o.run.trial) for o in scored if o.verdict is not None],
        "trajectories": trajectories,
    }
    if family_block is not None:
        entry[info.family.replace("-", "_")] = dict(family_block)
    return entry


def overall(suites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``overall`` entry: every suite's counts added up, and the mean of their accuracies."""
    tasks = sum(int(suite["tasks"]) for suite in suites.values())
    passed = sum(int(suite["passed"]) for suite in suites.values())
    return {
        "suites": len(suites),
        "tasks": tasks,
        "passed": passed,
        "errors": sum(int(suite["errors"]) for suite in suites.values()),
        "accuracy": statistics.fmean(s["accuracy"] for s in suites.values()) if suites else 0.0,
        "micro_accuracy": _rate(passed, tasks),
    }


def tau2_block(
    outcomes: Sequence[EpisodeOutcome],
    *,
    split: str,
    trials: int,
    user: str,
    judge: str | None,
    nl_assertion_tasks: int = 0,
) -> dict[str, Any]:
    """τ²'s aggregate metrics (average reward, pass^k for k up to the trials) as tau2 computes them."""
    from envtune.environments.tau2.metrics import compute_metrics

    rewards = [(o.run.task_id, o.verdict.reward) for o in outcomes if o.run.scored and o.verdict is not None]
    metrics = compute_metrics(rewards)
    return {
        "split": split,
        "trials": trials,
        "average_reward": metrics.average_reward,
        "pass_hat": {str(k): v for k, v in metrics.pass_hat.items()},
        "user_simulator": user,
        "nl_judge": judge,
        "nl_assertion_tasks": nl_assertion_tasks,
    }


def acebench_block(outcomes: Sequence[EpisodeOutcome]) -> dict[str, Any]:
    """ACEBench's process accuracy (milestones reached in order), overall and per category."""
    values: dict[str, list[float]] = {}
    for outcome in outcomes:
        verdict = outcome.verdict
        if not outcome.run.scored or verdict is None:
            continue
        value = verdict.detail.get("process_accuracy")
        score = float(value) if isinstance(value, int | float) else 0.0  # a failed run reached none
        values.setdefault(outcome.run.category, []).append(score)
    every = [v for vs in values.values() for v in vs]
    return {
        "process_accuracy": {
            "all": statistics.fmean(every) if every else 0.0,
            **{category: statistics.fmean(vs) for category, vs in values.items()},
        }
    }


def trajectory_record(suite: str, outcome: EpisodeOutcome) -> dict[str, Any]:
    """One line of the trajectories file (see the module docstring)."""
    trajectory = outcome.trajectory
    verdict = outcome.verdict
    record: dict[str, Any] = {
        "suite": suite,
        "task_id": outcome.run.task_id,
        "category": outcome.run.category,
        "trial": outcome.run.trial,
        "scored": outcome.run.scored,
        "passed": verdict.passed if verdict is not None else None,
        "reward": verdict.reward if verdict is not None else None,
        "error": outcome.error,
        "progress": None,
        "format_reward": None,
        "tool_reward": None,
        "turn_passed": None,
        "step_codes": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "truncated": None,
        "seconds": outcome.seconds,
    }
    if trajectory is not None:
        mask = trajectory.loss_mask
        record.update(
            progress=trajectory.progress,
            format_reward=trajectory.format_reward,
            tool_reward=trajectory.tool_reward,
            turn_passed=list(trajectory.turn_passed),
            step_codes=list(trajectory.step_codes),
            prompt_tokens=mask.index(True) if True in mask else len(mask),
            completion_tokens=sum(mask),
            total_tokens=len(mask),
            truncated=trajectory.truncated,
        )
    transcript = outcome.transcript
    record["messages"] = transcript_messages(transcript)
    record["tool_calls"] = transcript_calls(transcript)
    return record


def write_eval(path: Path, result: Mapping[str, Any]) -> None:
    """``eval.json``, atomically (a reader sees the old file or the new one)."""
    atomic_write_text(Path(path), json.dumps(plain(result), indent=1, ensure_ascii=False) + "\n")


def format_table(result: Mapping[str, Any]) -> str:
    """The table ``envtune-eval`` prints: per suite, its categories then its overall line."""
    rows: list[tuple[str, ...]] = [("suite", "category", "tasks", "passed", "accuracy", "errors")]
    for name, suite in result["suites"].items():
        for category, score in suite["categories"].items():
            rows.append(
                (
                    name,
                    category,
                    str(score["tasks"]),
                    str(score["passed"]),
                    f"{100 * score['accuracy']:.2f}%",
                    "",
                )
            )
        rows.append(
            (
                name,
                "(overall)",
                str(suite["tasks"]),
                str(suite["passed"]),
                f"{100 * suite['accuracy']:.2f}%",
                str(suite["errors"]),
            )
        )
        tau2 = suite.get("tau2")
        if tau2 and len(tau2["pass_hat"]) > 1:
            hats = ", ".join(f"pass^{k} {100 * v:.2f}%" for k, v in tau2["pass_hat"].items())
            rows.append((name, f"({hats})", "", "", "", ""))
    overall_entry = result.get("overall")
    if overall_entry and len(result["suites"]) > 1:
        rows.append(
            (
                "(all suites)",
                "(mean of suites)",
                str(overall_entry["tasks"]),
                str(overall_entry["passed"]),
                f"{100 * overall_entry['accuracy']:.2f}%",
                str(overall_entry["errors"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.extend(table_notes(result))
    return "\n".join(lines)


def table_notes(result: Mapping[str, Any]) -> list[str]:
    """Lines under the table: what the numbers do not cover (an interruption, unjudged assertions)."""
    notes = []
    if not result.get("complete", True):
        notes.append("note: interrupted; the counts are of the episodes that finished")
    for name, suite in result["suites"].items():
        tau2 = suite.get("tau2")
        if tau2 is not None and tau2.get("nl_judge") is None:
            notes.append(
                f"note: {name}: tau2's natural-language assertions are judged only with a judge endpoint "
                f"(suites.tau2_judge); none configured, and {tau2.get('nl_assertion_tasks', 0)} of the "
                "chosen tasks are scored on them"
            )
    return notes
