"""``envtune-eval``: accuracy of a model (optionally with a LoRA adapter) on evaluation suites.

    envtune-eval                                        # the tiny CPU model on BFCL V3's test split
    envtune-eval --suite list                           # the suites
    envtune-eval --run runs/20260101-120000-paper --suite bfcl-v3 --suite bfcl-v4-memory-kv
    envtune-eval --model /models/Qwen2.5-7B-Instruct --adapter runs/x/checkpoints/step-000040/adapter
    envtune-eval --suite tau2-retail --set suites.tau2_user.base_url=http://h:30000/v1 \\
        --set suites.tau2_user.model=gpt-4.1 --trials 4
    envtune-eval --suite acebench-agent --data /data/ACEBench --limit 5

The config is ``EvalConfig`` (``--list-keys`` lists every key); the options are shorthands for keys.
``--run RUN`` evaluates that run's final adapter (its last complete checkpoint's) on the model and
engine of its ``config.toml`` and writes ``eval.json`` into the run folder; elsewhere it goes to
``--output`` or ``evals/<UTC timestamp>/``. The suites run one after the other, each task's
episodes concurrently (``conditions.concurrency``), under each benchmark's evaluation conditions.
A progress display runs on stderr; the table goes to stdout, then the path of ``eval.json`` as the
last line (``--json``: eval.json itself instead of the table).

Bad input (an unknown suite, a missing ``--data``, OOD environment or user simulator) exits with
status 2 before any engine starts; an episode that raises is one failed task with its error in the
verdict; Ctrl-C exits with 130, ``eval.json`` keeping what finished (``complete`` false).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from envtune.agents.engine import EngineUnavailable
from envtune.environments.suites import SuiteInfo, close_shared, get_suite, listing, suite_names
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config import ConfigError, EvalConfig

log = structlog.get_logger(__name__)

EVAL_ADAPTER_NAME = "envtune-eval-adapter"
"""Name the evaluated adapter is loaded under."""


def build_arg_parser() -> argparse.ArgumentParser:
    from envtune.runtime.recipe.progress import add_verbosity_arguments

    parser = argparse.ArgumentParser(
        prog="envtune-eval",
        description="Accuracy of a model, optionally with a LoRA adapter, on BFCL V3 and the "
        "out-of-distribution suites (BFCL V4 memory and web search, tau2-bench, ACEBench agent), under "
        "each benchmark's evaluation conditions. Writes eval.json and prints a table.",
    )
    parser.add_argument("config", nargs="?", help="TOML config (EvalConfig; default: all defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set suites.tau2_split=test (see --list-keys)",
    )
    parser.add_argument(
        "--suite",
        dest="suites",
        action="append",
        default=[],
        metavar="NAME",
        help="a suite to run (repeatable; tasks.suites); --suite list prints them",
    )
    parser.add_argument("--run", help="a run folder: evaluate its final adapter on its model (run)")
    parser.add_argument("--model", help="model folder (model.path; default: the tiny local CPU model)")
    parser.add_argument("--adapter", help="LoRA adapter folder (peft layout) to evaluate (adapter)")
    parser.add_argument("--sglang", help="comma-separated SGLang server URLs serving --model")
    parser.add_argument("--limit", type=int, help="at most this many scored tasks per category (tasks.limit)")
    parser.add_argument("--ids", help="comma-separated task ids, ID or SUITE:ID (tasks.ids)")
    parser.add_argument("--trials", type=int, help="episodes per task, for pass^k (tasks.trials)")
    parser.add_argument("--data", help="the ACEBench checkout for acebench-agent (suites.acebench_data)")
    parser.add_argument("--output", help="where eval.json is written (output)")
    parser.add_argument("--json", action="store_true", help="print eval.json to stdout instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    parser.add_argument("--list-keys", action="store_true", help="list every config key and exit")
    add_verbosity_arguments(parser)
    return parser


def run_layer(run_folder: Path) -> dict[str, Any]:
    """The ``model`` and ``engine`` tables of a run's ``config.toml`` (the rest is the run's business)."""
    path = Path(run_folder) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"--run {run_folder}: not a run folder (no config.toml)")
    raw = config_io.read_toml(path)
    return {key: raw[key] for key in ("model", "engine") if isinstance(raw.get(key), Mapping)}


def resolve_config(args: argparse.Namespace) -> EvalConfig:
    """The eval config: a run's model and engine (with ``--run``), the file, the shorthands and
    ``--set`` (each laid over the one before)."""
    overrides: list[str] = []
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.adapter:
        overrides.append(f"adapter={args.adapter}")
    if args.run:
        overrides.append(f"run={args.run}")
    if args.sglang:
        overrides += ["engine.kind=sglang", f"engine.sglang.urls={args.sglang}"]
    if args.suites:
        overrides.append("tasks.suites=" + ",".join(args.suites))
    if args.limit is not None:
        overrides.append(f"tasks.limit={args.limit}")
    if args.ids:
        overrides.append(f"tasks.ids={args.ids}")
    if args.trials is not None:
        overrides.append(f"tasks.trials={args.trials}")
    if args.data:
        overrides.append(f"suites.acebench_data={args.data}")
    if args.output:
        overrides.append(f"output={args.output}")
    overrides += args.overrides
    user = config_io.read_toml(Path(args.config)) if args.config else {}
    config = config_io.from_dict(EvalConfig, config_io.apply_overrides(EvalConfig, dict(user), overrides))
    if config.run:
        raw = config_io.merge_tables(run_layer(Path(config.run)), user)
        config = config_io.from_dict(EvalConfig, config_io.apply_overrides(EvalConfig, raw, overrides))
    return config


# --- the evaluation ----------------------------------------------------------------------------------------


def _episode_config(info: SuiteInfo, config: EvalConfig) -> Any:
    """The episode config of a suite's family under this evaluation's conditions."""
    if info.family == "tau2":
        return config.conditions.tau2
    if info.family == "acebench":
        return config.conditions.acebench
    return config.conditions.episode  # BFCL V3 and V4 share the episode protocol and its config


def _family_block(info: SuiteInfo, environment: Any, config: EvalConfig, outcomes: Sequence[Any]) -> Any:
    from envtune.runtime.recipe.eval_output import acebench_block, tau2_block

    options = config.suites
    if info.family == "bfcl-v3":
        return {"split": config.tasks.split, "categories": list(config.tasks.categories)}
    if info.name.startswith("bfcl-v4-memory"):
        return {"memory_backend": environment.backend, "embedder": options.memory_embedder}
    if info.family == "bfcl-v4":
        return {
            "search_backend": type(environment.backend).__name__,
            "snippets": environment.variant == "base",
            "failure_rate": environment.failure_rate,
        }
    if info.family == "tau2":
        users = sorted(
            {
                str(o.verdict.detail["user_simulator"])
                for o in outcomes
                if o.verdict and "user_simulator" in o.verdict.detail
            }
        )
        judge = options.tau2_judge
        return tau2_block(
            outcomes,
            split=options.tau2_split,
            trials=config.tasks.trials,
            user="; ".join(users) or "none",
            judge=f"{judge.model} at {judge.base_url}" if judge is not None else None,
            nl_assertion_tasks=len(nl_assertion_tasks(environment, [o.run for o in outcomes])),
        )
    return acebench_block(outcomes)


def _needs_user(info: SuiteInfo, runs: Sequence[Any] | None, config: EvalConfig) -> str | None:
    """Why a suite cannot run without a user simulator (None: it can; ``runs`` None: not planned yet)."""
    options = config.suites
    if info.family == "tau2" and options.tau2_user is None and "tau2_user_factory" not in options.extra:
        return f"{info.name} needs a user simulator"
    if (
        info.family == "acebench"
        and runs is not None
        and options.tau2_user is None
        and "acebench_user_factory" not in options.extra
        and any(run.category == "agent_multi_turn" for run in runs)
    ):
        return f"{info.name}'s multi-turn tasks need a user simulator (or choose multi-step ones with --ids)"
    return None


USER_KEYS = (
    "set suites.tau2_user.base_url and suites.tau2_user.model (an OpenAI-compatible endpoint: "
    "envtune-serve, SGLang, vLLM or a hosted API; suites.tau2_user.api_key_env names the environment "
    "variable holding its key, suites.tau2_user.temperature its sampling temperature)"
)


def nl_assertion_tasks(environment: Any, runs: Sequence[Any]) -> list[str]:
    """The scored τ² tasks among ``runs`` whose reward includes tau2's NL assertions."""
    task_map = getattr(environment, "task_map", {})
    return sorted(
        {
            run.task_id
            for run in runs
            if run.scored and "NL_ASSERTION" in getattr(task_map.get(run.task_id), "reward_basis", ())
        }
    )


