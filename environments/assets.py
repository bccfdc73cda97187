"""Versioned, checksummed data assets: benchmark wheels read as zip archives, never installed.

BFCL V4 (``bfcl-eval==2026.3.23``) ships the memory and web-search data, while envtune's training
environments import ``bfcl_eval`` 2025.6.13 (BFCL V3) as an installed package. Installing both is
impossible (one import name) and mixing them is wrong (docs/method.md: the V4 classes and data
drifted). So the newer wheel is a *data asset*: ``make setup`` downloads it into ``.cache/assets``
with ``pip download --no-deps``, its SHA-256 is checked against the pin below, and envtune reads its
JSON files straight out of the archive. No module of it is imported into envtune's process, so the
two versions can never meet in ``sys.modules``.

Left out on purpose: anything that executes code from an asset. The one reference module a
conformance harness loads from a wheel (BFCL's answer checker, pure ``re``) is loaded by the harness
itself under a private module name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSET_DIR_ENV = "ENVTUNE_ASSET_DIR"
"""Environment variable naming the asset folder (default: ``<repo>/.cache/assets``)."""


class AssetError(RuntimeError):
    """An asset is missing, corrupt or not the pinned version."""


@dataclass(frozen=True, slots=True)
class Asset:
    """One pinned wheel used as data."""

    distribution: str
    """The name ``pip download`` is given."""
    version: str
    """The exact version pinned."""
    filename: str
    """The wheel's file name as the registry serves it."""
    sha256: str
    """The checksum the downloaded file must have."""

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


BFCL_V4 = Asset(
    distribution="bfcl-eval",
    version="2026.3.23",
    filename="bfcl_eval-2026.3.23-py3-none-any.whl",
    sha256="3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a",
)
"""BFCL V4: memory (155 questions, 5 prerequisite conversations), web search (100), their answers."""

ASSETS: dict[str, Asset] = {"bfcl-v4": BFCL_V4}
"""Assets by short name (what ``python -m envtune.environments.assets fetch NAME`` takes)."""


def asset_dir() -> Path:
    """Where assets live: ``$ENVTUNE_ASSET_DIR``, else ``.cache/assets`` at the repository root."""
    configured = os.environ.get(ASSET_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parent.parent / ".cache" / "assets"


def asset_path(asset: Asset) -> Path:
    return asset_dir() / asset.filename


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_VERIFY_LOCK = threading.Lock()


@functools.cache
def _verified(path: Path, sha256: str) -> Path:
    """Check a file once per process (the archive is read-only afterwards)."""
    if not path.exists():
        raise AssetError(
            f"missing data asset {path}; run `make setup` (or `python -m envtune.environments.assets "
            f"fetch`) to download it, or point {ASSET_DIR_ENV} at a folder holding it"
        )
    actual = file_sha256(path)
    if actual != sha256:
        raise AssetError(f"{path} has SHA-256 {actual}, expected {sha256}: delete it and fetch it again")
    return path


def verified_path(asset: Asset) -> Path:
    """The asset's path after its checksum matched."""
    with _VERIFY_LOCK:
        return _verified(asset_path(asset), asset.sha256)


@functools.cache
def _archive(path: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def read_member(asset: Asset, member: str) -> bytes:
    """The bytes of one file inside the wheel."""
    path = verified_path(asset)
    with _VERIFY_LOCK:  # ZipFile reads seek a shared handle
        try:
            return _archive(path).read(member)
        except KeyError:
            raise AssetError(f"{asset.filename} has no member {member!r}") from None


def list_members(asset: Asset, prefix: str) -> tuple[str, ...]:
    """Names of the wheel's files under ``prefix``, sorted."""
    path = verified_path(asset)
    with _VERIFY_LOCK:
        return tuple(sorted(name for name in _archive(path).namelist() if name.startswith(prefix)))


def read_json_lines(asset: Asset, member: str) -> list[dict[str, Any]]:
    """A JSON-lines member (one object per non-empty line), as BFCL stores its data."""
    text = read_member(asset, member).decode("utf-8")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssetError(f"{asset.filename}:{member} line {number}: {exc}") from exc
        if not isinstance(row, dict):
            raise AssetError(f"{asset.filename}:{member} line {number}: expected an object")
        rows.append(row)
    return rows


def fetch(asset: Asset, target: Path | None = None) -> Path:
    """Download the pinned wheel with pip (no dependencies, no install) and check its checksum."""
    folder = target or asset_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / asset.filename
    if not path.exists():
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            asset.requirement, "--dest", str(folder),
        ]  # fmt: skip
        subprocess.run(command, check=True)
    if not path.exists():
        raise AssetError(f"pip did not produce {path}")
    actual = file_sha256(path)
    if actual != asset.sha256:
        path.unlink()
        raise AssetError(f"downloaded {asset.filename} has SHA-256 {actual}, expected {asset.sha256}")
    return path


def _iter_names(names: list[str]) -> Iterator[Asset]:
    for name in names or list(ASSETS):
        if name not in ASSETS:
            raise SystemExit(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
        yield ASSETS[name]


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - exercised by `make setup`
    import argparse

    parser = argparse.ArgumentParser(description="Fetch or verify envtune's pinned data assets.")
    parser.add_argument("action", choices=("fetch", "verify"))
    parser.add_argument("names", nargs="*", help=f"assets (default: all of {', '.join(ASSETS)})")
    args = parser.parse_args(argv)
    for asset in _iter_names(args.names):
        path = fetch(asset) if args.action == "fetch" else verified_path(asset)
        print(f"{asset.requirement}: {path} (sha256 ok)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
