"""``envtune-eval``: BFCL V3 multi-turn accuracy of a model, optionally with a LoRA adapter.

    envtune-eval                                   # the tiny CPU model on the test split
    envtune-eval --model /models/Qwen2.5-7B-Instruct --adapter runs/x/checkpoints/step-40/adapter
    envtune-eval --model /models/Qwen2.5-7B-Instruct --sglang http://h1:30000 --set tasks.limit=10
    envtune-eval my_eval.toml --set conditions.concurrency=64

The config is ``EvalConfig`` (``--list-keys`` lists every key); ``--model``, ``--adapter``,
``--sglang`` and ``--output`` are shorthands for keys. Evaluation conditions are BFCL's by default:
standard feedback, 20 replies per user turn, greedy decoding, one episode per task. Prints one JSON
object (per-category and overall accuracy, per-task results) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
from envtune.agents.engine import EngineUnavailable
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config import ConfigError, EvalConfig
from envtune.runtime.recipe.evaluation import EvalSummary, evaluate_tasks, select_tasks, summarize
from envtune.runtime.recipe.progress import configure_logging

log = structlog.get_logger(__name__)

EVAL_ADAPTER_NAME = "envtune-eval-adapter"
"""Name the evaluated adapter is loaded under."""


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="envtune-eval",
        description="BFCL V3 multi-turn accuracy (per category and overall) of a model, optionally with "
        "a LoRA adapter, under BFCL's conditions: standard feedback, 20 replies per turn, greedy.",
    )
    parser.add_argument("config", nargs="?", help="TOML config (EvalConfig; default: all defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set tasks.limit=5 (see --list-keys)",
    )
    parser.add_argument("--model", help="model folder (model.path; default: the tiny local CPU model)")
    parser.add_argument("--adapter", help="LoRA adapter folder (peft layout) to evaluate (adapter)")
    parser.add_argument("--sglang", help="comma-separated SGLang server URLs serving --model")
    parser.add_argument("--output", help="also write the JSON to this file (output)")
    parser.add_argument("--no-results", action="store_true", help="leave per-task results out of the JSON")
    parser.add_argument("--list-keys", action="store_true", help="list every config key and exit")
    return parser


def resolve_config(args: argparse.Namespace) -> EvalConfig:
    """The eval config from the file, the shorthands and ``--set`` (in that order)."""
    overrides: list[str] = []
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.adapter:
        overrides.append(f"adapter={args.adapter}")
    if args.sglang:
        overrides += ["engine.kind=sglang", f"engine.sglang.urls={args.sglang}"]
    if args.output:
        overrides.append(f"output={args.output}")
    path = Path(args.config) if args.config else None
    return config_io.load(EvalConfig, path, [*overrides, *args.overrides])


async def run_eval(config: EvalConfig) -> EvalSummary:
    """Open the engines, load the adapter if any, evaluate the selected tasks."""
    from envtune.agents.chat_tokens import ChatTokenizer
    from envtune.environments.episode import BfclEnvironment
    from envtune.runtime.cli.engine_stack import open_engines
    from transformers import AutoTokenizer

    if config.adapter and not Path(config.adapter, "adapter_config.json").is_file():
        raise ConfigError(f"adapter {config.adapter} is not a peft adapter folder (no adapter_config.json)")
    task_ids = select_tasks(config.tasks.split, config.tasks.categories, config.tasks.limit)
    async with open_engines(config.model, config.engine) as engines:
        adapter = None
        if config.adapter:
            adapter = EVAL_ADAPTER_NAME
            await engines.client.load_adapter(adapter, str(Path(config.adapter).resolve()), version=1)
        chat = ChatTokenizer(await asyncio.to_thread(AutoTokenizer.from_pretrained, engines.model_path))
        log.info("eval_started", tasks=len(task_ids), split=config.tasks.split, engines=engines.description)
        results = await evaluate_tasks(
            engines.client,
            BfclEnvironment(),
            chat,
            task_ids,
            sampling=config.sampling,
            conditions=config.conditions,
            adapter=adapter,
        )
    return summarize(results)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``envtune-eval``."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.list_keys:
        for key, type_name, doc in config_io.describe_keys(EvalConfig):
            print(f"{key}  ({type_name})\n    {' '.join(doc.split())}")
        return
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(config.logging.level, fmt=config.logging.format)
    try:
        summary = asyncio.run(run_eval(config))
    except (ConfigError, FileNotFoundError) as exc:
        parser.exit(2, f"envtune-eval: error: {exc}\n")
    except EngineUnavailable as exc:
        parser.exit(1, f"envtune-eval: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "envtune-eval: interrupted\n")
    text = json.dumps(summary.to_json(include_results=not args.no_results), indent=1)
    if config.output:
        Path(config.output).write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
