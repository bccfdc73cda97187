"""Actionable hints layered over BFCL's own tool results (docs/method.md §5).

The official release edits the BFCL classes' error messages in place, which makes the standard
environment unreachable (docs/method.md §8.7). Here the classes stay untouched: the episode executes
a call on its own instance, renders BFCL's result string unchanged, and in augmented mode asks
``augment_result`` for an optional hint, which the tool message carries in a separate ``hint``
field. A hint explains a constraint or names the tool that supplies a missing fact (the two goals
of docs/method.md §5.1); it never states the answer, never over-constrains, and is actionable.
Facts a hint quotes (directory contents, airports, currency pairs, door names, enum values) are read
from the instance, its class, or the function docs the model sees, so hints stay true when the data
changes.

Deliberately left out: wording of the official release (ours is our own), LLM-written hints (the
paper's generation pipeline is not released), and any state change: a rule only reads the instance
or calls its pure lookups (``list_all_airports``, ``get_flight_cost``, ``compute_exchange_rate``, ...).

This file is longer than most modules because it is one table, one rule per BFCL class; splitting it
per class would scatter a single concept (the hint catalogue) over eight files.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import string
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import structlog
from envtune.environments.tasks import load_function_docs
from envtune.environments.types import ToolCall

_log = structlog.get_logger(__name__)

MAX_HINT_CHARS = 600
"""Hints are cut to this length so that a long listing never floods the context."""

_LISTED_NAMES = 8
"""How many names a directory or catalogue listing quotes before summarising the rest."""

_LISTED_SYMBOLS = 12
"""Stock symbols are short, so a symbol listing quotes more of them."""

_MAX_COMPARED_CHARS = 256
"""Longest name a similar-name hint compares (a 100,000-character pair takes difflib 1.5 s)."""

_EXEC_ERROR = "Error during execution: "
"""BFCL's prefix for a call that raised."""


