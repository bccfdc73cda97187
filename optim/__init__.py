"""The off-policy-corrected LoRA learner: pure torch, knowing nothing of agents or the runtime.

This face re-exports only what needs no torch (the config records and the advantage rule), so the
config schema can describe the learner without loading it. The torch modules are imported by path:
``optim.learner`` (``Learner``, ``StepMetrics``), ``optim.losses`` (``policy_loss``, ``k3_kl``),
``optim.packing`` (packed micro-batches, ``token_logprobs``) and ``optim.lora`` (peft adapters).
"""

from envtune.optim.advantages import GroupAdvantages, group_advantages, is_zero_variance
from envtune.optim.config import (
    QWEN2_TARGET_MODULES,
    AdvantageConfig,
    Batching,
    KlReference,
    LearnerConfig,
    LoraSettings,
    LossConfig,
    WeightLevel,
    WeightMode,
)

__all__ = [
    "QWEN2_TARGET_MODULES",
    "AdvantageConfig",
    "Batching",
    "GroupAdvantages",
    "KlReference",
    "LearnerConfig",
    "LoraSettings",
    "LossConfig",
    "WeightLevel",
    "WeightMode",
    "group_advantages",
    "is_zero_variance",
]
