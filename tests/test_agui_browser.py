"""The AG-UI page of ``docs/live-output.md``, as written there, in a real headless Chromium, through a worker kill.

The docs' ``fetch`` client is served as a Django template (so ``{{ csrf_token }}`` is real and CSRF is
enforced) by uvicorn (ASGI), next to the app's URLs. The page asks the narrator for a story
(``tests/event_tasks.py``); the first worker stalls after a few words and is killed with SIGKILL; a
second one resumes the turn. The page must say the worker was lost, drop the unfinished words (the
messages the ``absurd-attempt`` event names) and end with exactly the stored answer.

Without Chromium the test fails rather than skips (see ``test_admin_browser.py``).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from django_absurd_agents.models import Conversation, Turn
from tests import event_tasks
from tests.test_admin_browser import DevToolsPipe
from tests.test_event_log import gates, worker_env  # noqa: F401
from tests.test_live_browser import browser, serve_asgi  # noqa: F401
from tests.test_worker import WorkerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent

PAGE_URLS = '''
from pathlib import Path

from django.http import HttpResponse
from django.template import engines
from django.urls import include, path

import tests.event_tasks  # noqa: F401  (the narrator chat agent)

DOCS = Path({docs!r}).read_text()


def docs_snippet():
    """The html block of the docs' AG-UI section, exactly as the docs show it."""
    section = DOCS.split("## A chat with AG-UI", 1)[1]
    return section.split("```html\\n", 1)[1].split("```", 1)[0]


def page(request):
    html = engines["django"].from_string(docs_snippet()).render(request=request)
    return HttpResponse("<!doctype html><html><body>" + html + "</body></html>")


urlpatterns = [path("agents/", include("django_absurd_agents.urls")), path("page/", page)]
'''


@pytest.fixture
def site_env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:  # noqa: F811
    """The event tests' worker settings, with URLs that serve the docs' page; a 2 s lease so a kill is noticed soon."""
    settings_dir = tmp_path / "settings"  # where the event tests' worker_env wrote event_worker_settings.py
    (settings_dir / "agui_page_urls.py").write_text(PAGE_URLS.format(docs=str(ROOT / "docs" / "live-output.md")))
    (settings_dir / "agui_page_settings.py").write_text(
        "from event_worker_settings import *  # noqa: F403\n"
        "ROOT_URLCONF = 'agui_page_urls'\n"
        "ALLOWED_HOSTS = ['127.0.0.1']\n"
    )
    return {**worker_env, "DJANGO_SETTINGS_MODULE": "agui_page_settings"}


@pytest.fixture
def site(site_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    app = ["django.core.asgi:get_asgi_application", "--factory"]
    with serve_asgi(app, site_env, tmp_path / "uvicorn.log") as base:
        yield base


def page_state(browser: DevToolsPipe) -> dict[str, str]:  # noqa: F811
    value = browser.evaluate(
        "({answer: document.getElementById('answer').textContent,"
        " notice: document.getElementById('notice').textContent})"
    )
    return dict(value)


def start_worker(env: dict[str, str], log: Path, **extra: str) -> WorkerProcess:
    return WorkerProcess({**env, **extra}, log, "--queue", "agents", "--poll-interval", "0.05", "--claim-timeout", "2")


def test_the_docs_agui_page_shows_the_stored_answer_through_a_worker_kill(
    site: str,
    browser: DevToolsPipe,  # noqa: F811
    site_env: dict[str, str],
    tmp_path: Path,
) -> None:
    user = User.objects.create_user("reader")
    conversation = Conversation.objects.create(agent="narrator", owner=user)
    session = Client()
    session.force_login(user)
    browser.call("Network.setCookie", {"name": "sessionid", "value": session.cookies["sessionid"].value, "url": site})
    browser.navigate(f"{site}/page/")
    browser.evaluate(
        f"ask({json.dumps(str(conversation.pk))}, 'Tell me a story.')"
        ".then(() => (window.outcome = 'ended'), (error) => (window.outcome = 'failed: ' + error)); 0"
    )
    seen: list[dict[str, str]] = []

    def shows(predicate: Any) -> Any:
        state = page_state(browser)
        seen.append(state)
        return predicate(state)

    first = start_worker(site_env, tmp_path / "worker-1.log", EVENT_CRASH="stall")
    try:
        wait_until(
            lambda: shows(lambda s: len(s["answer"].split()) >= event_tasks.STALL_AFTER),
            "the first words of the answer",
            60,
        )
        first.process.send_signal(signal.SIGKILL)
        first.wait()
        partial = seen[-1]["answer"]
        second = start_worker(site_env, tmp_path / "worker-2.log")
        try:
            wait_until(lambda: shows(lambda s: s["notice"] == "done"), "the page to say done", 60)
        finally:
            second.close()
    finally:
        first.close()

    assert wait_until(lambda: browser.evaluate("window.outcome"), "ask() to return", 10) == "ended"
    turn = Turn.objects.get(conversation=conversation)
    assert turn.state == "completed", turn.error
    assert partial.startswith("take1 ") and turn.output.startswith("take2 ")
    assert page_state(browser)["answer"] == turn.output  # the stored assistant message, exactly
    assert any(state["notice"] == "worker lost, resuming..." for state in seen)
    # The page showed the dead attempt's words, then only beginnings of the stored answer: never both.
    texts = [state["answer"] for state in seen]
    after_the_kill = texts[texts.index(partial) :]
    assert all(text.startswith(("take1 ", "take2 ")) for text in texts if text)
    assert not [text for text in after_the_kill if "take1" in text and "take2" in text]
    assert "take1" not in page_state(browser)["answer"]
