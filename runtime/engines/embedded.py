"""The embedded engine: in-process transformers inference with continuous batching.

This is envtune's one larger "engine" file (see STYLE.md): the scheduler, the KV-cache bookkeeping,
the sampler and the grammar enforcement share one worker thread's state and read best together.

How it works. ``generate`` (on the event loop) validates a request, compiles its grammar (xgrammar,
cached by text, in a thread) and hands a job to ONE worker thread that owns the model. The worker
keeps a running batch of rows (one per sampled continuation) with a left-padded KV cache:

- a new job is prefilled alone (no padding, so no quadratic padding mask), its first token sampled
  from the prefill logits, and its ``n`` rows (the KV cache expanded ``n`` times: one prefill per
  GRPO group) merged into the running batch by left-padding — between any two decode steps, so new
  requests join without waiting for the batch to drain;
- each decode step feeds every row's last token with its own position id and the padded mask;
- finished rows leave the batch at once (and leading all-padding columns are trimmed).

Joins and leaves rebuild the batch's KV with each kept row written once (``kv_batch.py``).

A batch runs one LoRA adapter (peft's ``set_adapter`` is model-wide): a job naming another adapter
waits (FIFO) until the running batch drains. Weight changes (adapters, ``update_weights_from_disk``)
are queued like jobs and run between batches, as SGLang's weight lock does.

Sampling, per row, with its own ``torch.Generator`` (seeded from ``sampling.seed + row index`` when a
seed is given): grammar mask (-inf on disallowed tokens) -> temperature -> top-k -> top-p ->
multinomial; temperature 0 is argmax. **Reported logprobs** follow SGLang's default sampler
(``srt/layers/sampler.py``): ``log_softmax(masked_logits / temperature)`` of the sampled token, i.e.
temperature-scaled and grammar-masked but NOT renormalised after top-k/top-p; with temperature 0,
``log_softmax(masked_logits)``. The learner's recomputation ``log_softmax(logits / T)`` matches it.

Per-episode prefix cache (``prefix_cache.py``): when a single-sample request with an
``affinity_key`` finishes, its KV (prompt + completion) is kept under that key, as is the prompt's KV
after a cold prefill; a key's next request prefills only what follows the longest prefix it shares
with one of the key's entries, under the same adapter and version (``Completion.cached_tokens`` says
how many were reused). A key holds several entries because the episode loop keys requests by GRPO
group: members interleave under one key and must not evict each other. Unloading an adapter drops
its entries; new base weights and ``flush_cache`` empty it.

Left out: a general radix prefix cache across keys, stop strings, penalties.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from envtune.agents.engine import (
    Completion,
    Constraint,
    ConstraintKind,
    EngineError,
    FinishReason,
    GenerateRequest,
)
from envtune.runtime.engines.kv_batch import cache_kv, growing_cache, merge_left_padded, select_rows
from envtune.runtime.engines.prefix_cache import EpisodePrefixCache, PrefixHit
from envtune.runtime.engines.settings import EmbeddedEngineConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A snapshot of the embedded engine's load."""

    pending_jobs: int
    """Jobs and weight updates queued, not yet admitted."""
    active_rows: int
    """Rows in the running batch."""
    peak_rows: int
    """Largest running batch seen."""
    jobs_done: int
    """Requests completed (successfully or not)."""
    tokens_generated: int
    """Tokens sampled since start."""
    policy_version: int
    """Highest weight version published."""
    prefix_hits: int
    """Requests whose prompt prefix came from the per-episode KV cache."""
    cached_tokens: int
    """Prompt tokens not prefilled thanks to it, since start."""
    prefix_cache_held: int
    """Tokens of KV held in it now."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One streamed token of one continuation (``generate_stream``)."""

    index: int
    """Which of the ``n`` continuations."""
    token_id: int
    """The sampled token."""
    logprob: float
    """Its logprob (see the module docstring for the definition)."""
    completion: Completion | None = None
    """Set on the continuation's last token: the finished completion."""


# --- jobs and rows: worker-thread state ----------------------------------------------------------


