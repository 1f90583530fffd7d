"""docs/tutorial.md, built and run as a reader would: the docs cannot drift from the code.

The tutorial is read in order. A code block whose info string has ``title="<path>"`` is a file the
reader writes, relative to the directory the reader is in (the project directory, once the tutorial
has said ``cd mysite``); ``title="<path> (add at the end)"`` appends to a file ``startproject``
wrote. A ``console`` block's ``$`` lines are run: ``django-admin`` and ``python manage.py`` with this
venv's python, ``cd`` moves; the long-running commands (``runserver``, ``absurd_worker``) and the
reader's ``kill`` are kept for the run below. Installing (``pip``, ``venv``) is skipped: the checkout
is installed in this venv already. A ``python`` block without a title (a variant to swap in) must parse.

Then the reader's story: the ask view is posted to with Django's test client (in the project's
own ``manage.py shell``), a real ``absurd_worker`` starts, is killed with SIGKILL as soon as it
prints ``model call 2: thinking`` as the tutorial says, and the second worker finishes. The pages
shown in the tutorial's ``text`` blocks (the steps at the kill, the calls at the end) are compared
with the real pages, the tutorial's example pids replaced by the workers' own.

The project gets a database of its own on the suite's server (``DATABASE_URL`` when set), dropped
afterwards.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
TOPIC = "durable execution"  # the topic the tutorial asks for
APPEND = " (add at the end)"
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
TITLE = re.compile(r'title="(?P<title>[^"]+)"')
BACKGROUND = ("runserver", "absurd_worker")
SKIPPED = ("python -m venv", ". ", "pip install", "export ")
STARTUP = 180.0  # generous: two cores shared with other test runs


@dataclass
class Block:
    lang: str
    title: str | None
    body: str


@dataclass
class Built:
    """What reading the tutorial left behind: the project and the commands kept for later."""

    project: Path
    background: list[list[str]] = field(default_factory=list)
    kills: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # command: what it printed


def blocks(markdown: str) -> list[Block]:
    found = []
    for match in FENCE.finditer(markdown):
        info = match["info"].strip()
        title = TITLE.search(info)
        found.append(Block(info.split(" ")[0], title["title"] if title else None, match["body"]))
    return found


def commands(block: Block) -> list[str]:
    return [line[2:].strip() for line in block.body.splitlines() if line.startswith("$ ")]


def python_command(command: str) -> list[str]:
    """The reader's command line, run with this venv's python."""
    argv = shlex.split(command)
    if argv[0] == "django-admin":
        return [sys.executable, "-m", "django", *argv[1:]]
    assert argv[0] == "python", f"the test does not know how to run {command!r}"
    return [sys.executable, *argv[1:]]


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = STARTUP) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build(markdown: str, workdir: Path, env: dict[str, str]) -> Built:
    """Do what the tutorial says, in order, up to the commands that run until stopped."""
    cwd = workdir
    built = Built(project=workdir)
    for block in blocks(markdown):
        if block.title is not None:
            path = block.title.removesuffix(APPEND)
            target = cwd / path
            if block.title.endswith(APPEND):
                assert target.exists(), f"{path} is to be added to, but nothing wrote it"
                with target.open("a") as file:
                    file.write("\n" + block.body)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.body)
        elif block.lang == "console":
            for command in commands(block):
                if command.startswith("cd "):
                    cwd = cwd / command.removeprefix("cd ").strip()
                    built.project = cwd
                elif command.startswith("kill "):
                    built.kills.append(command)
                elif command.startswith(SKIPPED):
                    continue
                elif any(name in command.split() for name in BACKGROUND):
                    built.background.append(python_command(command))
                else:
                    built.outputs[command] = run(python_command(command), cwd, env)
        elif block.lang == "text":
            built.texts.append(block.body)
        elif block.lang == "python":  # a variant to swap in (a real model): it must at least parse
            ast.parse(block.body)
    return built


# --- the tutorial's database -------------------------------------------------------------------


def server_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    from tests.conftest import database_url

    return database_url()


@pytest.fixture
def tutorial_database() -> Iterator[str]:
    """A database of the tutorial project's own on the suite's server, dropped afterwards."""
    params = conninfo_to_dict(server_url())
    name = f"absurd_agents_tutorial_{os.getpid()}"
    admin = make_conninfo(**{**params, "dbname": "postgres"})
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')
        conn.execute(f'create database "{name}"')
    try:
        yield make_conninfo(**{**params, "dbname": name})
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


# --- running the project -----------------------------------------------------------------------


def project_env(database: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest-django's; manage.py sets the project's
    env["DATABASE_URL"] = database
    env["PYTHONUNBUFFERED"] = "1"
    return env


CLIENT = """
import json
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
client = Client()
{body}
"""


def with_client(project: Path, env: dict[str, str], body: str) -> dict[str, object]:
    """Run ``body`` with a Django test client in the project's ``manage.py shell``; it prints ``RESULT <json>``."""
    out = run([sys.executable, "manage.py", "shell", "-v", "0", "-c", CLIENT.format(body=body)], project, env)
    [line] = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))  # type: ignore[no-any-return]


