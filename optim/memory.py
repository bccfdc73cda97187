"""Per-GPU memory of the sharded LoRA learner, estimated from the model's shape before anything loads.

``estimate_learner_memory`` adds up what one rank holds at its peak during a training micro-batch
under FSDP2 (``distributed.py``): its shard of the frozen base weights, the FSDP units gathered at
that moment (the root's embeddings and LM head, the current and the prefetched decoder layer), the
LoRA weights, gradients and AdamW moments (sharded, fp32), the activations kept for backward (all
layers, or only layer inputs plus one recomputed layer with gradient checkpointing), the logits of
the predicted positions, and a fixed workspace (CUDA context, NCCL and cuBLAS buffers, allocator
slack). ``check_fits`` refuses a configuration whose estimate exceeds the device, before a run
spends minutes loading a model that would run out of memory on its first long episode.

The activation term is counted tensor by tensor for a Qwen2/Llama decoder layer (what autograd
saves: the normed inputs, q/k/v before and after RoPE, the attention output, the SwiGLU's four
intermediate-size tensors, the LoRA A outputs) with a flash/memory-efficient attention kernel that
saves no [L, L] matrix. Tests check it against the bytes autograd actually saves on a small model;
``benchmarks/gpu_check.py`` prints it beside the measured CUDA peak. It is an estimate: the
allocator's fragmentation and kernels' scratch space are only covered by the fixed workspace.

Standard library only: the runtime prints the estimate at start without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .config import LearnerConfig

GIB = 1024**3

LM_HEAD = "lm_head"
"""The LM head's module name, a LoRA target outside the decoder layers."""

