"""What Postgres can store as ``jsonb``, checked before anything is written.

Params, event payloads, step values and task results all end up in ``jsonb`` columns, written by
absurd-sdk with plain ``json.dumps``. Python's encoder accepts more than Postgres does: it writes
``NaN`` and ``Infinity`` (not JSON), it escapes a NUL character as ``\\u0000`` and a lone surrogate as
``\\ud800`` (both refused by ``jsonb``), and it recurses once per level of nesting (so a deep enough
value raises ``RecursionError``). A refusal by Postgres comes after the statement was sent: it aborts
the caller's transaction, and for a step it comes after the step's body (a side-effecting tool) ran.

One walk, :func:`find_problem`, finds each of those, with a path to the offending value
(``$.pages[3].text``), without recursion. Every writer of this package uses it:

* :func:`encode` for params and event payloads (``InvalidParams``, before any SQL);
* the step checks of ``task_context`` and ``durability`` (``UnrecordableStepResult``, the task then
  fails without another attempt);
* the task-result check of the worker (through ``client.encode_json``).

Values the standard encoder cannot write are given pydantic's JSON form (``plain_json``), so params
and results may hold pydantic models and Pydantic AI messages; their JSON is checked the same way.

NUL characters are refused, not escaped: text that holds one (often text extracted from a PDF or a web
page) is almost always a bug of the extraction, and silently changing a tool's or a model's output
would make a replay see something else than the code that produced it. Remove them where the text
comes from (``text.replace("\\x00", "")``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from pydantic import BaseModel
from pydantic_ai.messages import ModelMessagesTypeAdapter, ModelRequest, ModelResponse
from pydantic_core import PydanticSerializationError, to_jsonable_python

from django_absurd_agents.exceptions import AbsurdAgentsError, InvalidParams
from django_absurd_agents.exceptions import UnrecordableStepResult as UnrecordableStepResult  # its old import path

MAX_DEPTH = 200
"""Deepest nesting of lists and dicts accepted (real data is a few levels deep; a cycle is infinite)."""

_PATH_SHOWN = 12
"""Path segments shown in a message; deeper ones are elided."""

_SUSPECT = re.compile("[\x00\ud800-\udfff]")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

GENERIC_HINT = (
    "Pass dicts, lists, strings, numbers, booleans, None, or UUID/datetime/date/Decimal values; pass a "
    "model instance by its primary key."
)


class Problem:
    """Why a value cannot be stored, and where in it (``$`` is the value itself)."""

    def __init__(self, kind: str, path: str, detail: str) -> None:
        self.kind = kind
        self.path = path
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.detail} at {self.path}"

    @property
    def hint(self) -> str:
        return _HINTS[self.kind]


_HINTS = {
    "nul": (
        "Postgres cannot store the NUL character in text: remove it where the text comes from "
        '(text.replace("\\x00", "")).'
    ),
    "surrogate": (
        "A lone surrogate is not Unicode text: decode the bytes it came from with errors='replace', or drop it."
    ),
    "number": "JSON has no NaN or Infinity: use None or a string instead.",
    "depth": f"Nesting deeper than {MAX_DEPTH} levels (or a value that contains itself) is refused: flatten it.",
}


def _text_problem(text: str) -> tuple[str, str] | None:
    """(kind, detail) for the first NUL or unpaired surrogate in ``text``; a surrogate pair is fine."""
    if text.isascii() and "\x00" not in text:  # both are fast scans in C; most text stops here
        return None
    match = _SUSPECT.search(text)
    while match is not None:
        index = match.start()
        char = match.group()
        if char == "\x00":
            return "nul", f"a NUL character (\\u0000) at position {index}"
        if char <= "\udbff" and index + 1 < len(text) and "\udc00" <= text[index + 1] <= "\udfff":
            match = _SUSPECT.search(text, index + 2)
            continue
        return "surrogate", f"an unpaired surrogate (\\u{ord(char):04x}) at position {index}"
    return None


def _segment(key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"[{key}]"
    text = str(key)
    if _IDENTIFIER.match(text):
        return f".{text}"
    return "[" + json.dumps(text)[:60] + "]"


def _path(link: tuple[Any, ...] | None) -> str:
    segments: list[str] = []
    while link is not None:
        link, key = link
        segments.append(_segment(key))
    segments.reverse()
    if len(segments) > _PATH_SHOWN:
        segments = [*segments[: _PATH_SHOWN // 2], "...", *segments[-_PATH_SHOWN // 2 :]]
    return "$" + "".join(segments)


def _scalar_problem(item: Any, link: tuple[Any, ...] | None) -> Problem | None:
    if isinstance(item, str):
        found = _text_problem(item)
        if found is not None:
            return Problem(found[0], _path(link), f"{found[1]} of the string")
    elif isinstance(item, float) and not math.isfinite(item):
        return Problem("number", _path(link), f"the number {item!r}")
    return None


def _children(item: dict[Any, Any] | list[Any] | tuple[Any, ...], link: tuple[Any, ...] | None) -> Any:
    """(child, link) pairs of a container, last first (the stack pops the first); a bad key is a Problem."""
    if isinstance(item, dict):
        pairs = []
        for key, child in reversed(list(item.items())):
            if isinstance(key, str):
                found = _text_problem(key)
                if found is not None:
                    return Problem(found[0], _path((link, key)), f"{found[1]} of the key")
            pairs.append((child, (link, key)))
        return pairs
    return [(item[index], (link, index)) for index in range(len(item) - 1, -1, -1)]


def find_problem(value: Any, *, max_depth: int = MAX_DEPTH) -> Problem | None:
    """The first part of ``value`` that Postgres's ``jsonb`` would refuse, or None.

    Looks at strings (and dict keys), floats and the nesting of dicts, lists and tuples; any other
    object is left to the JSON encoder. Iterative, so no nesting raises ``RecursionError``.
    """
    # Each entry: (value, depth, path link); a link is (parent link, key), built only when needed.
    stack: list[tuple[Any, int, tuple[Any, ...] | None]] = [(value, 0, None)]
    while stack:
        item, depth, link = stack.pop()
        if not isinstance(item, dict | list | tuple):
            problem = _scalar_problem(item, link)
            if problem is not None:
                return problem
            continue
        if depth >= max_depth:
            return Problem("depth", _path(link), f"nesting deeper than {max_depth} levels")
        children = _children(item, link)
        if isinstance(children, Problem):
            return children
        stack.extend((child, depth + 1, child_link) for child, child_link in children)
    return None


class _Unstorable(AbsurdAgentsError, ValueError):
    """A pydantic value whose JSON form Postgres would refuse (a NUL character in a message, say)."""

    def __init__(self, problem: Problem, type_name: str) -> None:
        super().__init__(str(problem))
        self.problem = problem
        self.type_name = type_name


def plain_json(value: Any) -> Any:
    """The JSON form pydantic gives a pydantic model, a dataclass or a Pydantic AI message.

    Pydantic AI messages take their ``ModelMessagesTypeAdapter`` form (the one ``message_history=``
    reads back, bytes as base64), so a task may return ``result.all_messages()`` or a model instance.
    Anything else (a set, bytes) stays refused with ``TypeError``: turning it into a list or base64
    text would hand the task something else than what was passed.
    """
    if isinstance(value, ModelRequest | ModelResponse):
        return ModelMessagesTypeAdapter.dump_python([value], mode="json")[0]
    if isinstance(value, BaseModel) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        try:
            return to_jsonable_python(value, bytes_mode="base64")
        except PydanticSerializationError as exc:
            raise TypeError(f"{type(value).__name__} has no JSON form: {exc}") from exc
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class _Encoder(DjangoJSONEncoder):
    """Django's encoder (UUID, datetime, Decimal), then pydantic's, each result checked for ``jsonb``."""

    def default(self, o: Any) -> Any:
        try:
            return super().default(o)
        except TypeError:
            plain = plain_json(o)
        problem = find_problem(plain)
        if problem is not None:
            raise _Unstorable(problem, type(o).__name__)
        return plain


def encode(value: Any, *, what: str = "Task params", limit: int | None = None) -> str:
    """JSON text for ``value`` that Postgres will store, accepting Django's usual values (UUID,
    datetime, Decimal) and pydantic's (models, dataclasses, Pydantic AI messages), or ``InvalidParams``
    naming the problem and the fix. No SQL is involved."""
    problem = find_problem(value)
    if problem is not None:
        hint = f"{problem.hint} {GENERIC_HINT}" if problem.kind == "number" else problem.hint
        raise InvalidParams(f"{what} must be JSON: {problem}. {hint}")
    try:
        text = json.dumps(value, cls=_Encoder, allow_nan=False)
    except _Unstorable as exc:
        problem = exc.problem
        raise InvalidParams(f"{what} must be JSON: {problem} of a {exc.type_name}. {problem.hint}") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidParams(f"{what} must be JSON: {exc}. {GENERIC_HINT}") from exc
    if limit is not None:
        size = len(text.encode())
        if size > limit:
            raise InvalidParams(
                f"{what} are {size} bytes of JSON, over the limit of {limit} (ABSURD_AGENTS['MAX_PARAMS_BYTES'], "
                "which caps task params and event payloads alike). Store large inputs in your own table and "
                "pass its id."
            )
    return text


def recordable_problem(value: Any) -> str | None:
    """Why absurd-sdk could not record ``value`` (it writes with plain ``json.dumps``), or None."""
    problem = find_problem(value)
    if problem is not None:
        return f"{problem}. {problem.hint}"
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return (
            f"{exc}. Return JSON data: dicts, lists, strings, numbers, booleans and None (convert datetimes, "
            "UUIDs and Decimals to strings, models to dicts)."
        )
    return None


def name_problem(value: object, what: str) -> str | None:
    """Why ``value`` cannot be a task or event name (a non-blank string Postgres can store), or None."""
    if not isinstance(value, str):
        return f"{what} must be a string, not {type(value).__name__} ({value!r})."
    if not value.strip():
        return f"{what} must not be blank ({value!r})."
    found = _text_problem(value)
    if found is not None:
        return f"{what} {value!r} contains {found[1]}."
    return None