def augment_result(call: ToolCall, class_name: str, result: str, instance: object) -> str | None:
    """An actionable hint for one executed call, or None when nothing useful applies.

    `result` is BFCL's result string; `instance` is the episode's instance of `class_name` AFTER the
    call (failed calls do not change state, so it is also the state the call saw). Never raises.
    """
    rule = _CLASS_RULES.get(class_name) if isinstance(class_name, str) else None
    if rule is None or instance is None or not isinstance(result, str) or not isinstance(call, ToolCall):
        return None
    try:
        seen = _observe(call, class_name, result, instance)
        hint = _signature_hint(seen) or _type_hint(seen) or rule(seen) or _enum_hint(seen)
    except Exception as exc:  # a hint is optional: a rule that trips must never break a rollout
        _log.debug("feedback.rule_failed", cls=class_name, function=call.name, error=repr(exc))
        return None
    if not hint:
        return None
    hint = " ".join(hint.split())
    return hint if len(hint) <= MAX_HINT_CHARS else hint[: MAX_HINT_CHARS - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# What a rule sees


@dataclass(frozen=True, slots=True)
class _Seen:
    """One executed call as the rules see it."""

    call: ToolCall
    """The call as parsed."""
    class_name: str
    """The BFCL class that owns the function."""
    result: str
    """BFCL's result string."""
    failure: str | None
    """The error text when the call failed (raised, or returned an ``error`` value); None otherwise."""
    raised: bool
    """True when the call raised (BFCL's ``Error during execution: ...``)."""
    instance: Any
    """The episode's instance after the call."""

    def arg(self, name: str) -> Any:
        return self.call.arguments.get(name) if isinstance(self.call.arguments, Mapping) else None

    def text(self, name: str) -> str | None:
        value = self.arg(name)
        return value if isinstance(value, str) else None

    def payload(self) -> Any:
        """The result parsed as JSON (dict results are ``json.dumps``-ed by BFCL), or None."""
        try:
            return json.loads(self.result)
        except ValueError:
            return None


def _observe(call: ToolCall, class_name: str, result: str, instance: object) -> _Seen:
    failure: str | None = None
    raised = result.startswith(_EXEC_ERROR)
    if raised:
        failure = result[len(_EXEC_ERROR) :]
    elif result.startswith("{") and '"error"' in result:
        try:
            payload = json.loads(result)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and payload.get("error") not in (None, ""):
            failure = str(payload["error"])
    elif result.startswith(("[{'error'", "['Error")) and "not authenticated" in result:
        # get_user_tickets / get_watchlist report a missing login inside a list (rendered by str()).
        failure = result
    return _Seen(call, class_name, result, failure, raised, instance)


# ----------------------------------------------------------------------------------------------------
# Rules shared by every class: wrong argument names, wrong argument types, values outside an enum


def _method(seen: _Seen) -> Callable[..., Any] | None:
    name = seen.call.name
    if not isinstance(name, str) or name.startswith("_"):
        return None
    method = getattr(type(seen.instance), name, None)
    return method if callable(method) else None


def _signature_hint(seen: _Seen) -> str | None:
    """A TypeError from the call's keywords: name the parameters the real method takes."""
    if not seen.raised or seen.failure is None or not isinstance(seen.call.arguments, Mapping):
        return None
    if (
        "unexpected keyword argument" not in seen.failure
        and "required positional argument" not in seen.failure
    ):
        return None
    method = _method(seen)
    if method is None:
        return None
    params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    optional = [p.name for p in params if p.default is not inspect.Parameter.empty]
    unknown = sorted(set(seen.call.arguments) - {p.name for p in params})
    missing = [name for name in required if name not in seen.call.arguments]
    parts = [f"{seen.call.name} takes the parameters {_quoted(required) or 'none'} (required)"]
    if optional:
        parts[0] += f" and {_quoted(optional)} (optional)"
    if unknown:
        parts.append(f"it has no parameter {_quoted(unknown)}")
    if missing:
        parts.append(f"you left out {_quoted(missing)}")
    return "; ".join(parts) + ". Use exactly these parameter names."


def _doc_property(seen: _Seen, param: str) -> Mapping[str, Any] | None:
    doc = load_function_docs().get(seen.call.name)
    if doc is None or doc.class_name != seen.class_name:
        return None
    prop = doc.parameters.get("properties", {}).get(param)
    return prop if isinstance(prop, Mapping) else None


def _type_hint(seen: _Seen) -> str | None:
    """A failed call that passed a number as text (or text as a number) where the doc says otherwise."""
    if seen.failure is None or not isinstance(seen.call.arguments, Mapping):
        return None
    for param, value in seen.call.arguments.items():
        prop = _doc_property(seen, param)
        if prop is None:
            continue
        kind = prop.get("type")
        if kind in ("integer", "float") and isinstance(value, str):
            return (
                f"'{param}' must be a {'whole ' if kind == 'integer' else ''}number, but you passed the "
                f"string {value!r}; pass it as a JSON number without quotes."
            )
        if kind == "string" and isinstance(value, int | float) and not isinstance(value, bool):
            return f"'{param}' must be a string, but you passed the number {value!r}; quote it."
    return None


_ENUM = re.compile(r"\[Enum\]:\s*(.+)$")


def _doc_enum(seen: _Seen, param: str) -> tuple[str, ...]:
    """The allowed values of a parameter, read from the ``[Enum]`` note of the function doc."""
    prop = _doc_property(seen, param)
    match = _ENUM.search(str(prop.get("description", ""))) if prop else None
    if match is None:
        return ()
    return tuple(item.strip(" '\"[]") for item in match.group(1).split(",") if item.strip(" '\"[]"))


def _enum_hint(seen: _Seen) -> str | None:
    """A failed call with a value outside the documented enum of its parameter."""
    if seen.failure is None or not isinstance(seen.call.arguments, Mapping):
        return None
    for param, value in seen.call.arguments.items():
        allowed = _doc_enum(seen, param)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if isinstance(v, str) and allowed and v not in allowed]
        if bad:
            return (
                f"{_quoted(bad)} is not an allowed value of '{param}'; it must be one of {_quoted(allowed)}."
            )
    return None