QWEN2_LINEAR_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""The decoder block's linear layers, the names LoRA targets use."""

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MemoryBudgetError(ValueError):
    """The configuration's estimated per-GPU memory exceeds the device: change it before loading."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The sizes of a Qwen2/Llama-style decoder that memory depends on."""

    vocab_size: int
    """Rows of the embedding and the LM head."""
    hidden_size: int
    """Model width h."""
    intermediate_size: int
    """SwiGLU width i."""
    num_layers: int
    """Decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads (grouped-query attention)."""
    head_dim: int
    """Width of one head."""
    tie_word_embeddings: bool = False
    """True when the LM head shares the embedding matrix."""
    attention_bias: bool = True
    """q/k/v projections carry a bias (Qwen2: yes; Llama: no)."""

    @staticmethod
    def from_hf_config(config: Any) -> ModelShape:
        """From a transformers config object (``Qwen2Config``, ``LlamaConfig``...) or a dict of one."""
        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        model_type = get("model_type", "")
        bias = get("attention_bias", None)
        return ModelShape(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads", None) or heads),
            head_dim=int(get("head_dim", None) or hidden // heads),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            # Qwen2's config has no attention_bias field: its q/k/v always carry one.
            attention_bias=bool(bias) if bias is not None else model_type in ("qwen2", ""),
        )

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        """Parameters of one decoder layer (linears, q/k/v biases, two norms)."""
        n = sum(a * b for a, b in self.linear_shapes().values())
        if self.attention_bias:
            n += self.q_width + 2 * self.kv_width
        return n + 2 * self.hidden_size

    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, LM head (unless tied)."""
        embed = self.vocab_size * self.hidden_size
        return embed + self.hidden_size + (0 if self.tie_word_embeddings else embed)

    def base_params(self) -> int:
        """All parameters of the base model."""
        return self.root_params() + self.num_layers * self.layer_params()

    def lora_params(self, rank: int, target_modules: Sequence[str] = QWEN2_LINEAR_MODULES) -> int:
        """LoRA parameters for ``rank`` on the named linears of every layer, and on the LM head when
        ``lm_head`` is named: r·(in + out) each."""
        shapes = self.linear_shapes()
        unknown = sorted(set(target_modules) - set(shapes) - {LM_HEAD})
        if unknown:
            raise ValueError(f"unknown LoRA target modules {unknown}; known: {sorted(shapes)} and {LM_HEAD}")
        per_layer = sum(rank * (shapes[m][0] + shapes[m][1]) for m in set(target_modules) - {LM_HEAD})
        head = rank * (self.hidden_size + self.vocab_size) if LM_HEAD in target_modules else 0
        return self.num_layers * per_layer + head

    def activation_bytes_per_token(
        self, act_bytes: int, lora_rank: int, lora_targets: Sequence[str], lora_bytes: int | None = None
    ) -> int:
        """Bytes autograd keeps for backward per token and decoder layer (no checkpointing).

        Counted tensor by tensor (checked against autograd's saved tensors in the tests): the two
        RMSNorms' fp32 upcast inputs; q, k, v after RoPE and the attention output (a fused kernel
        keeps only per-row statistics, no [L, L] matrix); the o_proj input (a reshaped copy of the
        attention output); SwiGLU's gate, SiLU(gate) and up; the linear inputs the LoRA branches
        keep for their weight gradients (the frozen base weights keep none); each LoRA's A output.
        When LoRA computes in fp32 over a lower-precision base (peft's default without an FSDP
        mixed-precision policy) every LoRA branch keeps its own fp32 copy of its input instead.
        """
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_width, self.kv_width
        targets = set(lora_targets) - {LM_HEAD}  # the head's adapter is outside the layers
        lora_bytes = act_bytes if lora_bytes is None else lora_bytes
        base = 2 * 4 * h + act_bytes * (q + 2 * kv + q + 3 * i)
        if lora_bytes == act_bytes:
            inputs = 0
            if targets & {"q_proj", "k_proj", "v_proj"}:
                inputs += h
            if targets & {"gate_proj", "up_proj"}:
                inputs += h
            if "o_proj" in targets:
                inputs += q  # a reshaped copy of the attention output
            if "down_proj" in targets:
                inputs += i
            lora_inputs = act_bytes * inputs
        else:
            shapes = self.linear_shapes()
            lora_inputs = lora_bytes * sum(shapes[m][0] for m in targets)
        return base + lora_inputs + lora_bytes * lora_rank * len(targets)

    def root_activation_bytes_per_token(self, lora_rank: int = 0, lora_targets: Sequence[str] = ()) -> int:
        """Kept outside the decoder layers: the final norm's fp32 input (a frozen LM head keeps none;
        an adapter on it keeps its fp32 input and its A output)."""
        head = 4 * (self.hidden_size + lora_rank) if LM_HEAD in lora_targets else 0
        return 4 * self.hidden_size + head


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """One rank's estimated peak, by component (bytes)."""

    base_shard: int
    """This rank's 1/world of the frozen base weights."""
    gathered_units: int
    """Unsharded FSDP units alive at once: the root (embeddings, LM head) and two decoder layers."""
    lora_params: int
    """This rank's shard of the fp32 LoRA weights."""
    lora_grads: int
    """This rank's shard of their fp32 gradients."""
    optimizer: int
    """AdamW's two fp32 moments for the shard."""
    activations: int
    """Tensors kept for backward in one micro-batch, plus one layer's worth of backward transients."""
    logits: int
    """Logits of the predicted positions with their fp32 log-softmax, entropy and gradients."""
    workspace: int
    """CUDA context, communication and cuBLAS buffers, allocator slack (a fixed allowance)."""
    world_size: int
    """Ranks the weights are sharded over."""
    tokens_per_microbatch: int
    """Positions computed in the largest micro-batch the estimate assumes."""
    gradient_checkpointing: bool
    """Whether activations assume per-layer recomputation."""

    @property
    def total(self) -> int:
        return (
            self.base_shard
            + self.gathered_units
            + self.lora_params
            + self.lora_grads
            + self.optimizer
            + self.activations
            + self.logits
            + self.workspace
        )

    def as_dict(self) -> dict[str, int | bool]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        """A short table in GiB, for the log line printed at start."""
        parts = [
            (k, v)
            for k, v in asdict(self).items()
            if k not in ("world_size", "tokens_per_microbatch", "gradient_checkpointing")
        ]
        body = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts)
        return (
            f"per-GPU estimate {self.total / GIB:.1f} GiB over {self.world_size} rank(s), "
            f"{self.tokens_per_microbatch} tokens/micro-batch, checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'} ({body} GiB)"
        )


