"""Inference engines behind ``envtune.agents.engine``'s contract.

Modules, each imported by path because each pulls its own heavy dependencies:

- ``embedded``: in-process transformers engine (continuous batching, xgrammar, LoRA, per-episode KV);
  ``kv_batch`` and ``prefix_cache`` are its KV bookkeeping (torch);
- ``sglang_client``: SGLang's native ``/generate`` API over HTTP (aiohttp), with balancing, episode
  affinity, retries and weight sync; ``sglang_protocol``: SGLang's request contract (stdlib);
- ``sglang_server``: the embedded engine behind SGLang's HTTP API (aiohttp);
- ``tiny_model``: a tiny Qwen2-shaped model and a BPE tokenizer trained on BFCL texts (CPU default).

This face re-exports only the settings records, which need nothing beyond the standard library.
"""

from envtune.runtime.engines.settings import EmbeddedEngineConfig, SGLangClientConfig

__all__ = ["EmbeddedEngineConfig", "SGLangClientConfig"]