def page(project: Path, env: dict[str, str], url: str) -> str:
    body = f'response = client.get("{url}")\nprint("RESULT " + json.dumps([response.status_code, response.text]))'
    status, text = with_client(project, env, body)  # type: ignore[misc]
    assert status == 200, text
    return text  # type: ignore[no-any-return]


def items(text: str, heading: str) -> list[str]:
    """The ``<li>`` texts of the list under ``<h2>{heading}</h2>``."""
    section = text.split(f"<h2>{heading}</h2>", 1)[1].split("</ol>", 1)[0]
    return [html.unescape(item).strip() for item in re.findall(r"<li>(.*?)</li>", section, re.DOTALL)]


def shown(texts: list[str], marker: str) -> list[str]:
    """The lines of the tutorial's ``text`` block that shows ``marker``."""
    [text] = [text for text in texts if marker in text]
    return [line.strip() for line in text.strip().splitlines()]


def poll[T](what: str, check: Callable[[], T | None], timeout: float, watched: list[Worker]) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value is not None:
            return value
        for worker in watched:
            assert worker.process.poll() is None, f"{what}: the worker exited\n{worker.output()}"
        time.sleep(0.1)
    logs = "\n".join(worker.output() for worker in watched)
    raise AssertionError(f"{what}: not after {timeout} s\n{logs}")


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_worker(argv: list[str], project: Path, env: dict[str, str], log: Path) -> Worker:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=project, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    return Worker(process, log)


def task_state(database: str) -> str | None:
    with psycopg.connect(database, autocommit=True) as conn:
        row = conn.execute("select state from absurd.t_agents").fetchone()
    return None if row is None else str(row[0])


def test_the_tutorial_builds_its_project_and_survives_the_kill(tutorial_database: str, tmp_path: Path) -> None:
    markdown = TUTORIAL.read_text()
    assert 'pip install "./django-absurd-agents[embedded]"' in markdown
    env = project_env(tutorial_database)
    built = build(markdown, tmp_path, env)
    project = built.project
    assert (project / "manage.py").exists() and (project / "reports" / "tasks.py").exists()
    assert "runserver" in built.background[0]
    worker_commands = [argv for argv in built.background if "absurd_worker" in argv]
    assert len(worker_commands) == 2, built.background  # one to start, one to resume after the kill
    assert built.kills == ["kill -9 41872"]
    assert "Created Absurd queue(s): agents" in built.outputs["python manage.py migrate"]

    # The reader asks for a report on the site: the view spawns the task in its transaction.
    asked = with_client(
        project,
        env,
        'assert client.get("/").status_code == 200\n'
        f'response = client.post("/", {{"topic": "{TOPIC}"}})\n'
        'print("RESULT " + json.dumps([response.status_code, response["Location"]]))',
    )
    assert asked == [302, "/reports/1/"]
    assert "Task pending, attempt 1." in page(project, env, "/reports/1/")

    workers: list[Worker] = []
    try:
        first = start_worker(worker_commands[0], project, env, tmp_path / "worker1.log")
        workers.append(first)

        # "as soon as the worker prints `model call 2: thinking`, kill it".
        def thinking() -> int | None:
            found = re.search(r"\[pid (\d+)\] model call 2: thinking", first.output())
            return int(found[1]) if found else None

        pid = poll("model call 2 started", thinking, STARTUP, [first])
        assert pid == first.process.pid
        os.kill(pid, signal.SIGKILL)
        first.process.wait(timeout=60)

        killed = page(project, env, "/reports/1/")
        assert "Task running, attempt 1." in killed
        assert items(killed, "Steps recorded") == shown(built.texts, "(attempt 1)")

        second = start_worker(worker_commands[1], project, env, tmp_path / "worker2.log")
        workers.append(second)
        poll("the task completed", lambda: task_state(tutorial_database) == "completed" or None, STARTUP, [second])

        done = page(project, env, "/reports/1/")
        pids = {"41872": str(first.process.pid), "41955": str(second.process.pid)}
        expected_calls = [re.sub(r"\d+$", lambda found: pids[found[0]], line) for line in shown(built.texts, "by pid")]
        assert items(done, "Calls made") == expected_calls
        steps = items(done, "Steps recorded")
        assert steps[:2] == shown(built.texts, "(attempt 1)")
        assert len(steps) == 5 and all(step.endswith("(attempt 2)") for step in steps[2:]), steps
        assert "Task completed, attempt 2." in done
        assert f"<h2>{TOPIC.title()}</h2>" in done
        assert "The agent said: Report 1 is saved." in done
        assert second.output().count("thinking for") == 2  # model calls 2 and 3; call 1 was replayed

        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(timeout=60) == 0, second.output()
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(timeout=30)
