"""The admin in a real headless Chromium: log in through the form, open an agent task, take a screenshot.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: file
descriptors 3 and 4, NUL-separated JSON), so nothing beyond the standard library and Debian's
``chromium`` package is needed, and no browser is downloaded.

Without Chromium the test fails rather than skips: a skip would let CI pass without ever opening the
admin in a browser (``.ci/run`` installs the package). The screenshot goes to the test's ``tmp_path``;
``make screenshots`` runs the browser tests with ``ABSURD_AGENTS_SCREENSHOTS`` naming ``docs/images``, and
``keep_screenshot`` copies each docs image there (``admin-task-detail.png``, shown in ``docs/admin.md``):
the only way the tracked images are rewritten.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.test.testcases import LiveServerThread

from django_absurd_agents import absurd
from tests.test_admin import run_worker, task_url
from tests.test_worker import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING_CHROMIUM = (
    "Chromium is not installed, so the admin cannot be tested in a browser: install Debian's package "
    "(`apt-get install -y chromium`; `.ci/run` does it when run as root), or deselect this test with "
    "`-m 'not slow'`."
)
# Set by `make screenshots` only: the directory the docs' images are copied to.
SCREENSHOTS_ENV = "ABSURD_AGENTS_SCREENSHOTS"
WIDTH, HEIGHT = 1400, 1500

pytestmark = pytest.mark.slow


def keep_screenshot(png: bytes, tmp_path: Path, name: str) -> Path:
    """Write ``png`` to the test's ``tmp_path`` as ``name``, and under that name to the docs' images for
    ``make screenshots`` (``$ABSURD_AGENTS_SCREENSHOTS``), never during ``make test``."""
    path = tmp_path / name
    path.write_bytes(png)
    docs_images = os.environ.get(SCREENSHOTS_ENV)
    if docs_images:
        (Path(docs_images) / name).write_bytes(png)
    return path


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are above fd 9, so that placing them on fds 3 and 4 in the child cannot clash."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends[0], ends[1]


class DevToolsPipe:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_read, self._write_fd = _high_pipe()
        self._read_fd, from_browser_write = _high_pipe()
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # The browser reads commands on fd 3 and writes replies on fd 4; a small trampoline puts the
        # pipe ends there (both are above fd 9, so neither is overwritten by the other's dup2).
        trampoline = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(to_browser_read), str(from_browser_write), binary, *flags],
            pass_fds=(to_browser_read, from_browser_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._read_fd], [], [], remaining)
            if ready:
                chunk = os.read(self._read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the debugging pipe (did it crash?)")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self._events.append(reply)

    def wait_for(self, event: str, *, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for index, seen in enumerate(self._events):
                if seen["method"] == event:
                    return self._events.pop(index)
            self._events.append(self._read_message(deadline))

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression!r} raised in the page: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def open_page(self) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )

    def navigate(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")

    def submit_and_wait(self, expression: str) -> None:
        self._events.clear()
        self.evaluate(expression)
        self.wait_for("Page.loadEventFired")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write_fd)
        os.close(self._read_fd)


@pytest.fixture
def site(transactional_db: Any, settings: Any) -> Iterator[str]:
    """A live server that also serves the admin's CSS (the test settings do not install staticfiles,
    which pytest-django's ``live_server`` would need for that)."""
    settings.ALLOWED_HOSTS = ["localhost"]
    server = LiveServerThread("localhost", StaticFilesHandler, port=0)
    server.daemon = True
    server.start()
    server.is_ready.wait()
    if server.error:
        raise server.error
    try:
        yield f"http://localhost:{server.port}"
    finally:
        server.terminate()


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


@pytest.mark.django_db(transaction=True)
def test_log_in_open_an_agent_task_and_take_a_screenshot(
    site: str, browser: DevToolsPipe, clean_queues: None, tmp_path: Path
) -> None:
    User.objects.create_superuser("admin", "admin@example.org", "correct horse battery")
    task_id = absurd.spawn_sync("analyse", {"prompt": "How is ACME doing today?"})["task_id"]
    run_worker()
    detail = task_url("agents", task_id)

    browser.navigate(f"{site}/admin/login/?next={detail}")
    assert browser.evaluate("document.title").startswith("Log in")
    browser.submit_and_wait(
        "document.querySelector('#id_username').value = 'admin';"
        "document.querySelector('#id_password').value = 'correct horse battery';"
        "document.querySelector('#login-form').submit();"
    )
    assert browser.evaluate("location.pathname") == detail
    text = browser.evaluate("document.body.innerText")
    assert browser.evaluate("getComputedStyle(document.body).fontFamily") != "", "the admin's CSS did not load"
    assert browser.evaluate("getComputedStyle(document.querySelector('#header')).display") == "flex"
    for expected in ("analyse", "completed", "Model request 1", "Tool quote", "ACME", "12.5", "done: quote="):
        assert expected in text, expected
    # This agent does not write the event log: the live panel reads its end and says how to switch it on.
    panel = "document.querySelector('[data-live-events]')"
    done = f"{panel}.getAttribute('data-live-done') === 'completed'"
    wait_until(lambda: browser.evaluate(done), "the live panel to read the end of the event log", 15)
    said = browser.evaluate(f"{panel}.textContent")
    assert "This task logged no events" in said and "event_log=True" in said
    shot = browser.call("Page.captureScreenshot", {"format": "png"})["data"]
    png = base64.b64decode(shot)
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    keep_screenshot(png, tmp_path, "admin-task-detail.png")
