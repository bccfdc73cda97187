"""The off-policy-corrected LoRA learner: advantages, loss, packing, adapters, weight sync."""

from .advantages import AdvantageConfig, GroupAdvantages, ZeroVariancePolicy, group_advantages
from .learner import KlReference, Learner, LearnerConfig, SkipReason, StepMetrics, TokenMaskSource
from .logprobs import bitmask_words, chunked_token_logprobs, token_logprobs_reference, unpack_bitmask
from .lora import QWEN2_TARGET_MODULES, LoraSettings, attach_lora, reference_mode
from .losses import LossConfig, LossStats, WeightLevel, WeightMode, k3_kl, policy_loss
from .packing import (
    DEFAULT_LOGITS_CHUNK_ELEMENTS,
    Batching,
    ModelBatch,
    build_batch,
    enable_packed_attention,
    plan_microbatches,
    token_logprobs,
    with_masks,
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
    "DEFAULT_LOGITS_CHUNK_ELEMENTS",
    "QWEN2_TARGET_MODULES",
    "AdapterPublisher",
    "AdapterSource",
    "AdvantageConfig",
    "Batching",
    "GroupAdvantages",
    "KlReference",
    "Learner",
    "LearnerConfig",
    "LoraSettings",
    "LossConfig",
    "LossStats",
    "ModelBatch",
    "PublishedAdapter",
    "PublisherStats",
    "SkipReason",
    "StepMetrics",
    "TokenMaskSource",
    "WeightLevel",
    "WeightMode",
    "WeightSyncError",
    "WeightSyncTarget",
    "ZeroVariancePolicy",
    "attach_lora",
    "bitmask_words",
    "build_batch",
    "chunked_token_logprobs",
    "enable_packed_attention",
    "group_advantages",
    "k3_kl",
    "plan_microbatches",
    "policy_loss",
    "reference_mode",
    "token_logprobs",
    "token_logprobs_reference",
    "unpack_bitmask",
    "with_masks",
]
