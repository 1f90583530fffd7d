"""The example project: its pages with the test client, and ``make demo``'s run.

The analyst app lives in ``example_project/`` and is installed in the test settings, so its views,
tasks and demo code run here against the test database. Tasks are drained in this process with
``work_batch`` (the scripted model answers at once); the slow tests start real worker processes
and kill one of them.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import analyst.tasks  # noqa: F401  (registers write_report and the chat agent, as a worker would)
import pytest
from analyst import demo
from analyst.call_log import CALL_LOG_ENV, Call, read_call_log
from analyst.models import Report, ReportRequest
from analyst.reports import TASK_NAME, Progress, Run, Step, load_progress, request_report, step_label
from analyst.scripted import DELAY_ENV
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test import Client

from django_absurd_agents import InvalidParams, absurd
from django_absurd_agents.models import Conversation, Turn

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("example_project.urls")]

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "example_project" / "manage.py"

REPORT_STEPS = [
    "analyst__model.request_stream",
    "analyst__function_toolset__<agent>.call_tool:company_figures",
    "analyst__function_toolset__<agent>.call_tool:recent_news",
    "analyst__model.request_stream#2",
    "analyst__function_toolset__<agent>.call_tool:save_report",
    "analyst__model.request_stream#3",
]


@pytest.fixture(autouse=True)
def _example_env(clean_queues: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The scripted model without its delay, its calls logged to a file of this test."""
    monkeypatch.delenv("EXAMPLE_MODEL", raising=False)
    monkeypatch.setenv(DELAY_ENV, "0")
    call_log = tmp_path / "calls.log"
    monkeypatch.setenv(CALL_LOG_ENV, str(call_log))
    yield call_log


@pytest.fixture
def call_log(_example_env: Path) -> Path:
    return _example_env


def drain(until: Callable[[], bool], timeout: float = 30.0) -> None:
    """Run queued tasks in this process until ``until()`` holds; fail after ``timeout`` seconds."""

    async def work() -> None:
        deadline = time.monotonic() + timeout
        try:
            while not await sync_to_async(until)():
                if time.monotonic() > deadline:
                    raise AssertionError(f"tasks not done after {timeout} s")
                await absurd.work_batch(worker_id="test", claim_timeout=10, batch_size=4)
        finally:
            await absurd.close()

    async_to_sync(work)()


def task_done(task_id: object) -> Callable[[], bool]:
    def check() -> bool:
        progress = load_progress(str(task_id))
        return progress is not None and progress.done

    return check


# --- asking for a report ---------------------------------------------------------------------


def test_the_ask_page_offers_the_companies(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert b"Acme Robotics" in response.content and b"Umbra Biotech" in response.content


def test_asking_saves_the_request_and_spawns_its_task_then_redirects(client: Client) -> None:
    response = client.post("/", {"company": "Globex Energy", "question": "Is the debt a problem?"})
    request = ReportRequest.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/reports/{request.pk}/"
    with connection.cursor() as cursor:
        cursor.execute("select task_name, params, state from absurd.t_agents where task_id = %s", [request.task_id])
        name, params, state = cursor.fetchone()
    assert (name, state) == (TASK_NAME, "pending")
    assert json.loads(params) == {
        "request_id": request.pk,
        "company": "Globex Energy",
        "question": "Is the debt a problem?",
    }


def test_a_spawn_that_fails_leaves_no_request_behind(client: Client, settings: Any) -> None:
    # Params over the size limit make the spawn refuse after the request row was written: the
    # request's transaction must take the row back with it.
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "MAX_PARAMS_BYTES": 20}
    with pytest.raises(InvalidParams):
        client.post("/", {"company": "Acme Robotics", "question": "How is it doing?"})
    assert not ReportRequest.objects.exists()
    with connection.cursor() as cursor:
        cursor.execute("select count(*) from absurd.t_agents")
        assert cursor.fetchone()[0] == 0


def test_an_invalid_form_spawns_nothing(client: Client) -> None:
    response = client.post("/", {"company": "Nonexistent Corp", "question": "?"})
    assert response.status_code == 200 and b"Select a valid choice" in response.content
    assert not ReportRequest.objects.exists()