def estimate_learner_memory(
    shape: ModelShape,
    *,
    world_size: int,
    lora_rank: int,
    lora_targets: Sequence[str] = QWEN2_LINEAR_MODULES,
    micro_batch_tokens: int,
    max_sequence_tokens: int = 0,
    gradient_checkpointing: bool,
    param_dtype: str = "bfloat16",
    lora_dtype: str | None = None,
    logits_chunk_tokens: int | None = None,
    workspace_gib: float = 2.0,
    sharded: bool = True,
) -> MemoryEstimate:
    """Estimate one rank's peak while training a micro-batch (see the module docstring).

    ``micro_batch_tokens`` is the packing budget; a single sequence longer than it still gets a
    micro-batch of its own, so the assumed micro-batch is ``max(micro_batch_tokens,
    max_sequence_tokens)``. Every position is assumed to be predicted (the worst case: prompts and
    tool outputs are masked in practice) unless ``logits_chunk_tokens`` bounds the positions whose
    logits exist at once (chunked log-probabilities). ``lora_dtype`` is the dtype the LoRA branches
    compute in: the parameter dtype under FSDP2's mixed-precision policy (the default), "float32"
    for peft's fp32 adapter over a bf16 base without one (the single-process learner).
    ``sharded`` False is the single-process learner: no FSDP unit is ever gathered on top.
    """
    if world_size < 1 or lora_rank < 1 or micro_batch_tokens < 1:
        raise ValueError("world_size, lora_rank and micro_batch_tokens must be >= 1")
    lora_dtype = lora_dtype or param_dtype
    for name, value in (("param_dtype", param_dtype), ("lora_dtype", lora_dtype)):
        if value not in _DTYPE_BYTES:
            raise ValueError(f"{name} must be one of {sorted(_DTYPE_BYTES)}, got {value!r}")
    a = _DTYPE_BYTES[param_dtype]
    tokens = max(micro_batch_tokens, max_sequence_tokens)
    n_lora = shape.lora_params(lora_rank, lora_targets)
    per_layer = shape.activation_bytes_per_token(a, lora_rank, lora_targets, _DTYPE_BYTES[lora_dtype])
    root = tokens * shape.root_activation_bytes_per_token(lora_rank, lora_targets)
    if gradient_checkpointing:
        # Each layer's input is kept; in backward one layer at a time is recomputed in full.
        activations = root + shape.num_layers * tokens * a * shape.hidden_size + 2 * tokens * per_layer
    else:
        # All layers' saved tensors, plus one layer's worth of gradients in flight during backward.
        activations = root + (shape.num_layers + 1) * tokens * per_layer
    kept = tokens if logits_chunk_tokens is None else min(tokens, logits_chunk_tokens)
    # logits in the compute dtype, their fp32 copy, log-softmax and exp kept for backward, and the
    # fp32 gradients flowing back through them.
    logits = kept * shape.vocab_size * (a + 5 * 4)
    return MemoryEstimate(
        base_shard=_ceil_div(shape.base_params() * a, world_size),
        gathered_units=(shape.root_params() + 2 * shape.layer_params()) * a if sharded else 0,
        lora_params=_ceil_div(n_lora * 4, world_size),
        lora_grads=_ceil_div(n_lora * 4, world_size),
        optimizer=_ceil_div(n_lora * 8, world_size),
        activations=activations,
        logits=logits,
        workspace=int(workspace_gib * GIB),
        world_size=world_size,
        tokens_per_microbatch=tokens,
        gradient_checkpointing=gradient_checkpointing,
    )


def check_fits(estimate: MemoryEstimate, capacity_bytes: int, *, usable_fraction: float = 0.95) -> None:
    """Raise ``MemoryBudgetError`` when the estimate exceeds ``usable_fraction`` of the device."""
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction}")
    usable = capacity_bytes * usable_fraction
    if estimate.total <= usable:
        return
    hints = []
    if not estimate.gradient_checkpointing:
        hints.append("turn on gradient checkpointing")
    hints.append("lower the micro-batch token budget or the longest sequence")
    if estimate.logits > estimate.activations / 4:
        hints.append("compute log-probabilities in chunks")
    hints.append("shard over more ranks")
    raise MemoryBudgetError(
        f"the learner needs about {estimate.total / GIB:.1f} GiB per GPU but "
        f"{usable / GIB:.1f} GiB are usable ({estimate.describe()}); " + "; ".join(hints)
    )


def estimate_for_config(
    model_config: Any,
    learner: LearnerConfig,
    *,
    world_size: int,
    sharded: bool,
    on_gpu: bool,
    max_sequence_tokens: int = 0,
) -> MemoryEstimate | None:
    """The estimate for a run's learner: ``model_config`` is the model's ``config.json`` (a dict or
    a transformers config), ``learner`` the run's ``learner`` section. None for a model that is not
    Qwen2/Llama-shaped (nothing to estimate from).

    On a GPU the base is bf16; the sharded learner's LoRA computes in bf16 under FSDP2's
    mixed-precision policy, the single-process learner's in peft's fp32. Chunked log-probabilities
    (``logits_chunk_elements``) bound the positions whose logits exist at once.
    """
    try:
        shape = ModelShape.from_hf_config(model_config)
        shape.lora_params(learner.lora.rank, learner.lora.target_modules)
    except (TypeError, ValueError, AttributeError, KeyError):
        return None  # not a Qwen2/Llama decoder, or adapters on modules the estimate does not know
    mixed = on_gpu and (learner.distributed.mixed_precision or not sharded)
    param_dtype = "bfloat16" if mixed else "float32"
    lora_dtype = param_dtype if sharded else "float32"
    chunk = learner.logits_chunk_elements // shape.vocab_size if learner.logits_chunk_elements else None
    return estimate_learner_memory(
        shape,
        world_size=world_size,
        lora_rank=learner.lora.rank,
        lora_targets=learner.lora.target_modules,
        micro_batch_tokens=learner.micro_batch_tokens,
        max_sequence_tokens=max_sequence_tokens,
        gradient_checkpointing=learner.gradient_checkpointing,
        param_dtype=param_dtype,
        lora_dtype=lora_dtype,
        logits_chunk_tokens=max(1, chunk) if chunk is not None else None,
        workspace_gib=learner.memory.workspace_gib if on_gpu else 0.0,
        sharded=sharded,
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
