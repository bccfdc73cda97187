"""The embedded engine served over HTTP with SGLang's native endpoints and JSON shapes.

So the SGLang client is exercised over real HTTP in tests and in the CPU default run, and any SGLang
client can point at envtune's CPU engine. Request bodies are validated by envtune's own code
(``sglang_protocol.py``) against SGLang 0.5.23's HTTP contract: what SGLang's contract decoder
refuses is HTTP 400 ``{"error": "..."}`` with SGLang's wording.

Endpoints: ``/generate`` (``stream`` SSE too), ``/health``, ``/health_generate``, ``/model_info``
(``/get_model_info``), ``/server_info`` (``/get_server_info``), ``/load_lora_adapter``,
``/unload_lora_adapter``, ``/update_weights_from_disk``, ``/flush_cache``, ``/abort_request`` (cancels
the running ``/generate`` whose ``rid`` starts with the given one, or all of them, as SGLang matches;
its caller gets HTTP 400 "request aborted"). With an API key, every endpoint but the health checks
wants ``Authorization: Bearer KEY``.

``meta_info.weight_version`` is the policy version that produced each response (as a string).
SGLang's ``/load_lora_adapter`` carries no version: the server numbers adapters in load order
(after the highest version so far); a client that tracks policy versions (``SGLangClient``) keeps its
own map from adapter name to version.

Hardening (every refusal is a 4xx with a message; the process and its other clients carry on):
request bodies are capped (413) and must arrive within a deadline (408); a ``text`` longer than the
context could hold is refused before it is tokenized, and tokenizing and parsing run off the event
loop; one request asks for at most ``max_samples_per_request`` sequences (400) and a full queue
answers 503; a client that disconnects cancels its generation (streaming or not); connections are
limited and idle ones time out (``http_guard.py``); control endpoints (adapters, weights, cache) take
only JSON bodies and local folders, never Hub ids, and with ``admin_api_key`` only that key; requests a
browser sends cross-site (``Origin``/``Sec-Fetch-Site``) are refused (403), so a web page cannot
drive a server on localhost; API keys are compared in constant time. Left out: the console script
(``envtune.runtime.cli.serve``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from envtune.agents.engine import (
    Completion,
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from envtune.runtime.engines.embedded import EmbeddedEngine
from envtune.runtime.engines.http_guard import ConnectionGuard, read_body
from envtune.runtime.engines.openai_protocol import OpenAIError
from envtune.runtime.engines.settings import ServerLimits
from envtune.runtime.engines.sglang_protocol import (
    ContractError,
    ParsedGenerate,
    expect_bool,
    expect_map,
    expect_str,
    parse_generate,
)

log = structlog.get_logger(__name__)

SERVER_VERSION = "envtune-embedded-0.1 (SGLang 0.5.23 HTTP contract)"
"""What ``/server_info`` reports as ``version``."""

CONTROL_PATHS = frozenset(
    {"/load_lora_adapter", "/unload_lora_adapter", "/update_weights_from_disk", "/flush_cache"}
)
"""Endpoints that change the server's state (weights, adapters, cache)."""
_OPEN_PATHS = frozenset({"/health", "/health_generate"})
"""Endpoints that need no API key (as in SGLang: probes must work without it)."""
_THREADED_JSON_BYTES = 1 << 20
"""Bodies at least this big are parsed in a thread, off the event loop."""


