"""The live admin pages in a real headless Chromium: they change while the page stays loaded.

Each test marks the page's ``window`` once it is loaded; the mark is still there at the end, so what
changed came from ``admin_live.js`` swapping regions in place, not from a reload. What a page shows is
polled with a deadline (its refresh interval is a few seconds, fixed by the template).

* The overview counts a task spawned after the page was opened, but not while its tab is hidden (it
  catches up when the tab is shown); the worker list shows a worker that
  reported itself after it was opened; when the permission is taken away the page stops refreshing and
  says why, and so it does when the session ends.
* A task's page follows the task's event log while a worker streams the answer: the first words appear,
  the worker is killed with SIGKILL, a second worker resumes, the panel says "worker lost, resuming" and
  drops the dead attempt's words, and the page's state, runs and timeline catch up by themselves.

* A project's ``EVENTS_ACCESS`` that refuses the log: the task page opens, its panel says it may not read it.
* The task page of ``make demo``'s run (the example's report agent, its worker SIGKILLed in the middle of
  a model call) shows two attempts on its timeline and the resume in its event log.

Screenshots go to ``tmp_path``; ``make screenshots`` also copies the live task page to
``docs/images/admin-task-live.png``, and the demo task's timeline to ``docs/images/demo-task-timeline.png``
(the README's) and, with its runs, ``admin-task-timeline.png`` (see ``test_admin_browser.SCREENSHOTS_ENV``).
"""

from __future__ import annotations

import base64
import io
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from analyst.models import ReportRequest
from analyst.reports import task_queue
from analyst.scripted import DELAY_ENV
from django.contrib.auth.models import Permission, User
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from django_absurd_agents import absurd
from django_absurd_agents.models import Worker
from tests.event_tasks import STALL_AFTER, story
from tests.test_admin import make_user, task_url
from tests.test_admin_browser import DevToolsPipe, browser, keep_screenshot, site  # noqa: F401  (fixtures)
from tests.test_event_log import NO_RETRY_DELAY, output_of
from tests.test_worker import WorkerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REFRESH_DEADLINE = 15.0
"""A page refreshes every 3 to 5 seconds: 15 s is three chances, on a loaded machine."""
MARK = "window.__absurdNotReloaded"
STATUS = "document.querySelector('[data-live-status]').textContent"
PANEL = "document.querySelector('[data-live-events]')"


def log_in(browser: DevToolsPipe, site: str, username: str, password: str, then: str) -> None:  # noqa: F811
    browser.navigate(f"{site}/admin/login/?next={then}")
    browser.submit_and_wait(
        f"document.querySelector('#id_username').value = {username!r};"
        f"document.querySelector('#id_password').value = {password!r};"
        "document.querySelector('#login-form').submit();"
    )
    assert browser.evaluate("location.pathname") == then


def mark_loaded(browser: DevToolsPipe) -> None:  # noqa: F811
    browser.evaluate(f"{MARK} = true")


def shows(browser: DevToolsPipe, expression: str, what: str, timeout: float = REFRESH_DEADLINE) -> Any:  # noqa: F811
    """Poll ``expression`` in the page until it is truthy; the page must not have been reloaded meanwhile."""
    value = wait_until(lambda: browser.evaluate(expression), what, timeout)
    assert browser.evaluate(MARK) is True, "the page was reloaded"
    return value


def queue_total(queue: str) -> str:
    """A JavaScript expression: the overview's Total cell of ``queue``."""
    return (
        "(() => { for (const row of document.querySelectorAll('#absurd-overview tbody tr')) {"
        f" if (row.querySelector('th').textContent.trim() === {queue!r}) {{"
        " const cells = row.querySelectorAll('td'); return cells[cells.length - 3].textContent.trim(); } }"
        " return null; })()"
    )


def report_worker(worker_id: str) -> None:
    now = timezone.now()
    Worker.objects.create(
        worker_id=worker_id,
        host="box-7",
        pid=777,
        queues=["agents"],
        concurrency=2,
        version="0.1.0",
        heartbeat_interval=5.0,
        started=now,
        last_heartbeat=now,
    )