# ----------------------------------------------------------------------------------------------------
# GorillaFileSystem


_FS_FILE_READERS = MappingProxyType(
    {"cat": "file_name", "wc": "file_name", "sort": "file_name", "grep": "file_name", "tail": "file_name"}
)
"""Functions that read one file of the current directory -> the argument naming it."""


def _is_dir(item: object) -> bool:
    return isinstance(getattr(item, "contents", None), dict)


def _fs_where(fs: Any) -> str:
    try:
        return re.sub("/+", "/", str(fs.pwd()["current_working_directory"]))
    except Exception:  # pwd is only decoration for the hint
        return str(getattr(fs._current_dir, "name", "?"))


def _fs_listing(cwd: Any, dirs_only: bool = False) -> str:
    names = [
        name + ("/" if _is_dir(item) else "")
        for name, item in cwd.contents.items()
        if not dirs_only or _is_dir(item)
    ]
    if not names:
        return "It has no subdirectories." if dirs_only else "It is empty."
    what = "Its subdirectories" if dirs_only else "It contains"
    return f"{what}: {_listed(names)}."


def _fs_forbidden(fs: Any) -> str:
    """The characters the file system refuses in names, asked of its own validator."""
    check = getattr(fs, "_validate_file_or_directory_name", None)
    if not callable(check):
        return ""
    return "".join(c for c in string.punctuation + " " if not check(c))


def _close_names(value: str, names: Iterable[str]) -> list[str]:
    """The name most like ``value`` (difflib is quadratic in the worst case: long names are skipped)."""
    if len(value) > _MAX_COMPARED_CHARS:
        return []
    candidates = [name for name in names if isinstance(name, str) and len(name) <= _MAX_COMPARED_CHARS]
    return difflib.get_close_matches(value, candidates, n=1, cutoff=0.8)


def _fs_missing(fs: Any, fn: str, value: str, want: str) -> str | None:
    """Why `value` is not a usable item of the current directory for `fn`, or None when it is one."""
    cwd = fs._current_dir
    if "/" in value:
        return (
            f"'{value}' is a path, but {fn} only accepts a plain name from the current directory. "
            "cd into its directory first (one directory per cd call), then pass just the name."
        )
    item = cwd.contents.get(value)
    noun = {"file": "file", "dir": "directory"}.get(want, "file or directory")
    if item is None:
        close = _close_names(value, cwd.contents)
        similar = f" A similar name exists here: '{close[0]}'." if close else ""
        return (
            f"There is no {noun} named '{value}' in the current directory ({_fs_where(fs)}). "
            f"{_fs_listing(cwd, dirs_only=want == 'dir')}{similar} "
            "Use find to search below it, or cd to the directory that holds it."
        )
    if want == "file" and _is_dir(item):
        return f"'{value}' is a directory, not a file; {fn} works on files only."
    if want == "dir" and not _is_dir(item):
        return f"'{value}' is a file, not a directory."
    return None


def _fs_new_name(fs: Any, fn: str, value: str) -> str | None:
    """Why `value` cannot be created by `fn` in the current directory."""
    if "/" in value:
        return (
            f"{fn} creates items only inside the current directory and takes a plain name, not a path. "
            "cd into the target directory first (one level per cd call), then use the bare name."
        )
    forbidden = _fs_forbidden(fs)
    bad = sorted({c for c in value if c in forbidden})
    if bad:
        return (
            f"The name '{value}' contains {' '.join(bad)}, which names may not contain. "
            f"Forbidden characters: {' '.join(forbidden)}."
        )
    item = fs._current_dir.contents.get(value)
    if item is not None:
        kind = "directory" if _is_dir(item) else "file"
        return (
            f"A {kind} named '{value}' already exists in the current directory ({_fs_where(fs)}); "
            "use it as it is or choose another name."
        )
    return None


