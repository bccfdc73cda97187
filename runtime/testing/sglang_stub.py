"""A stub SGLang server: SGLang's native ``/generate`` contract, answered instantly from a script.

What it is for: measuring the client side of the real path (tokenizer, ``SGLangClient``, HTTP, JSON,
environment, episode loop) without a model. It runs in its own process (``python -m
envtune.runtime.testing.sglang_stub``), so its CPU is not the measured event loop's; it answers each
``/generate`` at once with realistic token ids, logprobs and text recorded beforehand, in the JSON
shape SGLang 0.5.23 returns (``output_ids``, ``meta_info.output_token_logprobs`` as
``[logprob, id, null]`` triples, ``finish_reason``, ``prompt_tokens``, ``weight_version``...).

The script. A JSON file ``{"replies": {KEY: [[ids, logprobs, text], ...]}, "default": [ids, logprobs,
text]}``. A request's ``routing_key`` (the episode's affinity key, which ``SGLangClient`` sends) reads
``RUN|KEY``: the n-th request under one routing key gets reply n of ``KEY``. A different ``RUN``
prefix replays the same episodes again. Unknown keys, and requests past the end of their script,
get ``default`` (an error if there is none).

Checked on every request, as SGLang's contract requires: a JSON object body, ``input_ids`` a
non-empty list of ints (or ``text``), ``sampling_params`` an object with integer ``n >= 1`` and
``max_new_tokens >= 1``; anything else is HTTP 400 ``{"error": ...}``. ``return_logprob`` false
leaves the logprobs out, as SGLang does. Also served: ``/health``, ``/model_info``,
``/load_lora_adapter`` and ``/unload_lora_adapter`` (accepted, remembered by name),
``/flush_cache``.

HTTP/1.1 over asyncio's ``Protocol`` (keep-alive, ``Content-Length`` bodies; chunked uploads are
refused with 411): small and fast enough that the client, not the stub, is what a benchmark
saturates. Not a model, never part of a training run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request body accepted (SGLang's server accepts far less than a 64 MB prompt)."""
RUN_SEPARATOR = "|"
"""Separates the run tag from the script key in a ``routing_key``."""


@dataclass(frozen=True, slots=True)
class ScriptedReply:
    """One recorded completion: sampled ids, their logprobs, the decoded text, why it ended."""

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish: str = "stop"
    """``stop`` (its last id is the matched stop token) or ``length`` (cut at ``max_new_tokens``)."""

    def __post_init__(self) -> None:
        if not self.ids or len(self.ids) != len(self.logprobs):
            raise ValueError(f"a reply needs ids, one logprob each: {len(self.ids)}, {len(self.logprobs)}")
        if self.finish not in ("stop", "length"):
            raise ValueError(f"finish is 'stop' or 'length', got {self.finish!r}")

    def to_json(self) -> list[Any]:
        return [list(self.ids), list(self.logprobs), self.text, self.finish]

    @classmethod
    def from_json(cls, value: Any) -> ScriptedReply:
        ids, logprobs, text, *finish = value
        return cls(tuple(int(i) for i in ids), tuple(float(x) for x in logprobs), str(text), *finish)


def write_script(
    path: Path, replies: Mapping[str, Sequence[ScriptedReply]], default: ScriptedReply | None = None
) -> None:
    """Write a script file the stub reads (``--script``)."""
    payload = {
        "replies": {key: [r.to_json() for r in seq] for key, seq in replies.items()},
        "default": default.to_json() if default is not None else None,
    }
    path.write_text(json.dumps(payload), encoding="utf-8")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large"}


