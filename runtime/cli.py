"""``envtune-run``: one training run of the curriculum, from a config to a run folder with a report.

    envtune-run                                   # the CPU preset: tiny model, every stage briefly
    envtune-run my.toml --set rollout.group_size=8
    envtune-run --model /models/Qwen2.5-7B-Instruct --sglang http://h1:30000,http://h2:30000
    envtune-run --model /models/Qwen2.5-7B-Instruct --launch-sglang
    envtune-run --resume [RUN_DIR]                # the last complete checkpoint of a run

Which config: a TOML file when given; else the paper preset when a real model is named
(``--model``/``--sglang``/``--launch-sglang``); else the CPU preset. ``--set`` overrides go last.

What it wires (top to bottom in ``train``): the engine stack (the embedded engine behind envtune's
SGLang-protocol server on 127.0.0.1 with the SGLang client talking to it over real HTTP; or
SGLang servers; or one launched here), the tokenizer and environment, the curriculum scheduler,
the LoRA learner, the adapter publisher (weight sync through the client's ``/load_lora_adapter``),
the rollout actor, the learner actor and a metrics recorder, all under one supervisor.

Stopping: Ctrl-C (SIGINT) or SIGTERM ends the run cleanly: no new work, in-flight episodes are
cancelled, a checkpoint of the last completed step is written, and the report is produced; a
second Ctrl-C aborts at once. The run folder's path is the last line written to stdout; logs and
the progress line go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from envtune.runtime.config import (
    CPU_CONFIG_PATH,
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    describe_keys,
    dump_toml,
    load_config,
    read_toml,
)
from envtune.runtime.run_folder import Checkpoint, RunFolder, RunFolderError

log = structlog.get_logger(__name__)


# --- the engine stack ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineStack:
    """What the run samples from and publishes adapters to."""

    client: Any
    """An ``SGLangClient``: the ``Engine`` the rollout uses and the ``WeightSyncTarget`` of the publisher."""
    model_path: Path
    """The policy model's folder (tokenizer and base weights for the learner)."""
    description: str
    """For logs: where tokens come from."""


async def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"sglang.launch_server exited with code {process.returncode} before it was healthy"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(2.0)
    raise TimeoutError(f"SGLang at {url} not healthy after {timeout_s:.0f} s")


def sglang_launch_command(config: Config) -> list[str]:
    """``python -m sglang.launch_server`` with LoRA enabled for the learner's adapters."""
    extra = list(config.engine.launch_extra_args)
    command = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        config.model.path,
        "--host",
        "127.0.0.1",
        "--port",
        str(config.engine.launch_port),
        "--enable-lora",
        "--max-lora-rank",
        str(config.learner.lora.r),
        "--lora-target-modules",
        *config.learner.lora.target_modules,
    ]
    if "--mem-fraction-static" not in extra:
        # The learner trains on the same GPU: leave it room (SGLang's default takes ~90%).
        command += ["--mem-fraction-static", "0.5"]
    return command + extra


@contextlib.asynccontextmanager
async def open_engines(config: Config) -> AsyncIterator[EngineStack]:
    """Start (or connect to) the engines of ``config.engine``; closes what it started."""
    from envtune.runtime.engines.sglang_client import SGLangClient, SGLangClientConfig

    timeout = config.engine.request_timeout_s
    if config.engine.kind == "embedded":
        from envtune.runtime.engines.embedded import EmbeddedEngine, EmbeddedEngineConfig
        from envtune.runtime.engines.sglang_server import SGLangProtocolServer
        from envtune.runtime.tiny_model import build_tiny_model, default_tiny_model_dir

        if config.model.path:
            model_path = Path(config.model.path)
        else:
            folder = (
                Path(config.model.tiny_model_dir) if config.model.tiny_model_dir else default_tiny_model_dir()
            )
            model_path = await asyncio.to_thread(build_tiny_model, folder, seed=config.model.tiny_seed)
        engine = await EmbeddedEngine.open(EmbeddedEngineConfig(model_path=model_path))
        try:
            server = SGLangProtocolServer(engine)
            url = await server.start("127.0.0.1", 0)
            try:
                async with SGLangClient(SGLangClientConfig(urls=(url,), request_timeout_s=timeout)) as client:
                    yield EngineStack(client, model_path, f"embedded engine at {url}")
            finally:
                await server.close()
        finally:
            await engine.close()
    elif config.engine.kind == "sglang":
        urls = config.engine.sglang_urls
        async with SGLangClient(SGLangClientConfig(urls=urls, request_timeout_s=timeout)) as client:
            yield EngineStack(client, Path(config.model.path), f"SGLang at {', '.join(urls)}")
    else:
        command = sglang_launch_command(config)
        log.info("sglang_launching", command=" ".join(command))
        process = subprocess.Popen(command)
        url = f"http://127.0.0.1:{config.engine.launch_port}"
        try:
            await _wait_healthy(url, process, config.engine.launch_timeout_s)
            async with SGLangClient(SGLangClientConfig(urls=(url,), request_timeout_s=timeout)) as client:
                yield EngineStack(client, Path(config.model.path), f"launched SGLang at {url}")
        finally:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 60)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


