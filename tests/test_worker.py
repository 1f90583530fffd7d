"""``manage.py absurd_worker`` as production runs it: real worker processes on a real PostgreSQL.

The worker processes load ``tests.worker_tasks`` through ``ABSURD_AGENTS['TASK_MODULES']`` (a small
settings module written per test extends ``tests.settings``), so task discovery is exercised the way
a project uses it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from django_absurd_agents import absurd
from django_absurd_agents.worker import Worker, WorkerConfig, WorkerError, heartbeat_age

pytestmark = pytest.mark.django_db(transaction=True)

SETTINGS_MODULE = "absurd_worker_test_settings"
FAST = ["--poll-interval", "0.05", "--claim-timeout", "5"]


def wait_until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class WorkerProcess:
    """A ``python -m django absurd_worker`` child whose log goes to a file the test can read."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "django", "absurd_worker", *args],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            if self.process.poll() is not None and text not in self.log():
                raise AssertionError(
                    f"worker exited ({self.process.returncode}) before logging {text!r}:\n{self.log()}"
                )
            return text in self.log()

        wait_until(seen, f"{text!r} in the worker log", timeout)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"worker did not exit within {timeout}s:\n{self.log()}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def settings_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "settings"
    directory.mkdir()
    (directory / f"{SETTINGS_MODULE}.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "ABSURD_AGENTS = {**ABSURD_AGENTS, 'TASK_MODULES': ['tests.worker_tasks']}  # noqa: F405\n"
    )
    return directory


