"""``envtune-serve``: the embedded engine behind SGLang's native HTTP API and OpenAI's chat API.

    envtune-serve                                   # the tiny local model on 127.0.0.1:30000
    envtune-serve --model /models/Qwen2.5-0.5B-Instruct --set server.port=31000
    ENVTUNE_API_KEY=secret envtune-serve --set server.adapters=policy=runs/x/checkpoints/step-000008/adapter

Two APIs on one port: SGLang's native one (``/generate``, ``/model_info``, LoRA loading...) and
OpenAI's (``/v1/models``, ``/v1/chat/completions`` with tools, streaming or not; the model's chat
template renders the tools, Qwen2.5's ``<tool_call>`` parser reads the calls back). The model is
served as ``server.served_model_name`` (default: ``--model`` as given, or ``tiny``); loaded adapters
are listed beside it and chosen with ``model=<adapter name>``.

The config is ``ServeConfig`` (``--list-keys`` lists every key). The API key is read from the
environment variable named by ``server.api_key_env`` or the file ``server.api_key_file``, never
from the command line (``/proc/PID/cmdline`` is readable by every user); without it ``/v1/*``
answers OpenAI's 401 error object, the native paths SGLang's. Stops cleanly on SIGINT/SIGTERM
(exit 0: a server asked to stop has done its job).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from envtune.agents.engine import EngineError
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config import ConfigError, ServeConfig
from envtune.runtime.recipe.progress import (
    add_verbosity_arguments,
    adopt_library_loggers,
    configure_logging,
    console_level,
)


def build_arg_parser() -> argparse.ArgumentParser:
    """``envtune-serve``'s command line."""
    parser = argparse.ArgumentParser(
        prog="envtune-serve",
        description="Serve a model with SGLang's native HTTP API and OpenAI's /v1/chat/completions "
        "(CPU, or CUDA when present).",
    )
    parser.add_argument("config", nargs="?", help="TOML config (ServeConfig; default: all defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set server.port=31000 (see --list-keys)",
    )
    parser.add_argument("--model", help="model folder (model.path; default: the tiny local model)")
    parser.add_argument("--port", type=int, help="port (server.port)")
    parser.add_argument("--list-keys", action="store_true", help="list every config key and exit")
    add_verbosity_arguments(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> ServeConfig:
    overrides: list[str] = []
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.port is not None:
        overrides.append(f"server.port={args.port}")
    path = Path(args.config) if args.config else None
    return config_io.load(ServeConfig, path, [*overrides, *args.overrides])


def read_api_key(variable: str, path: str) -> str | None:
    """The key in environment variable ``variable``, else the first line of file ``path``, else None."""
    key = os.environ.get(variable) if variable else None
    if not key and path:
        try:
            key = Path(path).read_text(encoding="utf-8").splitlines()[0].strip() if path else None
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            raise ConfigError(f"server.api_key_file {path}: cannot read a key ({exc})") from None
    return key or None


async def serve(config: ServeConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    from envtune.runtime.cli.engine_stack import resolve_model_path
    from envtune.runtime.engines.embedded import EmbeddedEngine
    from envtune.runtime.engines.openai_api import OpenAIServingConfig, add_openai_routes
    from envtune.runtime.engines.sglang_server import SGLangProtocolServer

    model_path = await resolve_model_path(config.model)
    engine = await EmbeddedEngine.open(model_path, config.engine)
    adopt_library_loggers()  # transformers is loaded now: its lines get the same format
    try:
        for version, spec in enumerate(config.server.adapters, start=1):
            name, _, path = spec.partition("=")
            await engine.load_adapter(name, path, version=version)
        api_key = read_api_key(config.server.api_key_env, config.server.api_key_file)
        name = served_model_name(config)
        server = SGLangProtocolServer(
            engine,
            api_key=api_key,
            admin_api_key=read_api_key(config.server.admin_api_key_env, ""),
            served_model_name=name,
            limits=config.server.limits,
        )
        # Before start(): aiohttp freezes an application's routes when it starts serving. The engine's
        # own tokenizer renders the chat template, so prompts are the ids the engine expects.
        add_openai_routes(
            server.app,
            engine,
            engine.tokenizer,
            served_model_name=name,
            config=OpenAIServingConfig(served_model_name=name, api_key=api_key),
        )
        server.tool_call_parser = "qwen25"  # what /v1 parses replies with (SGLang's name for it)
        await server.start(config.server.host, config.server.port)
        print(f"envtune-serve listening on {server.url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.close()
    finally:
        await engine.close()


def served_model_name(config: ServeConfig) -> str:
    """The name clients pass as ``model`` (``server.served_model_name``; see its doc for the default)."""
    return config.server.served_model_name or config.model.path or "tiny"


async def _serve_until_signal(config: ServeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await serve(config, stop)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``envtune-serve``."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.list_keys:
        for key, type_name, doc in config_io.describe_keys(ServeConfig):
            print(f"{key}  ({type_name})\n    {' '.join(doc.split())}")
        return
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    level = config.logging.level
    if args.verbose or args.quiet:
        level = console_level(verbose=args.verbose, quiet=args.quiet)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read once, when transformers loads
    configure_logging(level, fmt=config.logging.format)
    try:
        asyncio.run(_serve_until_signal(config))
    except (ConfigError, EngineError, FileNotFoundError) as exc:
        parser.exit(1, f"envtune-serve: error: {exc}\n")
    except KeyboardInterrupt:  # before the handlers are installed
        parser.exit(130, "envtune-serve: interrupted\n")
    except OSError as exc:  # the port is taken, the address does not exist
        where = f"{config.server.host}:{config.server.port}"
        parser.exit(1, f"envtune-serve: error: cannot serve on {where}: {exc}\n")


if __name__ == "__main__":
    main()
