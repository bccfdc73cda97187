"""How the entry points end: exit codes, and one line that names the problem and what to do.

A run that cannot go on (the engine is gone, the disk is full, the output folder is read-only)
must end with one line a user can act on and a non-zero exit code, never with a 100-line
``ExceptionGroup``; a run stopped by a signal exits 128 + the signal's number, as shells and
schedulers expect (130 for SIGINT, 143 for SIGTERM: a scheduler's requeue logic reads them).
Anything not recognised here is a bug and keeps its traceback.

Left out: what the entry points do (``run.py``, ``evaluate.py``).
"""

from __future__ import annotations

import errno
import os
import re
import signal

EXIT_FAILED = 1
"""The run started but could not go on (engine gone, disk full...)."""
EXIT_USAGE = 2
"""Bad arguments or configuration (argparse's code)."""


def signal_exit_code(signum: int) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


SIGINT_EXIT = signal_exit_code(signal.SIGINT)
"""What a run interrupted with Ctrl-C exits with."""


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order; ``[error]`` for a plain one."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def describe_os_error(error: OSError, where: str) -> str:
    """One line for a failed write: what, where, and what to do."""
    target = error.filename or where
    elsewhere = "free space, or point run.out_dir (--out) elsewhere"
    if error.errno == errno.ENOSPC:
        return f"no space left on the device writing {target}: {elsewhere}"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {target}: {elsewhere}"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {target} ({error.strerror}): choose a writable run.out_dir (--out)"
    return f"cannot write {target}: {error.strerror or error}"


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})
"""Errors of writing that the user fixes (space, permissions), not bugs."""
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How Rust writers (safetensors, tokenizers) report an OS error inside their own exception types."""


def _as_os_error(error: BaseException) -> OSError | None:
    if isinstance(error, OSError):
        return error
    match = _RUST_OS_ERROR.search(str(error))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


def describe_failure(error: BaseException, where: str) -> str | None:
    """The one line for a failure users can act on; None for anything else (a bug: keep the traceback).

    ``where`` names the run folder (used when an OS error does not say which file).
    """
    from envtune.agents.engine import EngineError
    from envtune.runtime.engines.sglang_launcher import LaunchError, WorkerDied
    from envtune.runtime.weight_sync import WeightSyncError

    for leaf in leaves(error):
        if isinstance(leaf, EngineError | WeightSyncError | LaunchError | WorkerDied):
            return str(leaf)
        if isinstance(leaf, FileNotFoundError) and "model.path" in str(leaf):
            return str(leaf)
        os_error = _as_os_error(leaf)
        if os_error is not None and os_error.errno in _WRITE_ERRNOS:
            return describe_os_error(os_error, where)
    return None
