"""LoRA adapters via peft: attach, read/write the trainable state, save in SGLang's layout.

The base reference policy for the KL term is the model with the adapter disabled
(``reference_mode``), so no second copy of the base weights exists (the stage-start reference swaps in
a snapshot of the adapter instead: ``learner.py``). Deliberately left out: merging adapters into the
base weights (the engines load the adapter folder instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from .config import LoraSettings


def attach_lora(model: torch.nn.Module, settings: LoraSettings = LoraSettings()) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (B = 0, so the policy starts equal to the base).

    A model that already is a ``PeftModel`` is returned unchanged. Only adapter parameters are
    trainable afterwards.
    """
    if isinstance(model, PeftModel):
        return model
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides it by r
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@contextmanager
def reference_mode(model: PeftModel) -> Iterator[None]:
    """Inside, ``model`` computes the reference (base) policy: the adapter is bypassed."""
    with model.disable_adapter():
        yield


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Copies of the adapter tensors (on CPU), keyed as peft saves them."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load tensors from ``adapter_state`` back into ``model``; every adapter key must be present."""
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "missing_keys", ()) if "lora_" in k]
    if missing:
        raise ValueError(f"adapter state lacks {len(missing)} keys, e.g. {missing[0]}")


def save_adapter(model: PeftModel, folder: Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (what SGLang and peft load).

    The adapter tensors only: with ``lm_head`` among the targets peft would also save the frozen
    base head (vocab x hidden, most of the file at a real vocabulary), which no engine needs."""
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