def test_the_overview_and_the_worker_list_change_without_a_reload(
    site: str,  # noqa: F811
    browser: DevToolsPipe,  # noqa: F811
    clean_queues: None,
) -> None:
    operator = make_user("operator", "view_absurdtask", "view_worker")
    overview = reverse("admin:absurd_agents_absurdtask_overview")
    log_in(browser, site, "operator", "pw", overview)
    mark_loaded(browser)
    assert browser.evaluate(queue_total("agents")) == "0"
    assert "live" in browser.evaluate(STATUS)

    absurd.spawn_sync("analyse", {"prompt": "counted live"})  # committed: this test is transactional
    shows(browser, f"{queue_total('agents')} === '1'", "the overview to count the new task")
    assert "updated" in browser.evaluate(STATUS)

    # A hidden tab fetches nothing, and catches up as soon as it is shown again.
    browser.evaluate(
        "window.__fetches = 0; const fetchPage = window.fetch;"
        " window.fetch = (...args) => { window.__fetches += 1; return fetchPage(...args); };"
        " Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});"
        " document.dispatchEvent(new Event('visibilitychange'));"
    )
    absurd.spawn_sync("analyse", {"prompt": "counted once the tab is shown"})
    shows(browser, f"{STATUS}.includes('paused')", "the refresh to pause")
    assert browser.evaluate("window.__fetches") == 0 and browser.evaluate(queue_total("agents")) == "1"
    browser.evaluate(
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});"
        " document.dispatchEvent(new Event('visibilitychange'));"
    )
    shows(browser, f"{queue_total('agents')} === '2'", "the overview to catch up", timeout=5)

    browser.navigate(f"{site}{reverse('admin:absurd_agents_worker_changelist')}")
    mark_loaded(browser)
    assert "w-late" not in browser.evaluate("document.querySelector('#absurd-workers-live').textContent")
    report_worker("w-late")
    shows(browser, "document.querySelector('#absurd-workers-live').textContent.includes('w-late')", "the new worker")
    assert "alive" in browser.evaluate("document.querySelector('#result_list').textContent")

    operator.user_permissions.remove(Permission.objects.get(codename="view_worker"))
    assert "403" in shows(browser, f"{STATUS}.includes('403') && {STATUS}", "the list to stop on a 403")
    assert "w-late" in browser.evaluate("document.querySelector('#absurd-workers-live').textContent")  # left as is

    browser.navigate(f"{site}{overview}")
    mark_loaded(browser)
    Session.objects.all().delete()  # logged out elsewhere, or the session expired
    assert "logged out" in shows(browser, f"{STATUS}.includes('logged out') && {STATUS}", "a stop on the login page")