class _Job:
    """One request in flight (mutable; touched by the worker thread, resolved on the loop)."""

    def __init__(
        self,
        request: GenerateRequest,
        grammar: Any,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue[TokenEvent | BaseException] | None,
    ) -> None:
        self.request = request
        self.grammar = grammar
        self.loop = loop
        self.future: asyncio.Future[list[Completion]] = loop.create_future()
        self.events = events
        self.cancelled = threading.Event()
        self.completions: list[Completion | None] = [None] * request.sampling.n
        self.version = 0
        self.cached_tokens = 0

    def post_event(self, event: TokenEvent) -> None:
        if self.events is not None:
            _call_soon(self.loop, self.events.put_nowait, event)

    def finish(self, result: list[Completion] | BaseException) -> None:
        _call_soon(self.loop, _settle, self.future, result)
        if isinstance(result, BaseException) and self.events is not None:
            _call_soon(self.loop, self.events.put_nowait, result)


class _Control:
    """A weight/adapter change, run by the worker between batches."""

    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()


class _Row:
    """One continuation being decoded."""

    __slots__ = ("generator", "index", "job", "last_token", "logprobs", "matcher", "next_pos", "token_ids")

    def __init__(self, job: _Job, index: int, matcher: Any, generator: torch.Generator) -> None:
        self.job = job
        self.index = index
        self.matcher = matcher
        self.generator = generator
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.next_pos = len(job.request.prompt_ids)
        self.last_token = -1


@dataclass(slots=True)
class _Part:
    """Rows with their KV cache and mask, on their way into the running batch."""

    rows: list[_Row]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor


_ANY = object()
"""No adapter chosen yet for the batch being formed."""

_LORA_TENSORS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})
"""The tensors of a peft LoRA adapter this engine loads (DoRA and other variants are refused)."""

_GREEDY_TEMPERATURE = 1e-6
"""Below this temperature sampling is greedy (SGLang's rule): logits divided by less overflow."""

_CLOSE = object()
"""Inbox sentinel: the worker fails what is left and exits."""


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    # The loop may be closed when a caller gave up and left; nothing is waiting then.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


# --- the engine ----------------------------------------------------------------------------------


