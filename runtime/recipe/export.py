"""Export a run's result as standard artefacts: a peft adapter folder, or a merged transformers model.

Which adapter is "the run's result": the adapter of the run's **last complete checkpoint**
(``checkpoints/step-N/adapter``). It was written atomically together with the learner state that
``--resume`` continues from and is covered by the checkpoint's ``COMPLETE`` marker. The run folder's
``adapters/vN`` folders are the publisher's working copies for the inference engines: the newest may
be a step past the last checkpoint, and they are deleted as versions retire, so they are never
exported.

``export_run(run, out)`` copies that adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
what peft, SGLang and vLLM load); ``merge=True`` loads the run's base model, applies the adapter and
merges it (peft ``merge_and_unload``), and writes a transformers folder with the tokenizer that
``AutoModelForCausalLM.from_pretrained`` loads and SGLang/vLLM serve without LoRA support. Either
way ``envtune-export.json`` records where it came from. The output appears atomically (built in a
temp folder beside it, then renamed) and an existing output is never overwritten unless asked.

The base model comes from the run's ``config.toml`` (``[model] path``, or the tiny model it built);
it is read with ``tomllib`` so exporting needs nothing of the training stack but torch, transformers
and peft.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS_DIR = "checkpoints"
"""Where a run folder keeps its checkpoints."""
CHECKPOINT_ADAPTER_DIR = "adapter"
"""The adapter inside a checkpoint (peft layout)."""
COMPLETE = "COMPLETE"
"""The marker that makes a checkpoint complete (file -> size manifest)."""
PROVENANCE_FILE = "envtune-export.json"
"""Written into every export: run, checkpoint step, policy version, base model, merged or not."""
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(RuntimeError):
    """The run cannot be exported (no run folder, no complete checkpoint, output exists...)."""


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What was exported, from where."""

    out: Path
    """The folder written."""
    run_folder: Path
    """The run it came from."""
    step: int
    """Learner step of the checkpoint whose adapter was exported."""
    policy_version: int | None
    """Policy version of that adapter (from the checkpoint's state), when recorded."""
    adapter: Path
    """The checkpoint's adapter folder."""
    base_model: Path
    """The base model the adapter belongs to."""
    merged: bool
    """True: a full transformers model; False: a peft adapter folder."""


def _complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first (manifest sizes checked)."""
    found = []
    root = run / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    for folder in root.iterdir():
        if not folder.name.startswith("step-") or not folder.name[5:].isdigit():
            continue
        step = int(folder.name[5:])
        try:
            manifest = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))
            if manifest.get("step") != step:
                continue
            if any((folder / name).stat().st_size != size for name, size in manifest["files"].items()):
                continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        found.append((step, folder))
    return sorted(found)


def final_adapter(run_folder: Path) -> tuple[int, Path, int | None]:
    """(step, adapter folder, policy version) of the run's last complete checkpoint."""
    run = Path(run_folder)
    if not (run / "config.toml").is_file():
        raise ExportError(f"{run} is not a run folder (no config.toml)")
    for step, folder in reversed(_complete_checkpoints(run)):
        adapter = folder / CHECKPOINT_ADAPTER_DIR
        if all((adapter / name).is_file() for name in _ADAPTER_FILES):
            version = None
            try:
                state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
                version = int(state["policy_version"]) if "policy_version" in state else None
            except (OSError, ValueError, TypeError):
                pass
            return step, adapter, version
    raise ExportError(f"{run} has no complete checkpoint with an adapter: nothing to export yet")


def base_model_path(run_folder: Path) -> Path:
    """The run's base model folder: ``[model] path``, or the tiny model (built if missing)."""
    try:
        config = tomllib.loads((Path(run_folder) / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ExportError(f"cannot read {run_folder}/config.toml: {exc}") from exc
    model: dict[str, Any] = config.get("model", {})
    if model.get("path"):
        return Path(model["path"])
    from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir

    folder = Path(model["tiny_model_dir"]) if model.get("tiny_model_dir") else default_tiny_model_dir()
    return build_tiny_model(folder, seed=int(model.get("tiny_seed", 0)))


def default_out(run_folder: Path, step: int, merge: bool) -> Path:
    """``<run>/export/{adapter,merged}-step-N``."""
    return Path(run_folder) / "export" / f"{'merged' if merge else 'adapter'}-step-{step:06d}"


def _write_merged(base: Path, adapter: Path, folder: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The base's own dtype ("auto"): a bf16 model stays bf16 and a float32 tiny model stays exact.
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    with torch.no_grad():
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)


def export_run(
    run_folder: Path, out: Path | None = None, *, merge: bool = False, overwrite: bool = False
) -> ExportResult:
    """Write the run's final adapter (see the module docstring) to ``out``; returns what was written."""
    run = Path(run_folder)
    step, adapter, version = final_adapter(run)
    base = base_model_path(run)
    out = Path(out) if out is not None else default_out(run, step, merge)
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if occupied and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another --out (or overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    result = ExportResult(
        out=out,
        run_folder=run,
        step=step,
        policy_version=version,
        adapter=adapter,
        base_model=base,
        merged=merge,
    )
    try:
        if merge:
            _write_merged(base, adapter, tmp)
        else:
            for item in adapter.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
        provenance = {
            key: str(value) if isinstance(value, Path) else value for key, value in asdict(result).items()
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result