def process_env(base: dict[str, str], settings_dir: Path, tmp_path: Path) -> dict[str, str]:
    env = dict(base)
    env["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(settings_dir), os.getcwd(), env.get("PYTHONPATH")]))
    env["WORKER_LOG"] = str(tmp_path / "runs.log")
    return env


@pytest.fixture
def env(worker_env: dict[str, str], clean_queues: None, settings_dir: Path, tmp_path: Path) -> dict[str, str]:
    return process_env(worker_env, settings_dir, tmp_path)


@pytest.fixture
def start_worker(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: str, extra_env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess({**env, **(extra_env or {})}, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def run_burst(env: dict[str, str], tmp_path: Path, *args: str) -> tuple[int, str]:
    log = tmp_path / "burst.log"
    with log.open("wb") as out:
        result = subprocess.run(
            [sys.executable, "-m", "django", "absurd_worker", "--burst", *FAST, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
    return result.returncode, log.read_text()


def runs(env: dict[str, str]) -> list[tuple[str, str, int, int]]:
    """(event, task_id, pid, monotonic ns) lines the handlers wrote."""
    path = Path(env["WORKER_LOG"])
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        event, task_id, pid, at = line.split()
        rows.append((event, task_id, int(pid), int(at)))
    return rows


def states(task_ids: list[str], queue: str = "agents") -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute(f"select task_id::text, state from absurd.t_{queue} where task_id = any(%s::uuid[])", [task_ids])
        return dict(cursor.fetchall())


def all_in_state(task_ids: list[str], state: str, queue: str = "agents") -> bool:
    found = states(task_ids, queue)
    return len(found) == len(task_ids) and set(found.values()) == {state}


def spawn(name: str, params: Any = None, n: int = 1, **options: Any) -> list[str]:
    return [absurd.spawn_sync(name, params if params is not None else {}, **options)["task_id"] for _ in range(n)]


# --- configuration ---------------------------------------------------------------------------------


def test_invalid_options_are_refused_with_the_fix() -> None:
    with pytest.raises(WorkerError, match="lowercase letters"):
        WorkerConfig.from_settings(queues=["Bad-Queue"])
    with pytest.raises(WorkerError, match=r"--claim-timeout must be a whole number of seconds at least 1"):
        WorkerConfig.from_settings(claim_timeout=0)
    for bad in ({"claim_timeout": 3_000_000_000}, {"poll_interval": float("inf")}, {"poll_interval": float("nan")},
                {"concurrency": 10**6}, {"shutdown_grace": float("inf")}):  # fmt: skip
        with pytest.raises(WorkerError, match="must be"):
            WorkerConfig.from_settings(**bad)
    config = WorkerConfig.from_settings(queues=["other", "other"])
    assert config.queues == ("other",)
    assert config.claim_timeout == 30  # from tests.settings


def test_a_queue_missing_from_the_database_stops_the_worker_with_the_fix() -> None:
    with connection.cursor() as cursor:
        cursor.execute("select absurd.create_queue('scratch')")
        cursor.execute("select absurd.drop_queue('scratch')")
    with pytest.raises(CommandError, match=r"scratch do not exist.*migrate"):
        call_command("absurd_worker", queues=["scratch"], burst=True, verbosity=0)


async def test_checkpoints_are_not_part_of_the_tasks_own_transaction(clean_queues: None) -> None:
    from asgiref.sync import sync_to_async

    from tests import worker_tasks  # noqa: F401  (registers the handlers in this process)

    task_id = (await sync_to_async(absurd.spawn_sync)("worker_atomic", {"username": "rolled-back"}))["task_id"]
    config = WorkerConfig.from_settings(queues=["agents"], burst=True, poll_interval=0.05)
    assert await Worker(config).run(handle_signals=False) == 0

    def outcome() -> tuple[Any, ...]:
        from django.contrib.auth.models import User

        with connection.cursor() as cursor:
            cursor.execute("select checkpoint_name from absurd.c_agents where task_id = %s", [task_id])
            checkpoints = [row[0] for row in cursor.fetchall()]
        snapshot = absurd.fetch_task_result_sync(task_id)
        return snapshot.state if snapshot else None, checkpoints, User.objects.filter(username="rolled-back").exists()

    # The user's rollback undid the user's row, not the checkpoint written meanwhile.
    assert await sync_to_async(outcome)() == ("completed", ["note"], False)


# --- worker processes ------------------------------------------------------------------------------


@pytest.mark.slow
def test_burst_drains_every_queue_and_exits_zero(env: dict[str, str], tmp_path: Path) -> None:
    records = spawn("worker_record", {"secret": "hunter2"}, n=12)
    others = spawn("worker_other", queue="other", n=3)
    orm = spawn("worker_orm", {"username": "from-worker"})

    code, log = run_burst(env, tmp_path, "--concurrency", "4")

    assert code == 0, log
    assert all_in_state(records + orm, "completed"), states(records + orm)
    assert all_in_state(others, "completed", "other")
    assert "serving queue(s) agents, other with 4 slot(s) (up to 2 database connections per queue)" in log
    banner_tasks = dict(
        part.split(": ", 1) for part in log.split("Tasks: ", 1)[1].split(".\n", 1)[0].split("; ")
    )  # {"agents": "..., worker_record, ...", "other": "worker_other"}
    assert {"worker_noop", "worker_orm", "worker_record"} <= set(banner_tasks["agents"].split(", "))
    assert banner_tasks["other"] == "worker_other"
    assert log.count("task completed name=worker_record") == 12
    assert "hunter2" not in log  # params are never logged at INFO
    result = absurd.fetch_task_result_sync(orm[0])
    assert result is not None and result.result["renamed"] == 1  # the ORM works inside a task


@pytest.mark.slow
def test_a_tasks_orm_work_uses_one_connection_closed_when_the_task_ends(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--queue", "agents", *FAST)
    [task_id] = spawn("worker_orm", {"username": "pid-check"})
    wait_until(lambda: all_in_state([task_id], "completed"), "the ORM task")
    result = absurd.fetch_task_result_sync(task_id)
    assert result is not None
    sync_to_async_pid, sync_tool_pid = result.result["pids"]
    # sync_to_async and the agent's sync tool ran on the task's own thread, with its one connection...
    assert sync_to_async_pid == sync_tool_pid
    # ...which the worker closes once the task is over, while the worker itself keeps running.

    def closed() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("select count(*) from pg_stat_activity where pid = %s", [sync_tool_pid])
            return cursor.fetchone()[0] == 0

    wait_until(closed, "the task's connection to close")
    assert worker.process.poll() is None
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def runs_of(task_id: str) -> list[dict[str, Any]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "select attempt, state, failure_reason from absurd.r_agents where task_id = %s order by attempt", [task_id]
        )
        return [{"attempt": a, "state": st, "failure": json.loads(f) if f else None} for a, st, f in cursor.fetchall()]


def with_settings(env: dict[str, str], settings_dir: Path, name: str, extra: str) -> dict[str, str]:
    """``env`` running the worker with ``tests.settings`` plus the ABSURD_AGENTS entries in ``extra``."""
    (settings_dir / f"{name}.py").write_text(
        f"from {SETTINGS_MODULE} import *  # noqa: F403\nABSURD_AGENTS = {{**ABSURD_AGENTS, {extra}}}  # noqa: F405\n"
    )
    return {**env, "DJANGO_SETTINGS_MODULE": name}


@pytest.mark.slow
def test_a_rolling_deploy_loses_no_task_and_uses_no_attempt(
    env: dict[str, str], settings_dir: Path, tmp_path: Path
) -> None:
    """An old worker claims a task only the new release registers: it is put back, visibly, and runs later."""
    [task_id] = spawn("worker_deployed_later", max_attempts=1)
    code, log = run_burst(env, tmp_path, "--queue", "agents")
    assert code == 0, log
    assert "no handler is registered for 'worker_deployed_later'" in log
    assert "ABSURD_AGENTS['TASK_MODULES']" in log and "UNKNOWN_TASK_GRACE" in log
    assert runs_of(task_id) == [{"attempt": 1, "state": "sleeping", "failure": None}]
    shown = StringIO()
    call_command("absurd_task", task_id, stdout=shown)
    assert "$unknown_task" in shown.getvalue()
    assert "@absurd.register_task(name='worker_deployed_later')" in shown.getvalue()

    # The new release is deployed; the task's next offer comes (time is moved on instead of waited for).
    with connection.cursor() as cursor:
        cursor.execute("update absurd.r_agents set available_at = now() where task_id = %s", [task_id])
    new_release = with_settings(
        env, settings_dir, "new_release_settings", "'TASK_MODULES': ['tests.worker_tasks', 'tests.worker_tasks_later']"
    )
    code, log = run_burst(new_release, tmp_path, "--queue", "agents")
    assert code == 0, log
    assert runs_of(task_id) == [{"attempt": 1, "state": "completed", "failure": None}]


@pytest.mark.slow
def test_an_unknown_task_fails_for_good_after_the_grace_period_naming_the_fix(
    env: dict[str, str], settings_dir: Path, tmp_path: Path
) -> None:
    [task_id] = spawn("not_registered_anywhere", max_attempts=5)
    no_grace = with_settings(env, settings_dir, "no_grace_settings", "'UNKNOWN_TASK_GRACE': 0")
    code, log = run_burst(no_grace, tmp_path, "--queue", "agents")
    assert code == 0, log
    [only_run] = runs_of(task_id)  # failed for good: no retry was scheduled despite 5 attempts
    assert only_run["state"] == "failed" and only_run["failure"]["name"] == "UnknownTask"
    message = only_run["failure"]["message"]
    assert "@absurd.register_task(name='not_registered_anywhere')" in message
    assert "TASK_MODULES" in message
    assert states([task_id]) == {task_id: "failed"}


@pytest.mark.slow
def test_one_worker_serves_two_queues(env: dict[str, str], start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("--queue", "agents", "--queue", "other", "--concurrency", "2", *FAST)
    agents_ids = spawn("worker_record", n=5)
    other_ids = spawn("worker_other", queue="other", n=5)
    wait_until(lambda: all_in_state(agents_ids, "completed") and all_in_state(other_ids, "completed", "other"), "tasks")
    assert {pid for _, _, pid, _ in runs(env)} == {worker.process.pid}
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


@pytest.mark.slow
def test_max_tasks_exits_zero_after_that_many(env: dict[str, str], tmp_path: Path) -> None:
    task_ids = spawn("worker_record", n=5)
    log = tmp_path / "max-tasks.log"
    with log.open("wb") as out:
        result = subprocess.run(
            [sys.executable, "-m", "django", "absurd_worker", "--max-tasks", "3", "--concurrency", "2", *FAST],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, log.read_text()
    assert sorted(states(task_ids).values()) == ["completed"] * 3 + ["pending"] * 2


@pytest.mark.slow
def test_sigterm_lets_the_running_task_finish_and_exits_zero(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    heartbeat = tmp_path / "worker.heartbeat"
    worker = start_worker("--queue", "agents", "--heartbeat-file", str(heartbeat), *FAST)
    wait_until(lambda: (age := heartbeat_age(str(heartbeat))) is not None and age < 5, "a fresh heartbeat")
    [task_id] = spawn("worker_record", {"sleep": 1.0})
    wait_until(lambda: any(event == "start" for event, *_ in runs(env)), "the task to start")

    worker.signal(signal.SIGTERM)
    worker.wait_for_log("Stopping (SIGTERM")
    [late] = spawn("worker_noop")  # spawned after the signal: not claimed any more

    assert worker.wait() == 0, worker.log()
    assert [event for event, *_ in runs(env)] == ["start", "end"]
    assert states([task_id, late]) == {task_id: "completed", late: "pending"}
    assert not heartbeat.exists()


@pytest.mark.slow
def test_a_task_outliving_the_grace_period_is_handed_back(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--queue", "agents", "--shutdown-grace", "0.2", *FAST)
    [task_id] = spawn("worker_record", {"sleep": 60})
    wait_until(lambda: runs(env), "the task to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.log()
    with connection.cursor() as cursor:
        cursor.execute(
            "select state, claimed_by, available_at <= now(), attempt from absurd.r_agents where task_id = %s",
            [task_id],
        )
        assert cursor.fetchall() == [("sleeping", None, True, 1)]  # claimable at once, same attempt


@pytest.mark.slow
def test_a_second_signal_exits_at_once(env: dict[str, str], start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("--queue", "agents", "--shutdown-grace", "120", *FAST)
    [task_id] = spawn("worker_record", {"sleep": 120})
    wait_until(lambda: runs(env), "the task to start")
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("Stopping (SIGTERM")
    worker.signal(signal.SIGINT)
    assert worker.wait(timeout=5) == 128 + signal.SIGINT
    assert "Second SIGINT: exiting now" in worker.log()
    assert states([task_id]) == {task_id: "running"}  # its lease expires, then another worker resumes it


@pytest.mark.slow
def test_two_workers_run_each_of_200_tasks_exactly_once(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    beats = [tmp_path / "a.heartbeat", tmp_path / "b.heartbeat"]
    workers = [
        start_worker("--queue", "agents", "--concurrency", "8", "--heartbeat-file", str(beat), *FAST) for beat in beats
    ]
    wait_until(lambda: all(beat.exists() for beat in beats), "both workers to be up")
    task_ids = spawn("worker_record", {"sleep": 0.005}, n=200)

    wait_until(lambda: all_in_state(task_ids, "completed"), "200 completed tasks", timeout=40)
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0]

    rows = runs(env)
    starts = Counter(task for event, task, _, _ in rows if event == "start")
    ends = Counter(task for event, task, _, _ in rows if event == "end")
    assert set(starts) == set(ends) == set(task_ids)
    assert set(starts.values()) == set(ends.values()) == {1}
    spans: dict[str, list[int]] = {}
    for _, task, _, at in rows:
        spans.setdefault(task, []).append(at)
    assert all(start <= end for start, end in spans.values())
    by_worker = Counter(pid for event, _, pid, _ in rows if event == "start")
    assert set(by_worker) == {worker.process.pid for worker in workers}, by_worker


# --- database restart ------------------------------------------------------------------------------


@pytest.fixture
def private_server() -> Iterator[tuple[Any, Callable[[], Any]]]:
    """An embedded PostgreSQL this test may stop and start; yields (server, restart)."""
    embedded = pytest.importorskip("django_absurd_agents.embedded")
    try:
        embedded.bin_dir()
    except embedded.EmbeddedPostgresError as exc:
        pytest.skip(str(exc))
    directory = tempfile.mkdtemp(prefix="absurd-worker-restart-")
    os.chmod(directory, 0o755)  # the server runs as an unprivileged user when we are root
    servers = [embedded.ensure_server(directory)]

    def restart() -> Any:
        servers.append(embedded.ensure_server(directory))
        return servers[-1]

    try:
        yield servers[0], restart
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def agents_database(server: Any, name: str) -> str:
    """A database of its own on ``server`` with Absurd's schema and the ``agents`` queue; its URL."""
    import absurdctl

    server.create_database(name)
    url: str = server.url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(absurdctl.BUNDLED_SCHEMA_SQL)
        conn.execute("select absurd.create_queue('agents')")
    return url


@pytest.mark.slow
def test_the_worker_survives_a_postgres_restart(
    private_server: tuple[Any, Callable[[], Any]], settings_dir: Path, tmp_path: Path
) -> None:
    server, restart = private_server
    url = agents_database(server, "worker_restart")

    def spawn_raw(n: int, sleep: float = 0) -> list[str]:
        with psycopg.connect(url, autocommit=True) as conn:
            return [
                str(
                    conn.execute(
                        "select task_id from absurd.spawn_task('agents', 'worker_record', %s::jsonb, %s::jsonb)",
                        [json.dumps({"sleep": sleep}), json.dumps({"max_attempts": 5})],
                    ).fetchone()[0]  # type: ignore[index]
                )
                for _ in range(n)
            ]

    def completed(task_ids: list[str]) -> bool:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                rows = conn.execute(
                    "select count(*) from absurd.t_agents where task_id = any(%s::uuid[]) and state = 'completed'",
                    [task_ids],
                ).fetchone()
        except psycopg.OperationalError:
            return False
        return rows is not None and rows[0] == len(task_ids)

    env = process_env({**os.environ, "DATABASE_URL": url}, settings_dir, tmp_path)
    worker = WorkerProcess(env, tmp_path / "worker.log", "--queue", "agents", "--concurrency", "4",
                           "--poll-interval", "0.05", "--claim-timeout", "2")  # fmt: skip
    try:
        before = spawn_raw(10)
        wait_until(lambda: completed(before), "the first tasks")
        in_flight = spawn_raw(3, sleep=1.0)
        wait_until(lambda: sum(event == "start" and task in in_flight for event, task, *_ in runs(env)) == 3, "starts")

        server.stop()
        # Stay down for a few failed claims, so the worker backs off and retries more than once.
        wait_until(lambda: worker.log().count("the database connection failed") >= 3, "failed claims")
        restart()
        after = spawn_raw(10)

        wait_until(lambda: completed(before + in_flight + after), "every task after the restart", timeout=30)
        assert worker.process.poll() is None, worker.log()
        assert "database reachable again" in worker.log()
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
    finally:
        worker.close()


@pytest.mark.slow
def test_a_restart_during_steps_longer_than_the_lease_runs_each_step_once(
    private_server: tuple[Any, Callable[[], Any]], settings_dir: Path, tmp_path: Path
) -> None:
    """Postgres restarts while two 6 s steps are in flight under a 3 s lease: the same runs renew their
    leases and write their checkpoints on new connections; nothing is claimed twice, nothing runs twice."""
    server, restart = private_server
    url = agents_database(server, "worker_restart_steps")
    with psycopg.connect(url, autocommit=True) as conn:
        task_ids = [
            str(
                conn.execute(
                    "select task_id from absurd.spawn_task('agents', 'worker_long_step', %s::jsonb, %s::jsonb)",
                    [json.dumps({"sleep": 6}), json.dumps({"max_attempts": 5})],
                ).fetchone()[0]  # type: ignore[index]
            )
            for _ in range(2)
        ]

    def task_rows() -> list[tuple[str, int, str]] | None:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                return conn.execute(
                    "select task_id::text, attempt, state from absurd.r_agents order by task_id, attempt"
                ).fetchall()
        except psycopg.OperationalError:
            return None

    env = process_env({**os.environ, "DATABASE_URL": url}, settings_dir, tmp_path)
    worker = WorkerProcess(env, tmp_path / "worker.log", "--queue", "agents", "--concurrency", "4",
                           "--poll-interval", "0.05", "--claim-timeout", "3")  # fmt: skip
    try:
        wait_until(lambda: sum(event == "slow-start" for event, *_ in runs(env)) == 2, "both slow steps to start")
        server.stop()
        restart()
        wait_until(
            lambda: (rows := task_rows()) is not None and {state for *_, state in rows} == {"completed"},
            "both tasks to complete",
            timeout=40,
        )
        rows = task_rows()
        assert rows is not None and sorted(rows) == sorted((t, 1, "completed") for t in task_ids), (rows, worker.log())
        events = Counter((event, task) for event, task, *_ in runs(env))
        for task_id in task_ids:
            assert [events[(e, task_id)] for e in ("slow-start", "slow-end", "after")] == [1, 1, 1], worker.log()
        assert "retrying on a new connection while its lease lasts" in worker.log()
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
    finally:
        worker.close()


@pytest.mark.slow
def test_an_outage_longer_than_the_lease_stops_the_execution_before_the_task_is_claimed_again(
    private_server: tuple[Any, Callable[[], Any]], settings_dir: Path, tmp_path: Path
) -> None:
    """Postgres stays down past the 2 s lease while a 4 s step runs. No renewal gets through, so the worker
    cannot know the task is still its own: it stops the step before the lease runs out, while the
    database is still down, and the next claim (attempt 2) never runs next to it."""
    server, restart = private_server
    url = agents_database(server, "worker_long_outage")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "select task_id::text from absurd.spawn_task('agents', 'worker_long_step', %s::jsonb, %s::jsonb)",
            [json.dumps({"sleep": 4}), json.dumps({"max_attempts": 5})],
        ).fetchone()
    assert row is not None
    task_id = row[0]

    def attempts() -> list[tuple[int, str]] | None:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                return conn.execute(
                    "select attempt, state from absurd.r_agents where task_id = %s order by attempt", [task_id]
                ).fetchall()
        except psycopg.OperationalError:
            return None

    def events(name: str) -> list[int]:
        return [at for event, task, _, at in runs(env) if event == name and task == task_id]

    env = process_env({**os.environ, "DATABASE_URL": url}, settings_dir, tmp_path)
    worker = WorkerProcess(env, tmp_path / "worker.log", "--queue", "agents", "--concurrency", "2",
                           "--poll-interval", "0.05", "--claim-timeout", "2")  # fmt: skip
    try:
        wait_until(lambda: events("slow-start"), "the slow step to start")
        server.stop()
        wait_until(lambda: events("slow-stopped"), "the step to stop as the lease runs out, the database still down")
        restart()
        wait_until(lambda: (rows := attempts()) is not None and rows[-1][1] == "completed", "the task to complete")
        assert attempts() == [(1, "failed"), (2, "completed")], worker.log()
        first_stopped, second_started = events("slow-stopped")[0], events("slow-start")[1]
        assert first_stopped < second_started
        assert len(events("slow-start")) == 2 and len(events("slow-end")) == 1 and len(events("after")) == 1
        assert "its lease could not be extended before it ran out" in worker.log()
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
    finally:
        worker.close()


def checkpoint_state(task_id: str, name: str) -> Any:
    with connection.cursor() as cursor:
        cursor.execute("select state from absurd.c_agents where task_id = %s and checkpoint_name = %s", [task_id, name])
        row = cursor.fetchone()
    return None if row is None else json.loads(row[0]) if isinstance(row[0], str) else row[0]


@pytest.mark.slow
def test_a_task_whose_own_connection_breaks_is_handed_back_without_using_an_attempt(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    [task_id] = spawn("worker_flaky_connection", {"flag": str(tmp_path / "broke-once")}, max_attempts=1)
    worker = start_worker(*FAST)
    wait_until(lambda: all_in_state([task_id], "completed"), "the task to complete after its connection broke")
    assert runs_of(task_id) == [{"attempt": 1, "state": "completed", "failure": None}]  # max_attempts=1, not used up
    assert [event for event, task, *_ in runs(env) if task == task_id] == ["run", "run"]
    assert checkpoint_state(task_id, "$connection_handbacks")["count"] == 1
    assert "task handed back name=worker_flaky_connection" in worker.log()


@pytest.mark.slow
def test_a_task_that_always_breaks_its_connection_still_ends(
    env: dict[str, str], settings_dir: Path, tmp_path: Path
) -> None:
    [task_id] = spawn("worker_flaky_connection", {"flag": str(tmp_path / "flag"), "always": True}, max_attempts=1)
    bounded = with_settings(env, settings_dir, "bounded_settings", "'MAX_CONNECTION_HANDBACKS': 2")
    worker = WorkerProcess(bounded, tmp_path / "bounded.log", *FAST)
    try:
        wait_until(lambda: all_in_state([task_id], "failed"), "the task to fail after two hand-backs")
    finally:
        worker.close()
    [only_run] = runs_of(task_id)
    assert only_run["attempt"] == 1 and only_run["state"] == "failed"
    assert only_run["failure"]["name"] == "OperationalError"
    assert [event for event, task, *_ in runs(env) if task == task_id] == ["run"] * 3


@pytest.mark.slow
def test_a_handler_that_swallows_its_suspension_fails_saying_how_to_fix_it(env: dict[str, str], tmp_path: Path) -> None:
    [task_id] = spawn("worker_swallows_sleep", max_attempts=1)
    code, log = run_burst(env, tmp_path, "--queue", "agents")
    assert code == 0, log
    [only_run] = runs_of(task_id)
    assert only_run["state"] == "failed", log
    assert only_run["failure"]["name"] == "SwallowedSuspension"
    assert "except SuspendTask: raise" in only_run["failure"]["message"]


@pytest.mark.slow
def test_a_run_failed_elsewhere_is_stopped_and_logged_as_lost(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    [task_id] = spawn("worker_long_step", {"sleep": 30}, max_attempts=1)
    worker = start_worker("--poll-interval", "0.05", "--claim-timeout", "3")
    wait_until(lambda: any(event == "slow-start" for event, *_ in runs(env)), "the step to start")
    with connection.cursor() as cursor:
        cursor.execute("select run_id from absurd.r_agents where task_id = %s and state = 'running'", [task_id])
        [(run_id,)] = cursor.fetchall()
        cursor.execute(
            "select absurd.fail_run('agents', %s, '{\"message\": \"failed by an operator\"}'::jsonb)", [run_id]
        )
    worker.wait_for_log("task lost name=worker_long_step")
    assert "task cancelled" not in worker.log()
    assert not any(event == "slow-end" for event, *_ in runs(env))


@pytest.mark.slow
def test_the_grace_period_is_not_overstayed_by_a_running_sync_call(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    [task_id] = spawn("worker_slow_sync_call", {"sleep": 60})
    worker = start_worker(*FAST, "--shutdown-grace", "1")
    wait_until(lambda: any(event == "sync-start" for event, *_ in runs(env)), "the sync call to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, worker.log()  # not after the call's remaining 60 s
    assert "the worker does not wait for them and exits now" in worker.log()
    assert not any(event == "sync-end" for event, *_ in runs(env))
    assert runs_of(task_id) == [{"attempt": 1, "state": "sleeping", "failure": None}]  # handed back, same attempt


def test_a_worker_with_a_wrong_database_exits_at_once_naming_the_setting(env: dict[str, str], tmp_path: Path) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    wrong = make_conninfo(**{**conninfo_to_dict(env["DATABASE_URL"]), "dbname": "no_such_database"})
    code, log = run_burst({**env, "DATABASE_URL": wrong}, tmp_path)
    assert code != 0
    assert "no_such_database" in log and "DATABASE_URL" in log
    assert "retrying" not in log


async def test_work_batch_uses_the_claim_timeout_setting(project_absurd: Any) -> None:
    from tests import worker_tasks  # noqa: F401  (registers the handlers in this process)

    task_id = (await project_absurd.spawn("worker_claim_timeout"))["task_id"]
    await project_absurd.work_batch()
    snapshot = await project_absurd.fetch_task_result(task_id)
    assert snapshot.state == "completed" and snapshot.result == 30  # CLAIM_TIMEOUT of tests.settings, not 120


def test_a_committed_spawn_notifies_idle_workers_and_a_rolled_back_one_does_not(clean_queues: None) -> None:
    from django.db import transaction

    from django_absurd_agents.wakeup import CHANNEL
    from tests.conftest import database_url

    with psycopg.connect(database_url(), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with pytest.raises(RuntimeError), transaction.atomic():
            absurd.spawn_sync("worker_noop", {})
            raise RuntimeError("roll the spawn back")
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
        with transaction.atomic():
            absurd.spawn_sync("worker_noop", {}, queue="agents")
            assert list(listener.notifies(timeout=0.5, stop_after=1)) == []  # not before the commit
        [notification] = list(listener.notifies(timeout=5, stop_after=1))
        assert notification.payload == "agents"


@pytest.mark.slow
def test_an_idle_worker_claims_a_spawn_at_once_not_at_its_next_poll(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--queue", "agents", "--poll-interval", "600")
    worker.wait_for_log("serving queue(s) agents")
    [task_id] = spawn("worker_record")
    # With a 10-minute poll interval only the notification can wake the worker within the deadline.
    wait_until(lambda: all_in_state([task_id], "completed"), "the spawned task to run", timeout=30)


@pytest.mark.slow
def test_workers_record_themselves_and_a_killed_one_shows_as_gone_then_is_pruned(
    env: dict[str, str], settings_dir: Path, tmp_path: Path
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from django_absurd_agents.models import Worker

    fast = with_settings(env, settings_dir, "fast_beat_settings", "'WORKER_HEARTBEAT': 0.2")
    stale = Worker.objects.create(
        worker_id="long-dead:1", host="old", pid=1, queues=["agents"], concurrency=1, version="0",
        heartbeat_interval=5, started=timezone.now() - timedelta(days=2),
        last_heartbeat=timezone.now() - timedelta(days=1),
    )  # fmt: skip
    clean = WorkerProcess(fast, tmp_path / "clean.log", *FAST, "--worker-id", "clean:1")
    killed = WorkerProcess(fast, tmp_path / "killed.log", *FAST, "--worker-id", "killed:1", "--concurrency", "3")
    try:
        wait_until(lambda: set(Worker.objects.values_list("pk", flat=True)) == {"clean:1", "killed:1"}, "both rows")
        assert not Worker.objects.filter(pk=stale.pk).exists()  # pruned by a live worker's heartbeat
        [task_id] = spawn("worker_record", {"sleep": 0})
        wait_until(lambda: all_in_state([task_id], "completed"), "the task")
        wait_until(lambda: sum(Worker.objects.values_list("tasks_done", flat=True)) == 1, "the count of tasks done")
        row = Worker.objects.get(pk="killed:1")
        assert row.status == "alive" and row.concurrency == 3 and row.queues == ["agents", "other"]
        killed.process.kill()
        killed.process.wait()
        wait_until(lambda: Worker.objects.get(pk="killed:1").status == "gone", "the killed worker to show as gone")
        assert Worker.objects.get(pk="clean:1").status == "alive"
        clean.signal(signal.SIGTERM)
        assert clean.wait() == 0
        assert not Worker.objects.filter(pk="clean:1").exists()  # a clean exit removes its row
    finally:
        clean.close()
        killed.close()