def _fs_cd(seen: _Seen, fs: Any, folder: str) -> str | None:
    cwd = fs._current_dir
    if folder == "..":
        if getattr(cwd, "parent", None) is None:
            return (
                f"You are already at the root directory ({_fs_where(fs)}); there is no parent to go to. "
                "Use ls to see what is here."
            )
        return None
    if "/" in folder:
        node = fs.root if folder.startswith("/") else cwd
        for part in (p for p in folder.split("/") if p):
            nxt = node.contents.get(part) if _is_dir(node) else None
            if not _is_dir(nxt):
                where = "the root" if node is fs.root else f"'{node.name}'"
                return (
                    f"cd moves one directory per call; pass a single directory name, not a path. "
                    f"The path breaks at '{part}', which is not a subdirectory of {where}. "
                    f"You are in {_fs_where(fs)}. {_fs_listing(cwd, dirs_only=True)}"
                )
            node = nxt
        return "cd moves one directory per call; pass a single directory name, not a path."
    return _fs_missing(fs, "cd", folder, "dir")


def _fs_move(seen: _Seen, fs: Any) -> str | None:
    fn = seen.call.name
    source, dest = seen.text("source"), seen.text("destination")
    if source is None or dest is None:
        return None
    problem = _fs_missing(fs, fn, source, "any")
    if problem:
        return f"Source: {problem}"
    if "/" in dest:
        return (
            f"The destination of {fn} must be a plain name in the current directory: a new name, or an "
            "existing subdirectory to put the item into. To reach a deeper directory, go one level at "
            "a time."
        )
    target = fs._current_dir.contents.get(dest)
    if target is not None and not _is_dir(target):
        return (
            f"'{dest}' is an existing file, so {fn} cannot use it as a destination (it never overwrites). "
            "Give a new name, or the name of a directory to put the item into."
        )
    if _is_dir(target) and source in target.contents:
        return f"The directory '{dest}' already holds an item named '{source}'; {fn} does not overwrite it."
    return None


def _filesystem_hint(seen: _Seen) -> str | None:
    fs, fn = seen.instance, seen.call.name
    if seen.failure is None or not _is_dir(getattr(fs, "_current_dir", None)):
        return None
    if fn == "cd":
        folder = seen.text("folder")
        return _fs_cd(seen, fs, folder) if folder is not None else None
    if fn in ("mkdir", "touch"):
        name = seen.text("dir_name" if fn == "mkdir" else "file_name")
        return _fs_new_name(fs, fn, name) if name is not None else None
    if fn == "echo":
        name = seen.text("file_name")
        if name is None:
            return None
        if _is_dir(fs._current_dir.contents.get(name)):
            return f"'{name}' is a directory; echo can write into a file only. Give a file name instead."
        return _fs_new_name(fs, fn, name)
    if fn in _FS_FILE_READERS:
        name = seen.text(_FS_FILE_READERS[fn])
        if fn == "wc" and "invalid mode" in seen.failure:
            return "wc's mode must be 'l' (lines), 'w' (words) or 'c' (characters)."
        return _fs_missing(fs, fn, name, "file") if name is not None else None
    if fn == "diff":
        names = [(p, seen.text(p)) for p in ("file_name1", "file_name2")]
        problems = [f"{p}: {_fs_missing(fs, fn, v, 'file')}" for p, v in names if v is not None]
        problems = [p for p in problems if not p.endswith(": None")]
        return " ".join(problems) or None
    if fn in ("mv", "cp"):
        return _fs_move(seen, fs)
    if fn == "rm":
        name = seen.text("file_name")
        return _fs_missing(fs, fn, name, "any") if name is not None else None
    if fn == "rmdir":
        name = seen.text("dir_name")
        if name is None:
            return None
        item = fs._current_dir.contents.get(name)
        if _is_dir(item) and item.contents:
            return (
                f"'{name}' still holds {len(item.contents)} item(s) and rmdir removes empty directories "
                "only. Empty it first, or use rm, which removes a directory with its contents."
            )
        return _fs_missing(fs, fn, name, "dir")
    return None


