"""``envtune-eval``: BFCL V3 multi-turn accuracy of a model (optionally with a LoRA adapter).

Evaluation conditions are BFCL's: standard tool feedback, at most 20 replies per user turn, greedy
decoding, one episode per task. A task passes when every one of its turns passes
(``EpisodeScore.all_passed``: the environment's state and execution-result checks, the same
verdicts as BFCL's multi-turn checker). Accuracy is reported per category and overall; overall is
the unweighted mean of the category accuracies, as BFCL's multi-turn summary is (with 100 test
tasks per category it equals the plain mean).

``evaluate_tasks`` is the core, shared with the training run's validation; ``main`` is the CLI
(embedded engine in-process, or SGLang servers over HTTP), writing one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import AgentConfig, RewardKind
from envtune.agents.episode_loop import run_episode
from envtune.agents.grammar import ConstraintCache
from envtune.environments.episode import EVAL_MAX_STEPS_PER_TURN, BfclEnvironment, EpisodeConfig
from envtune.environments.tasks import CATEGORIES, load_split, load_tasks
from envtune.environments.types import FeedbackMode, PromptStyle
from envtune.runtime.engines.base import Engine, EngineError, SamplingParams

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EvalSettings:
    """Conditions of an evaluation (BFCL's by default)."""

    feedback: FeedbackMode = FeedbackMode.STANDARD
    """Tool feedback (standard: BFCL's own results)."""
    prompt_style: PromptStyle = PromptStyle.RESOURCEFUL
    """System prompt (the final stage's)."""
    max_steps_per_turn: int = EVAL_MAX_STEPS_PER_TURN
    """Replies allowed per user turn (BFCL: 20)."""
    constrained: bool = False
    """Grammar-constrained decoding (off: BFCL evaluates free generation)."""
    max_new_tokens: int = 2048
    """Cap on one reply."""
    max_total_tokens: int = 32768
    """Cap on a whole episode."""
    temperature: float = 0.0
    """0 = greedy."""
    concurrency: int = 32
    """Episodes run at once."""
    adapter: str | None = None
    """Name of a loaded LoRA adapter to evaluate (None: the engine's base weights)."""


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One evaluated task."""

    task_id: str
    """BFCL id."""
    category: str
    """Its category."""
    passed: bool
    """BFCL's verdict: every turn passed."""
    progress: float
    """Passed turns / all turns."""
    format_reward: float
    """R_format of the episode."""
    truncated: bool
    """The episode hit a length cap."""
    error: str | None = None
    """Why the episode could not be run (counted as failed)."""


@dataclass(frozen=True, slots=True)
class CategoryScore:
    """Accuracy of one category."""

    n: int
    """Tasks evaluated."""
    passed: int
    """Tasks passed."""
    accuracy: float
    """passed / n."""
    progress: float
    """Mean progress (partial credit, for reading; not a BFCL figure)."""


@dataclass(frozen=True, slots=True)
class EvalSummary:
    """Per-category and overall accuracy."""

    categories: Mapping[str, CategoryScore]
    """Category -> its score (only categories that were evaluated)."""
    overall_accuracy: float
    """Unweighted mean of the category accuracies (BFCL's overall)."""
    micro_accuracy: float
    """Passed / evaluated over all tasks."""
    n: int
    """Tasks evaluated."""
    errors: int
    """Episodes that failed to run (counted as not passed)."""
    results: tuple[TaskResult, ...] = field(default=(), repr=False)
    """Every task's result."""

    def to_json(self, *, include_results: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "overall_accuracy": self.overall_accuracy,
            "micro_accuracy": self.micro_accuracy,
            "n": self.n,
            "errors": self.errors,
            "categories": {name: asdict(score) for name, score in self.categories.items()},
        }
        if include_results:
            out["results"] = [asdict(r) for r in self.results]
        return out


def summarize(results: Sequence[TaskResult]) -> EvalSummary:
    """Aggregate task results, categories in BFCL's order."""
    categories: dict[str, CategoryScore] = {}
    for name in CATEGORIES:
        rows = [r for r in results if r.category == name]
        if rows:
            passed = sum(r.passed for r in rows)
            categories[name] = CategoryScore(
                n=len(rows),
                passed=passed,
                accuracy=passed / len(rows),
                progress=statistics.fmean(r.progress for r in rows),
            )
    return EvalSummary(
        categories=categories,
        overall_accuracy=statistics.fmean(s.accuracy for s in categories.values()) if categories else 0.0,
        micro_accuracy=sum(r.passed for r in results) / len(results) if results else 0.0,
        n=len(results),
        errors=sum(r.error is not None for r in results),
        results=tuple(results),
    )


async def evaluate_tasks(
    engine: Engine,
    env: BfclEnvironment,
    chat: ChatTokenizer,
    task_ids: Sequence[str],
    settings: EvalSettings = EvalSettings(),
    *,
    constraints: ConstraintCache | None = None,
) -> list[TaskResult]:
    """Run one episode per task under ``settings``; results in the order of ``task_ids``."""
    agent = AgentConfig(
        sampling=SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature),
        constrained=settings.constrained,
        max_total_tokens=settings.max_total_tokens,
        reward=RewardKind.PROGRESS,
        adapter=settings.adapter,
    )
    episode_config = EpisodeConfig(
        feedback=settings.feedback,
        prompt_style=settings.prompt_style,
        max_steps_per_turn=settings.max_steps_per_turn,
    )
    cache = constraints if constraints is not None else ConstraintCache()
    slots = asyncio.Semaphore(max(1, settings.concurrency))

    async def one(index: int, task_id: str) -> TaskResult:
        category = env.tasks[task_id].category
        async with slots:
            episode = env.make_episode(task_id, episode_config)
            try:
                trajectory = await run_episode(
                    engine, episode, chat, agent, task_id=task_id, group_id=f"eval-{index}", constraints=cache
                )
            except EngineError as exc:
                # A task the engine could not serve is a failed task, as in BFCL; the run goes on.
                log.warning("eval_episode_failed", task_id=task_id, error=str(exc))
                return TaskResult(task_id, category, False, 0.0, 0.0, False, error=str(exc))
            finally:
                episode.close()
        return TaskResult(
            task_id=task_id,
            category=category,
            passed=all(trajectory.turn_passed),
            progress=trajectory.progress,
            format_reward=trajectory.format_reward,
            truncated=trajectory.truncated,
        )

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(i, task_id)) for i, task_id in enumerate(task_ids)]
    return [t.result() for t in tasks]