# --- following it ----------------------------------------------------------------------------


def test_the_status_page_follows_the_run_live_then_shows_answer_steps_and_report(client: Client) -> None:
    client.post("/", {"company": "Acme Robotics", "question": "How is it doing?"})
    request = ReportRequest.objects.get()
    pending = client.get(f"/reports/{request.pk}/")
    assert pending.status_code == 200 and b"pending" in pending.content
    assert b'http-equiv="refresh"' not in pending.content  # no refreshing: live.js follows the run's events
    assert f'data-live-events="/agents/tasks/{request.task_id}/events"'.encode() in pending.content
    assert b"/static/analyst/live.js" in pending.content

    drain(task_done(request.task_id))

    done = client.get(f"/reports/{request.pk}/")
    html = done.content.decode()
    assert "data-live-events" not in html
    report = Report.objects.get(task_id=request.task_id)
    assert f"I saved report #{report.pk}" in html
    assert f"Report #{report.pk}: {report.title}" in html
    for label in ("model call 1", "tool company_figures", "tool recent_news", "model call 2", "tool save_report"):
        assert label in html
    assert "asked for company_figures(company=&#x27;Acme Robotics&#x27;)" in html


def test_the_async_view_returns_the_same_progress_as_json(client: Client) -> None:
    request = request_report("Initech Software", "Should I worry?")
    assert client.get(f"/reports/{request.pk}.json").json()["state"] == "pending"
    drain(task_done(request.task_id))

    data = client.get(f"/reports/{request.pk}.json").json()
    assert data["state"] == "completed" and data["done"] is True
    assert [step["name"] for step in data["steps"]] == REPORT_STEPS
    assert {step["attempt"] for step in data["steps"]} == {1}
    assert [run["outcome"] for run in data["runs"]] == ["completed"]
    assert len(data["reports"]) == 1 and data["reports"][0]["title"].startswith("Initech Software: under pressure")
    assert client.get("/reports/999999.json").status_code == 404


def test_anyone_may_follow_a_report_task_but_not_someone_elses_chat(client: Client, settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "EVENTS_ACCESS": "analyst.access.can_read_events"}
    request = request_report("Initech Software", "Should I worry?")
    drain(task_done(request.task_id))
    stream = client.get(f"/agents/tasks/{request.task_id}/events")  # anonymous: the report pages are public
    assert stream.status_code == 200
    body = b"".join(stream.streaming_content).decode()
    assert "event: function_tool_call" in body and "event: part_delta" in body and body.endswith('"completed"}\n\n')

    owner = User.objects.create_user("owner")
    turn = Conversation.objects.create(agent="analyst_chat", owner=owner).send("How is Globex doing?")
    assert client.get(f"/agents/tasks/{turn.task_id}/events").status_code == 403
    client.force_login(owner)
    assert client.get(f"/agents/tasks/{turn.task_id}/events").status_code == 200


def test_step_labels() -> None:
    assert step_label("analyst__model.request") == "model call 1"
    assert step_label("analyst__model.request_stream") == "model call 1"
    assert step_label("analyst__model.request_stream#3") == "model call 3"
    assert step_label("analyst__function_toolset__<agent>.call_tool:save_report") == "tool save_report"
    assert step_label("analyst__function_toolset__<agent>.call_tool:quote#2") == "tool quote (call 2)"
    assert step_label("load_history") == "load_history"


# --- chatting --------------------------------------------------------------------------------


