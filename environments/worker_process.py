"""A child process that answers JSON-line requests, kept bounded: deadlines, restarts, session replay.

The τ² and ACEBench suites run third-party environment code (tau2's domains, an ACEBench checkout's
scenario classes) in a child process rather than in envtune's: the code and its dependencies stay out
of envtune's interpreter, and a tool that never returns can be stopped. ``WorkerProcess`` starts a
script with a given Python and exchanges one JSON line per request, one request at a time (a lock;
episode steps are blocking calls). Every request has a deadline. A request that runs past it, or a
process that dies, gets the process killed and restarted, and every open session is rebuilt on the new
process by replaying its logged calls (the environments are deterministic, which is also what the
benchmarks' own evaluators rely on when they replay a trajectory); the request that caused it fails
with ``WorkerLost``. Replies are bounded in size.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REPLY_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 300.0
"""Deadline of a request that is not a tool call (a busy 2-core machine can be very slow)."""
STARTUP_TIMEOUT_S = 600.0


class WorkerError(RuntimeError):
    """The worker failed a request (an error in the environment code, a timeout, a crash)."""


class WorkerUnavailable(WorkerError):
    """The worker's Python or script is missing."""


class WorkerLost(WorkerError):
    """The worker timed out, died or broke the protocol; it was restarted with its sessions."""


@dataclass
class _SessionLog:
    opening: dict[str, Any]
    calls: list[dict[str, Any]] = field(default_factory=list)


class WorkerProcess:
    """One child process and the sessions open on it."""

    def __init__(
        self,
        python: Path,
        script: Path,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        missing_hint: str = "",
    ) -> None:
        self.python = Path(python)
        if not self.python.exists():
            raise WorkerUnavailable(
                f"no Python at {self.python}{': ' + missing_hint if missing_hint else ''}"
            )
        self.script = Path(script)
        self.timeout_s = timeout_s
        self._env = dict(env or {})
        self._cwd = cwd
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._next_id = 0
        self._sessions: dict[str, _SessionLog] = {}
        self.restarts = 0
        self.info: dict[str, Any] = {}

    # --- process -------------------------------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self._env)
        self._process = subprocess.Popen(
            [str(self.python), str(self.script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=self._cwd,
        )
        self._buffer = b""
        self.info = self._exchange({"op": "hello"}, STARTUP_TIMEOUT_S)

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):  # Popen leaves its pipes open after wait
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def close(self) -> None:
        with self._lock:
            if self._process is not None and self._process.stdin is not None:
                try:
                    self._process.stdin.close()
                    self._process.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill()
            self._sessions.clear()

    def _exchange(self, request: dict[str, Any], timeout_s: float) -> Any:
        """Send one request and wait for its reply; raises WorkerError on timeout or death."""
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        self._next_id += 1
        request_id = self._next_id
        try:
            process.stdin.write(json.dumps({**request, "id": request_id}).encode() + b"\n")
            process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerLost(f"the worker is gone ({exc})") from None
        deadline = time.monotonic() + timeout_s
        fd = process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise WorkerLost(f"the worker did not answer {request['op']!r} within {timeout_s:.0f} s")
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise WorkerLost(f"the worker exited (code {process.poll()})")
                self._buffer += chunk
                if len(self._buffer) > MAX_REPLY_BYTES:
                    raise WorkerLost(f"the worker's reply exceeds {MAX_REPLY_BYTES} bytes")
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if reply.get("id") != request_id:
            raise WorkerLost(f"the worker answered request {reply.get('id')} instead of {request_id}")
        if not reply.get("ok"):
            raise WorkerError(str(reply.get("error")))
        return reply["result"]

    def _restart(self) -> None:
        """A fresh process with every open session rebuilt from its log."""
        self._kill()
        self.restarts += 1
        self._start()
        for session, log in self._sessions.items():
            self._exchange({"op": "open", "session": session, **log.opening}, self.timeout_s)
            for call in log.calls:
                self._exchange({"op": "call", "session": session, **call}, self.timeout_s)

    # --- requests ------------------------------------------------------------------------------

    def request(self, op: str, timeout_s: float | None = None, **payload: Any) -> Any:
        """One request; a timeout or crash restarts the worker (sessions replayed) and raises."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            try:
                return self._exchange({"op": op, **payload}, timeout_s or self.timeout_s)
            except WorkerLost:
                self._restart()
                raise

    def open_session(self, session: str, **opening: Any) -> Any:
        """Open a session (``opening`` is what the worker's ``open`` takes; replayed after a restart)."""
        with self._lock:
            result = self.request("open", session=session, **opening)
            self._sessions[session] = _SessionLog(dict(opening))
            return result

    def call(self, session: str, *, timeout_s: float | None = None, **call: Any) -> Any:
        """Send a ``call`` request (the worker's tool call) in a session; logged for replay once done."""
        with self._lock:
            if session not in self._sessions:
                raise WorkerError(f"no open session {session!r}")
            result = self.request("call", timeout_s=timeout_s, session=session, **call)
            self._sessions[session].calls.append(call)
            return result

    def close_session(self, session: str) -> None:
        with self._lock:
            if self._sessions.pop(session, None) is not None and self._process is not None:
                with contextlib.suppress(WorkerError):  # a lost worker has no session to close
                    self.request("close", session=session)

    def open_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)