# ----------------------------------------------------------------------------------------------------
# TravelAPI


def _travel_airports(api: Any) -> tuple[str, ...]:
    return tuple(api.list_all_airports())


def _travel_route_exists(api: Any, origin: str, destination: str) -> bool:
    try:
        api.get_flight_cost(
            travel_from=origin, travel_to=destination, travel_date="2024-01-01", travel_class="economy"
        )
    except Exception:  # BFCL signals a missing route by raising
        return False
    return True


def _travel_flight_cost(seen: _Seen, api: Any) -> str | None:
    if seen.failure is None or "route" not in seen.failure:
        return None
    origin, destination = seen.text("travel_from"), seen.text("travel_to")
    if origin is None or destination is None:
        return None
    airports = _travel_airports(api)
    unknown = [
        f"'{code}' ({role})"
        for role, code in (("travel_from", origin), ("travel_to", destination))
        if code not in airports
    ]
    if unknown:
        return (
            f"{' and '.join(unknown)} is not an airport code this system knows; both ends must be 3-letter "
            "airport codes. list_all_airports lists every code, and get_nearest_airport_by_city gives "
            "the airport of a city."
        )
    reachable = [
        code for code in airports if code != origin and _travel_route_exists(api, origin, destination=code)
    ]
    where = (
        f"Flights from '{origin}' go to: {_listed(reachable)}."
        if reachable
        else (f"No flights depart from '{origin}' at all.")
    )
    return (
        f"Both airport codes are valid, but no flight is offered from '{origin}' to '{destination}'. {where}"
    )


def _travel_exchange(seen: _Seen, api: Any) -> str | None:
    base, target = seen.text("base_currency"), seen.text("target_currency")
    if base is None or target is None:
        return None
    codes = list(dict.fromkeys((*_doc_enum(seen, "base_currency"), base, target)))

    def converts(a: str, b: str) -> bool:
        try:
            api.compute_exchange_rate(base_currency=a, target_currency=b, value=1.0)
        except Exception:  # BFCL signals a missing pair by raising
            return False
        return True

    partners = {c: [d for d in codes if d != c and converts(c, d)] for c in codes}
    supported = [c for c in codes if partners[c]]
    unknown = [c for c in dict.fromkeys((base, target)) if c not in supported]
    if unknown:
        return (
            f"{_quoted(unknown)} is not a supported currency code. Supported codes: {', '.join(supported)}. "
            "Use these 3-letter codes."
        )
    return (
        f"No direct rate exists between '{base}' and '{target}'. '{base}' converts only to or from "
        f"{_quoted(partners[base])}, and '{target}' only to or from {_quoted(partners[target])}."
    )


def _travel_hint(seen: _Seen) -> str | None:
    api, fn, failure = seen.instance, seen.call.name, seen.failure
    if fn == "get_nearest_airport_by_city":
        payload = seen.payload()
        if isinstance(payload, dict) and payload.get("nearest_airport") == "Unknown":
            known = _doc_enum(seen, "location")
            return (
                f"'{seen.text('location')}' is not a location this system knows (it answered 'Unknown'). "
                + (f"Known locations: {_listed(list(known))}. " if known else "")
                + "list_all_airports lists the airport codes."
            )
        return None
    if failure is None:
        return None
    if fn == "get_flight_cost" and seen.raised:
        return _travel_flight_cost(seen, api)
    if fn == "compute_exchange_rate" and seen.raised:
        return _travel_exchange(seen, api)
    if failure == "Token not initialized" or (seen.raised and api.token_expires_in is None):
        # Without a token, BFCL's V3 methods fail on `None -= 1` rather than with a message.
        return (
            "No one is logged in to the travel system yet; call authenticate_travel first and use the "
            "access_token it returns."
        )
    if failure == "Token expired":
        return "The access token has expired; call authenticate_travel again and use the new access_token."
    if failure == "Invalid access token":
        left = api.token_expires_in
        # BFCL V3 counts wrong tokens down to expiry; worth saying only when expiry is near.
        tail = f" {left} more wrong token(s) will expire it." if isinstance(left, int) and left <= 5 else ""
        return (
            "access_token must be exactly the token returned by authenticate_travel (or the one given to "
            f"you).{tail}"
        )
    if failure in ("Card not registered", "Credit card not registered"):
        return (
            "That card_id is not registered; get_all_credit_cards lists the registered cards and their ids."
        )
    if failure == "Booking not found":
        return "That booking_id does not exist; use the booking_id returned by book_flight for this booking."
    if failure == "Insufficient funds":
        return "The card's balance does not cover this cost; get_credit_card_balance shows what is available."
    return None