def test_chat_sends_turns_and_shows_answers_that_remember_the_conversation(client: Client) -> None:
    user = User.objects.create_user("ada", password="pw")
    client.force_login(user)
    response = client.post("/chat/new/")
    conversation = Conversation.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/chat/{conversation.pk}/"
    assert conversation.owner == user and conversation.agent == "analyst_chat"

    assert client.post(f"/chat/{conversation.pk}/", {"message": "How is Globex doing?"}).status_code == 302
    waiting = client.get(f"/chat/{conversation.pk}/")
    pending_turn = Turn.objects.get()
    assert b"How is Globex doing?" in waiting.content
    assert f'data-live-events="/agents/tasks/{pending_turn.task_id}/events"'.encode() in waiting.content
    drain(lambda: all(turn.is_terminal for turn in Turn.objects.all()))

    client.post(f"/chat/{conversation.pk}/", {"message": "What should I watch there?"})
    drain(lambda: all(turn.is_terminal for turn in Turn.objects.all()))

    page = client.get(f"/chat/{conversation.pk}/").content.decode()
    assert "data-live-events" not in page
    first, second = Turn.objects.filter(conversation=conversation).order_by("sequence")
    assert first.state == second.state == "completed"
    assert first.output.startswith("Globex Energy (Utilities) made $2,310M")
    # The follow-up names no company: the answer comes from the history the turn was given.
    assert second.output.startswith("Still on Globex Energy. What I would watch:")
    assert "net debt of $640M" in second.output
    assert "Still on Globex Energy" in page


def test_chat_pages_need_a_login_and_show_only_your_own_conversations(client: Client) -> None:
    owner = User.objects.create_user("owner", password="pw")
    conversation = Conversation.objects.create(agent="analyst_chat", owner=owner)
    anonymous = client.get(f"/chat/{conversation.pk}/")
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/admin/login/")

    client.force_login(User.objects.create_user("mallory", password="pw"))
    assert client.get(f"/chat/{conversation.pk}/").status_code == 404
    assert client.post(f"/chat/{conversation.pk}/", {"message": "hi"}).status_code == 404
    assert str(conversation.pk) not in client.get("/chat/").content.decode()
    assert not Turn.objects.exists()


# --- the demo's proof ------------------------------------------------------------------------


def test_the_demo_proof_holds_for_a_run_in_this_process(call_log: Path) -> None:
    # Another task run by the same worker logs to the same file: the proof must count only its own.
    other = request_report("Globex Energy", "And this one?")
    request = request_report("Acme Robotics", "How is it doing?")
    drain(lambda: task_done(other.task_id)() and task_done(request.task_id)())
    pid = os.getpid()

    proof = demo.collect_proof(str(request.task_id), call_log, {pid: "this process"})

    assert proof.ok, proof.checks
    assert [step.name for step in proof.progress.steps] == REPORT_STEPS
    task = str(request.task_id)
    assert len(read_call_log(call_log)) == 12
    assert read_call_log(call_log, task) == [
        Call("model", "1", pid, task),
        Call("tool", "company_figures", pid, task),
        Call("tool", "recent_news", pid, task),
        Call("model", "2", pid, task),
        Call("tool", "save_report", pid, task),
        Call("model", "3", pid, task),
    ]
    texts = [check.text for check in proof.checks]
    assert texts[0] == "each of the 3 model calls was paid for once: calls 1, 2, 3 by this process"
    assert "save_report, the side effect, ran once (this process) and wrote 1 Report row" in texts


def _progress(steps: list[tuple[str, int]], runs: int = 2) -> Progress:
    now = datetime.datetime.now(datetime.UTC)
    return Progress(
        task_id="t",
        state="completed",
        result={"answer": "ok"},
        failure=None,
        steps=[Step(name=name, attempt=attempt, recorded_at=now, state=None) for name, attempt in steps],
        runs=[
            Run(
                attempt=n,
                state="failed" if n < runs else "completed",
                worker=None,
                started_at=None,
                ended_at=None,
                failure=None,
            )
            for n in range(1, runs + 1)
        ],
    )


