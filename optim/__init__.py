"""The off-policy-corrected LoRA learner: advantages, loss, packing, adapters, weight sync."""

from .advantages import AdvantageConfig, GroupAdvantages, ZeroVariancePolicy, group_advantages
from .learner import Learner, LearnerConfig, StepMetrics
from .lora import QWEN2_TARGET_MODULES, LoraSettings, attach_lora, reference_mode
from .losses import LossConfig, LossStats, WeightLevel, WeightMode, k3_kl, policy_loss
from .packing import (
    Batching,
    ModelBatch,
    build_batch,
    enable_packed_attention,
    plan_microbatches,
    token_logprobs,
)
from .weight_sync import (
    AdapterPublisher,
    AdapterSource,
    PublishedAdapter,
    PublisherStats,
    WeightSyncError,
    WeightSyncTarget,
)

__all__ = [
    "QWEN2_TARGET_MODULES",
    "AdapterPublisher",
    "AdapterSource",
    "AdvantageConfig",
    "Batching",
    "GroupAdvantages",
    "Learner",
    "LearnerConfig",
    "LoraSettings",
    "LossConfig",
    "LossStats",
    "ModelBatch",
    "PublishedAdapter",
    "PublisherStats",
    "StepMetrics",
    "WeightLevel",
    "WeightMode",
    "WeightSyncError",
    "WeightSyncTarget",
    "ZeroVariancePolicy",
    "attach_lora",
    "build_batch",
    "enable_packed_attention",
    "group_advantages",
    "k3_kl",
    "plan_microbatches",
    "policy_loss",
    "reference_mode",
    "token_logprobs",
]
