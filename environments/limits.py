"""Bounds on what one tool call may cost, checked before it runs, and on what its result may weigh.

A model exploring under RL can write any call, and BFCL's classes trust their arguments: ``power(10,
10**9)`` computes a billion-digit integer in one C operation, ``square_root(precision=10**9)`` and
``logarithm(precision=10**8)`` set a billion-digit context, ``find``/``du`` walk a directory graph that
``cp`` of a folder into itself makes cyclic (or, repeated, exponentially shared). None of that can be
interrupted once started (``deadline.py`` stops Python loops, not C), so it is refused before it starts.

The table below comes from reading every public method of the eight BFCL V3 classes of
bfcl-eval 2025.6.13. What each class needs:

- ``MathAPI``: ``power`` (int ** int grows without bound), ``square_root`` and ``logarithm``
  (precision), ``round_number`` (``round(int, -n)`` computes ``10**n``). The others are one C
  operation on numbers of at most ``MAX_INT_DIGITS`` digits (the parser's limit, re-checked here).
  ``square_root``/``logarithm`` also leave ``decimal``'s and ``mpmath``'s precision raised for the
  whole process; ``save_numeric_state``/``restore_numeric_state`` bracket every MathAPI call.
- ``GorillaFileSystem``: ``find`` and ``du`` recurse over the directory graph, which ``cp``/``mv``
  can make cyclic or shared; both are walked first with a budget. ``find`` also repeats its ``path``
  argument in every match. The other methods touch one directory or one file, whose size is bounded
  by what the replies wrote (``MAX_STRING_CHARS`` per argument).
- ``TwitterAPI``, ``MessageAPI``, ``TicketAPI``, ``TradingBot``, ``TravelAPI``,
  ``VehicleControlAPI``: every method is a lookup, a scan of the instance's state (which grows by at
  most one record per call), or arithmetic on scalar arguments: linear in what the model wrote, so
  the generic argument bounds are enough. (``MessageAPI`` draws ids until an unused one appears; the
  90,000 possible ids cannot be used up within an episode's step limits.)

Every bound is far above what ground truth needs (a test replays all 800 tasks and checks that no
ground-truth call meets one; ``benchmarks/conformance.py`` still agrees with BFCL's checker). Several
refusals are calls BFCL cannot answer either (a power whose result has no ``str``, a walk of a cyclic
folder that ends in ``RecursionError``). The others (precision above 1,000 digits, a walk of more
than 10,000 shared entries, a ``find`` path longer than 4,096) are read-only calls: a refusal changes
no state, and could change a verdict only if the unbounded answer happened to equal a result string
that ground truth needs. The generic bounds on argument sizes are never tighter than what a reply
can hold, so they only refuse hand-built calls.
Left out: interrupting a call that has started (``deadline.py``) and the parser's own bounds
(``tool_calls.py``).
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from envtune.environments.tool_calls import MAX_REPLY_CHARS

MAX_INT_DIGITS = 4300
"""Largest integer (in decimal digits) an argument or a computed power may have: CPython's default
limit for ``int``/``str`` conversion, so the parser never produces more and BFCL could never print more."""
MAX_STRING_CHARS = MAX_REPLY_CHARS
"""Longest string argument: what one reply can hold (only hand-built calls can exceed it)."""
MAX_ARGUMENT_ITEMS = MAX_REPLY_CHARS // 2
"""Most values (all nesting levels together) in one call's arguments: as many as a reply can hold
(two characters each), so like the two bounds above it only ever refuses hand-built calls."""
MAX_PRECISION = 1_000
"""Largest ``precision`` of ``square_root`` and ``logarithm``, in digits (ground truth uses <= 10;
1,000 digits cost about 3 ms, a million more than 10 s)."""
MAX_ROUND_DIGITS = 10_000
"""Largest ``-decimal_places`` for ``round_number`` of an integer (``round`` computes ``10**n``)."""
MAX_PATH_CHARS = 4_096
"""Longest ``path`` argument of ``find`` (Linux's ``PATH_MAX``), which every match repeats."""
MAX_TREE_ENTRIES = 10_000
"""Most entries ``find``/``du`` may visit (following shared folders as often as they would);
ground-truth file systems hold at most 124. Checking costs at most about 10 ms."""
MAX_TREE_CHARS = 4 * 1024 * 1024
"""Most characters ``find`` may list (all match paths) or ``du`` may measure (all file contents)."""
MAX_RESULT_CHARS = 64 * 1024
"""Longest result string shown to the model; longer ones are cut (ground truth's longest is 31,706)."""
MAX_STEP_RESULT_CHARS = 256 * 1024
"""Most result characters one step's feedback shows (64 calls x 64 KiB would be 4 MiB to tokenize);
ground truth's largest turn returns 70,423. Scoring always sees each call's own result."""

_MAX_INT = 10**MAX_INT_DIGITS
_POWER_BITS = math.ceil(MAX_INT_DIGITS * math.log2(10)) + 1
"""A result with more bits than this has more than ``MAX_INT_DIGITS`` digits."""

Check = Callable[[Any, Mapping[str, Any]], str | None]
"""A per-method bound: (the episode's instance, the call's arguments) -> why it is refused, or None."""


# --- generic argument bounds ---------------------------------------------------------------------


def _check_nested(stack: list[Any], count: int) -> str | None:
    """The generic bounds inside lists and dicts (walked without recursion, at most
    ``MAX_ARGUMENT_ITEMS`` values)."""
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_ARGUMENT_ITEMS:
            return f"the arguments hold more than {MAX_ARGUMENT_ITEMS} values"
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                return f"a string argument is longer than {MAX_STRING_CHARS} characters"
        elif isinstance(value, int):
            if not -_MAX_INT < value < _MAX_INT:
                return f"an integer argument has more than {MAX_INT_DIGITS} digits"
        elif isinstance(value, list | tuple):
            stack.extend(value)
        elif isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
    return None


# --- MathAPI -------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, int | float)


def _power(_instance: Any, arguments: Mapping[str, Any]) -> str | None:
    base, exponent = arguments.get("base"), arguments.get("exponent")
    # Only int ** positive int is exact and unbounded; floats overflow at once, negatives give floats.
    if not (isinstance(base, int) and isinstance(exponent, int)) or exponent <= 0 or abs(base) <= 1:
        return None
    # bit_length - 1 <= log2|base|: a lower bound on the result's size, so nothing printable is refused.
    if exponent * (abs(base).bit_length() - 1) > _POWER_BITS:
        return f"the result would have more than {MAX_INT_DIGITS} digits"
    return None


def _precision(_instance: Any, arguments: Mapping[str, Any]) -> str | None:
    precision = arguments.get("precision")
    if isinstance(precision, int | float) and _is_number(precision) and precision > MAX_PRECISION:
        return f"precision may be at most {MAX_PRECISION} digits"
    return None


def _round_number(_instance: Any, arguments: Mapping[str, Any]) -> str | None:
    places = arguments.get("decimal_places", 0)
    # round(float, n) is cheap for any n; round(int, -n) builds 10**n first.
    if isinstance(arguments.get("number"), int) and _is_number(places) and places < -MAX_ROUND_DIGITS:
        return f"decimal_places may be at least -{MAX_ROUND_DIGITS} when rounding an integer"
    return None


NUMERIC_STATE_CLASSES = frozenset({"MathAPI"})
"""Classes whose methods change process-wide numeric state: ``square_root`` sets
``decimal.getcontext().prec``, ``logarithm`` sets ``mpmath.mp.dps``, and both leave them set."""

NumericState = tuple[decimal.Context, int, Any, int]


def save_numeric_state() -> NumericState:
    """The thread's ``decimal`` context and its precision, and ``mpmath``'s (process-wide) precision.

    Restored after the call *and* after its result is rendered: an ``mpf`` renders at the current
    precision, and BFCL renders it before anything resets it. Only what MathAPI changes is saved (a
    full ``decimal.localcontext`` copy costs more than the call).
    """
    import mpmath  # MathAPI's module imports it: already loaded, so this is a dict lookup

    context = decimal.getcontext()
    return context, context.prec, mpmath.mp, mpmath.mp.prec


def restore_numeric_state(state: NumericState) -> None:
    context, prec, mp, mp_prec = state
    if decimal.getcontext() is not context:
        decimal.setcontext(context)
    if context.prec != prec:
        context.prec = prec
    if mp.prec != mp_prec:  # mpmath's setter is Python code; most calls change nothing
        mp.prec = mp_prec


# --- GorillaFileSystem ---------------------------------------------------------------------------


def _walk_budget(directory: Any, name: str | None, base_chars: int, measure_files: bool) -> str | None:
    """Walk the folder graph as ``find``/``du`` would (shared folders repeated), with a budget.

    Counts entries and, for ``find``, the characters of the listed paths (for ``du``, of the files).
    A folder inside itself (``cp`` of a folder into itself makes one) would be walked forever: refused
    at once.
    """
    entries = chars = 0
    ancestors: list[int] = []  # ids of the folders on the path to the one being listed
    stack: list[tuple[Any, int, int]] = [(directory, base_chars, 0)]
    while stack:
        folder, path_chars, depth = stack.pop()
        del ancestors[depth:]
        ancestors.append(id(folder))
        contents = getattr(folder, "contents", None)
        if not isinstance(contents, dict):
            continue
        for item_name, item in contents.items():
            entries += 1
            if entries > MAX_TREE_ENTRIES:
                return f"the directory tree holds more than {MAX_TREE_ENTRIES} entries to visit"
            item_chars = path_chars + 1 + len(item_name)
            if measure_files:
                content = getattr(item, "content", None)
                chars += len(content) if isinstance(content, str) else 0
            elif name is None or (isinstance(name, str) and name in item_name):
                chars += item_chars
            if chars > MAX_TREE_CHARS:
                return f"the result would exceed {MAX_TREE_CHARS} characters"
            if isinstance(getattr(item, "contents", None), dict):
                if id(item) in ancestors:
                    return f"the folder '{item_name}' contains itself, so the walk would never end"
                stack.append((item, item_chars, depth + 1))
    return None


def _find(instance: Any, arguments: Mapping[str, Any]) -> str | None:
    path = arguments.get("path", ".")
    if isinstance(path, str) and len(path) > MAX_PATH_CHARS:
        return f"path may be at most {MAX_PATH_CHARS} characters"
    base_chars = len(path.rstrip("/")) if isinstance(path, str) else 0
    # find always searches the current directory; `path` only prefixes the listed matches.
    return _walk_budget(
        getattr(instance, "_current_dir", None), arguments.get("name"), base_chars, measure_files=False
    )


def _du(instance: Any, _arguments: Mapping[str, Any]) -> str | None:
    return _walk_budget(getattr(instance, "_current_dir", None), None, 0, measure_files=True)


_LIMITS: dict[tuple[str, str], Check] = {
    ("MathAPI", "power"): _power,
    ("MathAPI", "square_root"): _precision,
    ("MathAPI", "logarithm"): _precision,
    ("MathAPI", "round_number"): _round_number,
    ("GorillaFileSystem", "find"): _find,
    ("GorillaFileSystem", "du"): _du,
}
LIMITS: Mapping[tuple[str, str], Check] = MappingProxyType(_LIMITS)
"""(class, method) -> its specific bound, on top of the generic bounds (see the module docstring).
A read-only view; lookups on the hot path use the dict itself (a proxy's ``get`` costs ~1 µs)."""


def check_call(
    class_name: str, function_name: str, instance: Any, arguments: Mapping[str, Any]
) -> str | None:
    """Why this call must not run (a message for the model), or None. Never raises on odd input.

    Generic bounds first (integers, strings, how many values in all), then the method's own bound.
    Runs once per tool call: the common case (a few short scalars, no per-method bound) is one loop
    over the values and one dict lookup.
    """
    try:
        problem = None
        containers: list[Any] = []
        for value in arguments.values():
            kind = type(value)
            if kind is str:
                if len(value) > MAX_STRING_CHARS:
                    problem = f"a string argument is longer than {MAX_STRING_CHARS} characters"
                    break
            elif kind is int:
                if not -_MAX_INT < value < _MAX_INT:
                    problem = f"an integer argument has more than {MAX_INT_DIGITS} digits"
                    break
            elif kind is not float and kind is not bool and value is not None:
                containers.append(value)
        if problem is None and containers:
            problem = _check_nested(containers, len(arguments))
        if problem is None:
            check = _LIMITS.get((class_name, function_name))
            if check is None:
                return None
            problem = check(instance, arguments)
    except Exception as exc:  # a bound is a guard: odd values (a hostile __eq__) must not crash the step
        problem = f"the arguments could not be checked ({type(exc).__name__})"
    return None if problem is None else f"{function_name}(): {problem} (a limit of this environment)"


# --- results -------------------------------------------------------------------------------------


def cut_result(text: str, limit: int = MAX_RESULT_CHARS) -> str | None:
    """``text`` shortened to ``limit`` characters with a note of its full length; None when it fits."""
    if len(text) <= limit:
        return None
    return f"{text[:limit]}… [cut: {len(text)} characters in all]"


def fit_step_results(results: list[str]) -> list[str | None]:
    """Per result of one step: None to show it whole, or a copy cut to what is left of the step's budget."""
    left = MAX_STEP_RESULT_CHARS
    fitted: list[str | None] = []
    for text in results:
        fitted.append(cut_result(text, max(left, 0)))
        left -= len(text)
    return fitted


def is_encodable(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 material (no lone surrogates): a tokenizer can take it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