# ----------------------------------------------------------------------------------------------------
# VehicleControlAPI


def _is_zipcode(value: object) -> bool:
    return isinstance(value, str) and value.isdigit()


def _vehicle_hint(seen: _Seen) -> str | None:
    car, fn, failure = seen.instance, seen.call.name, seen.failure
    if fn == "get_zipcode_based_on_city":
        payload = seen.payload()
        zipcode = payload.get("zipcode") if isinstance(payload, dict) else None
        if isinstance(zipcode, str) and zipcode and set(zipcode) == {"0"}:
            city = seen.text("city") or ""
            advice = (
                "Pass the city name alone, without state or country."
                if "," in city
                else ("Check the spelling of the city name.")
            )
            return f"'{city}' is not in the zipcode database (an all-zero zipcode means unknown). {advice}"
        return None
    if failure is None:
        return None
    if fn == "get_outside_temperature_from_weather_com":
        if callable(getattr(car, "get_outside_temperature_from_google", None)):
            return (
                "The weather.com service is not answering. get_outside_temperature_from_google reports the "
                "outside temperature too."
            )
        return None
    if fn == "estimate_distance":
        cities = [(p, seen.arg(p)) for p in ("cityA", "cityB")]
        not_zip = [f"{p}={v!r}" for p, v in cities if not _is_zipcode(v)]
        if not_zip:
            return (
                f"estimate_distance takes zipcodes, and {', '.join(not_zip)} is not one. "
                "get_zipcode_based_on_city gives the zipcode of a city."
            )
        return (
            f"No distance is recorded between zipcodes '{seen.arg('cityA')}' and '{seen.arg('cityB')}'. "
            "Check that each zipcode belongs to the intended city with get_zipcode_based_on_city."
        )
    if fn == "startEngine":
        if "doors must be locked" in failure:
            return "Lock every door listed above with lockDoors (unlock=False) before starting the engine."
        if "Brake pedal needs to be pressed" in failure:
            return "Press the brake pedal with pressBrakePedal before starting; it must be fully pressed."
        if "press the brake fully" in failure:
            return (
                f"The brake pedal is only partly pressed (force {car._brakePedalForce} N); starting needs it "
                "fully pressed, i.e. pressBrakePedal with pedalPosition at its maximum of 1."
            )
        if "Fuel tank is empty" in failure:
            return "There is no fuel; add some with fillFuelTank before starting the engine."
        return None
    if fn == "fillFuelTank" and "capacity" in failure:
        capacity = getattr(sys.modules.get(type(car).__module__), "MAX_FUEL_LEVEL", None)
        if capacity is None:
            return None
        room = max(capacity - car.fuelLevel, 0)
        return (
            f"fuelAmount is added to the current level ({car.fuelLevel} gallons) and the tank holds at most "
            f"{capacity} gallons, so at most {room:g} more gallons fit."
        )
    if fn == "setCruiseControl":
        if "Start the engine" in failure:
            return "Cruise control needs a running engine; start it with startEngine first."
        if "Invalid speed" in failure:
            return "speed must be between 0 and 120 and a multiple of 5."
        return None
    if fn == "lockDoors" and seen.raised:
        doors = list(getattr(car, "doorStatus", {}))
        return f"Door names must be among {_quoted(doors)}." if doors else None
    return None