def test_the_demo_proof_fails_when_a_recorded_call_is_made_again() -> None:
    """A proof that cannot fail proves nothing: work done twice must show up."""
    progress = _progress(
        [(REPORT_STEPS[0], 1), (REPORT_STEPS[1], 1), (REPORT_STEPS[2], 1), *((s, 2) for s in REPORT_STEPS[3:])]
    )
    honest = [
        Call("model", "1", 1),
        Call("tool", "company_figures", 1),
        Call("tool", "recent_news", 1),
        Call("model", "2", 2),
        Call("tool", "save_report", 2),
        Call("model", "3", 2),
    ]
    names = {1: "worker 1", 2: "worker 2"}
    assert demo.prove(progress, honest, 1, names, killed_pid=1).ok

    paid_twice = [*honest, Call("model", "1", 2)]
    proof = demo.prove(progress, paid_twice, 1, names, killed_pid=1)
    assert not proof.ok
    assert [c.text for c in proof.checks if not c.ok] == [
        "model call(s) 1 were paid for more than once",
        "recorded before the kill but run again: model call 1",
    ]

    tool_again = [*honest, Call("tool", "company_figures", 2)]
    assert not demo.prove(progress, tool_again, 1, names, killed_pid=1).ok
    side_effect_twice = [*honest, Call("tool", "save_report", 2)]
    assert not demo.prove(progress, side_effect_twice, 2, names, killed_pid=1).ok


@pytest.mark.slow
def test_the_demo_command_kills_a_worker_and_resumes_without_paying_twice(
    worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo's workers inherit this environment: the example's settings on the test database, and
    # a model delay long enough for the kill to land while model call 2 is in flight.
    monkeypatch.setenv("DATABASE_URL", worker_env["DATABASE_URL"])
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "example_project.settings")
    monkeypatch.setenv(DELAY_ENV, "0.5")
    out = io.StringIO()

    call_command("demo", stdout=out, no_color=True)

    text = out.getvalue()
    assert "✗" not in text, text
    assert "worker 1 killed with SIGKILL while model call 2 was in flight" in text
    assert re.search(r"each of the 3 model calls was paid for once: call 1 by worker 1; calls 2, 3 by\s+worker 2", text)
    assert "save_report, the side effect, ran once (worker 2) and wrote 1 Report row" in text
    assert "1. failed: $ClaimTimeout: worker did not finish task within claim interval" in text
    assert "created admin / admin" in text
    request = ReportRequest.objects.get()
    progress = load_progress(str(request.task_id))
    assert progress is not None and progress.state == "completed"
    assert [step.name for step in progress.steps] == REPORT_STEPS
    assert [step.attempt for step in progress.steps] == [1, 1, 1, 2, 2, 2]
    assert Report.objects.filter(task_id=request.task_id).count() == 1
    assert User.objects.get(username="admin").is_superuser


# --- make serve ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _poll(what: str, check: Callable[[], Any], timeout: float, process: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"serve exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_serve_runs_the_site_and_a_worker_and_ctrl_c_stops_both(worker_env: dict[str, str]) -> None:
    port = _free_port()
    env = {**worker_env, DELAY_ENV: "0", "DJANGO_SETTINGS_MODULE": "example_project.settings"}
    env.pop(CALL_LOG_ENV, None)
    serve = subprocess.Popen(
        [sys.executable, str(MANAGE), "serve", f"127.0.0.1:{port}", "--noreload"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar := CookieJar()))
    try:
        _poll("the site", lambda: opener.open(f"{base}/", timeout=2).status == 200, 60, serve)
        token = next(cookie.value for cookie in jar if cookie.name == "csrftoken")
        body = urlencode({"csrfmiddlewaretoken": token, "company": "Umbra Biotech", "question": "Is it worth it?"})
        answer = opener.open(f"{base}/", data=body.encode(), timeout=10)
        status_url = answer.geturl()
        assert re.fullmatch(rf"{base}/reports/\d+/", status_url)

        def completed() -> dict[str, Any] | None:
            data = json.loads(opener.open(status_url.rstrip("/") + ".json", timeout=5).read())
            return data if data["done"] else None

        data = _poll("the report to be written by serve's worker", completed, 60, serve)
        assert data["state"] == "completed" and data["answer"].startswith("I saved report #")
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)
        output = serve.communicate(timeout=60)[0].decode()
    assert serve.returncode == 0, output
    assert "Stopped." in output and "Worker" in output and "stopped" in output
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/", timeout=2)
