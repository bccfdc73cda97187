"""The one typed config of ``envtune-run``: nested frozen dataclasses, TOML in and out, ``--set`` overrides.

Every field has a default and a docstring. The dataclass defaults ARE the paper preset (paper.md §2,
§7; deviations are said at the field); ``runtime/default_config.toml`` is generated from them
(``python -m envtune.runtime.config --write-default``) and a test keeps the two equal. The CPU preset
(``runtime/cpu_config.toml``) is a partial TOML laid over the same defaults. A TOML file or a
``--set a.b.c=value`` override is checked against the dataclasses: an unknown key names the valid
ones, a wrong type names the expected one. Derived values are computed once, in ``Config.derived``.

Left out on purpose: anything that runs; this module only describes and validates.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import itertools
import json
import math
import sys
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from envtune.agents.config import RewardKind
from envtune.environments.tasks import CATEGORIES
from envtune.environments.types import FeedbackMode, PromptStyle

DEFAULT_CONFIG_PATH = Path(__file__).parent / "default_config.toml"
"""The shipped paper preset (generated from the dataclass defaults)."""
CPU_CONFIG_PATH = Path(__file__).parent / "cpu_config.toml"
"""The CPU preset used by ``envtune-run`` with no arguments (a partial TOML over the defaults)."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what was expected."""