class EmbeddedEngine:
    """An ``Engine`` and ``WeightSync`` running a transformers model in this process."""

    def __init__(self, model_path: Path | str, config: EmbeddedEngineConfig | None = None) -> None:
        """Load the model and tokenizer (blocking; use ``await EmbeddedEngine.open(...)`` on a loop)."""
        import xgrammar
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or EmbeddedEngineConfig()
        model_path = Path(model_path)
        self.model_path = model_path
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._base = self._load_base(model_path, AutoModelForCausalLM)
        self.vocab_size: int = self._base.config.vocab_size
        self.max_context: int = int(getattr(self._base.config, "max_position_embeddings", 1 << 30))
        self.eos_token_ids: frozenset[int] = self._eos_ids()
        self._peft: Any = None
        self._adapter_paths: dict[str, str] = {}
        self._adapter_versions: dict[str, int] = {}
        self._base_version = 0
        self._version_high = 0
        self._active_adapter: str | None = None

        info = xgrammar.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(self.eos_token_ids)
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self._grammar_cache: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._grammar_lock = threading.Lock()
        self._bitmask = xgrammar.allocate_token_bitmask(self.config.max_batch_rows, self.vocab_size)

        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: collections.deque[_Job | _Control] = collections.deque()
        self._rows: list[_Row] = []
        # The running batch's KV cache, rebuilt only when rows join or leave (decode steps append in place).
        self._cache: Any = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._seed_source = secrets.SystemRandom()
        self._closed = False
        self._peak_rows = 0
        self._prefix = EpisodePrefixCache(self.config.prefix_cache_tokens)
        self._prefix_hits = 0
        self._cached_tokens = 0
        self._jobs_done = 0
        self._tokens_generated = 0
        # daemon: a caller that forgets close() must not hang interpreter exit; close() joins it.
        self._thread = threading.Thread(target=self._worker, name="envtune-embedded-engine", daemon=True)
        self._thread.start()
        log.info("embedded_engine_started", model=str(model_path), device=str(self.device))

    @classmethod
    async def open(cls, model_path: Path | str, config: EmbeddedEngineConfig | None = None) -> EmbeddedEngine:
        """Construct without blocking the event loop."""
        return await asyncio.to_thread(cls, model_path, config)

    async def __aenter__(self) -> EmbeddedEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- public API (event loop side) --------------------------------------------------------

    @property
    def policy_version(self) -> int:
        """The highest version published so far (base weights or any adapter, unloaded ones too)."""
        return self._version_high

    def adapters(self) -> dict[str, int]:
        """Loaded adapter names and their policy versions."""
        return dict(self._adapter_versions)

    def adapter_paths(self) -> dict[str, str]:
        """Loaded adapter names and the folders they came from."""
        return dict(self._adapter_paths)

    @property
    def model_config(self) -> Any:
        """The transformers config of the base model."""
        return self._base.config

    def statistics(self) -> EngineStatistics:
        """Load snapshot (reads worker counters without locking: approximate by design)."""
        return EngineStatistics(
            pending_jobs=len(self._pending) + self._inbox.qsize(),
            active_rows=len(self._rows),
            peak_rows=self._peak_rows,
            jobs_done=self._jobs_done,
            tokens_generated=self._tokens_generated,
            policy_version=self.policy_version,
            prefix_hits=self._prefix_hits,
            cached_tokens=self._cached_tokens,
            prefix_cache_held=self._prefix.held_tokens,
        )

    async def generate(self, request: GenerateRequest) -> Sequence[Completion]:
        """``request.sampling.n`` completions; raises ``EngineError`` on bad input or a closed engine."""
        job = await self._submit(request, stream=False)
        return await self._await_job(job)

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Tokens as they are sampled; each continuation's last event carries its ``Completion``."""
        job = await self._submit(request, stream=True)
        assert job.events is not None
        remaining = request.sampling.n
        try:
            while remaining:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise event
                if event.completion is not None:
                    remaining -= 1
                yield event
        finally:
            if not job.future.done():
                job.cancelled.set()
                job.future.add_done_callback(_retrieve)

    async def load_adapter(self, name: str, path: str, *, version: int) -> None:
        """Load a LoRA adapter (peft folder) under ``name``; returns its policy version."""
        await self._control(lambda: self._do_load_adapter(name, str(path), version))

    async def unload_adapter(self, name: str) -> None:
        """Unload a LoRA adapter; raises ``EngineError`` when it is not loaded."""
        await self._control(lambda: self._do_unload_adapter(name))

    async def update_weights_from_disk(self, path: str, *, version: int) -> None:
        """Replace the base weights (loaded adapters are re-applied); returns the new base version."""
        await self._control(lambda: self._do_update_weights(str(path), version))

    async def flush_cache(self) -> None:
        """Drop the per-episode prefix cache; ordered after queued work, as SGLang's flush is."""
        await self._control(self._prefix.clear)

    async def close(self) -> None:
        """Fail queued and running work with ``EngineError`` and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_CLOSE)
        await asyncio.to_thread(self._thread.join)

    # --- submission -------------------------------------------------------------------------

    def _validate(self, request: GenerateRequest) -> None:
        prompt = request.prompt_ids
        if not prompt:
            raise EngineError("prompt_ids is empty", retryable=False)
        bad = [tok for tok in prompt if not 0 <= tok < self.vocab_size]
        if bad:
            raise EngineError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                retryable=False,
            )
        total = len(prompt) + request.sampling.max_new_tokens
        if total > self.max_context:
            raise EngineError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) "
                f"exceeds the model context ({self.max_context})",
                retryable=False,
            )
        bad_stops = [tok for tok in request.sampling.stop_token_ids if not 0 <= tok < self.vocab_size]
        if bad_stops:
            raise EngineError(f"stop_token_ids {bad_stops} are outside the vocabulary", retryable=False)

    async def _submit(self, request: GenerateRequest, *, stream: bool) -> _Job:
        if self._closed:
            raise EngineError("embedded engine is closed", retryable=False)
        self._validate(request)
        grammar = None
        if request.constraint is not None:
            grammar = await asyncio.to_thread(self.compile_grammar, request.constraint)
        loop = asyncio.get_running_loop()
        # Unbounded, yet bounded in practice: at most n * max_new_tokens events per job.
        events: asyncio.Queue[TokenEvent | BaseException] | None = asyncio.Queue() if stream else None
        job = _Job(request, grammar, loop, events)
        self._inbox.put(job)
        return job

    async def _await_job(self, job: _Job) -> list[Completion]:
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancelled.set()
            # The worker still settles the future ("request cancelled"): nobody waits for it now.
            job.future.add_done_callback(_retrieve)
            raise

    async def _control(self, fn: Callable[[], Any]) -> Any:
        if self._closed:
            raise EngineError("embedded engine is closed", retryable=False)
        control = _Control(fn, asyncio.get_running_loop())
        self._inbox.put(control)
        return await control.future

    # --- grammars ----------------------------------------------------------------------------

    def compile_grammar(self, constraint: Constraint) -> Any:
        """The xgrammar ``CompiledGrammar`` for a constraint (LRU-cached); ``EngineError`` if invalid."""
        key = (str(constraint.kind), constraint.grammar)
        with self._grammar_lock:
            cached = self._grammar_cache.get(key)
            if cached is not None:
                self._grammar_cache.move_to_end(key)
                return cached
        try:
            compiled = self._compile(constraint)
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise EngineError(f"invalid {constraint.kind} constraint: {exc}", retryable=False) from exc
        with self._grammar_lock:
            self._grammar_cache[key] = compiled
            while len(self._grammar_cache) > self.config.grammar_cache_size:
                self._grammar_cache.popitem(last=False)
        return compiled

    def _compile(self, constraint: Constraint) -> Any:
        import xgrammar

        text = constraint.grammar
        match constraint.kind:
            case ConstraintKind.EBNF:
                return self._compiler.compile_grammar(text)
            case ConstraintKind.JSON_SCHEMA:
                return self._compiler.compile_json_schema(text)
            case ConstraintKind.REGEX:
                return self._compiler.compile_regex(text)
            case ConstraintKind.STRUCTURAL_TAG:
                spec = json.loads(text)
                if isinstance(spec, dict) and "structures" in spec:
                    # SGLang's legacy form (xgrammar_backend.py): begin/schema/end items + triggers.
                    items = [
                        xgrammar.StructuralTagItem(
                            begin=item["begin"], schema=json.dumps(item["schema"]), end=item["end"]
                        )
                        for item in spec["structures"]
                    ]
                    return self._compiler.compile_structural_tag(items, spec["triggers"])
                return self._compiler.compile_structural_tag(text)
        raise ValueError(f"unknown constraint kind {constraint.kind!r}")

    # --- models and weights (worker thread) ----------------------------------------------------

    def _load_base(self, path: Path | str, auto_cls: Any = None) -> Any:
        if auto_cls is None:
            from transformers import AutoModelForCausalLM as auto_cls
        model = auto_cls.from_pretrained(path, dtype=torch.float32)
        return model.to(self.device).eval()

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        eos = getattr(self._base.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(tok) for tok in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    @property
    def _model(self) -> Any:
        return self._peft if self._peft is not None else self._base

    def _do_load_adapter(self, name: str, path: str, version: int) -> None:
        from peft import PeftModel

        if name in self._adapter_versions:
            raise EngineError(f"adapter {name!r} is already loaded", retryable=False)
        # Everything that can be checked is checked before peft allocates a single layer.
        self._check_adapter_folder(name, Path(path))
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._base, path, adapter_name=name, is_trainable=False
                )
            else:
                self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
        except Exception as exc:
            # peft injects layers before it loads their weights: a load failing half way would
            # leave them active in the base model (and their memory held). Take them out again.
            self._discard_partial_adapter(name)
            raise EngineError(f"cannot load adapter {name!r} from {path}: {exc}", retryable=False) from exc
        self._peft.to(self.device).eval()
        self._active_adapter = None
        self._adapter_paths[name] = path
        self._adapter_versions[name] = version
        self._version_high = max(self._version_high, version)
        log.debug("adapter_loaded", name=name, path=path, version=version)  # the publisher logs at info

    def _check_adapter_folder(self, name: str, folder: Path) -> None:
        """``EngineError`` unless ``folder`` holds a LoRA adapter this model can take: a local folder
        (never a Hub id), a LoRA config with ranks within ``max_lora_rank``, and safetensors whose
        every tensor has the shape its module needs (read from the file header, nothing loaded)."""

        def refuse(why: str) -> EngineError:
            return EngineError(f"cannot load adapter {name!r} from {folder}: {why}", retryable=False)

        if not folder.is_dir():
            raise refuse("not a folder on this machine (only local folders are loaded)")
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise refuse(f"unreadable adapter_config.json ({exc})") from None
        if not isinstance(config, dict):
            raise refuse("adapter_config.json is not a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise refuse(f"peft_type {config.get('peft_type')!r} is not LORA")
        limit = self.config.max_lora_rank
        ranks = [config.get("r")]
        pattern = config.get("rank_pattern") or {}
        if not isinstance(pattern, dict):
            raise refuse("rank_pattern is not an object")
        ranks += list(pattern.values())
        for rank in ranks:
            if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
                raise refuse(f"LoRA rank {rank!r} is not an integer in [1, {limit}] (max_lora_rank)")
        targets = config.get("target_modules")
        if not (isinstance(targets, str) or (isinstance(targets, list) and targets)):
            raise refuse("target_modules is missing")
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():
            self._check_adapter_shapes(weights, limit, refuse)
        elif not (folder / "adapter_model.bin").is_file():
            raise refuse("no adapter_model.safetensors")

    def _check_adapter_shapes(
        self, weights: Path, limit: int, refuse: Callable[[str], EngineError]
    ) -> None:
        from safetensors import safe_open

        modules = dict(self._base.named_modules())
        try:
            with safe_open(str(weights), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise refuse(f"unreadable adapter_model.safetensors ({exc})") from None
        for key, shape in shapes.items():
            parts = key.removeprefix("base_model.model.").rsplit(".", 2)
            if len(parts) != 3 or parts[2] != "weight" or parts[1] not in _LORA_TENSORS:
                raise refuse(f"unsupported tensor {key!r}")
            module = modules.get(parts[0])
            module = getattr(module, "base_layer", module)
            if module is None:
                raise refuse(f"tensor {key!r} names no module of this model")
            if isinstance(module, torch.nn.Embedding):
                size_in, size_out = module.num_embeddings, module.embedding_dim
            elif isinstance(module, torch.nn.Linear):
                size_in, size_out = module.in_features, module.out_features
            else:
                raise refuse(f"tensor {key!r} targets a {type(module).__name__}, not a Linear or Embedding")
            rank = shape[0] if parts[1].endswith("_A") else shape[-1]
            expected = (rank, size_in) if parts[1].endswith("_A") else (size_out, rank)
            if len(shape) != 2 or shape != expected or not 1 <= rank <= limit:
                raise refuse(
                    f"tensor {key!r} has shape {list(shape)}, expected {list(expected)} with rank <= {limit}"
                )

    def _discard_partial_adapter(self, name: str) -> None:
        """Remove whatever a failed load of adapter ``name`` injected into the model."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self._peft is not None and name in getattr(self._peft, "peft_config", {}):
            with contextlib.suppress(Exception):
                self._peft.delete_adapter(name)
        for parent in list(self._base.modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, BaseTunerLayer):
                    continue
                if name in getattr(child, "lora_A", {}) or name in getattr(child, "lora_embedding_A", {}):
                    with contextlib.suppress(Exception):
                        child.delete_adapter(name)
                if self._peft is None:  # no adapter was loaded before: restore the plain layer
                    setattr(parent, child_name, child.get_base_layer())
        if self._peft is None and hasattr(self._base, "peft_config"):
            with contextlib.suppress(AttributeError):
                del self._base.peft_config
        self._active_adapter = None
        gc.collect()

    def _do_unload_adapter(self, name: str) -> None:
        if name not in self._adapter_versions:
            raise EngineError(f"adapter {name!r} is not loaded", retryable=False)
        if len(self._adapter_versions) == 1:
            self._base = self._peft.unload()
            self._peft = None
        else:
            self._peft.delete_adapter(name)
        self._active_adapter = None
        # Only this adapter's kept KV is stale; other episodes keep theirs (a new adapter is
        # published every learner step, while in-flight episodes finish on the one they started with).
        self._prefix.drop_adapter(name)
        del self._adapter_versions[name]
        del self._adapter_paths[name]
        log.debug("adapter_unloaded", name=name)

    def _do_update_weights(self, path: str, version: int) -> None:
        try:
            base = self._load_base(path)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load weights from {path}: {exc}", retryable=False) from exc
        if base.config.vocab_size != self.vocab_size:
            raise EngineError(
                f"weights at {path} have vocab {base.config.vocab_size}, "
                f"the engine's tokenizer {self.vocab_size}",
                retryable=False,
            )
        adapters = [
            (name, self._adapter_paths[name], self._adapter_versions[name]) for name in self._adapter_paths
        ]
        self._base, self._peft, self._active_adapter = base, None, None
        self._prefix.clear()  # every kept KV came from the old base weights
        self._adapter_paths.clear()
        self._adapter_versions.clear()
        for name, adapter_path, adapter_ver in adapters:
            self._do_load_adapter(name, adapter_path, adapter_ver)
        self._base_version = version
        self._version_high = max(self._version_high, self._base_version)
        log.info("weights_updated", path=path, version=self._base_version)

    def _adapter_context(self, adapter: str | None) -> contextlib.AbstractContextManager[Any]:
        if self._peft is None:
            return contextlib.nullcontext()
        if adapter is None:
            return self._peft.disable_adapter()
        if self._active_adapter != adapter:
            self._peft.set_adapter(adapter)
            self._active_adapter = adapter
        return contextlib.nullcontext()

    # --- the worker loop -----------------------------------------------------------------------

    def _worker(self) -> None:
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        while True:
            if not self._rows and not self._pending:
                item = self._inbox.get()
                if item is _CLOSE:
                    self._shutdown()
                    return
                self._pending.append(item)
                if self.config.batch_window_s > 0:
                    time.sleep(self.config.batch_window_s)
            if self._drain_inbox():
                self._shutdown()
                return
            try:
                with torch.inference_mode():
                    self._run_controls()
                    self._admit()
                    if self._rows:
                        self._decode_step()
            except Exception as exc:  # a broken step must not kill the engine: fail its jobs
                log.error("embedded_engine_step_failed", error=repr(exc)[:500])
                self._fail_rows(EngineError(f"engine step failed: {exc!r}", retryable=True))

    def _drain_inbox(self) -> bool:
        """Move arrivals to ``_pending``; True when close was requested."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return False
            if item is _CLOSE:
                return True
            self._pending.append(item)

    def _shutdown(self) -> None:
        error = EngineError("embedded engine closed", retryable=False)
        self._fail_rows(error)
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, _Job):
                item.finish(error)
            else:
                _call_soon(item.loop, _settle, item.future, error)

    def _fail_rows(self, error: EngineError) -> None:
        jobs = {id(row.job): row.job for row in self._rows}
        for job in jobs.values():
            job.finish(error)
            self._jobs_done += 1
        self._rows, self._cache = [], None
        self._mask = self._mask.new_zeros((0, 0))

    def _run_controls(self) -> None:
        while self._pending and isinstance(self._pending[0], _Control) and not self._rows:
            control = self._pending.popleft()
            assert isinstance(control, _Control)
            try:
                result: Any = control.fn()
            except Exception as exc:
                result = exc if isinstance(exc, EngineError) else EngineError(repr(exc), retryable=False)
            _call_soon(control.loop, _settle, control.future, result)

    def _admit(self) -> None:
        """Prefill the jobs at the front of the queue that fit, then merge them into the batch at once."""
        parts: list[_Part] = []
        rows_in_use = len(self._rows)
        adapter_in_use: str | object | None = self._rows[0].job.request.adapter if self._rows else _ANY
        while self._pending and isinstance(self._pending[0], _Job):
            job = self._pending[0]
            if job.cancelled.is_set():
                self._pending.popleft()
                continue
            adapter = job.request.adapter
            if adapter_in_use is not _ANY and adapter != adapter_in_use:
                break  # one adapter per batch: this job waits for the batch to drain
            if rows_in_use and rows_in_use + job.request.sampling.n > self.config.max_batch_rows:
                break
            self._pending.popleft()
            if adapter is not None and adapter not in self._adapter_versions:
                job.finish(EngineError(f"adapter {adapter!r} is not loaded", retryable=False))
                self._jobs_done += 1
                continue
            job.version = self._adapter_versions[adapter] if adapter is not None else self._base_version
            adapter_in_use = adapter
            try:
                part = self._prefill(job)
            except Exception as exc:  # one bad prefill fails its own job, not the batch
                # One line, no traceback with locals: a bad request must not cost 64 KB of log.
                log.error("embedded_engine_prefill_failed", error=repr(exc)[:500])
                job.finish(EngineError(f"prefill failed: {exc!r}", retryable=True))
                self._jobs_done += 1
                continue
            if part is not None:
                parts.append(part)
                rows_in_use += len(part.rows)
        if parts:
            try:
                self._merge(parts)
            except Exception:
                for job in {id(row.job): row.job for part in parts for row in part.rows}.values():
                    job.finish(EngineError("could not add the request to the batch", retryable=True))
                    self._jobs_done += 1
                raise

    def _prefill(self, job: _Job) -> _Part | None:
        """Prefill one prompt, sample each row's first token; the rows still going, or None."""
        import xgrammar

        request = job.request
        n = request.sampling.n
        prompt = request.prompt_ids
        prefix = self._take_prefix(job)
        start = 0 if prefix is None else prefix.tokens
        cache = None if prefix is None else growing_cache(prefix.kv)
        with self._adapter_context(request.adapter):
            out = self._model(
                input_ids=torch.tensor([prompt[start:]], device=self.device),
                position_ids=torch.arange(start, len(prompt), device=self.device)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        job.cached_tokens = start
        prompt_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        if start == 0 and request.affinity_key is not None and self.config.prefix_cache_tokens > 0:
            # A cold prefill is the expensive case, and the GRPO siblings sharing this key usually send
            # the same prompt at the same time: keep it for them (this job's own finished history
            # supersedes the entry later).
            self._prefix.remember(request.affinity_key, prompt, prompt_kv, request.adapter, job.version)
        logits = out.logits[:, -1, :].float().expand(n, -1).clone()
        seed = request.sampling.seed
        rows = []
        for index in range(n):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed + index if seed is not None else self._seed_source.getrandbits(63))
            matcher = xgrammar.GrammarMatcher(job.grammar) if job.grammar is not None else None
            rows.append(_Row(job, index, matcher, generator))
        keep = self._sample_and_advance(rows, logits)
        if not keep[0]:
            self._remember(rows[0], prompt_kv)
        alive = [row for row, going in zip(rows, keep, strict=True) if going]
        if not alive:
            return None
        # One prefill serves the whole group: the prompt's KV is shared (expanded, copied at the merge).
        kv = [
            (keys.expand(len(alive), -1, -1, -1), values.expand(len(alive), -1, -1, -1))
            for keys, values in prompt_kv
        ]
        mask = torch.ones((len(alive), len(request.prompt_ids)), dtype=torch.long, device=self.device)
        return _Part(alive, kv, mask)

    # --- the per-episode prefix cache --------------------------------------------------------

    def _take_prefix(self, job: _Job) -> PrefixHit | None:
        """Kept KV of the job's episode covering a prefix of its prompt (same adapter and version)."""
        key = job.request.affinity_key
        if key is None or self.config.prefix_cache_tokens <= 0:
            return None
        hit = self._prefix.lookup(key, job.request.prompt_ids, job.request.adapter, job.version)
        if hit is not None:
            self._prefix_hits += 1
            self._cached_tokens += hit.tokens
        return hit

    def _remember(self, row: _Row, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a finished single-sample row's KV (prompt + completion minus its last token)."""
        job = row.job
        key = job.request.affinity_key
        if key is None or job.request.sampling.n != 1 or self.config.prefix_cache_tokens <= 0:
            return
        tokens = job.request.prompt_ids + tuple(row.token_ids[:-1])
        if kv[0][0].shape[2] != len(tokens):
            return
        self._prefix.remember(key, tokens, kv, job.request.adapter, job.version)

    def _merge(self, parts: list[_Part]) -> None:
        """Append new rows to the running batch in one copy, left-padding every part to one length."""
        if self._rows:
            parts = [_Part(self._rows, cache_kv(self._cache), self._mask), *parts]
        length = max(part.mask.shape[1] for part in parts)
        self._cache = merge_left_padded([part.kv for part in parts])
        self._mask = torch.cat(
            [torch.nn.functional.pad(part.mask, (length - part.mask.shape[1], 0)) for part in parts]
        )
        self._rows = [row for part in parts for row in part.rows]
        self._peak_rows = max(self._peak_rows, len(self._rows))

    def _decode_step(self) -> None:
        self._drop_cancelled()
        if not self._rows:
            return
        rows = self._rows
        input_ids = torch.tensor([[row.last_token] for row in rows], device=self.device)
        positions = torch.tensor([[row.next_pos] for row in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        with self._adapter_context(rows[0].job.request.adapter):
            out = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
            )
        self._mask = mask
        for row in rows:
            row.next_pos += 1
        keep = self._sample_and_advance(rows, out.logits[:, -1, :].float())
        if not all(keep):
            layers = cache_kv(self._cache)
            for i, alive in enumerate(keep):
                if not alive:
                    start = int(mask[i].nonzero()[0, 0])
                    self._remember(
                        rows[i], [(k[i : i + 1, :, start:], v[i : i + 1, :, start:]) for k, v in layers]
                    )
            self._select([i for i, alive in enumerate(keep) if alive])

    def _drop_cancelled(self) -> None:
        cancelled = {id(row.job) for row in self._rows if row.job.cancelled.is_set()}
        if cancelled:
            for job in {id(row.job): row.job for row in self._rows if id(row.job) in cancelled}.values():
                job.finish(EngineError("request cancelled", retryable=False))
                self._jobs_done += 1
            self._select([i for i, row in enumerate(self._rows) if id(row.job) not in cancelled])

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows; trim leading columns that are padding in every remaining row."""
        if not keep:
            self._rows, self._cache = [], None
            self._mask = self._mask.new_zeros((0, 0))
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[index]
        start = int(mask.any(dim=0).nonzero()[0, 0])
        self._mask = mask[:, start:]
        self._cache = select_rows(cache_kv(self._cache), keep, start)

    # --- sampling ----------------------------------------------------------------------------

    def _sample_and_advance(self, rows: list[_Row], logits: torch.Tensor) -> list[bool]:
        """Sample one token per row, record it, finish rows that are done; returns which rows go on."""
        import xgrammar

        constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
        if constrained:
            if len(rows) > self._bitmask.shape[0]:
                self._bitmask = xgrammar.allocate_token_bitmask(len(rows), self.vocab_size)
            for i in constrained:
                rows[i].matcher.fill_next_token_bitmask(self._bitmask, i)
            bitmask = self._bitmask[: len(rows)].to(logits.device)
            xgrammar.apply_token_bitmask_inplace(
                logits, bitmask, vocab_size=self.vocab_size, indices=constrained
            )
        keep = []
        for i, row in enumerate(rows):
            token, logprob = self._sample_row(logits[i], row)
            keep.append(self._advance(row, token, logprob))
        return keep

    def _sample_row(self, logits: torch.Tensor, row: _Row) -> tuple[int, float]:
        sampling = row.job.request.sampling
        if sampling.temperature < _GREEDY_TEMPERATURE:
            token = int(torch.argmax(logits))
            return token, float(torch.log_softmax(logits, dim=-1)[token])
        logprobs = torch.log_softmax(logits / sampling.temperature, dim=-1)
        probs = logprobs.exp()
        if 0 < sampling.top_k < probs.shape[0]:
            kth = torch.topk(probs, sampling.top_k).values[-1]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
            sorted_probs = torch.where(mass_before < sampling.top_p * sorted_probs.sum(), sorted_probs, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        token = int(torch.multinomial(probs, 1, generator=row.generator))
        return token, float(logprobs[token])

    def _advance(self, row: _Row, token: int, logprob: float) -> bool:
        """Record a sampled token; False when the row is finished (and its completion recorded)."""
        job = row.job
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        row.last_token = token
        self._tokens_generated += 1
        sampling = job.request.sampling
        finish: FinishReason | None = None
        if row.matcher is not None and not row.matcher.accept_token(token):
            finish = FinishReason.ABORT  # cannot happen with the mask applied; kept as a loud guard
            log.error("grammar_rejected_sampled_token", token=token)
        elif (
            token in self.eos_token_ids
            or token in sampling.stop_token_ids
            or (row.matcher is not None and row.matcher.is_terminated())
        ):
            finish = FinishReason.STOP
        elif len(row.token_ids) >= sampling.max_new_tokens:
            finish = FinishReason.LENGTH
        completion = None
        if finish is not None:
            completion = Completion(
                token_ids=tuple(row.token_ids),
                logprobs=tuple(row.logprobs),
                finish_reason=finish,
                policy_version=job.version,
                prompt_tokens=len(job.request.prompt_ids),
                cached_tokens=job.cached_tokens,
            )
            job.completions[row.index] = completion
        job.post_event(TokenEvent(row.index, token, logprob, completion))
        if completion is not None and all(c is not None for c in job.completions):
            job.finish([c for c in job.completions if c is not None])
            self._jobs_done += 1
        return finish is None
