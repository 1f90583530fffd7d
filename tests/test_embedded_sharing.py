"""The development database belongs to all of its users (issue 13): proofs with real processes.

Every user is a separate interpreter that calls ``ensure_server`` (or loads Django settings calling
``database_config()``) and is killed with SIGKILL, so no cleanup code of ours runs. The test process
itself never becomes a user: it only looks at /proc and connects with psycopg, which does not keep
the server alive. Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured

from django_absurd_agents import database, embedded, embedded_os
from tests.test_embedded import DEADLINE, finish, postgres_processes, proc_running, python, read_line, wait_for

REPO = Path(__file__).resolve().parents[1]
#: How soon the server must be gone after its last user died: "a few seconds", with slack for a busy machine.
STOP_DEADLINE = 10.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and flock")

USER = """
    import os, sys, psycopg
    from django_absurd_agents.embedded import ensure_server
    server = ensure_server(sys.argv[1])
    print(server.pid, server.owned, flush=True)
    for line in sys.stdin:  # each line asks for one query; EOF ends the process
        with psycopg.connect(server.url(), connect_timeout=5) as conn:
            print(conn.execute("select pg_postmaster_start_time()::text").fetchone()[0], flush=True)
"""

FORKING_USER = """
    import os, sys
    from django_absurd_agents.embedded import ensure_server
    server = ensure_server(sys.argv[1])
    child = os.fork()
    if child == 0:
        os.close(1)  # the parent answers; the child only lives on with the inherited lock
        sys.stdin.read()
        os._exit(0)
    print(server.pid, child, flush=True)
    sys.stdin.read()
"""


def layout_of(requested: Path) -> embedded_os._Layout:
    return embedded_os._layout(requested, embedded_os._default_run_as())


def supervisors(requested: Path) -> set[int]:
    """Live supervisor processes of the cluster in ``requested``, found by their command line."""
    lock = os.fsencode(layout_of(requested).users)
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if (
            any(arg.endswith(b"embedded_supervisor.py") for arg in argv)
            and lock in argv
            and proc_running(int(entry.name))
        ):
            found.add(int(entry.name))
    return found


def shared_memory(postmaster: int, data_dir: Path) -> tuple[int, set[Path]]:
    """The server's System V segment id (from postmaster.pid) and the POSIX segments it maps."""
    shmid = int((data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1])
    maps = Path(f"/proc/{postmaster}/maps").read_text().splitlines()
    posix = {Path(line.split()[-1]) for line in maps if "/dev/shm/PostgreSQL." in line}
    return shmid, posix


def sysv_segments() -> set[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[1]) for line in lines}


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None once it is gone: a pid's identity."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[19])  # field 22 of proc_pid_stat(5); fields[0] is field 3


def nothing_left(requested: Path) -> bool:
    layout = layout_of(requested)
    return not postgres_processes(layout.data) and not supervisors(requested)


@pytest.fixture
def pg_dir(tmp_path: Path) -> Iterator[Path]:
    """A cluster of the test's own; by the end of the test its users are gone, so the server must be too."""
    requested = tmp_path / "pg"
    yield requested
    try:
        wait_for(lambda: nothing_left(requested), timeout=STOP_DEADLINE, what="the server to stop after its users")
    finally:
        if not nothing_left(requested):
            embedded.main(["--data-dir", str(requested), "stop"])
        shutil.rmtree(embedded_os._tmp_area(requested), ignore_errors=True)


def query(user: subprocess.Popen[str]) -> str:
    """Ask ``user`` for one query; the answer is the postmaster's start time, so a restart would show."""
    assert user.stdin is not None
    user.stdin.write("query\n")
    user.stdin.flush()
    return read_line(user)


def test_killing_the_first_user_leaves_the_server_to_the_second(pg_dir: Path) -> None:
    first = python(USER, str(pg_dir))
    try:
        postmaster, owned = read_line(first).split()
        assert owned == "True"
        second = python(USER, str(pg_dir))
        try:
            assert read_line(second).split() == [postmaster, "False"]
            started_at = query(second)

            first.send_signal(signal.SIGKILL)
            assert first.wait(DEADLINE) == -signal.SIGKILL

            assert query(second) == started_at  # the same server, not a restarted one
            assert proc_running(int(postmaster))
            third = python(USER, str(pg_dir))  # a newcomer still finds it running
            try:
                assert read_line(third).split() == [postmaster, "False"]
            finally:
                finish(third)
            assert query(second) == started_at
        finally:
            finish(second)
    finally:
        finish(first)


