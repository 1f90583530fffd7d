"""JSON as people read and type it: stored values shown on pages and terminals, payloads typed in.

Shown: ``compact_json`` on one line, ``pretty_json`` indented (short containers kept on one line) and
cut at a limit. Both come from one encoder that keeps non-ASCII text as it is and shows what JSON
cannot hold (datetimes, say) as text. Typed: ``loads_storable_json`` reads the admin's emit form and
``absurd_emit --payload`` with the client's own storability rules (``jsonsafe``).
"""

from __future__ import annotations

import json
from typing import Any

from django_absurd_agents import jsonsafe
from django_absurd_agents.exceptions import UnstorableJSON

MAX_JSON_CHARS = 200_000
"""Stored JSON longer than this is cut on a page (the database keeps all of it)."""

LINE_WIDTH = 88
"""Containers whose compact JSON fits in this many columns stay on one line."""

# The C encoder: json.dumps(indent=...) falls back to the pure Python one, several times slower on a
# page of 200 checkpoints.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


def compact_json(value: Any) -> str:
    """``value`` as JSON on one line."""
    return _ENCODER.encode(value)


def _pretty(value: Any, indent: int) -> str:
    compact = compact_json(value)
    if not isinstance(value, dict | list) or not value or indent + len(compact) <= LINE_WIDTH:
        return compact
    inner = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{inner}{compact_json(str(key))}: {_pretty(item, indent + 2)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [inner + _pretty(item, indent + 2) for item in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def pretty_json(value: Any, limit: int | None = MAX_JSON_CHARS) -> str:
    """Indented JSON, short containers kept on one line, cut at ``limit`` characters (None: never)."""
    if limit is None:
        return _pretty(value, 0)
    compact = compact_json(value)
    # Huge values are shown compact: indenting them costs time and cutting them loses the shape anyway.
    text = compact if len(compact) > limit else _pretty(value, 0)
    if len(text) > limit:
        return f"{text[:limit]}\n… ({len(text) - limit:,} more characters not shown)"
    return text


def _refuse_constant(name: str) -> Any:
    raise UnstorableJSON(
        f'{name} is not a JSON number and PostgreSQL refuses it: write null, or a string such as "{name}".'
    )


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store ``text`` (a NUL character, a lone surrogate), or None."""
    problem = jsonsafe.find_problem(text)
    return None if problem is None else f"it contains {problem.detail.removesuffix(' of the string')}. {problem.hint}"


def loads_storable_json(text: str) -> Any:
    """``text`` parsed as JSON that PostgreSQL can store (the client's own rules, ``jsonsafe``).

    Raises ``UnstorableJSON`` naming what to fix (NaN, Infinity, too deep, NUL, lone surrogates) and
    ``ValueError`` (``json.JSONDecodeError``) for text that is not JSON at all.
    """
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise UnstorableJSON(f"It is nested more than {jsonsafe.MAX_DEPTH} levels deep: flatten it.") from None
    problem = jsonsafe.find_problem(value)
    if problem is not None:
        raise UnstorableJSON(f"{str(problem)[0].upper()}{str(problem)[1:]}: {problem.hint}")
    return value
