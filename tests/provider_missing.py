"""A tasks module whose agent needs a model provider that the dev environment does not install (OpenAI)."""

from pydantic_ai import Agent

agent = Agent("openai:gpt-5.2", name="needs_openai")