def select_tasks(split_part: str, categories: Sequence[str], limit: int) -> list[str]:
    """Ids of a split part, restricted to ``categories``, at most ``limit`` per category (0 = all)."""
    tasks = load_tasks()
    ids = load_split().ids(split_part)
    out: list[str] = []
    for category in categories:
        chosen = [i for i in ids if tasks[i].category == category]
        out.extend(chosen[:limit] if limit else chosen)
    return out


# --- the command ----------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="envtune-eval",
        description="BFCL V3 multi-turn accuracy (per category and overall) of a model, optionally with "
        "a LoRA adapter, under BFCL's conditions: standard feedback, 20 replies per turn, greedy.",
    )
    parser.add_argument("--model", default="", help="model folder (default: the tiny local CPU model)")
    parser.add_argument("--sglang", default="", help="comma-separated SGLang server URLs serving --model")
    parser.add_argument("--adapter", default="", help="LoRA adapter folder (peft layout) to evaluate")
    parser.add_argument(
        "--split", default="test", choices=["test", "validation", "train", "train_minus_validation"]
    )
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="comma-separated categories")
    parser.add_argument("--limit", type=int, default=0, help="at most N tasks per category (0 = all)")
    parser.add_argument("--prompt-style", default="resourceful", choices=[p.value for p in PromptStyle])
    parser.add_argument("--max-steps-per-turn", type=int, default=EVAL_MAX_STEPS_PER_TURN)
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--constrained", action="store_true", help="grammar-constrained decoding")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--device", default=None, help="embedded engine device (cpu, cuda...)")
    parser.add_argument("--output", default="", help="also write the JSON to this file")
    parser.add_argument("--no-results", action="store_true", help="leave per-task results out of the JSON")
    parser.add_argument("--log-format", default="console", choices=["console", "json"])
    return parser


async def _run(args: argparse.Namespace) -> EvalSummary:
    from envtune.runtime.engines.embedded import EmbeddedEngine, EmbeddedEngineConfig
    from envtune.runtime.engines.sglang_client import SGLangClient, SGLangClientConfig
    from envtune.runtime.tiny_model import build_tiny_model, default_tiny_model_dir
    from transformers import AutoTokenizer

    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        raise SystemExit(f"envtune-eval: unknown categories {sorted(unknown)}; valid: {list(CATEGORIES)}")
    urls = tuple(u.strip() for u in args.sglang.split(",") if u.strip())
    if urls and not args.model:
        raise SystemExit("envtune-eval: --sglang needs --model (the tokenizer of the served model)")
    model_path = Path(args.model) if args.model else build_tiny_model(default_tiny_model_dir())
    task_ids = select_tasks(args.split, categories, args.limit)
    engine: Any
    if urls:
        engine = SGLangClient(SGLangClientConfig(urls=urls))
    else:
        engine = await EmbeddedEngine.open(EmbeddedEngineConfig(model_path=model_path, device=args.device))
    try:
        adapter = None
        if args.adapter:
            adapter = "envtune-eval-adapter"
            await engine.load_adapter(adapter, str(Path(args.adapter).resolve()))
        chat = ChatTokenizer(AutoTokenizer.from_pretrained(model_path))
        settings = EvalSettings(
            prompt_style=PromptStyle(args.prompt_style),
            max_steps_per_turn=args.max_steps_per_turn,
            constrained=args.constrained,
            max_new_tokens=args.max_new_tokens,
            max_total_tokens=args.max_total_tokens,
            concurrency=args.concurrency,
            adapter=adapter,
        )
        log.info("eval_started", tasks=len(task_ids), split=args.split, model=str(model_path), sglang=urls)
        results = await evaluate_tasks(engine, BfclEnvironment(), chat, task_ids, settings)
    finally:
        await engine.close()
    return summarize(results)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``envtune-eval``."""
    from envtune.runtime.logs import configure_logging

    args = build_arg_parser().parse_args(argv)
    configure_logging(args.log_format)
    summary = asyncio.run(_run(args))
    text = json.dumps(summary.to_json(include_results=not args.no_results), indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