# ----------------------------------------------------------------------------------------------------
# MessageAPI, TwitterAPI, TicketAPI, TradingBot, MathAPI


def _message_hint(seen: _Seen) -> str | None:
    api, fn, failure = seen.instance, seen.call.name, seen.failure
    users = getattr(api, "user_map", {})
    if fn == "message_login":
        payload = seen.payload()
        if not (isinstance(payload, dict) and payload.get("login_status") is False):
            return None
        user_id = seen.text("user_id")
        if user_id in users:
            return f"'{user_id}' is a user name, but message_login needs a user ID; get_user_id gives it."
        return (
            "That user ID does not exist; get_user_id turns a user name into its ID (list_users lists names)."
        )
    if failure is None:
        return None
    if "No user is currently logged in" in failure:
        return "Log in first with message_login, using the user's ID (get_user_id gives the ID of a name)."
    if fn in ("send_message", "delete_message") and "not found" in failure:
        receiver = seen.text("receiver_id")
        if receiver in users:
            return f"'{receiver}' is a user name, but receiver_id must be a user ID; get_user_id gives it."
        if fn == "delete_message" and receiver in users.values():
            return f"No sent message to '{receiver}' remains; view_messages_sent shows the messages you sent."
        return "That receiver ID does not exist; list_users lists the users and get_user_id gives their IDs."
    if fn == "get_user_id":
        return (
            "That user is not in the workspace; list_users lists the user names, add_contact adds a new one."
        )
    if fn == "add_contact" and "already exists" in failure:
        return "This user is already a contact; get_user_id gives their ID."
    return None


def _twitter_hint(seen: _Seen) -> str | None:
    api, fn, failure = seen.instance, seen.call.name, seen.failure
    if fn == "authenticate_twitter":
        payload = seen.payload()
        if isinstance(payload, dict) and payload.get("authentication_status") is False:
            return "The username or password is wrong; use exactly the credentials you were given."
        return None
    if failure is None:
        return None
    if "not authenticated" in failure or (fn == "comment" and seen.raised and not api.authenticated):
        return "Log in to Twitter first with authenticate_twitter (username and password)."
    if "Tweet with ID" in failure and "not found" in failure:
        return "No tweet has that ID; get_user_tweets or search_tweets show existing tweets and their IDs."
    return None


def _ticket_hint(seen: _Seen) -> str | None:
    fn, failure = seen.call.name, seen.failure
    if failure is None:
        return None
    if "not authenticated" in failure:
        return "Log in to the ticket system first with ticket_login."
    if "Ticket with ID" in failure and "not found" in failure:
        return "No ticket has that ID; get_user_tickets lists your tickets with their IDs."
    if fn == "edit_ticket" and "Invalid fields" in failure:
        prop = _doc_property(seen, "updates") or {}
        fields = list(prop.get("properties", {}))
        known = re.findall(r"- (\w+) \(", str(prop.get("description", "")))
        allowed = list(dict.fromkeys((*known, *fields)))
        return f"updates may only set the fields {_quoted(allowed)}." if allowed else None
    return None


