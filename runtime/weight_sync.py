"""Publishing the learner's adapter to the inference engines, version by version.

After a learner step the adapter is written atomically to ``<root>/v{N}/`` (a temporary folder,
then ``os.replace``), loaded into every engine under the name ``policy-v{N}`` with its version passed
explicitly (SGLang's ``/load_lora_adapter``; requests then name it in ``lora_path``), and becomes
*current*: new requests take it via ``acquire``/``use``. An older version is unloaded (and its
folder removed) once it is no longer current and no request holds it. Versioned names mean a request
never runs on an adapter that changed under it.

Deliberately left out: pausing generation around a swap (the engines decide), in-memory transfer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
from envtune.agents.engine import WeightSync

log = structlog.get_logger(__name__)


def adapter_name(version: int) -> str:
    """The name engines know policy ``version``'s adapter by: ``policy-v{version}``."""
    if version < 0:
        raise ValueError(f"policy versions are >= 0, got {version}")
    return f"policy-v{version}"


class AdapterSource(Protocol):
    """What the publisher needs from a learner."""

    def save_adapter(self, folder: Path) -> int:
        """Write the adapter into ``folder`` and return the policy version written (atomically read)."""
        ...


class WeightSyncError(RuntimeError):
    """An engine refused or failed to load a new adapter version; the previous one stays current."""


@dataclass(frozen=True, slots=True)
class PublishedAdapter:
    """One adapter version as loaded into the engines."""

    version: int
    """Policy version of the weights."""
    name: str
    """Name the engines know it by (``policy-v{version}``); requests pass it as their adapter."""
    path: Path
    """Folder holding ``adapter_config.json`` and ``adapter_model.safetensors``."""


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Introspection snapshot of the publisher."""

    current_version: int | None
    """Version new requests get (None before the first publish: the base model)."""
    loaded_versions: tuple[int, ...]
    """Versions currently loaded in the engines."""
    in_flight: tuple[tuple[int, int], ...]
    """(version, requests holding it) for versions with holders."""
    published: int
    """Versions published so far."""
    unloaded: int
    """Versions unloaded so far."""


class AdapterPublisher:
    """Writes, loads, hands out and retires adapter versions. Use from one event loop."""

    def __init__(
        self,
        root: Path,
        targets: Sequence[WeightSync],
        *,
        keep_files: bool = False,
    ) -> None:
        # Absolute: the engines resolve the path in their own working folder (another process).
        self._root = Path(root).absolute()
        self._targets = tuple(targets)
        self._keep_files = keep_files
        self._current: PublishedAdapter | None = None
        self._loaded: dict[int, PublishedAdapter] = {}
        self._in_flight: dict[int, int] = {}
        self._sync = asyncio.Lock()
        self._published = 0
        self._unloaded = 0

    @property
    def current(self) -> PublishedAdapter | None:
        return self._current

    async def publish(self, source: AdapterSource) -> PublishedAdapter:
        """Write the source's adapter, load it everywhere, make it current, retire unused versions.

        Returns the current adapter unchanged when the source's version is already current.
        """
        async with self._sync:
            version, path = await asyncio.to_thread(self._write_atomic, source)
            if self._current is not None and version == self._current.version:
                return self._current
            adapter = PublishedAdapter(version=version, name=adapter_name(version), path=path)
            loaded: list[WeightSync] = []
            try:
                for target in self._targets:
                    await target.load_adapter(adapter.name, str(adapter.path), version=version)
                    loaded.append(target)
            except Exception as exc:
                for target in loaded:
                    await self._unload_quietly(target, adapter.name)
                raise WeightSyncError(f"loading {adapter.name} failed: {exc}") from exc
            self._loaded[version] = adapter
            self._current = adapter
            self._published += 1
            log.info("adapter_published", version=version, name=adapter.name, path=str(path))
            for old in [v for v in self._loaded if v != version and not self._in_flight.get(v)]:
                await self._retire(old)
            return adapter

    def acquire(self) -> PublishedAdapter | None:
        """The current adapter, held until ``release`` (None = base model, nothing to hold)."""
        adapter = self._current
        if adapter is not None:
            self._in_flight[adapter.version] = self._in_flight.get(adapter.version, 0) + 1
        return adapter

    async def release(self, adapter: PublishedAdapter | None) -> None:
        """Give back what ``acquire`` returned; unloads a superseded version when its last holder leaves."""
        if adapter is None:
            return
        count = self._in_flight.get(adapter.version, 0)
        if count <= 0:
            raise ValueError(f"release of {adapter.name} without a matching acquire")
        if count == 1:
            del self._in_flight[adapter.version]
            if self._current is None or adapter.version != self._current.version:
                async with self._sync:
                    if adapter.version in self._loaded and not self._in_flight.get(adapter.version):
                        await self._retire(adapter.version)
        else:
            self._in_flight[adapter.version] = count - 1

    @asynccontextmanager
    async def use(self) -> AsyncIterator[PublishedAdapter | None]:
        """``async with publisher.use() as adapter:`` — request with ``adapter.name`` (None: base)."""
        adapter = self.acquire()
        try:
            yield adapter
        finally:
            await self.release(adapter)

    async def unload_all(self) -> None:
        """Unload every loaded version (shutdown)."""
        async with self._sync:
            for version in list(self._loaded):
                await self._retire(version)
            self._current = None

    def statistics(self) -> PublisherStats:
        return PublisherStats(
            current_version=self._current.version if self._current is not None else None,
            loaded_versions=tuple(sorted(self._loaded)),
            in_flight=tuple(sorted(self._in_flight.items())),
            published=self._published,
            unloaded=self._unloaded,
        )

    async def _retire(self, version: int) -> None:
        adapter = self._loaded.pop(version)
        for target in self._targets:
            await self._unload_quietly(target, adapter.name)
        self._unloaded += 1
        if not self._keep_files:
            await asyncio.to_thread(shutil.rmtree, adapter.path, True)
        log.debug("adapter_unloaded", version=version, name=adapter.name)  # routine, every step

    async def _unload_quietly(self, target: WeightSync, name: str) -> None:
        # A failed unload leaks engine memory but must not fail the rollout that released it.
        try:
            await target.unload_adapter(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("adapter_unload_failed", name=name, error=repr(exc))

    def _write_atomic(self, source: AdapterSource) -> tuple[int, Path]:
        """Save into a temporary folder, then rename it to ``v{N}`` (readers never see a partial one)."""
        self._root.mkdir(parents=True, exist_ok=True)
        tmp = self._root / f".tmp-{uuid.uuid4().hex}"
        try:
            version = source.save_adapter(tmp)
            final = self._root / f"v{version}"
            if final.exists():
                # Re-publishing a version (after a resume): move the old folder aside first, since
                # os.replace cannot overwrite a non-empty directory.
                trash = self._root / f".old-{uuid.uuid4().hex}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return version, final
