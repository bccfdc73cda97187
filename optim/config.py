"""Every knob of the learner, declared once: the run config's ``learner`` section is ``LearnerConfig``.

Standard library only, so the config schema (and ``envtune-run --help``) can describe the learner
without importing torch; the modules that do the work (``losses``, ``packing``, ``lora``,
``learner``) take these records.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

QWEN2_TARGET_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
"""Every linear layer of a Qwen2 (and Llama) decoder block."""


class WeightLevel(enum.StrEnum):
    """Granularity of the behaviour importance weight."""

    TOKEN = "token"
    """One weight per token: proximal/behaviour of that token."""
    SEQUENCE = "sequence"
    """One weight per sequence: the geometric mean of its token weights (a product over thousands of
    tokens is numerically degenerate; GSPO and SkyRL's geometric mask use the same mean)."""


class WeightMode(enum.StrEnum):
    """What happens to a behaviour weight outside its bounds."""

    TRUNCATE = "truncate"
    """min(weight, cap): truncated importance sampling (TIS)."""
    MASK = "mask"
    """Weights outside [floor, cap] zero the policy-gradient term of their tokens (or sequences)."""


class Batching(enum.StrEnum):
    """How a micro-batch of sequences becomes model input."""

    PACKED = "packed"
    """One row, position_ids restarting per sequence, no padding."""
    PADDED = "padded"
    """Right-padded rows with an attention mask (baseline)."""


class KlReference(enum.StrEnum):
    """Which policy the KL term anchors to."""

    BASE = "base"
    """The base model (adapter disabled) in every stage."""
    STAGE_START = "stage_start"
    """The adapter as it was at the last ``Learner.snapshot_reference()`` (taken at construction, and
    by the runtime at each stage promotion): each stage is anchored to the policy it started from."""


@dataclass(frozen=True, slots=True)
class LossConfig:
    """The clipped, off-policy-corrected policy-gradient loss (docs/method.md §7.3-§7.5)."""

    clip_low: float = 0.2
    """PPO ratio lower clip: 1 - clip_low (epsilon_low)."""
    clip_high: float = 0.28
    """PPO ratio upper clip: 1 + clip_high (epsilon_high, DAPO's clip-higher)."""
    dual_clip: float | None = 10.0
    """Dual-clip constant c for negative advantages (the release's value); ``none`` disables it."""
    behavior_correction: bool = True
    """Multiply by the behaviour weight proximal/behaviour; false trusts the engine's logprobs as-is."""
    behavior_weight_cap: float = 2.0
    """Upper bound of the behaviour weight (verl's ``rollout_is_threshold``, slime's TIS default)."""
    behavior_weight_floor: float = 0.0
    """Lower bound, used only by the ``mask`` mode (truncation only caps from above)."""
    behavior_weight_level: WeightLevel = WeightLevel.TOKEN
    """Token- or sequence-level behaviour weight."""
    behavior_weight_mode: WeightMode = WeightMode.TRUNCATE
    """Truncate or mask out-of-bound behaviour weights."""
    kl_coef: float = 0.1
    """beta of the k3 ("low_var_kl") KL to the reference policy; 0 skips the reference forward pass.
    The paper's KL ablation shows 0.1 is needed to keep entropy from collapsing."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus (subtracted from the loss)."""

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if not self.behavior_weight_cap > 0:
            raise ValueError(f"behavior_weight_cap must be > 0, got {self.behavior_weight_cap}")
        if not 0 <= self.behavior_weight_floor < self.behavior_weight_cap:
            raise ValueError("behavior_weight_floor must be in [0, behavior_weight_cap)")
        if not (self.kl_coef >= 0 and self.entropy_coef >= 0):
            raise ValueError("kl_coef and entropy_coef must be >= 0")


@dataclass(frozen=True, slots=True)
class AdvantageConfig:
    """How rewards become GRPO advantages."""

    normalize_std: bool = True
    """Divide by the group's standard deviation (GRPO); false gives Dr.GRPO's mean-centring only."""
    eps: float = 1e-6
    """Added to the standard deviation before dividing."""

    def __post_init__(self) -> None:
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """The LoRA adapter the learner trains (the paper fine-tunes all weights; envtune trains LoRA)."""

    rank: int = 32
    """Adapter rank r."""
    alpha: float = 64.0
    """Scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.0
    """LoRA dropout. Keep 0: with dropout the proximal (no-grad) and training passes differ and the
    on-policy ratio is no longer exactly 1."""
    target_modules: tuple[str, ...] = QWEN2_TARGET_MODULES
    """Module names that get an adapter (every linear layer of a Qwen2/Llama block)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")


@dataclass(frozen=True, slots=True)
class LearnerConfig:
    """The policy-gradient learner (docs/method.md §7; the release's values, §7.8)."""

    lr: float = 1e-5
    """AdamW learning rate, constant. The paper uses 1e-6 for full fine-tuning; LoRA conventionally
    needs about 10x the full-fine-tuning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (verl's default)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm (the release's 1.0); ``inf`` disables clipping."""
    micro_batch_tokens: int = 8192
    """Budget of computed positions per forward/backward (padding included in padded mode)."""
    updates_per_step: int = 1
    """Optimizer updates per batch (mini-batches). 1 reproduces the release (the PPO clip is then
    inert against the proximal policy, but the behaviour weight still corrects staleness)."""
    batching: Batching = Batching.PACKED
    """Packed (padding-free) or padded micro-batches."""
    autocast_dtype: str | None = None
    """E.g. ``bfloat16`` to run forwards under autocast; ``none`` runs in the model's dtype."""
    logits_chunk_elements: int = 1 << 26
    """Most fp32 logits held at once when computing logprobs and entropies (the LM head runs over
    chunks of ``logits_chunk_elements // vocab`` tokens; 64M = 256 MiB, 441 tokens at a 152k
    vocabulary, whole micro-batches at small vocabularies). 0 computes full-vocabulary logits for the
    whole micro-batch: about 20 GB per 8k tokens at 152k (``benchmarks/learner_memory.py``)."""
    kl_reference: KlReference = KlReference.STAGE_START
    """The KL anchor. ``stage_start``: the adapter at the last snapshot, which the run takes at each
    promotion, as the paper's per-stage runs restart from the previous checkpoint with a KL to that
    run's initial policy. ``base``: the base model in every stage, which pulls later stages back toward
    the untrained model. Cost: one extra copy of the adapter."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The loss."""
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Advantage normalisation."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter (used only when the model is not already a peft model)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.micro_batch_tokens < 1 or self.updates_per_step < 1:
            raise ValueError("micro_batch_tokens and updates_per_step must be >= 1")
        if self.logits_chunk_elements < 0:
            raise ValueError(f"logits_chunk_elements must be >= 0, got {self.logits_chunk_elements}")
