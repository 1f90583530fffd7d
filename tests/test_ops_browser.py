"""The operations pages in a real headless Chromium: the overview and its charts, the worker list, a task's timeline.

Driven like ``test_admin_browser`` (Chromium at /usr/bin/chromium over the DevTools pipe; a missing
Chromium fails, never skips). Screenshots go to the test's temporary directory, never over tracked
files; ``make screenshots`` copies the overview's and the worker list's to ``docs/images``
(``admin-overview.png``, ``admin-workers.png``), shown in ``docs/admin.md``. The docs' timeline is a real
crash's, taken by ``test_admin_live_browser``; this one's first attempt is faked in SQL.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone

from django_absurd_agents.models import Worker
from tests.test_admin import task_url
from tests.test_admin_browser import (  # noqa: F401  (fixtures)
    HEIGHT,
    WIDTH,
    DevToolsPipe,
    browser,
    keep_screenshot,
    site,
)
from tests.test_admin_charts import crash_and_resume

pytestmark = pytest.mark.slow


def screenshot(browser: DevToolsPipe, tmp_path: Path, name: str, *, for_docs: bool = True) -> bytes:  # noqa: F811
    """The window down to the end of the page's content (no empty screen below a short page)."""
    bottom = browser.evaluate("document.querySelector('#content').getBoundingClientRect().bottom + 24")
    clip = {"x": 0, "y": 0, "width": WIDTH, "height": min(HEIGHT, max(400, int(bottom))), "scale": 1}
    png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png", "clip": clip})["data"])
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    if for_docs:
        keep_screenshot(png, tmp_path, name)
    else:
        (tmp_path / name).write_bytes(png)
    return png


def drawn_width(browser: DevToolsPipe, selector: str) -> float:  # noqa: F811
    return float(browser.evaluate(f"document.querySelector({selector!r}).getBoundingClientRect().width"))


@pytest.mark.django_db(transaction=True)
def test_overview_workers_and_timeline_in_a_browser(
    site: str,  # noqa: F811
    browser: DevToolsPipe,  # noqa: F811
    clean_queues: None,
    tmp_path: Path,
) -> None:
    User.objects.create_superuser("admin", "admin@example.org", "correct horse battery")
    task_id = crash_and_resume()
    now = timezone.now()
    Worker.objects.create(
        worker_id="rescuer",
        host="box-1",
        pid=4242,
        queues=["agents"],
        concurrency=4,
        version="0.1.0",
        heartbeat_interval=5.0,
        started=now,
        last_heartbeat=now,
        tasks_in_flight=1,
        tasks_done=12,
    )
    overview = reverse("admin:absurd_agents_absurdtask_overview")
    charts = reverse("admin:absurd_agents_absurdtask_charts")
    browser.navigate(f"{site}/admin/login/?next={overview}")
    browser.submit_and_wait(
        "document.querySelector('#id_username').value = 'admin';"
        "document.querySelector('#id_password').value = 'correct horse battery';"
        "document.querySelector('#login-form').submit();"
    )
    assert browser.evaluate("location.pathname") == overview
    assert "Runs over time" in browser.evaluate("document.querySelector('#absurd-charts-link').textContent")
    screenshot(browser, tmp_path, "admin-overview.png")

    browser.navigate(f"{site}{charts}")
    assert "Runs over time" in browser.evaluate("document.body.innerText")
    assert browser.evaluate("document.querySelectorAll('figure.absurd-chart svg').length") == 4
    assert drawn_width(browser, "figure.absurd-chart svg") > 300
    assert browser.evaluate("document.querySelectorAll('figure.absurd-chart rect').length") >= 2
    screenshot(browser, tmp_path, "charts.png", for_docs=False)

    browser.navigate(f"{site}{reverse('admin:absurd_agents_worker_changelist')}")
    text = browser.evaluate("document.body.innerText")
    assert "rescuer" in text and "box-1" in text and "alive" in text
    screenshot(browser, tmp_path, "admin-workers.png")

    browser.navigate(f"{site}{task_url('agents', task_id)}")
    assert drawn_width(browser, "#absurd-timeline") > 300
    assert browser.evaluate("document.querySelectorAll('#absurd-timeline .lane').length") == 2
    assert browser.evaluate("document.querySelectorAll('#absurd-timeline .mark').length") == 3
    assert "lease expired" in browser.evaluate("document.querySelector('#absurd-timeline').textContent")
    link = browser.evaluate(
        "document.querySelector('a.absurd-worker') && document.querySelector('a.absurd-worker').textContent"
    )
    assert link == "rescuer"
    screenshot(browser, tmp_path, "task-timeline.png", for_docs=False)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "admin-overview.png",
        "admin-workers.png",
        "charts.png",
        "task-timeline.png",
    ]