def _trading_hint(seen: _Seen) -> str | None:
    bot, fn, failure = seen.instance, seen.call.name, seen.failure
    stocks = getattr(bot, "stocks", {})
    if fn == "add_to_watchlist":
        stock = seen.text("stock")
        if stock is not None and stock not in stocks and stock not in getattr(bot, "watch_list", ()):
            return _trading_symbol(bot, stock, "was not added to the watchlist: it is not a known symbol")
        return None
    if fn == "get_symbol_by_name":
        payload = seen.payload()
        if isinstance(payload, dict) and payload.get("symbol") == "Stock not found":
            return (
                "No company has exactly that name; use the company's plain name (e.g. without 'Inc.'), or "
                "get_available_stocks to browse symbols by sector."
            )
        return None
    if failure is None:
        return None
    if "not authenticated" in failure:
        return "Log in to the trading system first with trading_login."
    symbol = seen.text("symbol")
    if symbol is not None and ("Invalid stock symbol" in failure or "Stock with symbol" in failure):
        return _trading_symbol(bot, symbol, "is not a known stock symbol")
    if "Order with ID" in failure and "not found" in failure:
        return "No order has that ID; get_order_history lists your orders with their IDs."
    if "Market is closed" in failure and callable(getattr(bot, "update_market_status", None)):
        return "The market status is closed; get_current_time and update_market_status refresh it."
    if "Account with ID" in failure:
        return "That is not your account ID; get_account_info shows it."
    if "not found in watchlist" in failure:
        return "That symbol is not on the watchlist; get_watchlist shows what is."
    return None


def _trading_symbol(bot: Any, symbol: str, what: str) -> str:
    try:
        looked_up = bot.get_symbol_by_name(symbol).get("symbol")
    except Exception:  # the lookup only sharpens the hint
        looked_up = None
    if looked_up not in (None, "Stock not found"):
        return f"'{symbol}' is a company name, but a ticker symbol is needed; get_symbol_by_name gives it."
    known = _listed(list(getattr(bot, "stocks", {})), limit=_LISTED_SYMBOLS)
    return f"'{symbol}' {what}. Known symbols: {known}."


_UNIT_CANDIDATES = (
    "km",
    "m",
    "cm",
    "mm",
    "um",
    "nm",
    "in",
    "ft",
    "yd",
    "miles",
    "mi",
    "kg",
    "g",
    "lb",
    "oz",
    "celsius",
    "fahrenheit",
    "kelvin",
    "l",
    "ml",
    "gal",
    "s",
    "h",
)
"""Spellings tried against the conversion functions to tell the model which ones they accept."""


def _math_hint(seen: _Seen) -> str | None:
    api, fn, failure = seen.instance, seen.call.name, seen.failure
    if failure is None:
        return None
    if fn in ("si_unit_conversion", "imperial_si_conversion") and "not supported" in failure:
        method = getattr(api, fn)

        def works(a: str, b: str) -> bool:
            try:
                out = method(value=1.0, unit_in=a, unit_out=b)
            except Exception:  # probing: any failure means "not supported"
                return False
            return isinstance(out, dict) and "error" not in out

        if fn == "si_unit_conversion":
            units = [u for u in _UNIT_CANDIDATES if works(u, u)]
            return f"si_unit_conversion converts between the units {_quoted(units)} only." if units else None
        pairs = [f"{a}->{b}" for a in _UNIT_CANDIDATES for b in _UNIT_CANDIDATES if a != b and works(a, b)]
        return f"imperial_si_conversion supports only the conversions {', '.join(pairs)}." if pairs else None
    return None


# ----------------------------------------------------------------------------------------------------


def _quoted(items: Iterable[object]) -> str:
    return ", ".join(f"'{item}'" for item in items)


def _listed(names: list[str], limit: int = _LISTED_NAMES) -> str:
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return f"{shown} and {more} more" if more > 0 else shown


_CLASS_RULES: Mapping[str, Callable[[_Seen], str | None]] = MappingProxyType(
    {
        "GorillaFileSystem": _filesystem_hint,
        "TravelAPI": _travel_hint,
        "VehicleControlAPI": _vehicle_hint,
        "MessageAPI": _message_hint,
        "TwitterAPI": _twitter_hint,
        "TicketAPI": _ticket_hint,
        "TradingBot": _trading_hint,
        "MathAPI": _math_hint,
    }
)
"""BFCL class name -> its hint rule (a class without an entry gets no hints)."""
