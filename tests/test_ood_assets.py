"""Checksummed data assets and reference modules loaded from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from envtune.environments import assets
from envtune.environments.assets import BFCL_V4, Asset, AssetError, asset_path, read_json_lines
from envtune.environments.reference_modules import ReferenceModuleError, load_reference_module


def test_the_pinned_wheel_is_read_without_installing_it() -> None:
    rows = read_json_lines(BFCL_V4, "bfcl_eval/data/BFCL_v4_web_search.json")
    assert len(rows) == 100 and rows[0]["id"] == "web_search_0"
    import importlib.metadata

    assert importlib.metadata.version("bfcl-eval") == "2025.6.13"  # the installed package stays V3


def test_a_corrupt_or_missing_asset_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = asset_path(BFCL_V4)
    monkeypatch.setenv(assets.ASSET_DIR_ENV, str(tmp_path))
    # A distinct (equal-valued) record: the per-process verification cache is keyed by path and checksum.
    other = Asset("bfcl-eval", "2026.3.23", BFCL_V4.filename, BFCL_V4.sha256)
    with pytest.raises(AssetError, match="missing data asset"):
        assets.verified_path(other)
    shutil.copy(real, tmp_path / BFCL_V4.filename)
    with (tmp_path / BFCL_V4.filename).open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(AssetError, match="SHA-256"):
        assets.verified_path(other)


def test_reference_modules_must_be_self_contained() -> None:
    checker = load_reference_module(
        BFCL_V4, "bfcl_eval/eval_checker/agentic_eval/agentic_checker.py", "envtune_test_agentic_checker"
    )
    assert checker.agentic_checker("It is Paris.", ["paris"])["valid"]
    assert checker.__name__ == "envtune_test_agentic_checker"
    with pytest.raises(ReferenceModuleError, match="not self-contained"):
        load_reference_module(
            BFCL_V4, "bfcl_eval/eval_checker/multi_turn_eval/func_source_code/memory_kv.py", "envtune_test_kv"
        )