def test_killing_every_user_leaves_nothing_running(pg_dir: Path) -> None:
    users = [python(USER, str(pg_dir)) for _ in range(3)]
    try:
        postmasters = {read_line(user).split()[0] for user in users}
        assert len(postmasters) == 1
        postmaster = int(postmasters.pop())
        layout = layout_of(pg_dir)
        processes = postgres_processes(layout.data)
        assert postmaster in processes and len(processes) > 1
        assert len(supervisors(pg_dir)) == 1
        shmid, posix = shared_memory(postmaster, layout.data)
        assert shmid in sysv_segments()
        started = {pid: start_time(pid) for pid in processes}

        def server_gone() -> bool:
            # The server's own processes, known by pid and start time: pids are reused (pid_max can be
            # 32768), and a child may still be exiting after its postmaster, which nothing_left misses.
            alive = [pid for pid, start in started.items() if start_time(pid) == start and proc_running(pid)]
            return not alive and nothing_left(pg_dir)

        for user in users:
            user.send_signal(signal.SIGKILL)
        for user in users:
            user.wait(DEADLINE)
        killed = time.monotonic()
        wait_for(server_gone, timeout=STOP_DEADLINE, what="no postgres and no supervisor left")
        print(f"server and supervisor gone {time.monotonic() - killed:.3f} s after the last user was killed")

        assert shmid not in sysv_segments()
        assert not any(path.exists() for path in posix), posix
        assert not layout.pidfile.exists()  # a clean (fast) shutdown, not a crash
        assert embedded.find_server(pg_dir) is None
    finally:
        for user in users:
            finish(user)


def test_a_forked_child_counts_as_a_user(pg_dir: Path) -> None:
    """The lock is inherited across fork: a child of a user keeps the server up after its parent dies."""
    parent = python(FORKING_USER, str(pg_dir))
    child = 0
    try:
        postmaster, child_pid = (int(value) for value in read_line(parent).split())
        child = child_pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(DEADLINE)
        server = embedded.find_server(pg_dir)
        assert server is not None and server.pid == postmaster
        with psycopg.connect(server.url(), connect_timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)

        os.kill(child, signal.SIGKILL)
        wait_for(lambda: nothing_left(pg_dir), timeout=STOP_DEADLINE, what="the server to stop after the child")
    finally:
        if child and proc_running(child):
            os.kill(child, signal.SIGKILL)
        finish(parent)


def test_a_killed_supervisor_takes_the_server_along_and_the_next_call_starts_one(pg_dir: Path) -> None:
    """No orphan even when the supervisor itself is killed: the server gets its parent-death signal."""
    user = python(USER, str(pg_dir))
    try:
        postmaster = int(read_line(user).split()[0])
        (supervisor,) = supervisors(pg_dir)
        os.kill(supervisor, signal.SIGKILL)
        wait_for(lambda: not postgres_processes(layout_of(pg_dir).data), what="the server to follow its supervisor")

        again = python(USER, str(pg_dir))  # the user that remains would reconnect through a new call
        try:
            restarted, owned = read_line(again).split()
            assert owned == "True" and int(restarted) != postmaster
            assert query(again)
        finally:
            finish(again)
    finally:
        finish(user)


def test_a_user_arriving_as_the_last_one_leaves_gets_a_server(pg_dir: Path) -> None:
    """Whether the newcomer takes its shared lock before or after the supervisor's exclusive one, it gets
    a server that answers: the old one, or a new one started once the old one has stopped."""
    for _ in range(5):
        leaving = python(USER, str(pg_dir))
        read_line(leaving)
        arriving = python(USER, str(pg_dir))
        try:
            finish(leaving)
            read_line(arriving)
            assert query(arriving)
        finally:
            finish(arriving)
    wait_for(lambda: nothing_left(pg_dir), timeout=STOP_DEADLINE, what="the last server to stop")


SETTINGS = """
from django_absurd_agents import database_config

SECRET_KEY = "x"
USE_TZ = True
DATABASES = {"default": database_config(name="where")}
"""

SHOW = """
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
from django.conf import settings
from django_absurd_agents.database import embedded_data_dir

print(embedded_data_dir(), settings.DATABASES["default"]["HOST"], flush=True)
"""


