"""Model providers are extras: ``pip install "django-absurd-agents[openai]"`` brings pydantic-ai's OpenAI provider.

pydantic-ai raises ``ImportError`` naming its own extra (``pydantic-ai-slim[openai]``) when an agent is
built for a provider whose client library is missing; the worker turns that into the install line of
this package's extra of the same name, so the fix is not mistaken for a wrong dotted path.
"""

from __future__ import annotations

import re

PROVIDER_EXTRAS = ("openai", "anthropic", "google", "groq", "mistral", "bedrock")
"""Extras of django-absurd-agents passed through to ``pydantic-ai-slim[<same name>]`` (pyproject.toml)."""

_SLIM_EXTRA = re.compile(r"pydantic-ai-slim\[([\w-]+)\]")


def missing_provider(exc: BaseException, where: str) -> str | None:
    """The message for an import that failed for want of a model provider's library, else None."""
    match = _SLIM_EXTRA.search(str(exc))
    if match is None:
        return None
    extra = match.group(1)
    package = "django-absurd-agents" if extra in PROVIDER_EXTRAS else "pydantic-ai-slim"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"{where} failed: a model provider's library is not installed ({reason}). The dotted path is fine: install "
        f'the extra in the worker\'s environment, `pip install "{package}[{extra}]"`, then start the worker again.'
    )