def open_suite_environments(
    config: EvalConfig,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """Open every chosen suite and plan its runs (before any engine starts: a wrong option fails fast).

    Returns (name -> environment, shared resources, name -> planned runs); on error everything opened
    is closed again.
    """
    from envtune.runtime.recipe.suite_eval import BfclV3Suite, ids_for_suite, plan_runs

    environments: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    plans: dict[str, list[Any]] = {}
    tasks = config.tasks
    try:
        for name in tasks.suites:
            info = get_suite(name)
            reason = _needs_user(info, None, config)
            if reason is not None:  # before opening: tau2's tool worker takes seconds to start
                raise ConfigError(f"{reason}: {USER_KEYS}")
            try:
                environment = info.open(config.suites, shared)
            except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
                raise ConfigError(f"{name}: {exc}") from exc
            if info.family == "bfcl-v3":
                environment = BfclV3Suite(environment, tasks.split, tasks.categories)
            environments[name] = environment
            ids = ids_for_suite(name, tasks.ids, suite_names())
            runs = plan_runs(environment.tasks(), ids=ids, limit=tasks.limit, trials=tasks.trials)
            if not any(run.scored for run in runs):
                raise ConfigError(f"{name}: no task chosen (tasks.ids {list(tasks.ids)} names none of it)")
            reason = _needs_user(info, runs, config)
            if reason is not None:
                raise ConfigError(f"{reason}: {USER_KEYS}")
            if info.family == "tau2" and config.suites.tau2_judge is None:
                needing = nl_assertion_tasks(environment, runs)
                if needing:
                    raise ConfigError(
                        f"{name}: tasks {needing} are scored on natural-language assertions, which need "
                        "a judge: set suites.tau2_judge.base_url and suites.tau2_judge.model (or leave "
                        "those tasks out with --ids)"
                    )
            plans[name] = runs
        for item in tasks.ids:
            prefix, sep, rest = item.partition(":")
            if sep and prefix in suite_names():
                found = prefix in plans and any(run.task_id == rest for run in plans[prefix])
            else:
                found = any(run.task_id == item for runs in plans.values() for run in runs)
            if not found:
                raise ConfigError(f"tasks.ids: {item!r} is not a task of {list(plans)}")
    except BaseException:
        close_environments(environments, shared)
        raise
    return environments, shared, plans


def close_environments(environments: Mapping[str, Any], shared: Mapping[str, Any]) -> None:
    for name, environment in environments.items():
        try:
            environment.close()
        except Exception as exc:  # closing one must not keep the others open
            log.warning("suite_close_failed", suite=name, error=repr(exc))
    close_shared(shared)


def output_path(config: EvalConfig) -> Path:
    """Where eval.json goes: ``output``, else ``<run>/eval.json``, else ``evals/<UTC timestamp>/``."""
    from envtune.runtime.recipe.eval_output import default_output

    return Path(config.output) if config.output else default_output(config.run)


async def run_eval(
    config: EvalConfig, output: Path, *, progress: bool = True, console: Any = None
) -> dict[str, Any]:
    """Evaluate, writing ``output`` (eval.json) after every suite and, with what finished, when
    interrupted (``complete`` false); returns the result."""
    from envtune.agents.chat_tokens import ChatTokenizer
    from envtune.agents.config import AgentConfig
    from envtune.agents.grammar import ConstraintCache
    from envtune.environments.types import RewardKind
    from envtune.runtime.cli.engine_stack import open_engines
    from envtune.runtime.recipe import eval_output
    from envtune.runtime.recipe.export import ExportError, final_adapter
    from envtune.runtime.recipe.progress import RunProgress
    from envtune.runtime.recipe.suite_eval import EpisodeOutcome, run_suite
    from transformers import AutoTokenizer

    adapter_path = Path(config.adapter) if config.adapter else None
    provenance: dict[str, Any] = {"run": config.run or None, "checkpoint_step": None, "policy_version": None}
    if config.run:
        try:
            step, adapter_path, version = final_adapter(Path(config.run))
        except ExportError as exc:
            raise ConfigError(f"--run: {exc}") from exc
        provenance.update(checkpoint_step=step, policy_version=version)
    if adapter_path is not None and not (adapter_path / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {adapter_path} is not a peft adapter folder (no adapter_config.json)")
    trajectories = eval_output.trajectories_path(output)
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema_version": eval_output.SCHEMA_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "complete": False,
        "seconds": 0.0,
        "model": config.model.path or "tiny local model",
        "adapter": str(adapter_path) if adapter_path is not None else None,
        **provenance,
        "engine": None,
        "sampling": eval_output.plain(config.sampling),
        "conditions": eval_output.plain(config.conditions),
        "trajectories": trajectories.name,
        "overall": eval_output.overall({}),
        "suites": {},
    }

    def record(name: str, info: SuiteInfo, environment: Any, outcomes: Sequence[Any], complete: bool) -> None:
        entry = eval_output.summarize_suite(
            info,
            outcomes,
            options=eval_output.suite_options(info, config.suites),
            trajectories=trajectories.name,
            family_block=_family_block(info, environment, config, outcomes),
        )
        entry["complete"] = complete
        result["suites"][name] = entry
        result["overall"] = eval_output.overall(result["suites"])
        result["seconds"] = round(time.monotonic() - started, 3)
        eval_output.write_eval(output, result)

    environments, shared, plans = await asyncio.to_thread(open_suite_environments, config)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        trajectories.write_text("", encoding="utf-8")
        async with open_engines(config.model, config.engine) as engines:
            adapter = None
            if adapter_path is not None:
                adapter = EVAL_ADAPTER_NAME
                await engines.client.load_adapter(adapter, str(adapter_path.resolve()), version=1)
            chat = ChatTokenizer(await asyncio.to_thread(AutoTokenizer.from_pretrained, engines.model_path))
            result["engine"] = engines.description
            agent = AgentConfig(
                sampling=config.sampling,
                constrained=config.conditions.constrained,
                reward=RewardKind.PROGRESS,
                adapter=adapter,
            )
            constraints = ConstraintCache()
            for name, runs in plans.items():
                info = get_suite(name)
                environment = environments[name]
                scored = sum(run.scored for run in runs)
                log.info("eval_suite_started", suite=name, tasks=scored, unscored=len(runs) - scored)
                finished_outcomes: list[EpisodeOutcome] = []
                with (
                    RunProgress(
                        len(runs), 0, console=console, enabled=progress, label=name, unit="task"
                    ) as display,
                    trajectories.open("a", encoding="utf-8") as log_file,
                ):
                    every = 1 if display.live else max(1, len(runs) // 20)

                    def finished(
                        outcome: EpisodeOutcome,
                        display: RunProgress = display,
                        log_file: Any = log_file,
                        name: str = name,
                        total: int = len(runs),
                        done: list[EpisodeOutcome] = finished_outcomes,
                        every: int = every,
                    ) -> None:
                        done.append(outcome)
                        line = eval_output.trajectory_record(name, outcome)
                        log_file.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
                        log_file.flush()  # an interrupted evaluation keeps every finished episode
                        if len(done) % every == 0 or len(done) == total:
                            passed = sum(o.verdict is not None and o.verdict.passed for o in done)
                            errors = sum(o.error is not None for o in done)
                            display.advance(len(done), f"passed {passed} · errors {errors}")

                    try:
                        outcomes = await run_suite(
                            engines.client,
                            environment,
                            chat,
                            runs,
                            suite=name,
                            agent=agent,
                            episode_config=_episode_config(info, config),
                            concurrency=config.conditions.concurrency,
                            blocking=info.blocking_steps,
                            constraints=constraints,
                            on_finished=finished,
                        )
                    except (asyncio.CancelledError, KeyboardInterrupt):
                        # Ctrl-C: what finished is kept (the suite marked incomplete), then the stop goes on.
                        record(name, info, environment, finished_outcomes, complete=False)
                        raise
                record(name, info, environment, outcomes, complete=True)
        result["complete"] = True
        result["seconds"] = round(time.monotonic() - started, 3)
        eval_output.write_eval(output, result)
    finally:
        await asyncio.to_thread(close_environments, environments, shared)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``envtune-eval``."""
    from envtune.runtime.recipe.eval_output import format_table
    from envtune.runtime.recipe.progress import configure_logging, console_level

    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.list_keys:
        for key, type_name, doc in config_io.describe_keys(EvalConfig):
            print(f"{key}  ({type_name})\n    {' '.join(doc.split())}")
        return
    if "list" in args.suites:
        print(listing())
        return
    unknown = [name for name in args.suites if name not in suite_names()]
    if unknown:
        parser.exit(2, f"envtune-eval: error: unknown suite {unknown[0]!r}; the suites:\n{listing()}\n")
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    level = config.logging.level
    if args.verbose or args.quiet:
        level = console_level(verbose=args.verbose, quiet=args.quiet)
    console = configure_logging(level, fmt=config.logging.format)
    output = output_path(config)
    try:
        result = asyncio.run(run_eval(config, output, progress=not args.no_progress, console=console))
    except (ConfigError, FileNotFoundError) as exc:
        parser.exit(2, f"envtune-eval: error: {exc}\n")
    except EngineUnavailable as exc:
        parser.exit(1, f"envtune-eval: error: {exc}\n")
    except KeyboardInterrupt:
        kept = f"; what finished is in {output}" if output.is_file() else ""
        parser.exit(130, f"envtune-eval: interrupted{kept}\n")
    if args.json:
        sys.stdout.write(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_table(result) + "\n")
        print(output)


if __name__ == "__main__":  # pragma: no cover
    main()