def test_the_data_directory_does_not_depend_on_the_current_directory(tmp_path: Path) -> None:
    """``python site/show.py`` run from two directories: one cluster, in the settings' project."""
    project = tmp_path / "site"
    (project / "mysite").mkdir(parents=True)
    (project / "mysite" / "__init__.py").write_text("")
    (project / "mysite" / "settings.py").write_text(SETTINGS)
    (project / "show.py").write_text(SHOW)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", embedded.DATA_DIR_ENV)}
    env.pop(embedded.SETTINGS_ENV, None)
    env["PYTHONPATH"] = str(REPO)
    try:
        seen = []
        for cwd in (project, elsewhere, Path("/")):
            shown = subprocess.run(
                [sys.executable, str(project / "show.py")],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert shown.returncode == 0, shown.stderr
            seen.append(shown.stdout.split())
        expected = layout_of(project / ".postgres")
        assert seen == [[str(project / ".postgres"), str(expected.socket_dir)]] * 3
        assert not (elsewhere / ".postgres").exists()
        wait_for(lambda: nothing_left(project / ".postgres"), timeout=STOP_DEADLINE, what="the server to stop")
    finally:
        shutil.rmtree(embedded_os._tmp_area(project / ".postgres"), ignore_errors=True)


def test_project_dir_is_where_the_settings_module_is_imported_from(tmp_path: Path) -> None:
    package = tmp_path / "proj" / "conf" / "settings"
    package.mkdir(parents=True)
    for directory in (package.parent, package):
        (directory / "__init__.py").write_text("")
    (package / "dev.py").write_text("")
    sys.path.insert(0, str(tmp_path / "proj"))
    try:
        assert embedded.project_dir("conf.settings.dev") == tmp_path / "proj"  # found on sys.path, not imported
        assert "conf.settings.dev" not in sys.modules
        assert embedded.project_dir("conf.settings") == tmp_path / "proj"
        assert embedded.project_dir("no_such_settings_module") is None
    finally:
        sys.path.remove(str(tmp_path / "proj"))


def test_database_config_without_settings_module_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", embedded.DATA_DIR_ENV, embedded.SETTINGS_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ImproperlyConfigured, match=r"data_dir=BASE_DIR / '.postgres'.*ABSURD_AGENTS_PGDATA"):
        database.database_config()
    assert database.embedded_data_dir("/srv/pg") == Path("/srv/pg")
    monkeypatch.setenv(embedded.DATA_DIR_ENV, "/srv/other")
    assert database.embedded_data_dir() == Path("/srv/other")


def test_the_launcher_imports_nothing_of_django() -> None:
    code = "import sys, django_absurd_agents.embedded; print([m for m in sys.modules if m.split('.')[0] == 'django'])"
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "[]"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int, marker: bytes) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            argv = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if ppid == pid and marker in argv and proc_running(int(entry.name)):
            found.add(int(entry.name))
    return found


@pytest.mark.slow
def test_serve_keeps_the_site_when_its_worker_is_killed_and_starts_another(tmp_path: Path) -> None:
    """``make serve`` on the embedded server: SIGKILL the worker, the site keeps its database and a new
    worker runs the next report; Ctrl-C, and nothing is left running."""
    requested = tmp_path / "pg"
    tmp_path.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env |= {embedded.DATA_DIR_ENV: str(requested), "DJANGO_SETTINGS_MODULE": "example_project.settings"}
    env |= {"EXAMPLE_MODEL_DELAY": "0", "PYTHONPATH": str(REPO)}
    env.pop("EXAMPLE_CALL_LOG", None)
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:  # a file, not a pipe: nobody reads the output until the end
        serve = subprocess.Popen(
            [sys.executable, str(REPO / "example_project" / "manage.py"), "serve", f"127.0.0.1:{port}", "--noreload"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar := CookieJar()))

    def site_up() -> bool:
        assert serve.poll() is None, "serve exited"
        try:
            return bool(opener.open(f"{base}/", timeout=5).status == 200)
        except OSError:
            return False

    def report_done(company: str) -> bool:
        token = next(cookie.value for cookie in jar if cookie.name == "csrftoken")
        body = urlencode({"csrfmiddlewaretoken": token, "company": company, "question": "Worth it?"}).encode()
        status_url = opener.open(f"{base}/", data=body, timeout=10).geturl().rstrip("/") + ".json"
        deadline = time.monotonic() + 90
        while not json.loads(opener.open(status_url, timeout=5).read())["done"]:
            assert time.monotonic() < deadline, f"{company}'s report was not written"
            time.sleep(0.1)
        return True

    try:
        wait_for(site_up, timeout=180, what="the site")
        wait_for(lambda: len(_children(serve.pid, b"absurd_worker")) == 1, what="the worker")
        (worker,) = _children(serve.pid, b"absurd_worker")
        assert report_done("Umbra Biotech")

        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: _children(serve.pid, b"absurd_worker") - {worker}, what="a new worker")
        assert site_up()  # the site kept its database
        assert report_done("Acme Robotics")  # and the new worker runs tasks
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)
        serve.wait(90)
    output = log.read_text(errors="replace")
    assert serve.returncode == 0, output
    assert re.search(r"The worker exited with status -9; started another \(pid \d+\)", output), output
    wait_for(lambda: nothing_left(requested), timeout=STOP_DEADLINE, what="the server to stop after serve")
    shutil.rmtree(embedded_os._tmp_area(requested), ignore_errors=True)
