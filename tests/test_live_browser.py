"""The example's chat page in a real headless Chromium, served by uvicorn (ASGI), with a worker killed mid-answer.

The page sends a message through its form, then follows the turn's event log with ``EventSource``
(``static/analyst/live.js``). The test watches the page the way a person would: the first words of
the answer appear while the turn is still running; the worker is killed with SIGKILL while the answer
is being written; a second worker resumes the turn, the page says "worker lost, resuming..." and drops
the unfinished words; the page ends with exactly the stored answer. Every text the page showed along
the way is a beginning of that answer, so no word was ever shown twice.

Without Chromium the test fails rather than skips (see ``test_admin_browser.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from django_absurd_agents.models import Conversation, Turn
from tests.test_admin_browser import CHROMIUM, MISSING_CHROMIUM, DevToolsPipe
from tests.test_worker import WorkerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "How is Globex doing?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def site_env(worker_env: dict[str, str], clean_queues: None, tmp_path: Path) -> dict[str, str]:
    """The example site's URLs and static files on the test database; leases of 2 s so a kill is noticed soon."""
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / "live_site_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "INSTALLED_APPS = [*INSTALLED_APPS, 'django.contrib.staticfiles']  # noqa: F405\n"
        "ROOT_URLCONF = 'example_project.urls'\n"
        "ALLOWED_HOSTS = ['127.0.0.1']\n"
        "DEBUG = True  # static files, as make serve does\n"
    )
    env = dict(worker_env)
    env["DJANGO_SETTINGS_MODULE"] = "live_site_settings"
    env["PYTHONPATH"] = os.pathsep.join([str(settings_dir), str(ROOT), str(ROOT / "example_project")])
    env["EXAMPLE_MODEL_DELAY"] = "4"  # 1.6 s thinking, then the answer a word at a time over 2.4 s
    env.pop("EXAMPLE_MODEL", None)
    env.pop("EXAMPLE_CALL_LOG", None)
    return env


@contextlib.contextmanager
def serve_asgi(app: list[str], env: dict[str, str], log_path: Path) -> Iterator[str]:
    """uvicorn serving ``app`` (its import string and options) on a free loopback port, until the block ends."""
    port = free_port()
    with log_path.open("wb") as log:
        command = [sys.executable, "-m", "uvicorn", *app, "--host", "127.0.0.1", "--port", str(port),
                   "--timeout-graceful-shutdown", "1"]  # fmt: skip
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"uvicorn exited:\n{log_path.read_text()}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        try:
            wait_until(up, "uvicorn to listen", 60)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture
def site(site_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with serve_asgi(["example_project.asgi:application"], site_env, tmp_path / "uvicorn.log") as base:
        yield base


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevToolsPipe]:
    if CHROMIUM is None:
        pytest.fail(MISSING_CHROMIUM, pytrace=False)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    pipe = DevToolsPipe(CHROMIUM, profile)
    try:
        pipe.open_page()
        yield pipe
    finally:
        pipe.close()


def start_worker(env: dict[str, str], log: Path) -> WorkerProcess:
    return WorkerProcess(env, log, "--queue", "agents", "--poll-interval", "0.05", "--claim-timeout", "2")


BUBBLE = "document.querySelector('[data-live-events]')"


def page_state(browser: DevToolsPipe) -> dict[str, Any]:
    value = browser.evaluate(
        f"(() => {{ const b = {BUBBLE}; if (!b) return null; return {{"
        "text: b.querySelector('[data-live-text]').textContent,"
        "tools: b.querySelector('[data-live-tools]').textContent,"
        "notice: b.querySelector('[data-live-notice]').textContent,"
        "done: b.getAttribute('data-live-done')}; })()"
    )
    assert value is not None, "the page has no live answer"
    return dict(value)


def test_the_chat_page_streams_an_answer_through_a_worker_kill(
    site: str, browser: DevToolsPipe, site_env: dict[str, str], tmp_path: Path
) -> None:
    user = User.objects.create_user("reader")
    conversation = Conversation.objects.create(agent="analyst_chat", owner=user, title="Live")
    session = Client()
    session.force_login(user)
    browser.call("Network.setCookie", {"name": "sessionid", "value": session.cookies["sessionid"].value, "url": site})

    browser.navigate(f"{site}/chat/{conversation.pk}/")
    browser.submit_and_wait(
        f"document.querySelector('textarea[name=message]').value = {QUESTION!r};"
        "document.querySelector('form.card').submit();"
    )
    turn = Turn.objects.get(conversation=conversation)
    worker = start_worker(site_env, tmp_path / "worker-1.log")
    seen: list[dict[str, Any]] = []

    def shows(predicate: Any) -> Any:
        state = page_state(browser)
        seen.append(state)
        return predicate(state)

    try:
        # The first words, while the turn is still running.
        wait_until(lambda: shows(lambda s: len(s["text"].split()) >= 1), "the first words of the answer", 60)
        turn.refresh_from_db()
        assert turn.state != "completed", turn.state  # the turn has not finished
        assert "company_figures" in seen[-1]["tools"] and "recent_news" in seen[-1]["tools"]
        # Mid-answer: a few words shown, more to come. The worker dies.
        wait_until(lambda: shows(lambda s: len(s["text"].split()) >= 4), "a few words of the answer", 30)
        worker.process.send_signal(signal.SIGKILL)
        worker.wait()
        partial = seen[-1]["text"]
        turn.refresh_from_db()
        assert turn.state != "completed"

        second = start_worker(site_env, tmp_path / "worker-2.log")
        try:
            wait_until(lambda: shows(lambda s: "worker lost" in s["notice"]), "the page to say the worker was lost", 60)
            wait_until(lambda: shows(lambda s: s["done"] is not None), "the answer to end", 60)
        finally:
            second.close()
    finally:
        worker.close()

    turn.refresh_from_db()
    assert turn.state == "completed", turn.error
    final = page_state(browser)
    assert final["done"] == "completed"
    assert final["text"] == turn.output  # the stored assistant message, exactly
    assert partial and turn.output.startswith(partial.rstrip())
    # Every text the page ever showed was a beginning of the stored answer: no word was shown twice.
    for state in seen:
        assert turn.output.startswith(state["text"]), (state["text"], turn.output)
    assert final["text"].count(partial.split()[0]) == turn.output.count(partial.split()[0])
