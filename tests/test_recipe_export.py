"""Export: the last complete checkpoint's adapter, as a peft folder or merged into the base model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from envtune.optim.lora import LoraSettings, attach_lora, save_adapter
from envtune.runtime.engines.tiny_model import build_tiny_model, default_tiny_model_dir
from envtune.runtime.recipe.export import PROVENANCE_FILE, ExportError, export_run, final_adapter
from envtune.runtime.recipe.run_folder import RunFolder
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
CONFIG_TOML = '[model]\npath = ""\ntiny_model_dir = ""\ntiny_seed = 0\n\n[run]\nname = "export-test"\n'


def _cli() -> ModuleType:
    # runtime/cli/ becomes a package in the re-layout; until then runtime/cli.py owns the name.
    spec = importlib.util.spec_from_file_location(
        "envtune_cli_export", REPO / "runtime" / "cli" / "export.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trained_model(seed: int) -> Any:
    base = AutoModelForCausalLM.from_pretrained(
        build_tiny_model(default_tiny_model_dir()), dtype=torch.float32
    )
    model = attach_lora(base, LoraSettings(rank=4, alpha=8.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at 0: give the adapter an effect
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = RunFolder.create(tmp_path_factory.mktemp("runs"), "export-test")
    folder.write_config(CONFIG_TOML)
    older = _trained_model(1)
    folder.save_checkpoint(2, {"policy_version": 2}, lambda f: save_adapter(older, f / "adapter"))
    final = _trained_model(2)
    folder.save_checkpoint(4, {"policy_version": 4}, lambda f: save_adapter(final, f / "adapter"))
    # A newer checkpoint that never completed (no COMPLETE marker) is never the result.
    (folder.checkpoints_dir / "step-000006" / "adapter").mkdir(parents=True)
    save_adapter(_trained_model(3), folder.checkpoints_dir / "step-000006" / "adapter")
    return folder.path, final


def test_final_adapter_is_the_last_complete_checkpoint(run: tuple[Path, Any]) -> None:
    path, _ = run
    step, adapter, version = final_adapter(path)
    assert (step, version) == (4, 4)
    assert adapter == path / "checkpoints" / "step-000004" / "adapter"


def test_adapter_export_is_a_peft_folder(run: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = run
    result = export_run(path, tmp_path / "adapter")
    source = path / "checkpoints" / "step-000004" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (result.out / name).read_bytes() == (source / name).read_bytes()
    provenance = json.loads((result.out / PROVENANCE_FILE).read_text())
    assert provenance["step"] == 4 and provenance["merged"] is False and provenance["policy_version"] == 4
    with pytest.raises(ExportError, match="exists"):
        export_run(path, tmp_path / "adapter")
    export_run(path, tmp_path / "adapter", overwrite=True)


def test_merged_export_loads_and_equals_base_plus_adapter(run: tuple[Path, Any], tmp_path: Path) -> None:
    path, final = run
    cli = _cli()
    cli.main([str(path), "--merge", "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    reference_tokenizer = AutoTokenizer.from_pretrained(default_tiny_model_dir())
    text = "<|im_start|>user\nMove report.pdf into the archive folder.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    final.eval()
    with torch.no_grad():
        expected = final(input_ids=ids).logits
        with final.disable_adapter():
            base = final(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter matters, so equality below means something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_cli_default_out_and_errors(
    run: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = run
    cli = _cli()
    cli.main([str(path)])
    out = Path(capsys.readouterr().out.strip())
    assert out == path / "export" / "adapter-step-000004"
    assert (out / "adapter_model.safetensors").is_file()
    empty = RunFolder.create(tmp_path, "empty")
    empty.write_config(CONFIG_TOML)
    with pytest.raises(SystemExit) as exited:
        cli.main([str(empty.path)])
    assert exited.value.code == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([str(tmp_path / "missing")])
    assert "not a run folder" in capsys.readouterr().err