# --- progress -------------------------------------------------------------------------------------------


class ProgressLine:
    """A one-line progress display on stderr (rewritten in place on a terminal, a line per step otherwise)."""

    def __init__(self, total_steps: int, num_stages: int, enabled: bool) -> None:
        self.total = total_steps
        self.num_stages = num_stages
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def update(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(record["step"])
        width = 24
        filled = min(width, int(width * step / self.total)) if self.total else 0
        bar = "#" * filled + "." * (width - filled)
        of = f"/{self.total}" if self.total else ""
        reward = record.get("train/reward", record.get("learner/reward_mean"))
        reward_text = f"{reward:.3f}" if isinstance(reward, float) else "-"
        elapsed = time.monotonic() - self.started
        text = (
            f"[{bar}] step {step}{of} | stage {record['stage']}/{self.num_stages} {record['stage_name']} | "
            f"reward {reward_text} | {record.get('rollout/episodes_per_s', 0.0):.2f} ep/s | "
            f"{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}"
        )
        sys.stderr.write(("\r" + text) if self.tty else (text + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- the run -------------------------------------------------------------------------------------------


def _learner_config(config: Config, temperature: float) -> Any:
    from envtune.optim import AdvantageConfig, LearnerConfig, LoraSettings, LossConfig, ZeroVariancePolicy

    lc = config.learner
    return LearnerConfig(
        lr=lc.lr,
        weight_decay=lc.weight_decay,
        grad_clip=lc.grad_clip,
        updates_per_step=lc.mini_batches_per_step,
        # The learner divides logits by the rollout temperature to match the behaviour logprobs.
        temperature=temperature if temperature > 0 else 1.0,
        loss=LossConfig(
            clip_low=lc.clip_low,
            clip_high=lc.clip_high,
            dual_clip=lc.dual_clip,
            kl_coef=lc.kl_coef,
            entropy_coef=lc.entropy_coef,
        ),
        # Zero-variance groups are dropped or kept by the curriculum (per stage) before the learner.
        advantages=AdvantageConfig(zero_variance=ZeroVariancePolicy.KEEP),
        lora=LoraSettings(
            rank=lc.lora.r,
            alpha=float(lc.lora.alpha),
            dropout=lc.lora.dropout,
            target_modules=lc.lora.target_modules,
        ),
    )


def _load_policy_model(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


async def train(
    config: Config,
    folder: RunFolder,
    *,
    checkpoint: Checkpoint | None = None,
    stop: asyncio.Event | None = None,
    progress: ProgressLine | None = None,
) -> int:
    """Run the curriculum into ``folder`` until it ends, the step budget ends or ``stop`` is set.

    Returns the number of learner steps completed (including those before a resume).
    """
    from envtune.agents.chat_tokens import ChatTokenizer
    from envtune.agents.grammar import ConstraintCache, GrammarOptions
    from envtune.environments.episode import BfclEnvironment
    from envtune.optim import AdapterPublisher, Learner
    from envtune.runtime.curriculum import CurriculumScheduler
    from envtune.runtime.metrics import MetricsRecorder
    from envtune.runtime.rollout import RolloutActor
    from envtune.runtime.rollout import RolloutConfig as RolloutActorConfig
    from envtune.runtime.supervisor import Supervisor
    from envtune.runtime.training import (
        CurriculumTaskSource,
        EpisodeRunner,
        LearnerActor,
        TrainerSettings,
        make_validator,
        restore,
    )
    from transformers import AutoTokenizer

    stop = stop or asyncio.Event()
    scheduler = CurriculumScheduler(config.curriculum, seed=config.run.seed)
    async with open_engines(config) as engines:
        log.info("engines_ready", engines=engines.description, model=str(engines.model_path))
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, engines.model_path)
        chat = ChatTokenizer(tokenizer)
        env = BfclEnvironment()
        model = await asyncio.to_thread(_load_policy_model, engines.model_path)
        learner = Learner(model, _learner_config(config, config.rollout.sampling.temperature))
        start_step = 0
        if checkpoint is not None:
            await asyncio.to_thread(restore, learner, scheduler, checkpoint.path, checkpoint.state)
            start_step = checkpoint.step
            log.info("resumed", step=start_step, stage=scheduler.stage, policy_version=learner.policy_version)
        publisher = AdapterPublisher(folder.path / "adapters", [engines.client])
        if learner.policy_version > 0:
            await publisher.publish(learner)
        think = config.rollout.sampling.max_think_chars
        constraints = ConstraintCache(options=GrammarOptions(max_think_chars=think or None))
        settings = TrainerSettings(
            groups_per_step=config.rollout.groups_per_step,
            max_staleness=config.rollout.max_staleness,
            max_steps=config.run.max_steps,
            checkpoint_every=config.run.checkpoint_every,
            keep_checkpoints=config.run.keep_checkpoints,
            sample_every=config.run.sample_trajectories_every,
            sample_count=config.run.sample_trajectories_count,
        )
        concurrency = config.derived.max_concurrent_episodes
        learner_actor = LearnerActor(
            learner,
            scheduler,
            publisher,
            folder,
            settings,
            decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
            validate=make_validator(
                scheduler,
                engines.client,
                env,
                chat,
                publisher,
                config.rollout.sampling,
                concurrency=concurrency,
                constraints=constraints,
            ),
            on_step=progress.update if progress is not None else None,
            start_step=start_step,
        )
        source = CurriculumTaskSource(scheduler)
        if scheduler.finished or (config.run.max_steps and start_step >= config.run.max_steps):
            log.info("nothing_to_do", step=start_step)
            return start_step
        rollout = RolloutActor(
            RolloutActorConfig(
                max_concurrent_episodes=concurrency,
                group_size=config.rollout.group_size,
                min_group_size=min(2, config.rollout.group_size),
                max_staleness=config.rollout.max_staleness,
                groups_per_step=config.rollout.groups_per_step,
                # In-flight episodes at the end of a run would never be trained: cancel them at once.
                drain_timeout_s=0.0,
            ),
            source,
            EpisodeRunner(engines.client, env, chat, publisher, config.rollout.sampling, constraints),
            learner_actor,
            policy_version=learner.policy_version,
        )
        learner_actor.connect(rollout, source)
        recorder = MetricsRecorder(
            rollout,
            queue=learner_actor.mailbox.statistics,
            interval_s=30.0,
            on_record=lambda r: folder.append_metrics(
                {"event": "runtime", "step": learner_actor.step, **r.as_dict()}
            ),
        )
        # The learner may be mid-step (minutes on a GPU) when asked to stop: give it time to finish.
        supervisor = Supervisor([rollout, learner_actor, recorder], stop_timeout_s=3600.0)

        async def until() -> None:
            async with asyncio.TaskGroup() as group:
                waiters = {group.create_task(learner_actor.done.wait()), group.create_task(stop.wait())}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()  # the other one: a cancelled child ends the group quietly
            if stop.is_set():
                learner_actor.finish("stop requested")

        await supervisor.run(until())
        return learner_actor.step


# --- the command ----------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="envtune-run",
        description="Train a tool-use agent with the Environment Tuning curriculum on BFCL V3 multi-turn. "
        "With no arguments: the CPU preset (a tiny local model, every stage for a few steps).",
        epilog="The run folder's path is printed as the last line of stdout. Ctrl-C stops cleanly with a "
        "checkpoint; --resume continues from it.",
    )
    parser.add_argument(
        "config", nargs="?", help="TOML config (default: CPU preset, or the paper preset with --model)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set rollout.group_size=8 "
        "or --set curriculum.stages.*.promotion.max_steps=2 (see --list-keys)",
    )
    parser.add_argument("--model", help="policy model folder (a Hugging Face causal LM)")
    parser.add_argument(
        "--sglang", help="comma-separated URLs of SGLang servers serving --model (LoRA enabled)"
    )
    parser.add_argument(
        "--launch-sglang", action="store_true", help="start `python -m sglang.launch_server` here"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN_DIR",
        help="continue a run (default: the latest)",
    )
    parser.add_argument("--out", help="parent folder of run folders (run.out_dir)")
    parser.add_argument("--log-format", choices=["console", "json"], help="log renderer on stderr")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as TOML and exit"
    )
    parser.add_argument(
        "--list-keys", action="store_true", help="list every config key with its type and meaning"
    )
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, RunFolder | None, Checkpoint | None]:
    """The config, and for ``--resume`` the run folder and its checkpoint."""
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.sglang:
        overrides += ["engine.kind=sglang", f"engine.sglang_urls={args.sglang}"]
    if args.launch_sglang:
        if args.sglang:
            raise ConfigError("--sglang and --launch-sglang exclude each other")
        overrides.append("engine.kind=launch")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.log_format:
        overrides.append(f"logging.format={args.log_format}")
    if args.resume is not None:
        if args.config:
            raise ConfigError("--resume uses the run's own config.toml; pass changes with --set")
        out_dir = Path(args.out or load_config(CPU_CONFIG_PATH).run.out_dir)
        path = Path(args.resume) if args.resume else RunFolder.latest_run(out_dir)
        if path is None:
            raise RunFolderError(f"--resume: no run with a complete checkpoint under {out_dir}")
        folder = RunFolder.open(path)
        checkpoint = folder.latest_complete_checkpoint()
        if checkpoint is None:
            raise RunFolderError(f"--resume: {path} has no complete checkpoint")
        return load_config(folder.config_path, overrides), folder, checkpoint
    if args.config:
        path = Path(args.config)
    elif args.model or args.sglang or args.launch_sglang:
        path = DEFAULT_CONFIG_PATH
    else:
        path = CPU_CONFIG_PATH
    read_toml(path)  # a clear error for a missing or broken file before anything else
    return load_config(path, overrides), None, None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``envtune-run``."""
    from envtune.runtime.logs import configure_logging

    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.list_keys:
        for key, type_name, doc in describe_keys():
            print(f"{key}  ({type_name})\n    {' '.join(doc.split())}")
        return
    try:
        config, folder, checkpoint = resolve_config(args)
    except (ConfigError, RunFolderError) as exc:
        parser.error(str(exc))
    if args.print_config:
        sys.stdout.write(dump_toml(config))
        return
    configure_logging(config.logging.format, config.logging.level)
    if folder is None:
        folder = RunFolder.create(Path(config.run.out_dir), config.run.name)
    else:
        assert checkpoint is not None
        folder.truncate_after(checkpoint.step)
    folder.write_config(dump_toml(config))
    log.info("run_started", folder=str(folder.path), resume_step=checkpoint.step if checkpoint else None)
    progress = ProgressLine(
        config.derived.total_step_budget, config.derived.num_stages, config.run.progress_bar
    )
    steps = asyncio.run(_main_async(config, folder, checkpoint, progress))
    progress.close()
    from envtune.runtime.report import write_report

    report = write_report(folder)
    log.info("run_finished", folder=str(folder.path), steps=steps, report=str(report))
    sys.stdout.write(f"{folder.path}\n")
    sys.stdout.flush()


async def _main_async(
    config: Config, folder: RunFolder, checkpoint: Checkpoint | None, progress: ProgressLine
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_signal(signame: str) -> None:
        if not stop.is_set():
            log.warning(
                "stop_requested", signal=signame, hint="stopping with a checkpoint; Ctrl-C again aborts"
            )
            stop.set()
        else:
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        return await train(config, folder, checkpoint=checkpoint, stop=stop, progress=progress)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":  # pragma: no cover
    main()