def _json_response(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")

# --- the server ------------------------------------------------------------------------------


def _finish_json(completion: Completion, sampling: SamplingParams) -> dict[str, Any]:
    match completion.finish_reason:
        case FinishReason.STOP:
            return {"type": "stop", "matched": completion.token_ids[-1]}
        case FinishReason.LENGTH:
            return {"type": "length", "length": sampling.max_new_tokens}
        case _:
            return {"type": "abort", "message": "generation aborted"}


def _local_folder_problem(path: str, field: str, marker: str) -> str | None:
    """Why ``path`` is not a local folder holding ``marker`` (None when it is). Only local folders:
    a name that is not one would otherwise be taken for a Hugging Face Hub id and fetched."""
    try:
        folder = Path(path)
        if not folder.is_dir():
            return f"{field} {path[:300]!r} is not a folder on this server (only local folders are loaded)"
        if not (folder / marker).is_file():
            return f"{field} {path[:300]!r} has no {marker}"
    except (OSError, ValueError) as exc:  # a lone surrogate, a NUL byte, a name too long
        return f"{field} is not a usable path: {exc}"
    return None


class SGLangProtocolServer:
    """An aiohttp application serving an ``EmbeddedEngine`` with SGLang's HTTP API."""

    def __init__(
        self,
        engine: EmbeddedEngine,
        *,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        served_model_name: str | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self.engine = engine
        self.api_key = api_key
        self.admin_api_key = admin_api_key
        self.served_model_name = served_model_name or str(engine.model_path)
        self.tool_call_parser: str | None = None
        """Reported by ``/model_info``; set by whoever mounts a tool-calling API (``envtune-serve``)."""
        self.limits = limits or ServerLimits()
        self.guard = ConnectionGuard(self.limits)
        # Rust tokenizers are not meant to be shared by threads: one encode at a time, off the loop.
        self._tokenizer_lock = threading.Lock()
        self.app = web.Application(
            middlewares=[self.guard.middleware, self._safety_middleware],
            client_max_size=self.limits.max_body_bytes,
        )
        routes = [
            web.post("/generate", self._generate),
            web.put("/generate", self._generate),
            web.get("/health", self._health),
            web.get("/health_generate", self._health_generate),
            web.get("/model_info", self._model_info),
            web.get("/get_model_info", self._model_info),
            web.get("/server_info", self._server_info),
            web.get("/get_server_info", self._server_info),
            web.post("/load_lora_adapter", self._load_lora_adapter),
            web.post("/unload_lora_adapter", self._unload_lora_adapter),
            web.post("/update_weights_from_disk", self._update_weights_from_disk),
            web.get("/flush_cache", self._flush_cache),
            web.post("/flush_cache", self._flush_cache),
            web.post("/abort_request", self._abort_request),
        ]
        self.app.add_routes(routes)
        self._running: dict[str, asyncio.Task[Any]] = {}
        """Handler task of each running ``/generate``, by request id (for ``/abort_request``)."""
        self._aborting: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self.host = ""
        self.port = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (port 0 picks a free one); returns the base URL."""
        # handler_cancellation: a client that disconnects cancels its handler, and with it the
        # engine job, instead of leaving it generating for nobody.
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=self.limits.idle_timeout_s,
        )
        await self._runner.setup()
        self.host, self.port = host, await self.guard.listen(self._runner, host, port)
        log.info("sglang_protocol_server_started", url=self.url, connection_limit=self.guard.limit)
        return self.url

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:30000``."""
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        """Stop listening (the engine is the caller's to close)."""
        await self.guard.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SGLangProtocolServer:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- middleware and helpers ---------------------------------------------------------------

    @web.middleware
    async def _safety_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        try:
            response: web.StreamResponse = await handler(request)
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug must cost one request, not the server or a 64 KB log
            log.error("http_handler_failed", path=request.path, error=repr(exc)[:500])
            return web.json_response(
                {"error": {"message": f"internal error ({type(exc).__name__})"}}, status=500
            )
        return response

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Why ``request`` is refused before its handler runs (cross-site, key, content type)."""
        # A browser marks requests a web page sends to another site; other clients send neither.
        if request.headers.get("Sec-Fetch-Site", "none") not in ("none", "same-origin"):
            return _json_response("cross-site requests are not accepted", 403)
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return _json_response(f"requests from origin {origin[:100]!r} are not accepted", 403)
        if request.content_length is not None and request.content_length > self.limits.max_body_bytes:
            return _json_response(f"request body over {self.limits.max_body_bytes} bytes", 413)
        control = request.path in CONTROL_PATHS
        required = self.admin_api_key if control and self.admin_api_key else self.api_key
        if required and request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {required}".encode()):
                if request.path.startswith("/v1/"):  # the OpenAI routes' clients expect OpenAI's error
                    return OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key").response()
                return _json_response("Unauthorized", 401)
        if request.method in ("POST", "PUT") and request.content_length != 0:
            declared = request.headers.get("Content-Type")
            # Browsers send text/plain and forms cross-site without a preflight: control endpoints
            # take JSON only (as SGLang's typed endpoints do); /generate also takes an unlabelled body.
            if not (_is_json_type(request.content_type) or (declared is None and not control)):
                return _json_response(
                    f"{request.path} takes a JSON body (Content-Type: application/json), "
                    f"got {declared or 'no content type'}",
                    415,
                )
        return None

    async def _json_body(self, request: web.Request) -> Any:
        raw = await read_body(request, self.limits)
        charset = request.charset or "utf-8"
        try:
            codecs.lookup(charset)
        except LookupError:
            raise ContractError(f"unknown charset {charset!r} in Content-Type") from None
        try:
            text = raw.decode(charset)
            if len(raw) < _THREADED_JSON_BYTES:
                return json.loads(text)
            return await asyncio.to_thread(json.loads, text)
        except RecursionError:
            raise ContractError("request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, over-long integers too
            raise ContractError(f"request body is not valid JSON: {str(exc)[:200]}") from None

    def _encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.engine.tokenizer.encode(text))

    async def _parse_generate(self, body: Any) -> ParsedGenerate:
        """Validate (and tokenize) in a thread: a long text never blocks the event loop."""
        try:
            return await asyncio.to_thread(
                parse_generate,
                body,
                self._encode,
                max_samples=self.limits.max_samples_per_request,
                max_text_chars=self.engine.max_context * self.limits.max_chars_per_token,
            )
        except ContractError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. a tokenizer refusing the text
            raise ContractError(f"invalid request: {str(exc)[:200]}") from None

    def _decode(self, token_ids: Sequence[int], skip_special_tokens: bool) -> str:
        text = self.engine.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return str(text)

    def _response_item(
        self,
        parsed: ParsedGenerate,
        prompt_index: int,
        sample_index: int,
        completion: Completion | None,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        started: float,
    ) -> dict[str, Any]:
        sampling = parsed.sampling[prompt_index]
        text_ids = list(token_ids)
        if (
            completion is not None
            and completion.finish_reason is FinishReason.STOP
            and not sampling.no_stop_trim
            and text_ids
        ):
            text_ids = text_ids[:-1]  # SGLang trims the matched stop token from the text
        n = sampling.params.n
        meta: dict[str, Any] = {
            "id": parsed.rids[prompt_index] if n == 1 else f"{parsed.rids[prompt_index]}-{sample_index}",
            "finish_reason": None if completion is None else _finish_json(completion, sampling.params),
            "prompt_tokens": len(parsed.prompts[prompt_index]),
            "completion_tokens": len(token_ids),
            "cached_tokens": 0 if completion is None else completion.cached_tokens,
            "weight_version": str(
                completion.policy_version if completion is not None else self.engine.policy_version
            ),
            "e2e_latency": time.perf_counter() - started,
        }
        if parsed.return_logprob:
            meta["output_token_logprobs"] = [
                [lp, tok, self._decode([tok], False) if parsed.return_text_in_logprobs else None]
                for lp, tok in zip(logprobs, token_ids, strict=True)
            ]
        item: dict[str, Any] = {
            "text": self._decode(text_ids, sampling.skip_special_tokens),
            "output_ids": list(token_ids),
            "meta_info": meta,
        }
        if len(parsed.prompts) > 1 or n > 1:
            item["index"] = prompt_index * n + sample_index
        if parsed.return_prompt_token_ids:
            item["prompt_token_ids"] = list(parsed.prompts[prompt_index])
        return item

    def _engine_request(self, parsed: ParsedGenerate, index: int) -> GenerateRequest:
        sampling = parsed.sampling[index]
        return GenerateRequest(
            prompt_ids=parsed.prompts[index],
            sampling=sampling.params,
            constraint=sampling.constraint,
            adapter=parsed.adapters[index],
            affinity_key=parsed.routing_key,
        )

    @staticmethod
    def _engine_error(exc: EngineError) -> web.Response:
        return web.json_response({"error": {"message": str(exc)}}, status=503 if exc.retryable else 400)

    # --- /generate -------------------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            parsed = await self._parse_generate(await self._json_body(request))
        except ContractError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if self.engine.statistics().pending_jobs >= self.limits.max_queued_requests:
            return web.json_response(
                {"error": {"message": "the engine's queue is full; retry later"}},
                status=503,
                headers={"Retry-After": "1"},
            )
        task = asyncio.current_task()
        assert task is not None
        for rid in parsed.rids:
            self._running[rid] = task
        try:
            return await self._generate_parsed(request, parsed, started)
        except asyncio.CancelledError:
            if task in self._aborting and task.uncancel() == 0:  # /abort_request, and nothing else
                return web.json_response({"error": {"message": "request aborted"}}, status=400)
            raise
        finally:
            self._aborting.discard(task)
            for rid in parsed.rids:
                if self._running.get(rid) is task:
                    del self._running[rid]

    async def _abort_request(self, request: web.Request) -> web.Response:
        """SGLang's ``/abort_request``: ``{"rid": str, "abort_all": bool}``; unknown ids are a no-op."""
        try:
            body = expect_map(await self._json_body(request), "struct AbortReq")
            rid = expect_str(body.get("rid", ""))
            abort_all = expect_bool(body.get("abort_all", False))
        except ContractError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if not rid and not abort_all:
            return web.Response(status=200)  # SGLang ignores an empty rid (it would match everything)
        for key, task in list(self._running.items()):
            if (abort_all or key.startswith(rid)) and task not in self._aborting:
                self._aborting.add(task)
                task.cancel()
                log.info("generate_aborted", rid=key)
        return web.Response(status=200)

    async def _generate_parsed(
        self, request: web.Request, parsed: ParsedGenerate, started: float
    ) -> web.StreamResponse:
        if parsed.stream:
            return await self._generate_stream(request, parsed, started)
        failure: list[EngineError] = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self.engine.generate(self._engine_request(parsed, i)))
                    for i in range(len(parsed.prompts))
                ]
        except* EngineError as group_error:
            failure.extend(group_error.exceptions)  # type: ignore[arg-type]
        if failure:
            return self._engine_error(failure[0])
        items = [
            self._response_item(parsed, i, j, completion, completion.token_ids, completion.logprobs, started)
            for i, task in enumerate(tasks)
            for j, completion in enumerate(task.result())
        ]
        if len(items) == 1 and not parsed.batched:
            return web.json_response(items[0])
        return web.json_response(items)

    async def _generate_stream(
        self, request: web.Request, parsed: ParsedGenerate, started: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=1024)

        async def pump(prompt_index: int) -> None:
            async for event in self.engine.generate_stream(self._engine_request(parsed, prompt_index)):
                await queue.put((prompt_index, event))

        async def write(payload: dict[str, Any]) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        tokens: dict[tuple[int, int], list[int]] = {}
        logprobs: dict[tuple[int, int], list[float]] = {}
        expected = sum(sampling.params.n for sampling in parsed.sampling)
        finished = 0
        try:
            async with asyncio.TaskGroup() as group:
                for i in range(len(parsed.prompts)):
                    group.create_task(pump(i))
                while finished < expected:
                    prompt_index, event = await queue.get()
                    key = (prompt_index, event.index)
                    tokens.setdefault(key, []).append(event.token_id)
                    logprobs.setdefault(key, []).append(event.logprob)
                    finished += event.completion is not None
                    await write(
                        self._response_item(
                            parsed,
                            prompt_index,
                            event.index,
                            event.completion,
                            tokens[key],
                            logprobs[key],
                            started,
                        )
                    )
        except* EngineError as group_error:
            error = group_error.exceptions[0]
            retryable = isinstance(error, EngineError) and error.retryable
            with contextlib.suppress(ConnectionError):
                await write({"error": {"message": str(error), "code": 503 if retryable else 400}})
        except* ConnectionError:
            # The client left between two events (the cancelled pumps cancelled its engine job).
            log.debug("generate_stream_client_gone")
        with contextlib.suppress(ConnectionError):
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response

    # --- health and info ----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _health_generate(self, request: web.Request) -> web.Response:
        probe = GenerateRequest(prompt_ids=(0,), sampling=SamplingParams(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(self.engine.generate(probe), timeout=20)
        except (EngineError, TimeoutError):
            return web.Response(status=503)
        return web.Response(status=200)

    async def _model_info(self, request: web.Request) -> web.Response:
        config = self.engine.model_config
        return web.json_response(
            {
                "model_path": str(self.engine.model_path),
                "served_model_name": self.served_model_name,
                "tokenizer_path": str(self.engine.model_path),
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": str(self.engine.policy_version),
                "load_format": None,
                "reasoning_parser": None,
                "tool_call_parser": self.tool_call_parser,
                "model_type": getattr(config, "model_type", None),
                "architectures": getattr(config, "architectures", None),
            }
        )

    async def _server_info(self, request: web.Request) -> web.Response:
        stats = self.engine.statistics()
        return web.json_response(
            {
                "model_path": str(self.engine.model_path),
                "served_model_name": self.served_model_name,
                "tokenizer_path": str(self.engine.model_path),
                "max_context_length": self.engine.max_context,
                "version": SERVER_VERSION,
                "internal_states": [
                    {
                        "pending_jobs": stats.pending_jobs,
                        "active_rows": stats.active_rows,
                        "peak_rows": stats.peak_rows,
                        "tokens_generated": stats.tokens_generated,
                        "loaded_adapters": self.engine.adapters(),
                    }
                ],
                "host": self.host,
                "port": self.port,
                "max_batch_rows": self.engine.config.max_batch_rows,
            }
        )

    # --- weights ---------------------------------------------------------------------------------

    def _lora_response(self, success: bool, error: str | None) -> web.Response:
        return web.json_response(
            {
                "success": success,
                "error_message": error,
                "loaded_adapters": dict(self.engine.adapter_paths()),
            },
            status=200 if success else 400,
        )

    async def _load_lora_adapter(self, request: web.Request) -> web.Response:
        try:
            body = expect_map(await self._json_body(request), "struct LoadLoRAAdapterReqInput")
            name, path = expect_str(body.get("lora_name")), expect_str(body.get("lora_path"))
            if body.get("pinned") is not None:
                expect_bool(body["pinned"])
        except ContractError as exc:
            return self._lora_response(False, str(exc))
        problem = _local_folder_problem(path, "lora_path", "adapter_config.json")
        if problem is not None:
            return self._lora_response(False, problem)
        try:
            await self.engine.load_adapter(name, path, version=self.engine.policy_version + 1)
        except EngineError as exc:
            return self._lora_response(False, str(exc))
        return self._lora_response(True, None)

    async def _unload_lora_adapter(self, request: web.Request) -> web.Response:
        try:
            body = expect_map(await self._json_body(request), "struct UnloadLoRAAdapterReqInput")
            name = expect_str(body.get("lora_name"))
        except ContractError as exc:
            return self._lora_response(False, str(exc))
        try:
            await self.engine.unload_adapter(name)
        except EngineError as exc:
            return self._lora_response(False, str(exc))
        return self._lora_response(True, None)

    async def _update_weights_from_disk(self, request: web.Request) -> web.Response:
        def failure(message: str) -> web.Response:
            return web.json_response(
                {"success": False, "message": message, "num_paused_requests": 0}, status=400
            )

        try:
            body = expect_map(await self._json_body(request), "struct UpdateWeightFromDiskReqInput")
            path = expect_str(body.get("model_path"))
            raw_version = body.get("weight_version")
            version = None if raw_version is None else expect_str(raw_version)
        except ContractError as exc:
            return failure(str(exc))
        if version is not None and not (version.isascii() and version.isdigit() and len(version) < 19):
            return failure(f"envtune's engine uses integer weight versions, got {version[:40]!r}")
        problem = _local_folder_problem(path, "model_path", "config.json")
        if problem is not None:
            return failure(problem)
        new_version = self.engine.policy_version + 1 if version is None else int(version)
        try:
            await self.engine.update_weights_from_disk(path, version=new_version)
        except EngineError as exc:
            return failure(str(exc))
        return web.json_response(
            {
                "success": True,
                "message": f"Succeeded to update model weights (version {new_version}).",
                "num_paused_requests": 0,
            }
        )

    async def _flush_cache(self, request: web.Request) -> web.Response:
        await self.engine.flush_cache()
        return web.Response(text="Cache flushed.\n", status=200)