# --- the records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which policy model to train."""

    path: str = ""
    """Hugging Face folder of the policy model; empty builds the tiny local model (CPU default)."""
    tiny_model_dir: str = ""
    """Where the tiny model is built or reused when ``path`` is empty; empty = ``.cache/tiny-model``."""
    tiny_seed: int = 0
    """Seed of the tiny model's random weights."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Where tokens are sampled."""

    kind: Literal["embedded", "sglang", "launch"] = "embedded"
    """``embedded``: the in-process engine behind envtune's SGLang-protocol server on 127.0.0.1;
    ``sglang``: already running SGLang servers at ``sglang_urls``; ``launch``: start one with
    ``python -m sglang.launch_server`` (LoRA enabled) and wait for its health check."""
    sglang_urls: tuple[str, ...] = ()
    """Base URLs of SGLang servers (kind ``sglang``); requests are spread over them by episode."""
    launch_port: int = 30000
    """Port of the launched SGLang server (kind ``launch``)."""
    launch_extra_args: tuple[str, ...] = ()
    """Extra ``sglang.launch_server`` arguments, e.g. ``["--tp-size", "2"]``."""
    launch_timeout_s: float = 900.0
    """How long to wait for a launched server to report healthy."""
    request_timeout_s: float = 600.0
    """HTTP timeout of one generate request."""


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Sampling of training rollouts (paper.md §2.2: verl's defaults, nothing set in the release)."""

    temperature: float = 1.0
    """Rollout temperature (verl default 1.0)."""
    top_p: float = 1.0
    """Nucleus mass (verl default 1)."""
    top_k: int = -1
    """-1 disables top-k (verl default)."""
    max_new_tokens: int = 2048
    """Cap on one model reply (one step); the episode cap is ``max_episode_tokens``."""
    max_episode_tokens: int = 32768
    """Cap on prompt + everything appended in an episode (the release's ``max_model_len``)."""
    max_think_chars: int = 0
    """Bound on the ``<think>`` text in stages that decode under the grammar; 0 = unbounded. A
    random-weight model rarely closes its think block on its own, so the CPU preset bounds it."""


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """How episodes are produced."""

    group_size: int = 16
    """Episodes per task in a GRPO group (``rollout.n`` = 16 in the release)."""
    groups_per_step: int = 32
    """Groups per learner step (the release's ``train_batch_size`` = 32 prompts; 16 in stage 1)."""
    max_in_flight_groups: int = 64
    """Concurrency: groups being rolled out at once (bounded: backpressure from the learner)."""
    max_concurrent_episodes: int = 0
    """Episodes running at once (each holds an engine request); 0 = max_in_flight_groups * group_size."""
    max_staleness: int = 1
    """Oldest allowed policy lag, in learner steps, of a trajectory the learner accepts."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling parameters."""


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """The LoRA adapter the learner trains (the paper fine-tunes all weights; envtune trains LoRA)."""

    r: int = 32
    """Adapter rank."""
    alpha: int = 64
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.0
    """Adapter dropout (0: RL gradients are noisy enough)."""
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    """Module names adapted (every linear layer of a Qwen2/Llama block)."""


@dataclass(frozen=True, slots=True)
class LearnerConfig:
    """The policy-gradient learner (paper.md §7, App. D.2; the release's values in §2.2)."""

    lr: float = 1e-5
    """Learning rate. The paper uses 1e-6 for full fine-tuning; LoRA conventionally needs about 10x
    the full-fine-tuning rate, hence 1e-5."""
    weight_decay: float = 0.01
    """AdamW weight decay (verl default)."""
    clip_low: float = 0.2
    """epsilon_low of the decoupled clip."""
    clip_high: float = 0.28
    """epsilon_high of the decoupled clip (clip-higher)."""
    dual_clip: float = 10.0
    """Dual-clip constant c for negative advantages."""
    kl_coef: float = 0.1
    """beta of the KL loss against the reference policy (low-var KL); App. E.3 shows 0.1 is needed."""
    entropy_coef: float = 0.001
    """Entropy bonus coefficient."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    mini_batches_per_step: int = 1
    """Optimizer steps per rollout batch (1 as in the release, where the PPO clip is inert: §9.13)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter."""


@dataclass(frozen=True, slots=True)
class PromotionConfig:
    """When a stage ends: a metric's window mean passes a threshold, or a step budget runs out."""

    metric: str = ""
    """Metric name (a key of the step metrics, e.g. ``train/format_reward``,
    ``validation/progress``, ``train/zero_variance_share``); empty = budget only."""
    window: int = 5
    """How many most recent values of ``metric`` (within the stage) the mean is taken over."""
    threshold: float = 0.0
    """The window mean must reach this value (compared with ``comparison``)."""
    comparison: Literal[">=", "<="] = ">="
    """``>=``: promote when the mean is at least ``threshold``; ``<=``: at most."""
    min_steps: int = 0
    """Learner steps the stage runs before the metric rule may fire."""
    max_steps: int = 0
    """Step budget: promote after this many learner steps in the stage; 0 = no budget."""


@dataclass(frozen=True, slots=True)
class StageConfig:
    """One curriculum stage (paper.md §2)."""

    name: str
    """Short name, used in logs, metrics and ``--set curriculum.stages.<name>...``."""
    reward: RewardKind = RewardKind.PROGRESS
    """Which reward the stage trains on: ``stage1`` (the syntax reward) or ``progress``."""
    feedback: FeedbackMode = FeedbackMode.AUGMENTED
    """Augmented (actionable hints) or standard (BFCL's own) tool feedback."""
    prompt_style: PromptStyle = PromptStyle.BASIC
    """System prompt of paper.md §4.1."""
    data: Literal["train", "train_minus_validation"] = "train_minus_validation"
    """Split part the tasks come from; the test part is refused, and ``train`` includes the
    validation ids (their validation metrics then stop being held out)."""
    categories: tuple[str, ...] = CATEGORIES
    """BFCL categories of the stage's tasks."""
    max_tasks: int = 0
    """Keep at most this many tasks (0 = all), picked by ``selection``."""
    selection: Literal["random", "easiest"] = "random"
    """Which tasks ``max_tasks`` keeps: a seeded random subset, or the fewest ground-truth calls."""
    constrained: bool = False
    """Grammar-constrained decoding of the tool-call format."""
    max_steps_per_turn: int = 6
    """Model replies allowed per user turn (6 in the release's training, 20 in BFCL evaluation)."""
    zero_variance: Literal["drop", "keep"] = "drop"
    """A group whose rewards are all equal has all-zero GRPO advantages: ``drop`` it (envtune's
    default; it would only add KL and entropy terms) or ``keep`` it (the release keeps every group)."""
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    """When the stage ends."""


PAPER_STAGES: tuple[StageConfig, ...] = (
    StageConfig(
        name="syntax",
        reward=RewardKind.STAGE1,
        feedback=FeedbackMode.STANDARD,
        prompt_style=PromptStyle.BASIC,
        categories=("base",),
        max_tasks=75,
        selection="easiest",
        promotion=PromotionConfig(metric="train/format_reward", window=5, threshold=0.95, max_steps=80),
    ),
    StageConfig(
        name="hints",
        reward=RewardKind.PROGRESS,
        feedback=FeedbackMode.AUGMENTED,
        prompt_style=PromptStyle.BASIC,
        categories=("base",),
        promotion=PromotionConfig(metric="validation/progress", window=3, threshold=0.6, max_steps=80),
    ),
    StageConfig(
        name="hard",
        reward=RewardKind.PROGRESS,
        feedback=FeedbackMode.AUGMENTED,
        prompt_style=PromptStyle.RESOURCEFUL,
        promotion=PromotionConfig(metric="validation/progress", window=3, threshold=0.5, max_steps=240),
    ),
    StageConfig(
        name="independent",
        reward=RewardKind.PROGRESS,
        feedback=FeedbackMode.STANDARD,
        prompt_style=PromptStyle.RESOURCEFUL,
        promotion=PromotionConfig(max_steps=120),
    ),
)
"""The paper's four stages (§2.1): syntax on a small easy base subset with standard feedback,
base with hints, all four categories with hints and the resourceful prompt, then all four with
standard feedback. Step budgets follow the release (about 80 / 60-80 / 240 steps, §2.2; stage 4 has
none published, 120 is envtune's choice); the thresholds replace the paper's manual 'validation
plateaued' call (Remark 3.1) and are envtune's choice. Constrained decoding is off in every stage:
the paper samples unconstrained, stage 1 exists to *learn* the format (a grammar would saturate
R_format and leave no signal), evaluation is unconstrained, and masked sampling would make the
behaviour logprobs those of a different policy than the one the learner trains."""


@dataclass(frozen=True, slots=True)
class CurriculumConfig:
    """The stage sequence and the held-out validation that promotion rules may look at."""

    stages: tuple[StageConfig, ...] = PAPER_STAGES
    """The stages, in order (numbered from 1)."""
    validation_every: int = 5
    """Run validation every this many learner steps (0 = never)."""
    validation_limit: int = 0
    """Validate on at most this many of the 40 validation tasks (0 = all)."""
    validation_feedback: FeedbackMode = FeedbackMode.STANDARD
    """Feedback during validation: standard, the evaluation condition (§9.7)."""
    validation_max_steps_per_turn: int = 20
    """Replies per user turn during validation (BFCL's evaluation limit)."""


@dataclass(frozen=True, slots=True)
class RunConfig:
    """The run folder, checkpoints and the overall budget."""

    out_dir: str = "runs"
    """Parent folder of run folders (``<out_dir>/<timestamp>-<name>/``)."""
    name: str = "envtune"
    """Run name (the folder's suffix)."""
    seed: int = 0
    """Seed of task order, sampling and the learner."""
    max_steps: int = 0
    """Global cap on learner steps (0 = until the last stage ends)."""
    checkpoint_every: int = 5
    """Checkpoint every this many learner steps (and always at the end or on Ctrl-C)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept on disk (older ones are deleted)."""
    sample_trajectories_every: int = 1
    """Write decoded sample trajectories every this many learner steps (0 = never)."""
    sample_trajectories_count: int = 2
    """Trajectories written per sampled step."""
    progress_bar: bool = True
    """Show a progress line on stderr."""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log output (metrics go to the run folder, not the log)."""

    format: Literal["console", "json"] = "console"
    """Renderer of log events on stderr."""
    level: str = "info"
    """Minimum log level."""


@dataclass(frozen=True, slots=True)
class Derived:
    """Values computed once from the rest of the config."""

    episodes_per_step: int
    """group_size * groups_per_step."""
    max_concurrent_episodes: int
    """rollout.max_concurrent_episodes, or max_in_flight_groups * group_size when that is 0."""
    total_step_budget: int
    """Sum of the stage budgets (0 when some stage has none), capped by ``run.max_steps``."""
    num_stages: int
    """len(curriculum.stages)."""


@dataclass(frozen=True, slots=True)
class Config:
    """Everything an ``envtune-run`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The inference backend."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout production."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The learner."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """The curriculum."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run folder and budget."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    derived: Derived = field(init=False, repr=False, compare=False)
    """Computed in ``__post_init__``; never read from or written to TOML."""

    def __post_init__(self) -> None:
        _validate(self)
        budgets = [s.promotion.max_steps for s in self.curriculum.stages]
        total = sum(budgets) if all(budgets) else 0
        if self.run.max_steps:
            total = min(total, self.run.max_steps) if total else self.run.max_steps
        object.__setattr__(
            self,
            "derived",
            Derived(
                episodes_per_step=self.rollout.group_size * self.rollout.groups_per_step,
                max_concurrent_episodes=self.rollout.max_concurrent_episodes
                or self.rollout.max_in_flight_groups * self.rollout.group_size,
                total_step_budget=total,
                num_stages=len(self.curriculum.stages),
            ),
        )


def _validate(config: Config) -> None:
    """Cross-field checks (types are checked while parsing)."""
    if config.rollout.sampling.max_think_chars < 0:
        raise ConfigError(
            f"rollout.sampling.max_think_chars: must be >= 0 (0 = unbounded), "
            f"got {config.rollout.sampling.max_think_chars}"
        )
    stages = config.curriculum.stages
    if not stages:
        raise ConfigError("curriculum.stages: at least one stage is needed")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"curriculum.stages: stage names must be unique, got {names}")
    for number, stage in enumerate(stages, start=1):
        where = f"curriculum.stages.{number} ({stage.name})"
        if not stage.name or stage.name.isdigit() or stage.name == "*":
            raise ConfigError(f"{where}: name must be a non-numeric word")
        unknown = set(stage.categories) - set(CATEGORIES)
        if unknown or not stage.categories:
            raise ConfigError(f"{where}.categories: {sorted(unknown) or 'empty'}; valid: {list(CATEGORIES)}")
        rule = stage.promotion
        if not rule.metric and rule.max_steps <= 0:
            raise ConfigError(f"{where}.promotion: needs a metric or a max_steps budget, or it never ends")
        if rule.window < 1 or rule.max_steps < 0 or rule.min_steps < 0:
            raise ConfigError(f"{where}.promotion: window >= 1, min_steps >= 0, max_steps >= 0")
        if stage.max_tasks < 0 or stage.max_steps_per_turn < 1:
            raise ConfigError(f"{where}: max_tasks >= 0 and max_steps_per_turn >= 1")
    positive = {
        "rollout.group_size": config.rollout.group_size,
        "rollout.groups_per_step": config.rollout.groups_per_step,
        "rollout.max_in_flight_groups": config.rollout.max_in_flight_groups,
        "rollout.sampling.max_new_tokens": config.rollout.sampling.max_new_tokens,
        "rollout.sampling.max_episode_tokens": config.rollout.sampling.max_episode_tokens,
        "learner.lora.r": config.learner.lora.r,
        "learner.mini_batches_per_step": config.learner.mini_batches_per_step,
        "run.keep_checkpoints": config.run.keep_checkpoints,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    non_negative = {
        "rollout.max_staleness": config.rollout.max_staleness,
        "rollout.max_concurrent_episodes": config.rollout.max_concurrent_episodes,
        "run.max_steps": config.run.max_steps,
        "run.checkpoint_every": config.run.checkpoint_every,
        "curriculum.validation_every": config.curriculum.validation_every,
        "curriculum.validation_limit": config.curriculum.validation_limit,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if config.rollout.sampling.temperature < 0 or not 0 < config.rollout.sampling.top_p <= 1:
        raise ConfigError("rollout.sampling: temperature >= 0 and 0 < top_p <= 1")
    if config.engine.kind == "sglang" and not config.engine.sglang_urls:
        raise ConfigError("engine.kind = 'sglang' needs engine.sglang_urls")
    if config.engine.kind != "embedded" and not config.model.path:
        raise ConfigError(f"engine.kind = {config.engine.kind!r} needs model.path")


# --- typed conversion ---------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(json.dumps(m.value) for m in tp)
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (parsed TOML) as type ``tp``, or ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _from_mapping(tp, value, key)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_type)}, got {value!r}")
        return tuple(_coerce(item, item_type, f"{key}.{i + 1}") for i, item in enumerate(value))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key}: expected one of {[m.value for m in tp]}, got {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config field type {tp!r}")  # a bug in this module


def _from_mapping(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    valid = {f.name for f in _fields(cls)}
    for key in raw:
        if key not in valid:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key {where!r}; valid keys here: {sorted(valid)}")
    kwargs = {}
    for f in _fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix or 'config'}: missing required key {f.name!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain TOML-able data (enums as values, tuples as lists); ``derived`` is left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _fields(type(obj))}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_dict(item) for item in obj]
    return obj


def from_dict(raw: Mapping[str, Any]) -> Config:
    """A ``Config`` from parsed TOML; missing keys take their defaults."""
    config = _from_mapping(Config, raw, "")
    assert isinstance(config, Config)
    return config


# --- overrides ----------------------------------------------------------------------------------


def _parse_scalar(text: str, tp: Any, key: str) -> Any:
    """An override's text as the field's type (strings need no quotes)."""
    origin = typing.get_origin(tp)
    text = text.strip()
    if origin is tuple:
        if text.startswith("["):
            try:
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{key}: cannot parse {text!r} as a TOML array: {exc}") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    if tp is str or origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return text[1:-1]
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{key}: cannot parse {text!r} as {_type_name(tp)}") from None


def _stage_indices(stages: list[Any], selector: str, key: str) -> list[int]:
    if selector == "*":
        return list(range(len(stages)))
    if selector.isdigit():
        number = int(selector)
        if not 1 <= number <= len(stages):
            raise ConfigError(f"{key}: stage number {number} out of range 1..{len(stages)}")
        return [number - 1]
    for index, stage in enumerate(stages):
        if stage.get("name") == selector:
            return [index]
    names = [s.get("name") for s in stages]
    raise ConfigError(f"{key}: no stage {selector!r}; use a number 1..{len(stages)}, a name {names} or *")


def _apply(node: dict[str, Any], cls: type, parts: list[str], text: str, key: str) -> None:
    head, rest = parts[0], parts[1:]
    valid = {f.name for f in _fields(cls)}
    if head not in valid:
        done = key[: len(key) - len(".".join(parts))].rstrip(".")
        where = f"{done}.{head}" if done else head
        raise ConfigError(f"unknown key {where!r}; valid keys here: {sorted(valid)}")
    tp = _hints(cls)[head]
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not rest:
            raise ConfigError(f"{key} is a table; set one of its keys: {sorted(f.name for f in _fields(tp))}")
        _apply(node.setdefault(head, {}), tp, rest, text, key)
        return
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]) and rest:
        item_cls = typing.get_args(tp)[0]
        items = node[head]
        if len(rest) < 2:
            raise ConfigError(f"{key}: name a field, e.g. {key}.{rest[0] if rest else '1'}.<field>")
        for index in _stage_indices(items, rest[0], key):
            _apply(items[index], item_cls, rest[1:], text, key)
        return
    if rest:
        raise ConfigError(f"{key}: {'.'.join(parts[:1])} is a {_type_name(tp)}, it has no sub-keys")
    node[head] = _parse_scalar(text, tp, key)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to parsed TOML (in place; also returned).

    Stage fields are addressed as ``curriculum.stages.<number|name|*>.<field>`` (numbers from 1).
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parts = key.split(".")
        if parts[:2] == ["curriculum", "stages"] and "stages" not in raw.setdefault("curriculum", {}):
            # Overriding one stage of the default stages needs them materialised first.
            raw["curriculum"]["stages"] = to_dict(CurriculumConfig().stages)
        _apply(raw, Config, parts, text, key)
    return raw


# --- loading and dumping --------------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    """Parsed TOML, or ``ConfigError`` naming the file."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config of ``path`` (defaults when None) with ``overrides`` applied, validated."""
    raw = read_toml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides))


def with_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``config`` with ``a.b.c=value`` overrides applied."""
    return from_dict(apply_overrides(to_dict(config), overrides))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def _dump_table(obj: Any, header: str, array: bool, doc: str, out: list[str]) -> None:
    cls = type(obj)
    docs = field_docs(cls)
    scalars = []
    tables = []
    for f in _fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            tables.append((f.name, False))
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            tables.append((f.name, True))
        else:
            scalars.append(f.name)
    if header:
        out.extend(["", *_comment(doc), f"[[{header}]]" if array else f"[{header}]"])
    for name in scalars:
        out.extend(_comment(docs.get(name, "")))
        out.append(f"{name} = {_toml_value(to_dict(getattr(obj, name)))}")
    for name, is_array in tables:
        sub = f"{header}.{name}" if header else name
        value = getattr(obj, name)
        if is_array:
            for index, item in enumerate(value):
                _dump_table(item, sub, True, docs.get(name, "") if index == 0 else "", out)
        else:
            _dump_table(value, sub, False, docs.get(name, ""), out)


def dump_toml(config: Config) -> str:
    """The whole config as TOML, every field commented with its docstring (round-trips exactly)."""
    out = _comment(
        "envtune-run config. Generated from envtune/runtime/config.py; every key is optional\n"
        "(missing keys take these defaults). Override any key with --set a.b.c=value."
    )
    _dump_table(config, "", False, "", out)
    return "\n".join(out).strip() + "\n"


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, docstring) of every settable key, for ``envtune-run --list-keys``."""
    rows: list[tuple[str, str, str]] = []
    docs = field_docs(cls)
    for f in _fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, f"{key}."))
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows.extend(describe_keys(typing.get_args(tp)[0], f"{key}.<n|name|*>."))
        else:
            rows.append((key, _type_name(tp), docs.get(f.name, "")))
    return rows


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - maintenance entry point
    import argparse

    parser = argparse.ArgumentParser(description="Write or check the shipped default config.")
    parser.add_argument("--write-default", action="store_true", help=f"(re)write {DEFAULT_CONFIG_PATH}")
    args = parser.parse_args(argv)
    text = dump_toml(Config())
    if args.write_default:
        DEFAULT_CONFIG_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DEFAULT_CONFIG_PATH}")
    else:
        current = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8") if DEFAULT_CONFIG_PATH.exists() else ""
        print("default config is up to date" if current == text else "default config is stale")
        sys.exit(0 if current == text else 1)


__all__ = [
    "CATEGORIES",
    "CPU_CONFIG_PATH",
    "DEFAULT_CONFIG_PATH",
    "PAPER_STAGES",
    "Config",
    "ConfigError",
    "CurriculumConfig",
    "Derived",
    "EngineConfig",
    "LearnerConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "PromotionConfig",
    "RewardKind",
    "RolloutConfig",
    "RunConfig",
    "SamplingConfig",
    "StageConfig",
    "apply_overrides",
    "describe_keys",
    "dump_toml",
    "field_docs",
    "from_dict",
    "load_config",
    "read_toml",
    "to_dict",
    "with_overrides",
]

if __name__ == "__main__":  # pragma: no cover
    main()
