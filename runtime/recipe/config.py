"""The typed configs of envtune's entry points: ``Config`` (``envtune-run``), ``EvalConfig``
(``envtune-eval``) and ``ServeConfig`` (``envtune-serve``).

Each is a tree of frozen dataclasses with a default and a docstring per field, and each component
takes its own section unchanged: ``sampling`` is ``agents.SamplingConfig``, ``grammar`` is
``agents.GrammarOptions``, ``rollout`` is
``runtime.rollout.RolloutConfig``, ``learner`` is ``optim.LearnerConfig``, a stage's ``episode`` is
``environments.EpisodeConfig``, ``engine.embedded``/``engine.sglang`` are the engines' settings. So
every knob is declared once. The dataclass defaults ARE the paper preset (docs/method.md §2, §7.8;
deviations are said at the field); ``presets/paper.toml`` is generated from them
(``python -m envtune.runtime.recipe.config --write-default``) and a test keeps the two equal. The CPU
preset (``presets/cpu.toml``) is a partial TOML laid over the same defaults. Reading, overriding and
writing TOML is ``config_io``'s job.

Left out on purpose: anything that runs. Importing this module loads no torch, transformers,
xgrammar or aiohttp.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from envtune.agents.config import SamplingConfig
from envtune.agents.grammar import GrammarOptions
from envtune.environments.acebench.episode import AceEpisodeConfig
from envtune.environments.episode import EVAL_MAX_STEPS_PER_TURN, EpisodeConfig
from envtune.environments.suites import SuiteOptions, suite_names
from envtune.environments.tasks import CATEGORIES
from envtune.environments.tau2.episode import Tau2EpisodeConfig
from envtune.environments.types import FeedbackMode, PromptStyle, RewardKind
from envtune.optim.config import LearnerConfig
from envtune.runtime.engines.settings import (
    EmbeddedEngineConfig,
    RouterSettings,
    ServerLimits,
    SGLangClientConfig,
    SGLangLaunchSettings,
)
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config_io import ConfigError as ConfigError
from envtune.runtime.recipe.sinks import MetricsConfig
from envtune.runtime.recipe.trajectory_log import TrajectorySampling
from envtune.runtime.rollout import RolloutConfig

PRESETS = Path(__file__).parent / "presets"
PAPER_PRESET = PRESETS / "paper.toml"
"""The shipped paper preset (generated from the dataclass defaults)."""
CPU_PRESET = PRESETS / "cpu.toml"
"""The CPU preset used by ``envtune-run`` with no arguments (a partial TOML over the defaults)."""


# --- shared sections ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which policy model."""

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
    """``embedded``: the in-process engine behind envtune's SGLang-protocol server on 127.0.0.1
    (the client talks to it over real HTTP); ``sglang``: running SGLang servers at
    ``engine.sglang.urls``; ``launch``: start SGLang workers here, one per GPU or tensor-parallel
    group (``engine.launch``)."""
    embedded: EmbeddedEngineConfig = field(default_factory=EmbeddedEngineConfig)
    """The embedded engine (kind ``embedded``)."""
    sglang: SGLangClientConfig = field(default_factory=SGLangClientConfig)
    """The SGLang client (every kind talks through it; ``urls`` is set for kind ``sglang``)."""
    launch: SGLangLaunchSettings = field(default_factory=SGLangLaunchSettings)
    """The launched workers (kind ``launch``)."""
    router: RouterSettings = field(default_factory=RouterSettings)
    """SGLang's router in front of the workers (kinds ``launch`` and ``sglang``)."""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log output (metrics go to the run folder, not the log)."""

    format: Literal["console", "json"] = "console"
    """Renderer of log events on stderr."""
    level: str = "info"
    """Minimum log level on the terminal (``--verbose`` makes it debug, ``--quiet`` warning)."""
    json_log: bool = True
    """Also write every log event, values in full, to ``log.jsonl`` in the run folder (envtune-run)."""


# --- the curriculum -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromotionConfig:
    """When a stage ends (docs/method.md §2): the paper's rule, the metric has plateaued and the
    gradient norm is stable, bounded by a threshold (promote early once the metric's window mean
    reaches it) and a step budget (promote at the latest after ``max_steps``). The first of the three
    to hold fires, and the promotion record says which and why."""

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
    max_steps: int = 100
    """Step budget: promote after this many learner steps in the stage at the latest; 0 = no
    budget (then ``metric`` alone ends the stage)."""
    plateau_patience: int = 0
    """The plateau rule (paper Remark 3.1): the metric has plateaued when its window mean has not
    risen more than ``plateau_min_delta`` above its best earlier window mean (within the stage) for
    this many consecutive values; 0 turns the rule off (threshold and budget only)."""
    plateau_min_delta: float = 0.01
    """Smallest rise of the window mean that counts as an improvement."""
    grad_norm_window: int = 10
    """The plateau rule also needs a stable gradient: ``learner/grad_norm`` over this many most
    recent steps of the stage (steps that applied no update are left out)."""
    grad_norm_max_cv: float = 0.5
    """Stable means a coefficient of variation (std / mean) of those gradient norms at most this
    (the paper's collapse starts with the norm growing several-fold within tens of steps)."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_steps < 0 or self.min_steps < 0:
            raise ValueError("promotion needs window >= 1, min_steps >= 0, max_steps >= 0")
        if not self.metric and self.max_steps <= 0:
            raise ValueError("promotion needs a metric or a max_steps budget, or the stage never ends")
        if self.plateau_patience < 0 or self.grad_norm_window < 2:
            raise ValueError("plateau_patience must be >= 0 and grad_norm_window >= 2")
        if self.plateau_patience and not self.metric:
            raise ValueError("the plateau rule needs a metric")
        if not (self.plateau_min_delta >= 0 and self.grad_norm_max_cv > 0):
            raise ValueError("plateau_min_delta must be >= 0 and grad_norm_max_cv > 0")


@dataclass(frozen=True, slots=True)
class StageConfig:
    """One curriculum stage (docs/method.md §2)."""

    name: str
    """Short name, used in logs, metrics and ``--set curriculum.stages.<name>...``."""
    reward: RewardKind = RewardKind.PROGRESS
    """Which reward the stage trains on: ``stage1`` (the syntax reward) or ``progress``."""
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    """How the environment talks to the model: feedback (augmented or standard), system prompt
    (basic or resourceful), replies per user turn (6 in the release's training)."""
    data: Literal["train", "train_minus_validation"] = "train_minus_validation"
    """Split part the tasks come from; the test part is refused, and ``train`` includes the
    validation ids (their validation metrics then stop being held out)."""
    categories: tuple[str, ...] = CATEGORIES
    """BFCL categories of the stage's tasks."""
    max_tasks: int = 0
    """Keep at most this many tasks (0 = all), picked by ``selection``."""
    selection: Literal["random", "easiest", "shortest"] = "random"
    """Which tasks ``max_tasks`` keeps: a seeded random subset, the fewest ground-truth calls
    (``easiest``), or the shortest prompts (``shortest``: fewest characters of function docs and user
    questions, the cheapest episodes when compute is the limit, e.g. on a CPU)."""
    constrained: bool = False
    """Grammar-constrained decoding of the reply format."""
    max_replies: int = 0
    """0: episodes stop at the run's ``sampling.max_replies``. Otherwise this stage's episodes stop
    after this many replies (a budget: fewer replies per prompt, cheaper and sharper credit)."""
    learner_masks: Literal["replay", "unconstrained_target"] = "replay"
    """Which policy the learner trains when replies are sampled under the grammar. ``replay``: the
    constrained policy (the grammar is part of the policy, as when evaluating constrained): the
    learner replays each reply's grammar masks for the policy, the KL reference and the entropy, so
    its logprobs equal the engine's behaviour logprobs. ``unconstrained_target``: the free policy
    (evaluation unconstrained); constrained samples say almost nothing about it (the behaviour weight
    is the unmasked mass of the allowed tokens, median 0.005 on BFCL with the tiny model), so this
    choice refuses ``constrained = true``."""
    zero_variance: Literal["drop", "keep"] = "drop"
    """A group whose rewards are all equal has all-zero GRPO advantages: ``drop`` it (envtune's
    default; it would only add KL and entropy terms) or ``keep`` it (the release keeps every group)."""
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    """When the stage ends."""

    def __post_init__(self) -> None:
        if not self.name or self.name.isdigit() or self.name == "*":
            raise ValueError(f"stage name must be a non-numeric word, got {self.name!r}")
        unknown = set(self.categories) - set(CATEGORIES)
        if unknown or not self.categories:
            raise ValueError(f"categories {sorted(unknown) or 'empty'}; valid: {list(CATEGORIES)}")
        if self.max_tasks < 0:
            raise ValueError(f"max_tasks must be >= 0, got {self.max_tasks}")
        if self.max_replies < 0:
            raise ValueError(f"stage {self.name}: max_replies must be >= 0, got {self.max_replies}")
        if self.constrained and self.learner_masks == "unconstrained_target":
            raise ValueError(
                f"stage {self.name}: learner_masks = 'unconstrained_target' trains the unconstrained "
                "policy, which grammar-constrained samples cannot teach (their behaviour weights "
                "collapse); set constrained = false, or learner_masks = 'replay' to train the "
                "constrained policy"
            )


PAPER_STAGES: tuple[StageConfig, ...] = (
    StageConfig(
        name="syntax",
        reward=RewardKind.STAGE1,
        episode=EpisodeConfig(feedback=FeedbackMode.STANDARD, prompt_style=PromptStyle.BASIC),
        categories=("base",),
        max_tasks=75,
        selection="easiest",
        # The stage's own reward, not the format alone: a policy that only answers is well formed
        # (R_format = 1) but scores 0 here (I_tool = 0), so it never passes.
        promotion=PromotionConfig(metric="train/reward", window=5, threshold=1.8, max_steps=80),
    ),
    StageConfig(
        name="hints",
        reward=RewardKind.PROGRESS,
        episode=EpisodeConfig(feedback=FeedbackMode.AUGMENTED, prompt_style=PromptStyle.BASIC),
        categories=("base",),
        promotion=PromotionConfig(
            metric="validation/progress", window=3, threshold=0.6, min_steps=20, max_steps=80,
            plateau_patience=3,
        ),
    ),
    StageConfig(
        name="hard",
        reward=RewardKind.PROGRESS,
        episode=EpisodeConfig(feedback=FeedbackMode.AUGMENTED, prompt_style=PromptStyle.RESOURCEFUL),
        promotion=PromotionConfig(
            metric="validation/progress", window=3, threshold=0.5, min_steps=20, max_steps=240,
            plateau_patience=3,
        ),
    ),
    StageConfig(
        name="independent",
        reward=RewardKind.PROGRESS,
        episode=EpisodeConfig(feedback=FeedbackMode.STANDARD, prompt_style=PromptStyle.RESOURCEFUL),
        promotion=PromotionConfig(max_steps=120),
    ),
)
"""The paper's four stages (docs/method.md §2): syntax on a small easy base subset with standard
feedback, base with hints, all four categories with hints and the resourceful prompt, then all four
with standard feedback. Step budgets follow the release (about 80 / 60-80 / 240 steps; stage 4 has
none published, 120 is envtune's choice). Stages 2 and 3 end by the paper's rule made automatic:
validation progress plateaued (no rise of its 3-validation mean above its best by more than 0.01
for 3 validations, i.e. 15 steps) with a stable gradient norm, after at least 20 steps; their
thresholds (0.6, 0.5, above the paper's own validation curves) only cut a stage short that is far
ahead. Stage 1 promotes on its own reward (mean >= 1.8 of 2 over 5 steps: calls that are well formed
and execute). Constrained decoding is off in every stage: the paper
samples unconstrained, stage 1 exists to *learn* the format (a grammar would saturate R_format and
leave no signal), and evaluation is unconstrained."""


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
    """Feedback during validation: standard, the evaluation condition."""
    validation_max_steps_per_turn: int = EVAL_MAX_STEPS_PER_TURN
    """Replies per user turn during validation (BFCL's evaluation limit)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("at least one stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.validation_every < 0 or self.validation_limit < 0:
            raise ValueError("validation_every and validation_limit must be >= 0")
        if self.validation_max_steps_per_turn < 1:
            raise ValueError("validation_max_steps_per_turn must be >= 1")


# --- envtune-run ----------------------------------------------------------------------------------------


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
    trajectories: TrajectorySampling = field(default_factory=TrajectorySampling)
    """Which finished episodes go to ``trajectories.jsonl`` (a dataset: messages, tool calls, rewards)."""
    progress_bar: bool = True
    """Show the progress display on stderr."""
    no_progress_timeout_s: float = 3600.0
    """Fail the run (non-zero exit, checkpoint, report) when no learner step completes for this
    long (0 = never): a run that cannot progress, e.g. an engine that stopped answering, says so
    instead of hanging. Generous by default: a step with validation may take many minutes on a GPU."""

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("max_steps and checkpoint_every must be >= 0")
        if not self.no_progress_timeout_s >= 0:
            raise ValueError(f"no_progress_timeout_s must be >= 0, got {self.no_progress_timeout_s}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


@dataclass(frozen=True, slots=True)
class Derived:
    """Values computed once from the rest of the config."""

    episodes_per_step: int
    """group_size * groups_per_step."""
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
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling of training rollouts (verl's defaults; the release sets none) and episode length caps."""
    grammar: GrammarOptions = field(default_factory=GrammarOptions)
    """The reply grammar of stages with ``constrained = true`` (and of their validation); the
    defaults allow the whole paper format."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout production: GRPO groups, concurrency, the staleness bound."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The learner: optimiser, loss, advantages, LoRA adapter."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """The curriculum."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run folder and budget."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Metric sinks: metrics.jsonl always, TensorBoard and W&B as chosen."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    derived: Derived = field(init=False, repr=False, compare=False)
    """Computed in ``__post_init__``; never read from or written to TOML."""

    def __post_init__(self) -> None:
        _validate_run(self)
        budgets = [s.promotion.max_steps for s in self.curriculum.stages]
        total = sum(budgets) if all(budgets) else 0
        if self.run.max_steps:
            total = min(total, self.run.max_steps) if total else self.run.max_steps
        object.__setattr__(
            self,
            "derived",
            Derived(
                episodes_per_step=self.rollout.group_size * self.rollout.groups_per_step,
                total_step_budget=total,
                num_stages=len(self.curriculum.stages),
            ),
        )


def _validate_engine(model: ModelConfig, engine: EngineConfig) -> None:
    if engine.kind == "sglang" and not engine.sglang.urls:
        raise ConfigError("engine.kind = 'sglang' needs engine.sglang.urls")
    if engine.kind != "embedded" and not model.path:
        raise ConfigError(f"engine.kind = {engine.kind!r} needs model.path")
    if engine.router.enabled and engine.kind == "embedded":
        raise ConfigError("engine.router.enabled needs engine.kind = 'launch' or 'sglang' (SGLang workers)")
    if engine.router.enabled and engine.sglang.router_url:
        raise ConfigError(
            "engine.router.enabled starts a router and engine.sglang.router_url names one: pick one"
        )


def _validate_run(config: Config) -> None:
    """Cross-section checks (each section checks itself while parsing)."""
    _validate_engine(config.model, config.engine)
    if config.engine.kind == "embedded" and config.learner.lora.rank > config.engine.embedded.max_lora_rank:
        raise ConfigError(
            f"learner.lora.rank = {config.learner.lora.rank} is above engine.embedded.max_lora_rank = "
            f"{config.engine.embedded.max_lora_rank}: the engine would refuse every adapter; raise the limit"
        )
    sampling = config.sampling
    if sampling.temperature <= 0 or sampling.top_p < 1 or sampling.top_k > 0:
        # The learner recomputes logprobs of the full temperature-scaled distribution; a truncated
        # or greedy sampler's behaviour logprobs would be of another policy.
        raise ConfigError(
            "sampling: training needs temperature > 0, top_p = 1 and top_k = -1 (the learner cannot "
            f"recompute truncated or greedy logprobs); got temperature={sampling.temperature}, "
            f"top_p={sampling.top_p}, top_k={sampling.top_k}. Evaluation (envtune-eval) may use them."
        )


# --- envtune-eval ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvalTasksConfig:
    """Which suites and tasks ``envtune-eval`` runs."""

    suites: tuple[str, ...] = ("bfcl-v3",)
    """Suites, run one after the other (``--suite NAME``; ``envtune-eval --suite list`` lists them)."""
    split: Literal["test", "validation", "train", "train_minus_validation"] = "test"
    """BFCL V3: part of the committed split (BFCL's held-in test half by default)."""
    categories: tuple[str, ...] = CATEGORIES
    """BFCL V3: categories."""
    limit: int = 0
    """At most this many scored tasks per category of every suite (0 = all; not applied to tasks named
    in ``ids``); the tasks they depend on (BFCL V4 memory's prerequisite conversations) run too,
    unscored."""
    ids: tuple[str, ...] = ()
    """Only these task ids: ``ID`` in every chosen suite, or ``SUITE:ID`` in that one (a suite no id
    addresses keeps its own selection, up to ``limit``); empty = all. Their dependencies run too,
    unscored."""
    trials: int = 1
    """Episodes per scored task (τ²'s pass^k needs k trials; accuracy counts every trial)."""

    def __post_init__(self) -> None:
        unknown = set(self.categories) - set(CATEGORIES)
        if unknown or not self.categories:
            raise ValueError(f"categories {sorted(unknown) or 'empty'}; valid: {list(CATEGORIES)}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        known = suite_names()
        bad = [name for name in self.suites if name not in known]
        if bad or not self.suites:
            raise ValueError(f"suites {bad or 'empty'}; valid: {list(known)} (envtune-eval --suite list)")
        if len(set(self.suites)) != len(self.suites):
            raise ValueError(f"suites named twice: {list(self.suites)}")


@dataclass(frozen=True, slots=True)
class EvalConditions:
    """Conditions of an evaluation (BFCL's by default)."""

    episode: EpisodeConfig = field(
        default_factory=lambda: EpisodeConfig(
            feedback=FeedbackMode.STANDARD,
            prompt_style=PromptStyle.RESOURCEFUL,
            max_steps_per_turn=EVAL_MAX_STEPS_PER_TURN,
        )
    )
    """Standard feedback, the final stage's prompt, BFCL's 20 replies per turn (BFCL V3 and V4)."""
    tau2: Tau2EpisodeConfig = field(default_factory=Tau2EpisodeConfig)
    """τ² conversations: tau2's limits (200 messages, 10 failed calls)."""
    acebench: AceEpisodeConfig = field(default_factory=AceEpisodeConfig)
    """ACEBench agent episodes: its 40-message dialogue limit."""
    constrained: bool = False
    """Grammar-constrained decoding (off: BFCL evaluates free generation)."""
    concurrency: int = 32
    """Episodes run at once."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """Everything an ``envtune-eval`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model evaluated."""
    adapter: str = ""
    """A LoRA adapter folder (peft layout) to evaluate on top of the model; empty = the base model."""
    run: str = ""
    """A run folder (``--run``): its final adapter (the last complete checkpoint's) is evaluated, on
    the model and engine of its ``config.toml`` unless this config sets them; eval.json goes there."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The inference backend."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    """Sampling: greedy by default, as BFCL evaluates."""
    tasks: EvalTasksConfig = field(default_factory=EvalTasksConfig)
    """Which tasks."""
    conditions: EvalConditions = field(default_factory=EvalConditions)
    """Under which conditions."""
    suites: SuiteOptions = field(default_factory=SuiteOptions)
    """Settings of the out-of-distribution suites (search backend, τ² split and user simulator,
    ACEBench checkout...)."""
    output: str = ""
    """Where ``eval.json`` is written (the trajectories beside it); empty: ``<run>/eval.json`` with
    ``run``, else ``evals/<UTC timestamp>/eval.json``."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    def __post_init__(self) -> None:
        _validate_engine(self.model, self.engine)
        if self.run and self.adapter:
            raise ConfigError("run and adapter both name the adapter to evaluate; give one")


# --- envtune-serve ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP server of ``envtune-serve``."""

    host: str = "127.0.0.1"
    """Address to listen on (loopback by default)."""
    port: int = 30000
    """Port (SGLang's default)."""
    api_key_env: str = "ENVTUNE_API_KEY"
    """Name of the environment variable holding the API key (never on the command line, where every
    user of the machine can read it); when it is set, requests need ``Authorization: Bearer KEY``."""
    api_key_file: str = ""
    """A file holding the API key (its first line), read when the variable is unset."""
    admin_api_key_env: str = "ENVTUNE_ADMIN_API_KEY"
    """Environment variable holding the admin key (SGLang's ``--admin-api-key``): when set, the control
    endpoints (adapters, weights, cache) need it, and the API key alone no longer opens them."""
    adapters: tuple[str, ...] = ()
    """LoRA adapters to load at start, as ``NAME=PATH``."""
    served_model_name: str = ""
    """The model id clients name (``model`` in OpenAI requests, ``/v1/models``); empty: ``model.path``
    as given (SGLang's default), or ``tiny`` for the tiny local model."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    """Request sizes, connection limits and slow-client timeouts."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for spec in self.adapters:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"adapters: expected NAME=PATH, got {spec!r}")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything an ``envtune-serve`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model served."""
    engine: EmbeddedEngineConfig = field(default_factory=EmbeddedEngineConfig)
    """The embedded engine."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The HTTP server."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""


# --- files --------------------------------------------------------------------------------------------------


def load_config(path: Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The run config of ``path`` (the paper defaults when None) with ``overrides`` applied."""
    return config_io.load(Config, path, overrides)


def dump_config(config: Config) -> str:
    """The run config as commented TOML (round-trips exactly)."""
    return config_io.dump_toml(
        config,
        "envtune-run config, generated from envtune/runtime/recipe/config.py. Every key is optional\n"
        "(missing keys take these defaults, the paper preset). Override any key with --set a.b.c=value.",
    )


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - maintenance entry point
    import argparse

    parser = argparse.ArgumentParser(description="Write or check the shipped paper preset.")
    parser.add_argument("--write-default", action="store_true", help=f"(re)write {PAPER_PRESET}")
    args = parser.parse_args(argv)
    text = dump_config(Config())
    if args.write_default:
        PAPER_PRESET.write_text(text, encoding="utf-8")
        print(f"wrote {PAPER_PRESET}")
    else:
        current = PAPER_PRESET.read_text(encoding="utf-8") if PAPER_PRESET.exists() else ""
        print("paper preset is up to date" if current == text else "paper preset is stale")
        sys.exit(0 if current == text else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