@pytest.fixture
def story_workers(
    worker_env: dict[str, str], clean_queues: None, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Worker processes running ``tests.event_tasks`` (the storyteller writes its event log), leases of 2 s."""
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / "story_worker_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "ABSURD_AGENTS = {**ABSURD_AGENTS, 'TASK_MODULES': ['tests.event_tasks']}  # noqa: F405\n"
    )
    gates = tmp_path / "gates"
    gates.mkdir()
    env = {
        **worker_env,
        "DJANGO_SETTINGS_MODULE": "story_worker_settings",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(settings_dir), os.getcwd(), worker_env.get("PYTHONPATH")])),
        "EVENT_GATE_DIR": str(gates),
        "STORY_WORD_DELAY": "0.05",  # a model's pace: the answer takes about two seconds
    }
    started: list[WorkerProcess] = []

    def start(**extra: str) -> WorkerProcess:
        args = ["--queue", "agents", "--poll-interval", "0.05", "--claim-timeout", "2"]
        worker = WorkerProcess({**env, **extra}, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def panel_text(browser: DevToolsPipe) -> str:  # noqa: F811
    return str(browser.evaluate(f"{PANEL}.querySelector('[data-live-events-log]').textContent"))


def test_a_task_page_follows_the_event_log_through_a_worker_kill(
    site: str,  # noqa: F811
    browser: DevToolsPipe,  # noqa: F811
    story_workers: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    User.objects.create_superuser("admin", "admin@example.org", "correct horse battery")
    task_id = absurd.spawn_sync("event_story", {}, retry_strategy=NO_RETRY_DELAY)["task_id"]
    page = task_url("agents", task_id)
    log_in(browser, site, "admin", "correct horse battery", page)
    mark_loaded(browser)
    assert browser.evaluate("document.querySelector('#absurd-task-title .absurd-state').textContent") == "pending"
    shows(browser, f"{PANEL}.textContent.includes('event_log=True')", "the panel to wait for events")

    first = story_workers(EVENT_CRASH="stall")  # stops after a few words until it is killed
    words = "".join(story(1)[:STALL_AFTER]).strip()  # what the first attempt writes before it stalls
    shows(browser, f"{PANEL}.textContent.includes({words!r})", "the first words, live", timeout=60)
    text = panel_text(browser)
    assert "→ chapter(" in text and "= Chapter 1: the crash" in text
    shows(browser, "document.querySelector('#absurd-task-title').textContent.includes('running')", "running")
    first.signal(signal.SIGKILL)
    first.wait()

    story_workers()
    shows(browser, f"{PANEL}.getAttribute('data-live-done') === 'completed'", "the end of the log", timeout=60)
    text = panel_text(browser)
    assert "worker lost, resuming… (attempt 2)" in text
    assert output_of(task_id) in text and output_of(task_id).startswith("take2 ")
    assert "take1" not in text  # the words of the dead attempt are gone, none shown twice
    assert text.count("→ chapter(") == 1  # the tool's step was recorded before the kill: called once
    assert "■ completed" in text

    shows(browser, "document.querySelector('#absurd-task-title').textContent.includes('completed')", "completed")
    shows(browser, "document.querySelectorAll('#absurd-runs tbody tr').length === 2", "both runs")
    shows(browser, "document.querySelectorAll('#absurd-timeline .lane').length === 2", "two lanes")
    assert "lease expired" in browser.evaluate("document.querySelector('#absurd-timeline').textContent")
    assert "over" in shows(browser, f"{STATUS}.includes('over') && {STATUS}", "the refresh to stop")

    png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"})["data"])
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    keep_screenshot(png, tmp_path, "admin-task-live.png")


def test_the_demos_task_page_shows_the_crash_and_the_resume(
    site: str,  # noqa: F811
    browser: DevToolsPipe,  # noqa: F811
    worker_env: dict[str, str],
    clean_queues: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``make demo``'s run (a report agent's worker SIGKILLed mid-run, resumed by a second one), then its page.

    The timeline's picture is the README's (``docs/images/demo-task-timeline.png``); with the runs below it,
    the admin docs' (``admin-task-timeline.png``).
    """
    monkeypatch.setenv("DATABASE_URL", worker_env["DATABASE_URL"])  # the demo's workers: the example's settings
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "example_project.settings")
    monkeypatch.setenv(DELAY_ENV, "0.5")  # long enough for the kill to land while model call 2 is in flight
    monkeypatch.delenv("EXAMPLE_MODEL", raising=False)
    call_command("demo", stdout=io.StringIO(), no_color=True)
    task_id = str(ReportRequest.objects.get().task_id)

    log_in(browser, site, "admin", "admin", task_url(task_queue(), task_id))  # the demo's superuser
    assert browser.evaluate("document.querySelectorAll('#absurd-timeline .lane').length") == 2
    assert browser.evaluate("document.querySelectorAll('#absurd-timeline .mark').length") == 6
    assert "lease expired" in browser.evaluate("document.querySelector('#absurd-timeline').textContent")
    wait_until(lambda: browser.evaluate(f"{PANEL}.getAttribute('data-live-done')") == "completed", "the event log")
    text = panel_text(browser)
    assert "worker lost, resuming… (attempt 2)" in text and text.count("→ save_report(") == 1
    with_runs = screenshot_of(browser, "#absurd-task-progress", "#absurd-runs")
    keep_screenshot(with_runs, tmp_path, "admin-task-timeline.png")
    timeline = screenshot_of(browser, "#absurd-task-progress", ".absurd-timeline-box")
    keep_screenshot(timeline, tmp_path, "demo-task-timeline.png")


def screenshot_of(browser: DevToolsPipe, top: str, bottom: str) -> bytes:  # noqa: F811
    """A picture of the page from the top of ``top`` to the bottom of ``bottom``, as wide as ``top``."""
    box = browser.evaluate(
        f"(() => {{ const top = document.querySelector({top!r}).getBoundingClientRect();"
        f" const bottom = document.querySelector({bottom!r}).getBoundingClientRect();"
        " return {x: top.x, y: top.y + window.scrollY, width: top.width, height: bottom.bottom - top.top + 12}; })()"
    )
    clip = {**box, "scale": 1}
    shot = browser.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    return png


def test_the_panel_says_so_when_the_projects_rule_refuses_the_event_log(
    site: str,  # noqa: F811
    browser: DevToolsPipe,  # noqa: F811
    clean_queues: None,
    settings: Any,
) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "EVENTS_ACCESS": "tests.test_admin_live_browser.nobody"}
    make_user("operator", "view_absurdtask")
    task_id = absurd.spawn_sync("analyse", {"prompt": "not for your eyes"})["task_id"]
    log_in(browser, site, "operator", "pw", task_url("agents", task_id))  # the page itself: the view permission
    mark_loaded(browser)
    shows(browser, f"{PANEL}.getAttribute('data-live-done') === 'error'", "the panel to give up")
    assert "EVENTS_ACCESS" in browser.evaluate(f"{PANEL}.textContent")


def nobody(request: Any, task_id: str) -> bool:
    """A project's ``EVENTS_ACCESS`` that lets nobody read an event log."""
    return False
