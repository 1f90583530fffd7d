"""The worker, spawns, results and the admin through PgBouncer in transaction pooling.

A deployment that outgrows one web box and one worker box puts PgBouncer in front of PostgreSQL.
In transaction pooling consecutive statements of one client may run on different server sessions,
so prepared statements, LISTEN and session advisory locks do not survive between transactions.
The test starts Debian's ``pgbouncer`` itself on a loopback port (it must be installed: CI installs
it, and a missing binary fails the test), points a real worker process and a web-like process at
it, and keeps only the worker's LISTEN on a direct connection (``DIRECT_DATABASE_URL``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from django_absurd_agents import absurd
from tests.conftest import database_url
from tests.test_worker import WorkerProcess, all_in_state, process_env, spawn, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PGBOUNCER = "/usr/sbin/pgbouncer"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def pgbouncer(transactional_db: Any) -> Iterator[str]:
    """A PgBouncer in transaction pooling in front of the test database; yields its libpq URL."""
    if not os.path.exists(PGBOUNCER):
        pytest.fail(f"{PGBOUNCER} is missing: apt-get install -y pgbouncer (.ci/run does it)")
    direct = conninfo_to_dict(database_url())
    directory = Path(tempfile.mkdtemp(prefix="absurd-pgbouncer-"))
    os.chmod(directory, 0o755)  # PgBouncer refuses to run as root: it runs as the postgres user then
    port = free_port()
    server = f"host={direct.get('host', '127.0.0.1')} port={direct.get('port', 5432)}"
    (directory / "users.txt").write_text(f'"{direct.get("user", "postgres")}" ""\n')
    (directory / "pgbouncer.ini").write_text(
        f"[databases]\n* = {server}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"unix_socket_dir =\nauth_type = trust\nauth_file = {directory}/users.txt\npool_mode = transaction\n"
        f"max_client_conn = 500\ndefault_pool_size = 10\nlogfile = {directory}/pgbouncer.log\n"
        f"pidfile = {directory}/pgbouncer.pid\n"
    )
    command = [PGBOUNCER, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
        for path in (directory, *directory.iterdir()):
            shutil.chown(path, "postgres")
    output = (directory / "stderr.txt").open("wb")
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = make_conninfo("", **{**direct, "host": "127.0.0.1", "port": str(port)})

    def accepting() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"pgbouncer exited:\n{(directory / 'stderr.txt').read_text()}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(accepting, "pgbouncer to listen")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        output.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pooled_env(pgbouncer: str, worker_env: dict[str, str], clean_queues: None, tmp_path: Path) -> dict[str, str]:
    """A worker environment on PgBouncer, with LISTEN on the direct connection."""
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / "pooled_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "ABSURD_AGENTS = {**ABSURD_AGENTS, 'TASK_MODULES': ['tests.worker_tasks'], "
        f"'DIRECT_DATABASE_URL': {database_url()!r}}}\n"
    )
    env = process_env({**worker_env, "DATABASE_URL": pgbouncer}, settings_dir, tmp_path)
    return {**env, "DJANGO_SETTINGS_MODULE": "pooled_settings"}


def test_a_worker_behind_pgbouncer_runs_agents_orm_work_and_durable_waits(
    pooled_env: dict[str, str], tmp_path: Path
) -> None:
    worker = WorkerProcess(pooled_env, tmp_path / "worker.log", "--poll-interval", "0.05", "--claim-timeout", "5",
                           "--concurrency", "8")  # fmt: skip
    try:
        quick = spawn("worker_record", {"sleep": 0}, n=20)
        [orm] = spawn("worker_orm", {"username": "through-pgbouncer"})
        [waiting] = spawn("worker_approval", {"draft": "pooled"})
        wait_until(lambda: all_in_state([*quick, orm], "completed"), "the pooled worker to run its tasks", 60)
        wait_until(lambda: all_in_state([waiting], "sleeping"), "the approval wait", 30)
        absurd.emit_event_sync(f"approval:{waiting}", {"approved": True})
        wait_until(lambda: all_in_state([waiting], "completed"), "the approval to resume the task", 30)
        log = worker.log()
        assert "Traceback" not in log and "prepared statement" not in log, log
    finally:
        worker.close()


def test_spawns_results_and_the_admin_work_through_pgbouncer(pooled_env: dict[str, str]) -> None:
    [waiting] = spawn("worker_approval", {})
    result = subprocess.run(
        [sys.executable, "-m", "tests.pgbouncer_client", "pooled-key", waiting],
        env=pooled_env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["created"] == [True, False]
    assert summary["cancelled_state"] == "cancelled"
    assert summary["admin"] == [200, 200] and summary["listed"]
    with connection.cursor() as cursor:
        cursor.execute("select count(*) from absurd.e_agents where event_name = %s", [f"approval:{waiting}"])
        assert cursor.fetchone()[0] == 1


def test_listen_needs_the_direct_connection(pgbouncer: str) -> None:
    """What DIRECT_DATABASE_URL is for: a LISTEN through transaction pooling does not hold its session."""
    import psycopg

    from django_absurd_agents.wakeup import CHANNEL

    with (
        psycopg.connect(pgbouncer, autocommit=True) as pooled,
        psycopg.connect(database_url(), autocommit=True) as poster,
    ):
        pooled.execute(f"LISTEN {CHANNEL}")
        poster.execute("select pg_notify(%s, 'agents')", [CHANNEL])
        assert list(pooled.notifies(timeout=1, stop_after=1)) == []