class StubState:
    """The script and the per-routing-key cursors (one per server process)."""

    def __init__(self, replies: Mapping[str, Sequence[ScriptedReply]], default: ScriptedReply | None) -> None:
        self.replies = replies
        self.default = default
        self.cursors: dict[str, int] = {}
        self.adapters: set[str] = set()
        self.requests = 0

    @classmethod
    def load(cls, path: Path | None) -> StubState:
        if path is None:
            return cls({}, None)
        data = json.loads(path.read_text(encoding="utf-8"))
        replies = {k: tuple(ScriptedReply.from_json(r) for r in v) for k, v in data["replies"].items()}
        default = ScriptedReply.from_json(data["default"]) if data.get("default") else None
        return cls(replies, default)

    def next_reply(self, routing_key: str | None) -> ScriptedReply:
        key = routing_key.rsplit(RUN_SEPARATOR, 1)[-1] if routing_key else ""
        seq = self.replies.get(key, ())
        cursor = self.cursors.get(routing_key or "", 0)
        if routing_key:
            self.cursors[routing_key] = cursor + 1
        if cursor < len(seq):
            return seq[cursor]
        if self.default is None:
            raise _BadRequest(400, f"no scripted reply {cursor} for routing_key {routing_key!r}")
        return self.default

    # --- endpoints ----------------------------------------------------------------------------

    def generate(self, body: Any) -> Any:
        if not isinstance(body, dict):
            raise _BadRequest(400, "the /generate body must be a JSON object")
        ids = body.get("input_ids")
        if ids is None and not isinstance(body.get("text"), str):
            raise _BadRequest(400, "either text or input_ids should be provided")
        if ids is not None and (
            not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids)
        ):
            raise _BadRequest(400, "input_ids must be a non-empty list of non-negative integers")
        params = body.get("sampling_params", {})
        if not isinstance(params, dict):
            raise _BadRequest(400, "sampling_params must be an object")
        n, max_new = params.get("n", 1), params.get("max_new_tokens", 128)
        if type(n) is not int or n < 1 or type(max_new) is not int or max_new < 1:
            raise _BadRequest(400, f"n and max_new_tokens must be integers >= 1, got {n!r}, {max_new!r}")
        logprobs = bool(body.get("return_logprob", False))
        prompt_tokens = len(ids) if ids is not None else len(body["text"]) // 4
        routing_key = body.get("routing_key")
        items = []
        for index in range(n):
            reply = self.next_reply(routing_key if isinstance(routing_key, str) else None)
            out_ids = list(reply.ids[:max_new])
            finish = (
                {"type": "stop", "matched": out_ids[-1]}
                if len(out_ids) == len(reply.ids) and reply.finish == "stop"
                else {"type": "length", "length": len(out_ids)}
            )
            meta: dict[str, Any] = {
                "id": f"stub-{self.requests}-{index}",
                "finish_reason": finish,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(out_ids),
                "cached_tokens": 0,
                "weight_version": "0",
            }
            if logprobs:
                meta["output_token_logprobs"] = [
                    [lp, token, None] for lp, token in zip(reply.logprobs, out_ids, strict=False)
                ]
            item: dict[str, Any] = {"text": reply.text, "output_ids": out_ids, "meta_info": meta}
            if n > 1:
                item["index"] = index
            items.append(item)
        self.requests += 1
        return items[0] if n == 1 else items

    def route(self, method: str, path: str, body: Any) -> Any:
        if path == "/generate" and method in ("POST", "PUT"):
            return self.generate(body)
        if path in ("/health", "/health_generate") and method == "GET":
            return None
        if path in ("/model_info", "/get_model_info") and method == "GET":
            return {"model_path": "sglang-stub", "is_generation": True, "weight_version": "0"}
        if path == "/load_lora_adapter" and method == "POST":
            name = body.get("lora_name") if isinstance(body, dict) else None
            if not isinstance(name, str):
                raise _BadRequest(400, "lora_name is required")
            self.adapters.add(name)
            return {"success": True, "error_message": None, "loaded_adapters": sorted(self.adapters)}
        if path == "/unload_lora_adapter" and method == "POST":
            name = body.get("lora_name") if isinstance(body, dict) else None
            self.adapters.discard(name if isinstance(name, str) else "")
            return {"success": True, "error_message": None, "loaded_adapters": sorted(self.adapters)}
        if path == "/flush_cache" and method in ("GET", "POST"):
            return None
        raise _BadRequest(404, f"no route {method} {path}")


class _HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and ``Content-Length`` bodies; one request at a time per connection."""

    def __init__(self, state: StubState) -> None:
        self._state = state
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > 65536:
                    self._respond(400, {"error": "header too large"}, close=True)
                return
            head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            try:
                method, path, _ = head[0].split(" ", 2)
            except ValueError:
                self._respond(400, {"error": "malformed request line"}, close=True)
                return
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._respond(411, {"error": "send a Content-Length body"}, close=True)
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._respond(400, {"error": "bad Content-Length"}, close=True)
                return
            if length > MAX_BODY_BYTES:
                self._respond(413, {"error": "body too large"}, close=True)
                return
            if len(self._buffer) < end + 4 + length:
                return
            raw = bytes(self._buffer[end + 4 : end + 4 + length])
            del self._buffer[: end + 4 + length]
            close = headers.get("connection", "").lower() == "close"
            self._handle(method, path.split("?", 1)[0], raw, close)

    def _handle(self, method: str, path: str, raw: bytes, close: bool) -> None:
        try:
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                raise _BadRequest(400, f"the body is not JSON: {exc}") from None
            result = self._state.route(method, path, body)
        except _BadRequest as exc:
            self._respond(exc.status, {"error": str(exc)}, close)
            return
        self._respond(200, result, close)

    def _respond(self, status: int, payload: Any, close: bool) -> None:
        assert self._transport is not None
        body = b"" if payload is None else json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        self._transport.write(head.encode() + body)
        if close:
            self._transport.close()
            self._transport = None


async def serve(state: StubState, host: str, port: int, ready: asyncio.Future[str] | None = None) -> None:
    """Serve until cancelled; ``ready`` gets the base URL once listening."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _HttpProtocol(state), host, port)
    bound = server.sockets[0].getsockname()[1]
    url = f"http://{host}:{bound}"
    if ready is not None:
        ready.set_result(url)
    else:
        print(f"URL {url}", flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def stub_process(script: Path | None = None, *, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Run the stub in a child process for the ``with`` block; yields its base URL."""
    command = [sys.executable, "-m", "envtune.runtime.testing.sglang_stub", "--port", "0"]
    if script is not None:
        command += ["--script", str(script)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the child prints its URL once listening
        if not line.startswith("URL "):
            proc.wait(timeout=start_timeout_s)
            raise RuntimeError(f"the SGLang stub did not start (exit code {proc.returncode})")
        yield line.split()[1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A stub SGLang /generate server answering from a script.")
    parser.add_argument("--script", type=Path, default=None, help="reply script (see the module docstring)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed as 'URL ...')")
    args = parser.parse_args(argv)
    state = StubState.load(args.script)
    try:
        asyncio.run(serve(state, args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
